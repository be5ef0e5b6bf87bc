/**
 * IDLE watcher (RFC 2177), for upstreams without NOTIFY (Cyrus 3.6) or where NOTIFY is not
 * wanted. IDLE watches only the selected mailbox, so each watched mailbox costs a connection:
 *
 * - INBOX and the next registered mailboxes, up to `idleMaxPerUser`, each get their own
 *   connection: `EXAMINE` (read-only: keeps \Recent, changes nothing), then `IDLE`. An
 *   `* n EXISTS` ends the IDLE (`DONE`), a `STATUS` of that mailbox reads UIDNEXT (the session
 *   itself learns no UIDs from EXISTS), and IDLE starts again. IDLE is also renewed every
 *   `idleRefreshMs` (default 25 min, below the 29 min clients use and the ≥ 30 min
 *   autologout), with a STATUS each time, which doubles as a liveness check.
 * - The mailboxes beyond that share one more connection that STATUSes each of them every
 *   `pollIntervalMs`.
 *
 * Trade-off: latency vs upstream connections. IDLE mailboxes see new mail at once (Cyrus with
 * idled) or ~0.5 s later (Dovecot), at the price of one connection (and, on Dovecot, one
 * imap process and inotify instance) per mailbox and user: a user with 5 pushed mailboxes
 * costs 5–6 connections, against 1 with NOTIFY. Polled mailboxes cost one connection per user
 * in total but are up to pollIntervalMs late. Mind the upstream's per-user/IP connection
 * limits (Dovecot mail_max_userip_connections, default 10, counts the user's own clients
 * too). NOTIFY, where the upstream has it, is better on both counts.
 *
 * Catch-up and back-off are those of every watcher connection (session.ts, tracker.ts): each
 * connection compares its first observation after a (re)connect with the stored state.
 */
import { quote } from '../imap/tokens.js';
import { encodeMailboxName } from '../push/mutf7.js';
import { ImapCommandError, type ImapConnection, type ImapResponse } from './imap-connection.js';
import { statusCommand } from './notify.js';
import { WatchSession, type WatcherConnectionSettings } from './session.js';
import { MailboxTracker, existsCount, normalizeMailboxList, parseSelectResponses, parseStatusResponse } from './tracker.js';
import type { ChangeSource, UserWatcher, WatcherContext, WatcherFactory } from './types.js';
import { watchMetrics, type WatchMetrics } from './watch-metrics.js';
import type { Logger } from '../ops/log.js';

export interface IdleWatcherOptions extends WatcherConnectionSettings {
  /** Connections (IDLE mailboxes) per user; the other mailboxes are polled. Default 5. */
  idleMaxPerUser?: number;
  /** STATUS interval for polled mailboxes, and the retry interval of missing ones (ms). Default 60 s. */
  pollIntervalMs?: number;
  /** IDLE is ended and restarted this often (ms). Default 25 min. */
  idleRefreshMs?: number;
}

interface Shared {
  tracker: MailboxTracker;
  opts: IdleWatcherOptions;
  metrics: WatchMetrics;
}

/** STATUS one mailbox; NO marks it missing. The answer itself is observed in onUntagged. */
async function statusOrMissing(conn: ImapConnection, mailbox: string, shared: Shared, log: Logger): Promise<boolean> {
  const r = await conn.command(statusCommand(mailbox));
  if (r.status === 'OK') return true;
  if (r.status === 'NO') {
    if (!shared.tracker.isMissing(mailbox)) log.info({ mailbox }, 'watched mailbox does not exist (yet); retrying later');
    shared.tracker.markMissing(mailbox);
    return false;
  }
  throw new ImapCommandError('STATUS', r);
}

function observeStatusLine(r: ImapResponse, watched: (mb: string) => boolean, shared: Shared, source: ChangeSource): void {
  const st = parseStatusResponse(r);
  if (st && watched(st.mailbox)) shared.tracker.observe(st.mailbox, st.status, source);
}

/** One mailbox: EXAMINE + IDLE on its own connection. */
class IdleMailboxSession extends WatchSession {
  /** An EXISTS arrived since the last STATUS was sent. */
  private dirty = false;

