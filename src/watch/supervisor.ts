/**
 * Watch supervisor: decides which users this instance watches and keeps one watcher per such user, watching the
 * union of the mailboxes the user's devices registered (INBOX always).
 *
 *   start()                    a first pass (below), then two timers:
 *   reconcile, every reconcileIntervalMs (10 s)
 *                              store.listUsers(); for every user we watch: re-read the registrations (mailboxes
 *                              changed → watcher.setMailboxes; none left, e.g. expired → stop + release the lease);
 *                              for every other user: take the lease if free and start a watcher
 *   renew, every renewIntervalMs (the lease manager's, 5 s)
 *                              renew the leases we hold (lost ones: stop that watcher, no release — not ours); then
 *                              try to take the users nobody watches (leases of a dead instance run out: that is how
 *                              its users move here, within ~ttl + one renew tick)
 *   registrationChanged(user)  right after a registration was stored: start or update that user's watcher now.
 *                              (A registration stored on another instance while we hold the lease reaches us with
 *                              the next reconcile.)
 *   stop()                     stop every watcher and release the leases.
 *
 * Cap: at most maxWatchers users here. Beyond it users stay unwatched by this instance (no lease taken, so another
 * instance may take them); `xaps_watchers_capped` is 1 meanwhile, `xaps_watchers_cap_hits_total` counts each user
 * turned away (once until watched), and a warning is logged at most once per logIntervalMs.
 *
 * Failures: nothing escapes a timer. A store or Redis error is logged (rate-limited) and the pass goes on with the
 * next user; what failed is retried on the next tick. With Redis unreachable the lease manager keeps reporting our
 * leases as held until they would have expired (./leases.ts), so watchers keep running that long, then stop.
 *
 * Events mode (factory null): no per-user watchers, no leases; the supervisor does nothing.
 *
 * Concurrency: everything about one user (take, update, drop, loss) runs one at a time (a per-user queue); passes
 * for different users run `concurrency` at a time. The cap is checked right before a watcher is started, with no
 * await in between, so it holds under concurrency.
 */
import type { Registry } from 'prom-client';
import { LogLimiter } from '../apns/queue.js';
import { silentLogger, type Logger } from '../ops/log.js';
import { compareStrings, mapLimit } from '../store/common.js';
import type { Registration, RegistrationStore } from '../store/types.js';
import { DEFAULT_LEASE_RENEW_MS, type LeaseTiming } from './leases.js';
import { supervisorMetrics, type SupervisorMetrics } from './supervisor-metrics.js';
import type {
  ChangeSink,
  LeaseManager,
  MailboxChange,
  MailboxStateStore,
  UserWatcher,
  WatcherContext,
  WatcherFactory,
} from './types.js';

/** What the supervisor needs of the registration store (watchers get it as their MailboxStateStore). */
export type SupervisorStore = Pick<RegistrationStore, 'listUsers' | 'listByUser'> & MailboxStateStore;

export interface SupervisorTimers {
  setInterval(fn: () => void, ms: number): unknown;
  clearInterval(handle: unknown): void;
}

export interface WatchSupervisorOptions {
  store: SupervisorStore;
  /** null in events mode: no per-user watchers. */
  factory: WatcherFactory | null;
  /** RedisLeaseManager / LocalLeaseManager (./leases.ts); their renewIntervalMs is used unless given here. */
  leases: LeaseManager & Partial<LeaseTiming>;
  /** Where the watchers' changes go (the push dispatcher's notify). */
  onChange: ChangeSink;
  /** Most users watched by this instance (--max-watchers). */
  maxWatchers: number;
  /** Default 10 s. */
  reconcileIntervalMs?: number;
  /** Default: the lease manager's renewIntervalMs, else 5 s. */
  renewIntervalMs?: number;
  log?: Logger;
  /** Registry for the metrics (ignored when `metrics` is given); default: unregistered metrics. */
  registry?: Registry;
  metrics?: SupervisorMetrics;
  /** Default: global timers, unref'd. */
  timers?: SupervisorTimers;
  /** For log rate limiting (default Date.now). */
  clock?: () => number;
  /** Repeated warnings at most once per this long (default 60 s). */
  logIntervalMs?: number;
  /** Users handled at once in a pass (default 16). */
  concurrency?: number;
  /** How long stopping one watcher may take before we go on without it (default 5 s). */
  stopTimeoutMs?: number;
}

