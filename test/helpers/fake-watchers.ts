/** Watchers that connect nowhere: what a supervisor started, updated and stopped. */
import type { UserWatcher, WatcherContext, WatcherFactory } from '../../src/watch/types.js';

export class FakeWatcher implements UserWatcher {
  readonly calls: string[][] = [];
  stopped = false;
  connected = true;
  constructor(readonly user: string, public mailboxes: string[], readonly ctx: WatcherContext) {}
  setMailboxes(mailboxes: string[]): void {
    this.calls.push([...mailboxes]);
    this.mailboxes = [...mailboxes];
  }
  async stop(): Promise<void> {
    this.stopped = true;
    this.connected = false;
  }
}

export class FakeFactory implements WatcherFactory {
  readonly mode = 'notify' as const;
  readonly started: FakeWatcher[] = [];
  readonly failFor = new Set<string>();
  start(user: string, mailboxes: string[], ctx: WatcherContext): UserWatcher {
    if (this.failFor.has(user)) throw new Error(`cannot watch ${user}`);
    const w = new FakeWatcher(user, [...mailboxes], ctx);
    this.started.push(w);
    return w;
  }
  /** Running watchers by user (at most one per user, checked). */
  live(): Map<string, FakeWatcher> {
    const out = new Map<string, FakeWatcher>();
    for (const w of this.started) {
      if (w.stopped) continue;
      if (out.has(w.user)) throw new Error(`two running watchers for ${w.user}`);
      out.set(w.user, w);
    }
    return out;
  }
  liveUsers(): string[] {
    return [...this.live().keys()].sort();
  }
  mailboxes(user: string): string[] | undefined {
    return this.live().get(user)?.mailboxes;
  }
}