  constructor(
    user: string,
    readonly mailbox: string,
    private readonly shared: Shared,
    log: Logger,
  ) {
    super(user, shared.opts, 'idle', shared.metrics, log);
  }

  protected onUntagged(r: ImapResponse): void {
    if (existsCount(r) !== null) {
      this.dirty = true;
      this.wakeSleep();
      return;
    }
    observeStatusLine(r, (mb) => mb === this.mailbox, this.shared, 'idle');
  }

  protected async session(conn: ImapConnection): Promise<void> {
    const { tracker } = this.shared;
    const pollMs = this.shared.opts.pollIntervalMs ?? 60_000;
    await tracker.beginCatchUp([this.mailbox]);
    // EXAMINE until the mailbox exists (retrying every pollIntervalMs)
    for (;;) {
      this.throwIfStopped();
      const r = await conn.command(`EXAMINE ${quote(encodeMailboxName(this.mailbox))}`);
      if (r.status === 'OK') {
        this.dirty = false;
        const st = parseSelectResponses(r.untagged);
        if (tracker.observe(this.mailbox, st, 'idle') === 'incomplete') await this.status(conn);
        break;
      }
      if (r.status !== 'NO') throw new ImapCommandError('EXAMINE', r);
      if (!tracker.isMissing(this.mailbox)) this.log.info('watched mailbox does not exist (yet); retrying later');
      tracker.markMissing(this.mailbox);
      this.markReady();
      if (!(await this.sleep(pollMs))) return;
      if (conn.closed) throw await conn.whenClosed();
    }
    this.markReady();
    const refreshMs = this.shared.opts.idleRefreshMs ?? 25 * 60_000;
    for (;;) {
      this.throwIfStopped();
      if (!this.dirty) {
        const idle = await conn.idle();
        if (!this.dirty) await this.sleep(refreshMs); // woken by EXISTS, stop() or the connection's end
        if (conn.closed) throw await conn.whenClosed();
        const done = await idle.done();
        if (done.status !== 'OK') throw new ImapCommandError('IDLE', done);
        this.throwIfStopped();
      }
      // after new mail or the refresh: what is UIDNEXT now?
      await this.status(conn);
    }
  }

  protected override onConnectionClosed(): void {
    this.wakeSleep();
  }

  private async status(conn: ImapConnection): Promise<void> {
    this.dirty = false;
    await statusOrMissing(conn, this.mailbox, this.shared, this.log);
  }
}

/** The mailboxes beyond idleMaxPerUser: STATUS each every pollIntervalMs on one connection. */
class PollSession extends WatchSession {
  private needCatchUp: string[] = [];
  /**
   * Mailboxes were added after the current round took its list: another round follows at once. A wake while no
   * sleep is pending would be lost, and the new mailbox left unwatched for a whole interval.
   */
  private roundDue = false;

  constructor(
    user: string,
    private mailboxes: string[],
    private readonly shared: Shared,
    log: Logger,
  ) {
    super(user, shared.opts, 'idle', shared.metrics, log);
  }

  setMailboxes(list: string[]): void {
    const added = list.filter((m) => !this.mailboxes.includes(m));
    this.mailboxes = list;
    if (added.length > 0) {
      this.needCatchUp.push(...added);
      this.roundDue = true;
      if (this.ready) this.wakeSleep(); // poll the new ones now
    }
  }

  protected onUntagged(r: ImapResponse): void {
    observeStatusLine(r, (mb) => this.mailboxes.includes(mb), this.shared, 'poll');
  }

  protected async session(conn: ImapConnection): Promise<void> {
    this.needCatchUp = [...this.mailboxes]; // after a (re)connect, all of them
    await this.round(conn);
    this.markReady();
    const pollMs = this.shared.opts.pollIntervalMs ?? 60_000;
    for (;;) {
      if (!this.roundDue && !(await this.sleep(pollMs))) return;
      this.throwIfStopped();
      if (conn.closed) throw await conn.whenClosed();
      await this.round(conn);
    }
  }

  protected override onConnectionClosed(): void {
    this.wakeSleep();
  }

  private async round(conn: ImapConnection): Promise<void> {
    this.roundDue = false;
    if (this.needCatchUp.length > 0) await this.shared.tracker.beginCatchUp(this.needCatchUp.splice(0));
    for (const mb of [...this.mailboxes]) {
      this.throwIfStopped();
      await statusOrMissing(conn, mb, this.shared, this.log);
    }
  }
}

