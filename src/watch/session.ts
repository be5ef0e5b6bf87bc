/**
 * One watcher connection that keeps itself up: connect (openUpstream settings), master login,
 * the mode's own session (NOTIFY SET, EXAMINE + IDLE, STATUS polls), keepalive NOOPs, and on
 * any disconnect or error a reconnect after an exponential back-off with jitter (1 s doubling
 * to 5 min by default; reset once a session is set up).
 *
 * Logging: the first failure of a streak is a warning, the following ones debug, and the
 * recovery is info, so that an upstream outage with thousands of watched users does not
 * flood the log. Nothing logged carries the master password (errors never include commands).
 */
import type { Registry } from 'prom-client';
import type { Logger } from '../ops/log.js';
import type { ClientEndpoint, UpstreamSettings } from '../proxy/upstream.js';
import { ImapConnection, type ImapResponse } from './imap-connection.js';
import { LoginError, masterLogin, type MasterCredentials } from './login.js';
import type { WatchMetrics, WatchMode } from './watch-metrics.js';

export interface BackoffOptions {
  /** First delay (ms). Default 1000. */
  initialMs?: number;
  /** Largest delay (ms). Default 300000 (5 min). */
  maxMs?: number;
}

/** Exponential back-off with jitter: delay n is min(max, initial·2ⁿ) scaled by 0.75–1.25 (capped at max). */
export class Backoff {
  private attempt = 0;
  private readonly initialMs: number;
  private readonly maxMs: number;

  constructor(opts: BackoffOptions = {}, private readonly random: () => number = Math.random) {
    this.initialMs = Math.max(1, opts.initialMs ?? 1000);
    this.maxMs = Math.max(this.initialMs, opts.maxMs ?? 300_000);
  }

  next(): number {
    const base = Math.min(this.maxMs, this.initialMs * 2 ** Math.min(this.attempt, 40));
    this.attempt++;
    return Math.round(Math.min(this.maxMs, base * (0.75 + this.random() * 0.5)));
  }

  reset(): void {
    this.attempt = 0;
  }

  get attempts(): number {
    return this.attempt;
  }
}

/** Settings common to every watcher connection (from the proxy's upstream and watch options). */
export interface WatcherConnectionSettings {
  /** The upstream as the proxy reaches it. clientIp 'id' becomes 'none'; 'proxy-v2' stays (with our own addresses). */
  upstream: UpstreamSettings;
  /** Addresses for a PROXY v2 header (default: this host's address towards the upstream). */
  endpoint?: ClientEndpoint;
  credentials: MasterCredentials;
  /** Prometheus registry for the watcher metrics (xaps_watchers, …). */
  registry?: Registry;
  /** Timeout of one command (ms). Default 60 s. */
  commandTimeoutMs?: number;
  /** A NOOP after this long without traffic (ms), so NATs and autologout never cut a quiet connection. Default 4 min. */
  keepaliveMs?: number;
  backoff?: BackoffOptions;
}

/** Thrown to end a session when it is stopped. */
class Stopped extends Error {}

export abstract class WatchSession {
  /** Set up and watching. */
  protected ready = false;
  protected conn: ImapConnection | null = null;
  private stopped = false;
  private running: Promise<void> | null = null;
  private sleeper: { timer: NodeJS.Timeout; wake: () => void } | null = null;
  private readonly backoff: Backoff;
  private failures = 0;

  constructor(
    readonly user: string,
    protected readonly settings: WatcherConnectionSettings,
    protected readonly mode: WatchMode,
    protected readonly metrics: WatchMetrics,
    protected readonly log: Logger,
  ) {
    this.backoff = new Backoff(settings.backoff);
  }

  get connected(): boolean {
    return this.ready && !!this.conn && !this.conn.closed;
  }

  /** An open upstream connection exists (for the connections gauge). */
  get open(): boolean {
    return !!this.conn && !this.conn.closed;
  }

  get isStopped(): boolean {
    return this.stopped;
  }

  start(): void {
    if (!this.running) this.running = this.run();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.wakeSleep();
    const conn = this.conn;
    if (conn) await conn.logout(2000);
    await this.running;
  }

  /** The mode's work on a logged-in connection; resolves or rejects when it ends. */
  protected abstract session(conn: ImapConnection): Promise<void>;

  /** Untagged responses of the current connection. */
  protected abstract onUntagged(r: ImapResponse): void;

  /** The current connection ended (e.g. to wake a sleeping session). */
  protected onConnectionClosed(): void {}

  /** Call once the session is set up: marks it connected and resets the back-off. */
  protected markReady(): void {
    this.ready = true;
    this.backoff.reset();
    if (this.failures > 0) this.log.info({ attempts: this.failures }, 'watcher reconnected');
    this.failures = 0;
  }

  /** Sleeps, or returns false at once when stopped (or woken by wakeSleep). */
  protected sleep(ms: number): Promise<boolean> {
    if (this.stopped) return Promise.resolve(false);
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        if (this.sleeper?.timer === timer) this.sleeper = null;
        resolve(!this.stopped);
      };
      const timer = setTimeout(done, ms);
      this.sleeper = { timer, wake: done };
    });
  }

  protected wakeSleep(): void {
    this.sleeper?.wake();
  }

  protected throwIfStopped(): void {
    if (this.stopped) throw new Stopped('stopped');
  }

  private async run(): Promise<void> {
    let first = true;
    while (!this.stopped) {
      if (!first) this.metrics.reconnects.inc({ mode: this.mode });
      first = false;
      let keepalive: NodeJS.Timeout | undefined;
      try {
        let current: ImapConnection | null = null;
        const conn = await ImapConnection.connect({
          upstream: this.settings.upstream,
          endpoint: this.settings.endpoint,
          commandTimeoutMs: this.settings.commandTimeoutMs,
          onUntagged: (r) => {
            if (current && this.conn === current) this.onUntagged(r);
          },
          onClose: () => {
            if (current && this.conn === current) this.onConnectionClosed();
          },
        });
        current = conn;
        this.conn = conn;
        if (this.stopped) break;
        try {
          await masterLogin(conn, this.user, this.settings.credentials);
        } catch (err) {
          if (err instanceof LoginError) this.metrics.loginFailed(err.reason);
          throw err;
        }
        this.throwIfStopped();
        const keepaliveMs = this.settings.keepaliveMs ?? 240_000;
        keepalive = setInterval(
          () => {
            if (!conn.closed && !conn.busy && conn.idleForMs >= keepaliveMs) conn.command('NOOP').catch(() => undefined);
          },
          Math.max(50, Math.floor(keepaliveMs / 4)),
        );
        keepalive.unref();
        await this.session(conn);
      } catch (err) {
        if (!this.stopped && !(err instanceof Stopped)) this.reportFailure(err as Error);
      } finally {
        clearInterval(keepalive);
        this.ready = false;
        const conn = this.conn;
        this.conn = null;
        conn?.close();
      }
      if (this.stopped) break;
      const delay = this.backoff.next();
      this.log.debug({ delayMs: delay }, 'watcher reconnects after a delay');
      await this.sleep(delay);
    }
    this.ready = false;
  }

  private reportFailure(err: Error): void {
    this.failures++;
    const info = {
      err: err.message,
      ...(err instanceof LoginError ? { reason: err.reason } : {}),
      attempt: this.failures,
    };
    if (this.failures === 1) this.log.warn(info, 'watcher connection lost or failed; reconnecting with back-off');
    else this.log.debug(info, 'watcher connection failed again');
  }
}
