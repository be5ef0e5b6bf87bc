/**
 * A benchmark helper running in a forked child process, driven by request/answer messages over
 * the IPC channel. Parent: `ChildPeer.fork(script)` then `peer.call({ type, … })`. Child:
 * `serveRequests(handler)`. The child runs under the same node flags as the parent (tsx's loader),
 * minus profiling and inspector flags.
 */
import { fork, type ChildProcess } from 'node:child_process';

type Answer = { id: number; ok: true; result: unknown } | { id: number; ok: false; error: string };

export class ChildPeer {
  private seq = 0;
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  private gone: Error | undefined;
  readonly exited: Promise<void>;

  private constructor(
    readonly name: string,
    readonly child: ChildProcess,
  ) {
    child.on('message', (m: Answer) => {
      const w = this.waiting.get(m.id);
      if (!w) return;
      this.waiting.delete(m.id);
      clearTimeout(w.timer);
      if (m.ok) w.resolve(m.result);
      else w.reject(new Error(`${name}: ${m.error}`));
    });
    this.exited = new Promise<void>((resolve) => {
      child.once('exit', (code, signal) => {
        this.failAll(new Error(`${name} (pid ${child.pid}) exited (${signal ?? `code ${code}`})`));
        resolve();
      });
    });
    child.on('error', (err) => this.failAll(new Error(`${name}: ${err.message}`)));
  }

  private failAll(err: Error): void {
    this.gone ??= err;
    for (const w of this.waiting.values()) {
      clearTimeout(w.timer);
      w.reject(this.gone);
    }
    this.waiting.clear();
  }

  static fork(name: string, script: string, args: string[] = [], execArgvExtra: string[] = []): ChildPeer {
    const execArgv = process.execArgv.filter((a, i, all) => !/^--(cpu-prof|heap-prof|prof|inspect)/.test(a) && !/^--(cpu|heap)-prof-/.test(all[i - 1] ?? ''));
    const child = fork(script, args, { execArgv: [...execArgv, ...execArgvExtra], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    return new ChildPeer(name, child);
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  call<T>(msg: { type: string } & Record<string, unknown>, timeoutMs = 5 * 60_000): Promise<T> {
    if (this.gone) return Promise.reject(this.gone);
    const id = ++this.seq;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        reject(new Error(`${this.name}: no answer to ${msg.type} within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      this.waiting.set(id, { resolve: (v) => resolve(v as T), reject, timer });
      this.child.send({ ...msg, id });
    });
  }

  /** Ends the child (this one, by its own handle) and waits for it. */
  async stop(graceMs = 5000): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill('SIGTERM');
    const t = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    await this.exited;
    clearTimeout(t);
  }
}

/** Child side: answers the parent's requests with `handler`; exits when the parent goes away. */
export function serveRequests(handler: (msg: { type: string } & Record<string, unknown>) => Promise<unknown>): void {
  if (!process.send) throw new Error('this script is started by a benchmark (child_process.fork), not by hand');
  process.on('message', (m: { id: number; type: string } & Record<string, unknown>) => {
    handler(m).then(
      (result) => process.send!({ id: m.id, ok: true, result }),
      (err: unknown) => process.send!({ id: m.id, ok: false, error: err instanceof Error ? (err.stack ?? err.message) : String(err) }),
    );
  });
  process.on('disconnect', () => process.exit(0));
}