class IdleUserWatcher implements UserWatcher {
  private mailboxes: string[] = [];
  private readonly slots = new Map<string, IdleMailboxSession>();
  private poll: PollSession | null = null;
  private readonly stopping = new Set<Promise<void>>();
  private readonly shared: Shared;
  private readonly log: Logger;
  private stopped = false;

  constructor(
    readonly user: string,
    mailboxes: string[],
    ctx: WatcherContext,
    opts: IdleWatcherOptions,
    metrics: WatchMetrics,
    private readonly onStopped: (w: IdleUserWatcher) => void,
  ) {
    this.log = ctx.log.child({ user, watch: 'idle' });
    this.shared = { tracker: new MailboxTracker(user, ctx, metrics, this.log), opts, metrics };
    this.assign(normalizeMailboxList(mailboxes));
  }

  private get sessions(): WatchSession[] {
    return [...this.slots.values(), ...(this.poll ? [this.poll] : [])];
  }

  get connected(): boolean {
    const s = this.sessions;
    return !this.stopped && s.length > 0 && s.every((x) => x.connected);
  }

  /** Open upstream connections of this user. */
  get openConnections(): number {
    return this.sessions.filter((s) => s.open).length;
  }

  setMailboxes(mailboxes: string[]): void {
    if (this.stopped) return;
    const next = normalizeMailboxList(mailboxes);
    if (next.length === this.mailboxes.length && next.every((m, i) => m === this.mailboxes[i])) return;
    this.assign(next);
  }

  private retire(s: WatchSession): void {
    const p = s.stop().finally(() => this.stopping.delete(p));
    this.stopping.add(p);
  }

  private assign(list: string[]): void {
    const max = Math.max(1, this.shared.opts.idleMaxPerUser ?? 5);
    const idleSet = list.slice(0, max);
    const pollSet = list.slice(max);
    for (const m of this.mailboxes) if (!list.includes(m)) this.shared.tracker.forget(m);
    this.mailboxes = list;
    for (const [mb, s] of this.slots) {
      if (!idleSet.includes(mb)) {
        this.slots.delete(mb);
        this.retire(s);
      }
    }
    for (const mb of idleSet) {
      if (this.slots.has(mb)) continue;
      const s = new IdleMailboxSession(this.user, mb, this.shared, this.log.child({ mailbox: mb }));
      this.slots.set(mb, s);
      s.start();
    }
    if (pollSet.length > 0) {
      if (this.poll) this.poll.setMailboxes(pollSet);
      else {
        this.poll = new PollSession(this.user, pollSet, this.shared, this.log.child({ poll: true }));
        this.poll.start();
      }
    } else if (this.poll) {
      this.retire(this.poll);
      this.poll = null;
    }
  }

  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    for (const s of this.sessions) this.retire(s);
    this.slots.clear();
    this.poll = null;
    await Promise.all([...this.stopping]);
    await this.shared.tracker.flush();
    this.onStopped(this);
  }
}

export class IdleWatcherFactory implements WatcherFactory {
  readonly mode = 'idle' as const;
  private readonly watchers = new Set<IdleUserWatcher>();
  private readonly metrics: WatchMetrics;
  private readonly removeSource: () => void;

  constructor(private readonly opts: IdleWatcherOptions) {
    this.metrics = watchMetrics(opts.registry);
    this.removeSource = this.metrics.addSource('idle', () => {
      let users = 0;
      let connections = 0;
      for (const w of this.watchers) {
        if (w.connected) users++;
        connections += w.openConnections;
      }
      return { users, connections };
    });
  }

  start(user: string, mailboxes: string[], ctx: WatcherContext): UserWatcher {
    const w = new IdleUserWatcher(user, mailboxes, ctx, this.opts, this.metrics, (x) => this.watchers.delete(x));
    this.watchers.add(w);
    return w;
  }

  /** Stops every watcher and unregisters the gauges' source. */
  async close(): Promise<void> {
    await Promise.all([...this.watchers].map((w) => w.stop()));
    this.removeSource();
  }
}