export interface SupervisorStats {
  /** Users with a watcher here. */
  watched: number;
  /** Users with live registrations as of the last pass (+ registrationChanged since). */
  known: number;
  /** Users last seen leased by another instance. */
  elsewhere: number;
  /** Users left unwatched here because of the cap. */
  capped: number;
}

interface Held {
  watcher: UserWatcher;
  mailboxes: string[];
  /** Distinguishes successive watchers of one user (a loss reported for an older one is ignored). */
  gen: number;
}

const systemTimers: SupervisorTimers = {
  setInterval(fn, ms) {
    const t = setInterval(fn, ms);
    t.unref();
    return t;
  },
  clearInterval(handle) {
    clearInterval(handle as NodeJS.Timeout);
  },
};

/** The mailboxes to watch for a user: the union over the registrations, INBOX (any case) first as "INBOX", then sorted. */
export function watchedMailboxes(regs: readonly Pick<Registration, 'mailboxes'>[]): string[] {
  const names = new Set<string>();
  for (const r of regs) for (const m of r.mailboxes) if (m.name.toUpperCase() !== 'INBOX') names.add(m.name);
  return ['INBOX', ...[...names].sort(compareStrings)];
}

function sameList(a: readonly string[], b: readonly string[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

function errText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Marks where a failure came from, for the log. */
class StepError extends Error {
  constructor(readonly step: 'store' | 'leases', readonly original: unknown) {
    super(errText(original));
  }
}

async function step<T>(what: 'store' | 'leases', p: () => Promise<T>): Promise<T> {
  try {
    return await p();
  } catch (err) {
    throw new StepError(what, err);
  }
}

export class WatchSupervisor {
  private readonly store: SupervisorStore;
  private readonly factory: WatcherFactory | null;
  private readonly leases: LeaseManager & Partial<LeaseTiming>;
  private readonly onChange: ChangeSink;
  private readonly maxWatchers: number;
  private readonly reconcileIntervalMs: number;
  private readonly renewIntervalMs: number;
  private readonly log: Logger;
  private readonly metrics: SupervisorMetrics;
  private readonly timers: SupervisorTimers;
  private readonly limiter: LogLimiter;
  private readonly concurrency: number;
  private readonly stopTimeoutMs: number;
  private readonly removeSource: () => void;

  private readonly held = new Map<string, Held>();
  /** Users with live registrations (last listUsers, plus registrationChanged since). */
  private known = new Set<string>();
  /** Users whose lease another instance held when we last tried. */
  private readonly elsewhere = new Set<string>();
  /** Users turned away by the cap (not yet watched since). */
  private readonly capped = new Set<string>();
  private readonly queues = new Map<string, Promise<void>>();
  private gen = 0;
  private started = false;
  private stopped = false;
  private handles: unknown[] = [];
  private reconcileRun: Promise<void> | null = null;
  private reconcileNext: Promise<void> | null = null;
  private renewRun: Promise<void> | null = null;
  private stopPromise: Promise<void> | undefined;

  constructor(opts: WatchSupervisorOptions) {
    if (!Number.isSafeInteger(opts.maxWatchers) || opts.maxWatchers < 0) {
      throw new RangeError(`maxWatchers must be a non-negative integer, got ${String(opts.maxWatchers)}`);
    }
    this.store = opts.store;
    this.factory = opts.factory;
    this.leases = opts.leases;
    this.onChange = opts.onChange;
    this.maxWatchers = opts.maxWatchers;
    this.reconcileIntervalMs = positive(opts.reconcileIntervalMs ?? 10_000, 'reconcileIntervalMs');
    this.renewIntervalMs = positive(opts.renewIntervalMs ?? opts.leases.renewIntervalMs ?? DEFAULT_LEASE_RENEW_MS, 'renewIntervalMs');
    this.log = (opts.log ?? silentLogger()).child({ component: 'watch', instance: opts.leases.instanceId });
    this.metrics = opts.metrics ?? supervisorMetrics(opts.registry);
    this.timers = opts.timers ?? systemTimers;
    this.limiter = new LogLimiter(opts.logIntervalMs ?? 60_000, opts.clock ?? Date.now);
    this.concurrency = Math.max(1, Math.floor(opts.concurrency ?? 16));
    this.stopTimeoutMs = positive(opts.stopTimeoutMs ?? 5000, 'stopTimeoutMs');
    this.removeSource = this.metrics.addSource(() => ({ watched: this.held.size, capped: this.capped.size }));
  }

  // ---------------------------------------------------------------- public

  /** First pass (watchers for every stored user we get the lease of), then the timers. Never rejects. */
  async start(): Promise<void> {
    if (this.started || this.stopped) return;
    this.started = true;
    if (!this.factory) {
      this.log.info('no per-user watchers (events mode)');
      return;
    }
    await this.reconcile();
    if (this.stopped) return;
    this.handles.push(
      this.timers.setInterval(() => this.tick('reconcile'), this.reconcileIntervalMs),
      this.timers.setInterval(() => this.tick('renew'), this.renewIntervalMs),
    );
    this.log.info(
      { mode: this.factory.mode, watched: this.held.size, users: this.known.size, maxWatchers: this.maxWatchers },
      'watch supervisor started',
    );
  }

  /**
   * A registration of `user` was stored: start or update that user's watcher now. Never rejects; resolves when
   * done (tests), callers may ignore it.
   */
  registrationChanged(user: string): Promise<void> {
    if (this.stopped || !this.factory || typeof user !== 'string' || user === '') return Promise.resolve();
    this.known.add(user);
    return this.forUser(user).then(() => this.reportCap());
  }

  /** One reconcile pass (also run by the timer); a call during a pass runs one more after it. Never rejects. */
  reconcile(): Promise<void> {
    if (this.stopped || !this.factory) return Promise.resolve();
    if (this.reconcileRun) {
      this.reconcileNext ??= this.reconcileRun.then(() => {
        this.reconcileNext = null;
        return this.reconcile();
      });
      return this.reconcileNext;
    }
    const run = this.guard('reconcile', () => this.reconcileOnce()).finally(() => {
      this.reconcileRun = null;
    });
    this.reconcileRun = run;
    return run;
  }

  /** One renew tick (also run by the timer): renew held leases, drop lost ones, take free ones. Never rejects. */
  renewLeases(): Promise<void> {
    if (this.stopped || !this.factory) return Promise.resolve();
    if (this.renewRun) return this.renewRun;
    const run = this.guard('renew', () => this.renewOnce()).finally(() => {
      this.renewRun = null;
    });
    this.renewRun = run;
    return run;
  }

  /** Stops every watcher and releases our leases. Idempotent; never rejects. */
  stop(): Promise<void> {
    this.stopPromise ??= (async () => {
      this.stopped = true;
      for (const h of this.handles.splice(0)) this.timers.clearInterval(h);
      await Promise.allSettled([this.reconcileRun, this.reconcileNext, this.renewRun].filter((p) => p !== null));
      await Promise.allSettled([...this.queues.values()]);
      const all = [...this.held];
      this.held.clear();
      this.capped.clear();
      await mapLimit(all, 64, async ([user, h]) => {
        await this.stopWatcher(user, h);
        await this.releaseLease(user);
      });
      this.removeSource();
      if (this.factory) this.log.info({ stopped: all.length }, 'watch supervisor stopped');
    })();
    return this.stopPromise;
  }

  /** Users watched here, sorted. */
  watchedUsers(): string[] {
    return [...this.held.keys()].sort(compareStrings);
  }

  /** The user's watcher here is connected and watching. */
  isConnected(user: string): boolean {
    return this.held.get(user)?.watcher.connected ?? false;
  }

  /** The mailboxes watched for `user` here (undefined: not watched here). */
  mailboxesOf(user: string): string[] | undefined {
    const h = this.held.get(user);
    return h ? [...h.mailboxes] : undefined;
  }

  stats(): SupervisorStats {
    return { watched: this.held.size, known: this.known.size, elsewhere: this.elsewhere.size, capped: this.capped.size };
  }

  // ---------------------------------------------------------------- passes

  private tick(which: 'reconcile' | 'renew'): void {
    try {
      if (which === 'reconcile') {
        if (!this.reconcileRun) void this.reconcile();
      } else if (!this.renewRun) {
        void this.renewLeases();
      }
    } catch (err) {
      this.log.error({ err: errText(err) }, 'BUG: watch supervisor timer failed');
    }
  }

  private async guard(what: string, fn: () => Promise<void>): Promise<void> {
    try {
      await fn();
    } catch (err) {
      this.log.error({ err: errText(err), pass: what }, 'BUG: watch supervisor pass failed');
    }
  }

  private async reconcileOnce(): Promise<void> {
    let users: string[];
    try {
      users = await this.store.listUsers();
    } catch (err) {
      this.warnLimited('store', { err: errText(err) }, 'cannot list registered users; watchers unchanged, retrying next pass');
      return;
    }
    if (this.stopped) return;
    const known = new Set(users);
    this.known = known;
    for (const u of this.elsewhere) if (!known.has(u)) this.elsewhere.delete(u);
    for (const u of this.capped) if (!known.has(u) && !this.held.has(u)) this.capped.delete(u);
    // Users we watch first (dropping those without registrations makes room under the cap), then the others.
    await mapLimit([...this.held.keys()], this.concurrency, (u) => this.forUser(u));
    if (this.stopped) return;
    await mapLimit(users.filter((u) => !this.held.has(u)), this.concurrency, (u) => this.forUser(u));
    this.reportCap();
  }

  private async renewOnce(): Promise<void> {
    const snapshot = new Map([...this.held].map(([u, h]) => [u, h.gen]));
    if (snapshot.size > 0) {
      let lost: string[] = [];
      try {
        lost = await this.leases.renew([...snapshot.keys()]);
      } catch (err) {
        this.warnLimited('leases', { err: errText(err) }, 'cannot renew watcher leases; retrying next tick');
      }
      await Promise.all(lost.map((user) => this.queue(user, async () => {
        const h = this.held.get(user);
        if (!h || h.gen !== snapshot.get(user)) return;
        this.held.delete(user);
        this.elsewhere.add(user);
        this.metrics.losses.inc();
        this.log.warn({ user }, 'watcher lease lost (another instance has it, or Redis was unreachable too long); watcher stopped');
        await this.stopWatcher(user, h);
      })));
    }
    if (this.stopped) return;
    const free = [...this.known].filter((u) => !this.held.has(u));
    await mapLimit(free, this.concurrency, (u) => this.forUser(u));
    this.reportCap();
  }

  // ---------------------------------------------------------------- one user

  /** Runs `fn` after whatever is queued for `user`; the queue never holds a rejection. */
  private queue(user: string, fn: () => Promise<void>): Promise<void> {
    const prev = this.queues.get(user) ?? Promise.resolve();
    const run = prev.then(fn);
    const tail = run.catch(() => undefined);
    this.queues.set(user, tail);
    void tail.then(() => {
      if (this.queues.get(user) === tail) this.queues.delete(user);
    });
    return run;
  }

  /** syncUser in the user's queue, errors logged. */
  private forUser(user: string): Promise<void> {
    return this.queue(user, () => this.syncUser(user)).catch((err: unknown) => {
      if (err instanceof StepError) {
        const msg = err.step === 'store'
          ? 'cannot read registrations; retrying next pass'
          : 'cannot take or check a watcher lease; retrying next pass';
        this.warnLimited(err.step, { user, err: err.message }, msg);
      } else {
        this.log.error({ user, err: errText(err) }, 'BUG: watch supervisor failed on a user');
      }
    });
  }

  /** Brings one user in line: update or drop our watcher, or take the lease and start one. */
  private async syncUser(user: string): Promise<void> {
    const factory = this.factory;
    if (this.stopped || !factory) return;
    const h = this.held.get(user);
    if (h) {
      const regs = await step('store', () => this.store.listByUser(user));
      if (this.stopped || this.held.get(user) !== h) return;
      if (regs.length === 0) {
        this.held.delete(user);
        this.known.delete(user);
        this.log.info({ user }, 'no live registrations left; watcher stopped');
        await this.stopWatcher(user, h);
        await this.releaseLease(user);
        return;
      }
      const mailboxes = watchedMailboxes(regs);
      if (!sameList(mailboxes, h.mailboxes)) {
        h.mailboxes = mailboxes;
        try {
          h.watcher.setMailboxes([...mailboxes]);
          this.log.debug({ user, mailboxes: mailboxes.length }, 'watched mailboxes changed');
        } catch (err) {
          this.log.error({ user, err: errText(err) }, 'watcher refused its new mailboxes');
        }
      }
      return;
    }

    if (this.held.size >= this.maxWatchers) {
      this.turnAway(user);
      return;
    }
    const acquired = await step('leases', () => this.leases.acquire(user));
    if (!acquired) {
      this.elsewhere.add(user);
      this.capped.delete(user);
      return;
    }
    let regs: Registration[];
    try {
      regs = this.stopped ? [] : await step('store', () => this.store.listByUser(user));
    } catch (err) {
      await this.releaseLease(user);
      throw err;
    }
    if (this.stopped || regs.length === 0) {
      await this.releaseLease(user);
      if (regs.length === 0) {
        this.known.delete(user);
        this.elsewhere.delete(user);
        this.capped.delete(user);
      }
      return;
    }
    // No await between this check and held.set: the cap holds however many users are handled at once.
    if (this.held.size >= this.maxWatchers) {
      await this.releaseLease(user);
      this.turnAway(user);
      return;
    }
    const mailboxes = watchedMailboxes(regs);
    let watcher: UserWatcher;
    try {
      watcher = factory.start(user, [...mailboxes], this.contextFor(user));
    } catch (err) {
      this.log.error({ user, err: errText(err) }, 'cannot start a watcher; retrying next pass');
      await this.releaseLease(user);
      return;
    }
    this.held.set(user, { watcher, mailboxes, gen: ++this.gen });
    this.capped.delete(user);
    if (this.elsewhere.delete(user)) {
      this.metrics.handovers.inc();
      this.log.info({ user, mailboxes: mailboxes.length }, 'took over the watcher of a user from another instance');
    } else {
      this.log.debug({ user, mailboxes: mailboxes.length }, 'watching user');
    }
  }

  private turnAway(user: string): void {
    if (this.elsewhere.has(user) || this.capped.has(user)) return;
    this.capped.add(user);
    this.metrics.capHits.inc();
  }

  private reportCap(): void {
    if (this.capped.size === 0) return;
    this.warnLimited(
      'cap',
      { unwatched: this.capped.size, watched: this.held.size, maxWatchers: this.maxWatchers },
      'watcher cap reached: users left unwatched by this instance (raise --max-watchers or add instances)',
    );
  }

  private contextFor(user: string): WatcherContext {
    return {
      onChange: (change: MailboxChange) => {
        try {
          return this.onChange(change);
        } catch (err) {
          this.log.error({ user, err: errText(err) }, 'change sink failed');
          return undefined;
        }
      },
      states: this.store,
      log: this.log.child({ user }),
    };
  }

  private async stopWatcher(user: string, h: Held): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        Promise.resolve().then(() => h.watcher.stop()),
        new Promise<void>((resolve) => {
          timer = setTimeout(() => {
            this.log.warn({ user, timeoutMs: this.stopTimeoutMs }, 'watcher did not stop in time; going on without it');
            resolve();
          }, this.stopTimeoutMs);
          timer.unref();
        }),
      ]);
    } catch (err) {
      this.log.warn({ user, err: errText(err) }, 'watcher failed to stop cleanly');
    } finally {
      if (timer) clearTimeout(timer);
    }
  }

  private async releaseLease(user: string): Promise<void> {
    try {
      await this.leases.release(user);
    } catch (err) {
      // It runs out by itself within the lease ttl.
      this.warnLimited('leases', { user, err: errText(err) }, 'cannot release a watcher lease; it will expire');
    }
  }

  private warnLimited(key: string, fields: Record<string, unknown>, msg: string): void {
    const suppressed = this.limiter.hit(key);
    if (suppressed !== undefined) this.log.warn({ ...fields, ...(suppressed > 0 ? { suppressed } : {}) }, msg);
  }
}

function positive(n: number, what: string): number {
  if (typeof n !== 'number' || !Number.isFinite(n) || n <= 0) throw new RangeError(`${what} must be a positive number, got ${String(n)}`);
  return n;
}
