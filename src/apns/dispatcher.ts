/**
 * Push dispatcher: turns mailbox changes into Mail pushes through an ApnsTransport (./types), and applies what APNs
 * answers (protocol notes §b error table).
 *
 *   notify({user, mailbox, changeId?, detectedAt?})
 *     → store.listByUser(user), keep registrations that push that mailbox (INBOX case-insensitively); when the
 *       store cannot be read (Redis down), the change is handled again later (1 s doubling to 30 s), not dropped
 *     → change guard (only with a changeId): one instance of many pushes a given change
 *     → per device (user + token): coalesce, queue, send, interpret the answer
 *
 * Coalescing, per device. The first change is pushed at once and opens a window (`coalesceWindowMs`, default 2 s);
 * changes inside the window are merged (union of mailboxes) into ONE follow-up sent when the window ends; a change
 * after the window opens a new one. A device has at most one request in flight and at most one waiting push: every
 * change, retry or back-off for the device merges into that waiting push, whose payload lists every merged mailbox.
 *
 * Queue bound. Waiting pushes (for a send slot, a window end, a retry, a throttle back-off, valid credentials) never
 * exceed `queueSize`. When a new one would, the oldest merged follow-up is dropped first (its device already got a
 * push in this window), then the oldest of anything; drops are counted and logged at most once per `logIntervalMs`.
 * At most `maxInFlight` requests are handed to the transport at once; one timer is armed for all waiting pushes.
 * Memory is therefore bounded by queueSize + maxInFlight + devices pushed within the last window, however slow or
 * absent APNs is.
 *
 * Answers:
 *   200                                   delivered
 *   410 (Unregistered, ExpiredToken)      store.remove(user, token, {unlessSeenAfter: timestamp}) (sent time if absent)
 *   400 BadDeviceToken                    store.remove(user, token)
 *   400 DeviceTokenNotForTopic            keep; alarm wrong_topic unless a push was delivered within wrongTopicGraceMs
 *   400 BadTopic, TopicDisallowed         keep; alarm wrong_topic (cleared by a 200 or credentialsChanged())
 *   403 (any reason)                      credentials fault: alarm bad_certificate, PAUSE all sending (waiting pushes
 *                                         stay, within the bound); resume on credentialsChanged(), or when a probe —
 *                                         one push every credentialProbeMs — gets any answer but 403/5xx
 *   429                                   back off this device for retryAfterMs (else throttleBackoffMs, 5 min); its
 *                                         push (with anything merged meanwhile) goes out afterwards
 *   5xx, transport error                  retry after retryAfterMs, else full-jitter exponential back-off
 *                                         (retryBaseMs·2^(n-1), capped at retryCapMs), up to maxAttempts sends;
 *                                         then give up (`failed`)
 *   anything else (400, 404, 405, 413…)   a bug on our side: log, no retry (`rejected`)
 * Nothing a transport returns or throws escapes: every promise the dispatcher starts is caught.
 *
 * Attempts: a waiting push counts the failed sends (5xx/transport) of the content it carries; merging a new change
 * into a push that is waiting for its retry keeps that count. 403 and 429 are not failures of the push.
 */
import { Registry } from 'prom-client';
import { silentLogger, shortToken, type Logger } from '../ops/log.js';
import type { MailboxRef, Registration, RegistrationStore } from '../store/types.js';
import { LocalChangeGuard, type ChangeGuard } from './change-guard.js';
import {
  createDispatcherMetrics,
  reasonLabel,
  statusLabel,
  transportKindLabel,
  type AlarmKind,
  type ChangeResult,
  type DispatcherMetrics,
  type DropKind,
  type PushResult,
  type RemovalReason,
} from './dispatcher-metrics.js';
import { buildNotification, mailboxKey, matchMailbox, refForName } from './payload.js';
import { FifoSet, fullJitterBackoff, LogLimiter, systemScheduler, Timeline, type Scheduler } from './queue.js';
import { ApnsTransportError, type ApnsNotification, type ApnsResponse, type ApnsTransport, type PushType } from './types.js';

/** A mailbox changed (from the mailbox watchers). */
export interface MailboxChange {
  user: string;
  /** Decoded (UTF-8) mailbox name. */
  mailbox: string;
  /** Identifies the change across instances (e.g. mailbox + UIDVALIDITY + UIDNEXT); enables the change guard. */
  changeId?: string;
  /** When the change was detected, ms since epoch (latency metric). */
  detectedAt?: number;
}

export interface DispatcherOptions {
  store: Pick<RegistrationStore, 'listByUser' | 'remove'>;
  transport: Pick<ApnsTransport, 'send'>;
  /** The certificate's topic (apns-topic); null: nothing is sent (counted as no_topic). */
  topic: () => string | null;
  /** Registry for the metrics (ignored when `metrics` is given); default: a private one. */
  registry?: Registry;
  metrics?: DispatcherMetrics;
  logger?: Logger;
  /** Duplicate suppression for changes with a changeId; default a LocalChangeGuard; null: none. */
  guard?: ChangeGuard | null;
  /** apns-push-type (default background). */
  pushType?: PushType;
  /** apns-priority (default 5). */
  priority?: 5 | 10;
  /** apns-expiration = now + this, in seconds; 0 = deliver now or never (default 1 day). */
  expirationMs?: number;
  /** Sends per push on 5xx/transport errors before giving up (default 8). */
  maxAttempts?: number;
  /** Default 2000 ms; 0 disables coalescing (every change is pushed once nothing is waiting for its device). */
  coalesceWindowMs?: number;
  /** Most waiting pushes (default 100 000). */
  queueSize?: number;
  /** Most requests handed to the transport at once (default 1000). */
  maxInFlight?: number;
  /** Retry back-off base (default 500 ms) and cap (default 60 s). */
  retryBaseMs?: number;
  retryCapMs?: number;
  /** Per-device back-off after a 429 without Retry-After (default 5 min). */
  throttleBackoffMs?: number;
  /** While paused by a 403: one probe push this often (default 5 min). */
  credentialProbeMs?: number;
  /** DeviceTokenNotForTopic raises the alarm only without a delivery in this long (default 10 min). */
  wrongTopicGraceMs?: number;
  /** Repeated warnings (drops, alarms, store errors) are logged at most once per this long (default 60 s). */
  logIntervalMs?: number;
  /** Clock and timers (default: Date.now and global timers). */
  scheduler?: Scheduler;
  /** For the back-off jitter (default Math.random). */
  random?: () => number;
}

/** The push-related settings of a loaded configuration, as dispatcher options. */
export function dispatcherSettings(config: {
  readonly apnsPushType: PushType;
  readonly apnsPriority: string | number;
  readonly apnsExpiration: number;
  readonly apnsMaxAttempts: number;
  readonly pushCoalesceWindow?: number;
  readonly pushQueueSize?: number;
}): Pick<DispatcherOptions, 'pushType' | 'priority' | 'expirationMs' | 'maxAttempts' | 'coalesceWindowMs' | 'queueSize'> {
  const out: Pick<DispatcherOptions, 'pushType' | 'priority' | 'expirationMs' | 'maxAttempts' | 'coalesceWindowMs' | 'queueSize'> = {
    pushType: config.apnsPushType,
    priority: Number(config.apnsPriority) === 10 ? 10 : 5,
    expirationMs: config.apnsExpiration,
    maxAttempts: config.apnsMaxAttempts,
  };
  if (config.pushCoalesceWindow !== undefined) out.coalesceWindowMs = config.pushCoalesceWindow;
  if (config.pushQueueSize !== undefined) out.queueSize = config.pushQueueSize;
  return out;
}

/** sendNow without a topic: there is no certificate to push with. */
export class NoTopicError extends Error {
  constructor() {
    super('no APNs topic: push is not configured (no certificate loaded)');
    this.name = 'NoTopicError';
  }
}

/** What an APNs answer means for the push (see the table above). */
export type AnswerKind =
  | 'delivered'
  | 'unregistered'
  | 'bad_token'
  | 'wrong_topic'
  | 'bad_certificate'
  | 'throttled'
  | 'retry'
  | 'rejected';

const WRONG_TOPIC_REASONS = new Set(['DeviceTokenNotForTopic', 'BadTopic', 'TopicDisallowed']);

export function classifyAnswer(res: Pick<ApnsResponse, 'status' | 'reason'>): AnswerKind {
  const { status, reason } = res;
  if (status === 200) return 'delivered';
  if (status === 410) return 'unregistered';
  if (status === 400) {
    if (reason === 'BadDeviceToken') return 'bad_token';
    if (typeof reason === 'string' && WRONG_TOPIC_REASONS.has(reason)) return 'wrong_topic';
    return 'rejected';
  }
  if (status === 403) return 'bad_certificate';
  if (status === 429) return 'throttled';
  if (status >= 500 && status <= 599) return 'retry';
  return 'rejected';
}

export interface DispatcherStats {
  /** Waiting pushes (≤ queueSize). */
  pending: number;
  /** Of which merged follow-ups waiting for their window end. */
  followups: number;
  inFlight: number;
  /** Devices with state (a window, a waiting push, a back-off or a request in flight). */
  devices: number;
  /** Sending paused by a 403. */
  paused: boolean;
  alarms: Record<AlarmKind, boolean>;
}

type Category = 'first' | 'followup' | 'retry';

interface Item {
  reg: Registration;
  /** mailboxKey -> ref, in the order they changed (retried content first). */
  changed: Map<string, MailboxRef>;
  /** Failed sends (5xx/transport) of this content. */
  failures: number;
  due: number;
  category: Category;
  /** Earliest detectedAt of the merged changes. */
  detectedAt: number | undefined;
  /** Who waits for this push to be done with (notifyAndWait): called once it is answered, given up or dropped. */
  done: Array<() => void>;
}

interface Device {
  key: string;
  user: string;
  token: string;
  /** The one waiting push. */
  pending: Item | null;
  /** The one request in flight. */
  sending: Item | null;
  /** End of the coalescing window (0: none). */
  windowEnd: number;
  /** No send before this (429 / retry back-off). */
  blockedUntil: number;
}

const MAX_DELAY_MS = 60 * 60 * 1000;

/** The push is done with (answered, given up or dropped): wake who waits for it. Idempotent. */
function release(item: Item | null | undefined): void {
  if (item) for (const f of item.done.splice(0)) f();
}

function waitFor(item: Item): Promise<void> {
  return new Promise((resolve) => item.done.push(resolve));
}

function optNumber(v: number | undefined, def: number, what: string, min: number): number {
  const n = v ?? def;
  if (typeof n !== 'number' || !Number.isFinite(n) || n < min) throw new RangeError(`dispatcher ${what} must be a number >= ${min}, got ${String(n)}`);
  return n;
}

function minDefined(a: number | undefined, b: number | undefined): number | undefined {
  if (a === undefined) return b;
  if (b === undefined) return a;
  return Math.min(a, b);
}

function firstOf<T>(s: Set<T>): T | undefined {
  const it = s.values().next();
  return it.done ? undefined : it.value;
}

function errText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function isResponse(v: unknown): v is ApnsResponse {
  return typeof v === 'object' && v !== null && typeof (v as { status?: unknown }).status === 'number';
}

function validDelay(ms: unknown): number | undefined {
  return typeof ms === 'number' && Number.isFinite(ms) && ms >= 0 ? Math.min(Math.floor(ms), MAX_DELAY_MS) : undefined;
}

export class PushDispatcher {
  private readonly store: DispatcherOptions['store'];
  private readonly transport: DispatcherOptions['transport'];
  private readonly topic: () => string | null;
  private readonly metrics: DispatcherMetrics;
  private readonly log: Logger;
  private readonly guard: ChangeGuard | null;
  private readonly scheduler: Scheduler;
  private readonly random: () => number;
  private readonly limiter: LogLimiter;
  private readonly pushType: PushType;
  private readonly priority: 5 | 10;
  private readonly expirationMs: number;
  private readonly maxAttempts: number;
  private readonly windowMs: number;
  private readonly queueSize: number;
  private readonly maxInFlight: number;
  private readonly retryBaseMs: number;
  private readonly retryCapMs: number;
  private readonly throttleMs: number;
  private readonly probeMs: number;
  private readonly wrongTopicGraceMs: number;

  private readonly devices = new Map<string, Device>();
  /** Devices whose waiting push is due and that have nothing in flight, in the order they became ready. */
  private readonly ready = new FifoSet<Device>();
  /** Devices with a waiting push, by kind, oldest first (the drop order). */
  private readonly followups = new Set<Device>();
  private readonly others = new Set<Device>();
  private readonly timeline: Timeline<Device>;
  private inFlight = 0;
  private pumping = false;

  private paused = false;
  private probeTimer: unknown = undefined;
  private probeDue = false;
  private probing = false;
  private readonly alarms: Record<AlarmKind, boolean> = { wrong_topic: false, bad_certificate: false };
  private lastDeliveredAt = Number.NEGATIVE_INFINITY;

  /** Changes whose registrations could not be read (store down), by user + mailbox: read again later, not dropped. */
  private readonly unreadable = new Map<string, { change: MailboxChange; done: Array<() => void> }>();
  private unreadableTimer: unknown = undefined;
  private unreadableDelayMs = 0;

  private closed = false;
  private finished = false;
  private flushDeadline = 0;
  private closing: Promise<void> | undefined;
  private onProgress: (() => void) | undefined;
  private readonly tasks = new Set<Promise<void>>();

  constructor(opts: DispatcherOptions) {
    this.store = opts.store;
    this.transport = opts.transport;
    this.topic = opts.topic;
    this.metrics = opts.metrics ?? createDispatcherMetrics(opts.registry ?? new Registry());
    this.log = (opts.logger ?? silentLogger()).child({ component: 'push' });
    this.scheduler = opts.scheduler ?? systemScheduler;
    this.guard = opts.guard === undefined ? new LocalChangeGuard({ clock: () => this.scheduler.now() }) : opts.guard;
    this.random = opts.random ?? Math.random;
    this.pushType = opts.pushType ?? 'background';
    if (this.pushType !== 'background' && this.pushType !== 'alert') throw new RangeError(`dispatcher pushType must be background or alert`);
    this.priority = opts.priority ?? 5;
    if (this.priority !== 5 && this.priority !== 10) throw new RangeError('dispatcher priority must be 5 or 10');
    this.expirationMs = optNumber(opts.expirationMs, 86_400_000, 'expirationMs', 0);
    this.maxAttempts = Math.floor(optNumber(opts.maxAttempts, 8, 'maxAttempts', 1));
    this.windowMs = optNumber(opts.coalesceWindowMs, 2000, 'coalesceWindowMs', 0);
    this.queueSize = Math.floor(optNumber(opts.queueSize, 100_000, 'queueSize', 1));
    this.maxInFlight = Math.floor(optNumber(opts.maxInFlight, 1000, 'maxInFlight', 1));
    this.retryBaseMs = optNumber(opts.retryBaseMs, 500, 'retryBaseMs', 1);
    this.retryCapMs = optNumber(opts.retryCapMs, 60_000, 'retryCapMs', 1);
    this.throttleMs = optNumber(opts.throttleBackoffMs, 300_000, 'throttleBackoffMs', 0);
    this.probeMs = optNumber(opts.credentialProbeMs, 300_000, 'credentialProbeMs', 1);
    this.wrongTopicGraceMs = optNumber(opts.wrongTopicGraceMs, 600_000, 'wrongTopicGraceMs', 0);
    this.limiter = new LogLimiter(optNumber(opts.logIntervalMs, 60_000, 'logIntervalMs', 0), () => this.scheduler.now());
    this.timeline = new Timeline<Device>(
      this.scheduler,
      (d) => {
        try {
          this.check(d);
        } catch (err) {
          this.log.error({ err: errText(err) }, 'BUG: push dispatcher timer failed');
        }
      },
      () => this.pump(),
    );
  }

  // ---------------------------------------------------------------- input

  /** Schedules pushes for a mailbox change. Never rejects; resolves once the pushes are scheduled (or skipped). */
  notify(change: MailboxChange): Promise<void> {
    return this.track(this.handleChange(change));
  }

  /**
   * notify, resolving only once every push of this change is done with: answered (whatever the answer), given up or
   * dropped. The watchers store a mailbox's new state only then, so that mail whose push dies with the process is
   * pushed by the catch-up of the next one. Never rejects.
   */
  async notifyAndWait(change: MailboxChange): Promise<void> {
    const waits: Promise<void>[] = [];
    await this.track(this.handleChange(change, waits));
    await Promise.all(waits);
  }

  private async handleChange(change: MailboxChange, waits?: Promise<void>[]): Promise<void> {
    try {
      if (this.closed) return this.changeDone('closed');
      if (
        change === null || typeof change !== 'object' ||
        typeof change.user !== 'string' || change.user === '' ||
        typeof change.mailbox !== 'string' || change.mailbox === '' ||
        (change.changeId !== undefined && (typeof change.changeId !== 'string' || change.changeId === ''))
      ) {
        this.warnLimited('invalid-change', {}, 'ignoring a malformed mailbox change');
        return this.changeDone('invalid');
      }
      const { user, mailbox, changeId } = change;
      const detectedAt = typeof change.detectedAt === 'number' && Number.isFinite(change.detectedAt) ? change.detectedAt : undefined;
      let regs: Registration[];
      try {
        regs = await this.store.listByUser(user);
      } catch (err) {
        this.warnLimited('store-list', { user, err: errText(err) }, 'cannot read registrations; trying the change again later');
        this.retryUnreadable(change, waits);
        return this.changeDone('store_error');
      }
      this.unreadableDelayMs = 0;
      const matches: Array<[Registration, MailboxRef]> = [];
      for (const reg of regs) {
        const ref = matchMailbox(reg, mailbox);
        if (ref) matches.push([reg, ref]);
      }
      if (matches.length === 0) return this.changeDone('no_device');
      if (changeId !== undefined && this.guard) {
        let mine = true;
        try {
          mine = (await this.guard.claim(user, changeId)) !== false;
        } catch (err) {
          this.metrics.guardErrors.inc();
          this.warnLimited('guard', { err: errText(err) }, 'change guard unavailable; pushing anyway (duplicates are harmless)');
        }
        if (!mine) {
          this.count('deduplicated', matches.length);
          return this.changeDone('deduplicated');
        }
      }
      if (this.closed) return this.changeDone('closed');
      // Pump after each device: pushes that can go at once do not occupy the queue bound.
      for (const [reg, ref] of matches) {
        this.schedule(reg, ref, detectedAt, waits);
        this.pump();
      }
      this.changeDone('scheduled');
    } catch (err) {
      this.log.error({ err: errText(err) }, 'BUG: push dispatcher failed handling a change');
    }
  }

  /**
   * The mail is there, only the registrations cannot be read now (Redis down): the change is handled again after
   * 1 s, doubling to 30 s while the store stays down, so that it is pushed once the store is back (the watcher has
   * moved on and will not report it again). One entry per user and mailbox, at most queueSize.
   */
  private retryUnreadable(change: MailboxChange, waits: Promise<void>[] | undefined): void {
    if (this.closed) return;
    const key = `${change.user}\u0000${change.mailbox}`;
    const entry = this.unreadable.get(key) ?? { change, done: [] };
    entry.change = change;
    this.unreadable.delete(key);
    if (this.unreadable.size >= this.queueSize) {
      const oldest = this.unreadable.entries().next().value;
      if (oldest !== undefined) {
        this.unreadable.delete(oldest[0]);
        for (const f of oldest[1].done) f();
      }
    }
    if (waits) waits.push(new Promise((resolve) => entry.done.push(resolve)));
    this.unreadable.set(key, entry);
    if (this.unreadableTimer !== undefined) return;
    this.unreadableDelayMs = Math.min(30_000, Math.max(1000, this.unreadableDelayMs * 2));
    this.unreadableTimer = this.scheduler.setTimeout(() => {
      this.unreadableTimer = undefined;
      const entries = [...this.unreadable.values()];
      this.unreadable.clear();
      for (const e of entries) void this.notifyAndWait(e.change).then(() => e.done.forEach((f) => f()));
    }, this.unreadableDelayMs);
  }

  private changeDone(result: ChangeResult): void {
    this.metrics.changes.inc({ result });
  }

  private schedule(reg: Registration, ref: MailboxRef, detectedAt: number | undefined, waits?: Promise<void>[]): void {
    const token = reg.deviceToken.toLowerCase();
    const key = `${reg.user}\u0000${token}`;
    let d = this.devices.get(key);
    if (!d) {
      d = { key, user: reg.user, token, pending: null, sending: null, windowEnd: 0, blockedUntil: 0 };
      this.devices.set(key, d);
    }
    const now = this.scheduler.now();
    if (d.pending) {
      const p = d.pending;
      if (reg.lastSeen >= p.reg.lastSeen) p.reg = reg;
      p.changed.set(mailboxKey(ref.name), ref);
      p.detectedAt = minDefined(p.detectedAt, detectedAt);
      if (waits) waits.push(waitFor(p));
      return;
    }
    let due: number;
    let category: Category;
    if (d.windowEnd > now) {
      due = d.windowEnd;
      category = 'followup';
    } else {
      due = now;
      category = 'first';
      d.windowEnd = now + this.windowMs;
      if (this.windowMs > 0) this.timeline.add(d.windowEnd, d);
    }
    due = Math.max(due, d.blockedUntil);
    const item: Item = { reg, changed: new Map([[mailboxKey(ref.name), ref]]), failures: 0, due, category, detectedAt, done: [] };
    if (waits) waits.push(waitFor(item));
    this.enqueue(d, item);
  }

  // ---------------------------------------------------------------- queue

  private get pendingCount(): number {
    return this.followups.size + this.others.size;
  }

  /** Makes `item` the device's waiting push (it has none), dropping another if the queue is full. */
  private enqueue(d: Device, item: Item): void {
    if (!this.admitDuringClose(item)) return release(item);
    while (this.pendingCount >= this.queueSize) {
      if (!this.dropOldest()) break;
    }
    d.pending = item;
    (item.category === 'followup' ? this.followups : this.others).add(d);
    this.metrics.queueDepth.set(this.pendingCount);
    if (item.due > this.scheduler.now()) this.timeline.add(item.due, d);
    this.check(d);
  }

  /** While closing, what is due by the flush deadline is sent now; the rest is dropped. */
  private admitDuringClose(item: Item): boolean {
    if (!this.closed) return true;
    if (this.finished || item.due > this.flushDeadline || this.paused) {
      this.countDrop('shutdown');
      return false;
    }
    item.due = Math.min(item.due, this.scheduler.now());
    return true;
  }

  /** Puts back a push that was sent but must go again at `due` (merged with whatever is waiting for the device). */
  private requeue(d: Device, item: Item, due: number): void {
    const p = d.pending;
    if (!p) {
      item.due = due;
      item.category = 'retry';
      this.enqueue(d, item);
      return;
    }
    const merged = new Map(item.changed);
    for (const [k, v] of p.changed) merged.set(k, v);
    p.changed = merged;
    p.done.push(...item.done.splice(0));
    if (item.reg.lastSeen > p.reg.lastSeen) p.reg = item.reg;
    p.failures = item.failures;
    p.detectedAt = minDefined(p.detectedAt, item.detectedAt);
    if (p.category === 'followup') {
      this.followups.delete(d);
      this.others.add(d);
    }
    p.category = 'retry';
    if (due > p.due) {
      p.due = due;
      if (this.closed && !this.admitDuringClose(p)) {
        this.takePending(d);
        return;
      }
      this.timeline.add(p.due, d);
    }
    this.check(d);
  }

  /** Takes the device's waiting push off the queue: to send it, or (`dropped`) to drop it. */
  private takePending(d: Device, dropped = true): Item | null {
    const item = d.pending;
    if (!item) return null;
    if (dropped) release(item);
    d.pending = null;
    this.followups.delete(d);
    this.others.delete(d);
    this.ready.delete(d);
    this.metrics.queueDepth.set(this.pendingCount);
    return item;
  }

  /** Drops the oldest merged follow-up, else the oldest waiting push. */
  private dropOldest(): boolean {
    const d = firstOf(this.followups) ?? firstOf(this.others);
    if (!d) return false;
    const item = this.takePending(d);
    if (item?.category === 'first') d.windowEnd = 0; // never pushed: its next change goes out at once
    this.countDrop(item?.category === 'followup' ? 'followup' : 'other');
    this.check(d);
    return true;
  }

  private countDrop(kind: DropKind): void {
    this.count('dropped');
    this.metrics.queueDropped.inc({ kind });
    const suppressed = this.limiter.hit(`drop-${kind}`);
    if (suppressed !== undefined) {
      this.log.warn(
        { kind, suppressed, queueSize: this.queueSize, pending: this.pendingCount },
        kind === 'shutdown' ? 'push dropped at shutdown' : 'push queue full: dropping the oldest waiting push',
      );
    }
  }

  /** Re-evaluates one device: ready to send, waiting, or idle (then forgotten once its window and back-off ended). */
  private check(d: Device): void {
    if (d.sending) return;
    const now = this.scheduler.now();
    if (d.pending) {
      if (d.pending.due <= now && !this.finished) this.ready.add(d);
      return;
    }
    this.ready.delete(d);
    if (d.windowEnd <= now && d.blockedUntil <= now && this.devices.get(d.key) === d) this.devices.delete(d.key);
  }

  // ---------------------------------------------------------------- sending

  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    try {
      const now = this.scheduler.now();
      while (this.inFlight < this.maxInFlight && this.ready.size > 0 && !this.finished) {
        let probe = false;
        if (this.paused) {
          if (!this.probeDue || this.probing) break;
          probe = true;
        }
        const d = this.ready.shift() as Device;
        if (!d.pending || d.sending || d.pending.due > now) continue;
        const item = this.takePending(d, false) as Item;
        if (probe) {
          this.probeDue = false;
          this.probing = true;
        }
        this.start(d, item, probe);
      }
    } catch (err) {
      this.log.error({ err: errText(err) }, 'BUG: push dispatcher pump failed');
    } finally {
      this.pumping = false;
    }
    this.onProgress?.();
  }

  private currentTopic(): string | null {
    try {
      const t = this.topic();
      return typeof t === 'string' && t !== '' ? t : null;
    } catch (err) {
      this.warnLimited('topic', { err: errText(err) }, 'reading the APNs topic failed');
      return null;
    }
  }

  private notification(reg: Registration, changed: MailboxRef[], topic: string): ApnsNotification {
    return buildNotification(reg, changed, {
      topic,
      pushType: this.pushType,
      priority: this.priority,
      expirationMs: this.expirationMs,
      now: this.scheduler.now(),
    });
  }

  private start(d: Device, item: Item, probe: boolean): void {
    const topic = this.currentTopic();
    if (topic === null) {
      this.count('no_topic');
      this.warnLimited('no-topic', {}, 'no APNs topic (certificate not loaded?): push not sent');
      if (probe) {
        this.probing = false;
        this.probeDue = true;
      }
      release(item);
      this.check(d);
      return;
    }
    const n = this.notification(item.reg, [...item.changed.values()], topic);
    d.sending = item;
    this.inFlight++;
    this.metrics.inFlight.set(this.inFlight);
    this.track(this.deliver(d, item, n, this.scheduler.now(), probe));
  }

  private async deliver(d: Device, item: Item, n: ApnsNotification, sentAt: number, probe: boolean): Promise<void> {
    let answer: unknown;
    let error: unknown;
    let answered = false;
    try {
      answer = await this.transport.send(n);
      answered = true;
    } catch (err) {
      error = err;
    }
    try {
      this.inFlight--;
      this.metrics.inFlight.set(this.inFlight);
      d.sending = null;
      if (probe) this.probing = false;
      if (answered && isResponse(answer)) {
        this.onAnswer(d, item, answer, sentAt, probe);
      } else {
        if (answered) error = new ApnsTransportError('protocol', 'the transport resolved without an APNs answer');
        this.onNoAnswer(d, item, error, probe);
      }
    } catch (err) {
      this.log.error({ err: errText(err) }, 'BUG: push dispatcher failed handling an APNs answer');
    }
    if (d.pending !== item) release(item); // not waiting again for a retry: done with
    try {
      this.check(d);
      this.pump();
    } catch (err) {
      this.log.error({ err: errText(err) }, 'BUG: push dispatcher failed after an APNs answer');
    }
  }

  private onAnswer(d: Device, item: Item, res: ApnsResponse, sentAt: number, probe: boolean): void {
    const kind = classifyAnswer(res);
    this.metrics.responses.inc({ status: statusLabel(res.status), reason: reasonLabel(res.reason) });
    const now = this.scheduler.now();
    if (probe && this.paused && kind !== 'bad_certificate' && kind !== 'retry') this.resume('a probe push was accepted');
    switch (kind) {
      case 'delivered':
        this.count('delivered');
        if (item.detectedAt !== undefined && now >= item.detectedAt) this.metrics.latency.observe((now - item.detectedAt) / 1000);
        this.delivered(now);
        return;
      case 'unregistered': {
        this.count('unregistered');
        const ts = typeof res.timestamp === 'number' && Number.isFinite(res.timestamp) ? res.timestamp : sentAt;
        this.track(this.removeRegistration(d.user, d.token, 'unregistered', ts));
        return;
      }
      case 'bad_token':
        this.count('bad_token');
        this.track(this.removeRegistration(d.user, d.token, 'bad_token', undefined));
        return;
      case 'wrong_topic':
        this.count('wrong_topic');
        this.wrongTopic(res.reason, d.token, now);
        return;
      case 'bad_certificate':
        this.count('bad_certificate');
        this.pause(res.reason);
        this.requeue(d, item, now);
        return;
      case 'throttled': {
        this.count('throttled');
        const wait = validDelay(res.retryAfterMs) ?? this.throttleMs;
        d.blockedUntil = Math.max(d.blockedUntil, now + wait);
        this.timeline.add(d.blockedUntil, d);
        this.infoLimited('throttled', { user: d.user, token: shortToken(d.token), waitMs: wait }, 'APNs throttled a device (429); backing off');
        this.requeue(d, item, d.blockedUntil);
        return;
      }
      case 'retry':
        if (probe && this.paused) this.armProbe();
        this.retryOrGiveUp(d, item, validDelay(res.retryAfterMs), `${res.status} ${res.reason ?? ''}`.trim());
        return;
      case 'rejected':
        this.count('rejected');
        this.errorLimited(
          `rejected-${statusLabel(res.status)}-${reasonLabel(res.reason)}`,
          { status: res.status, reason: res.reason, user: d.user, token: shortToken(d.token) },
          'APNs rejected a push (a bug in the request?); not retried',
        );
        return;
    }
  }

  private onNoAnswer(d: Device, item: Item, err: unknown, probe: boolean): void {
    const kind = err instanceof ApnsTransportError ? err.kind : 'other';
    this.metrics.responses.inc({ status: 'transport', reason: transportKindLabel(kind) });
    if (!(err instanceof ApnsTransportError)) {
      this.warnLimited('transport-bug', { err: errText(err) }, 'the APNs transport failed with an unexpected error');
    }
    if (probe && this.paused) this.armProbe();
    this.retryOrGiveUp(d, item, undefined, `transport ${kind}: ${errText(err)}`);
  }

  private retryOrGiveUp(d: Device, item: Item, retryAfterMs: number | undefined, why: string): void {
    item.failures++;
    if (item.failures >= this.maxAttempts) {
      this.count('failed');
      this.warnLimited('gave-up', { user: d.user, token: shortToken(d.token), attempts: item.failures, why }, 'giving up on a push');
      return;
    }
    this.count('retried');
    const delay = retryAfterMs ?? fullJitterBackoff(item.failures, this.retryBaseMs, this.retryCapMs, this.random);
    const due = this.scheduler.now() + delay;
    if (due > d.blockedUntil) {
      d.blockedUntil = due;
      this.timeline.add(due, d);
    }
    this.infoLimited('retry', { attempts: item.failures, delayMs: delay, why }, 'APNs push failed; retrying');
    this.requeue(d, item, due);
  }

  private delivered(now: number): void {
    this.lastDeliveredAt = now;
    this.setAlarm('wrong_topic', false);
  }

  private wrongTopic(reason: string | undefined, token: string, now: number): void {
    if (reason === 'DeviceTokenNotForTopic' && now - this.lastDeliveredAt < this.wrongTopicGraceMs) {
      this.warnLimited('not-for-topic', { token: shortToken(token) }, 'a device token belongs to another topic (registered elsewhere?); kept');
      return;
    }
    this.setAlarm('wrong_topic', true);
    this.errorLimited('wrong-topic', { reason }, 'APNs refuses the topic: the certificate does not match the topic pushed on (alarm)');
  }

  private async removeRegistration(user: string, token: string, reason: RemovalReason, unlessSeenAfter: number | undefined): Promise<void> {
    try {
      const removed = await this.store.remove(user, token, unlessSeenAfter === undefined ? {} : { unlessSeenAfter });
      if (!removed) {
        this.log.debug({ user, token: shortToken(token), reason }, 'registration kept (re-registered since, or already gone)');
        return;
      }
      this.metrics.removed.inc({ reason });
      this.log.info({ user, token: shortToken(token), reason }, 'registration removed on APNs answer');
      // What is still waiting for that device would only get the same answer.
      const d = this.devices.get(`${user}\u0000${token}`);
      if (d && this.takePending(d)) {
        this.count(reason);
        this.check(d);
      }
    } catch (err) {
      this.metrics.removeErrors.inc();
      this.warnLimited('store-remove', { user, token: shortToken(token), reason, err: errText(err) }, 'could not remove a registration');
    }
  }

  // ---------------------------------------------------------------- credentials

  private pause(reason: string | undefined): void {
    if (!this.paused) {
      this.paused = true;
      this.probeDue = false;
      this.setAlarm('bad_certificate', true);
      this.log.error(
        { reason, probeInMs: this.probeMs },
        'APNs refuses our credentials (403): push sending paused until the certificate is replaced (alarm)',
      );
    } else {
      this.errorLimited('bad-certificate', { reason }, 'APNs still refuses our credentials (403)');
    }
    this.armProbe();
  }

  private armProbe(): void {
    if (!this.paused || this.finished || this.probeTimer !== undefined || this.probeDue || this.probing) return;
    this.probeTimer = this.scheduler.setTimeout(() => {
      this.probeTimer = undefined;
      if (!this.paused || this.finished) return;
      this.probeDue = true;
      this.pump();
    }, this.probeMs);
  }

  private resume(why: string): void {
    if (!this.paused) return;
    this.paused = false;
    this.probeDue = false;
    if (this.probeTimer !== undefined) this.scheduler.clearTimeout(this.probeTimer);
    this.probeTimer = undefined;
    this.setAlarm('bad_certificate', false);
    this.log.info({ why, waiting: this.pendingCount }, 'push sending resumed');
  }

  /** New credentials were loaded: resume sending (if paused by a 403) and clear the alarms. */
  credentialsChanged(): void {
    try {
      this.resume('credentials changed');
      this.setAlarm('wrong_topic', false);
      this.pump();
    } catch (err) {
      this.log.error({ err: errText(err) }, 'BUG: push dispatcher failed resuming');
    }
  }

  private setAlarm(kind: AlarmKind, on: boolean): void {
    if (this.alarms[kind] === on) return;
    this.alarms[kind] = on;
    this.metrics.alarm.set({ kind }, on ? 1 : 0);
  }

  // ---------------------------------------------------------------- direct send

  /**
   * Sends one push now (the test-push admin command): no coalescing, no guard, no queue, no retry. The answer is
   * applied as usual (registration removal on 410/BadDeviceToken, alarms, pause/resume, metrics) before this
   * resolves with what APNs answered, or the ApnsTransportError when no answer came. Rejects only without a topic
   * (NoTopicError) or once closed.
   */
  async sendNow(reg: Registration, opts: { mailboxes?: string[] } = {}): Promise<ApnsResponse | ApnsTransportError> {
    if (this.closed) throw new Error('push dispatcher is closed');
    const topic = this.currentTopic();
    if (topic === null) {
      this.count('no_topic');
      throw new NoTopicError();
    }
    const refs: MailboxRef[] = [];
    const seen = new Set<string>();
    for (const name of opts.mailboxes ?? []) {
      const ref = refForName(reg, name);
      const k = mailboxKey(ref.name);
      if (!seen.has(k)) {
        seen.add(k);
        refs.push(ref);
      }
    }
    const token = reg.deviceToken.toLowerCase();
    const n = this.notification(reg, refs, topic);
    const sentAt = this.scheduler.now();
    let answer: unknown;
    let error: unknown;
    let answered = false;
    this.inFlight++;
    this.metrics.inFlight.set(this.inFlight);
    try {
      answer = await this.transport.send(n);
      answered = true;
    } catch (err) {
      error = err;
    } finally {
      this.inFlight--;
      this.metrics.inFlight.set(this.inFlight);
    }
    try {
      if (answered && isResponse(answer)) {
        const res = answer;
        const kind = classifyAnswer(res);
        this.metrics.responses.inc({ status: statusLabel(res.status), reason: reasonLabel(res.reason) });
        if (this.paused && kind !== 'bad_certificate' && kind !== 'retry') this.resume('a test push was accepted');
        const now = this.scheduler.now();
        switch (kind) {
          case 'delivered':
            this.count('delivered');
            this.delivered(now);
            break;
          case 'unregistered':
            this.count('unregistered');
            await this.removeRegistration(reg.user, token, 'unregistered', typeof res.timestamp === 'number' && Number.isFinite(res.timestamp) ? res.timestamp : sentAt);
            break;
          case 'bad_token':
            this.count('bad_token');
            await this.removeRegistration(reg.user, token, 'bad_token', undefined);
            break;
          case 'wrong_topic':
            this.count('wrong_topic');
            this.wrongTopic(res.reason, token, now);
            break;
          case 'bad_certificate':
            this.count('bad_certificate');
            this.pause(res.reason);
            break;
          case 'throttled':
            this.count('throttled');
            break;
          case 'retry':
            this.count('failed');
            break;
          case 'rejected':
            this.count('rejected');
            this.errorLimited('rejected-direct', { status: res.status, reason: res.reason }, 'APNs rejected a test push');
            break;
        }
        this.pump();
        return { ...res };
      }
      const err = answered
        ? new ApnsTransportError('protocol', 'the transport resolved without an APNs answer')
        : error instanceof ApnsTransportError
          ? error
          : new ApnsTransportError('protocol', `transport failed: ${errText(error)}`, { cause: error });
      this.metrics.responses.inc({ status: 'transport', reason: transportKindLabel(err.kind) });
      this.count('failed');
      return err;
    } catch (err) {
      this.log.error({ err: errText(err) }, 'BUG: push dispatcher failed handling a test push answer');
      return new ApnsTransportError('protocol', `internal error: ${errText(err)}`, { cause: err });
    }
  }

  // ---------------------------------------------------------------- lifecycle

  /**
   * Stops taking changes, sends what is due within `flushMs` (follow-ups whose window ends by then are sent early;
   * nothing while paused by a 403), waits for those answers up to the deadline, then stops all timers and drops
   * what is left (counted). Does not close the transport or the store.
   */
  close(opts: { flushMs?: number } = {}): Promise<void> {
    this.closing ??= this.shutdown(Math.max(0, opts.flushMs ?? 0));
    return this.closing;
  }

  private async shutdown(flushMs: number): Promise<void> {
    this.closed = true;
    const now = this.scheduler.now();
    this.flushDeadline = now + flushMs;
    for (const d of [...this.followups, ...this.others]) {
      const item = d.pending as Item;
      if (item.due <= this.flushDeadline && !this.paused) {
        item.due = Math.min(item.due, now);
        this.check(d);
      } else {
        this.takePending(d);
        this.countDrop('shutdown');
      }
    }
    this.pump();
    await new Promise<void>((resolve) => {
      let timer: unknown;
      const done = (): void => {
        this.onProgress = undefined;
        if (timer !== undefined) this.scheduler.clearTimeout(timer);
        resolve();
      };
      this.onProgress = () => {
        if (this.inFlight === 0 && (this.ready.size === 0 || this.paused)) done();
      };
      timer = flushMs > 0 ? this.scheduler.setTimeout(done, flushMs) : undefined;
      if (flushMs === 0) done();
      else this.onProgress();
    });
    this.finished = true;
    this.timeline.stop();
    if (this.probeTimer !== undefined) this.scheduler.clearTimeout(this.probeTimer);
    this.probeTimer = undefined;
    if (this.unreadableTimer !== undefined) this.scheduler.clearTimeout(this.unreadableTimer);
    this.unreadableTimer = undefined;
    for (const e of this.unreadable.values()) e.done.forEach((f) => f());
    this.unreadable.clear();
    for (const d of [...this.followups, ...this.others]) {
      this.takePending(d);
      this.countDrop('shutdown');
    }
    this.ready.clear();
    this.devices.clear();
    this.log.info({ inFlight: this.inFlight }, 'push dispatcher closed');
  }

  /** Resolves once nothing the dispatcher started (change handling, sends, removals) is running. Tests, shutdown. */
  async settled(): Promise<void> {
    while (this.tasks.size > 0) await Promise.allSettled([...this.tasks]);
  }

  stats(): DispatcherStats {
    return {
      pending: this.pendingCount,
      followups: this.followups.size,
      inFlight: this.inFlight,
      devices: this.devices.size,
      paused: this.paused,
      alarms: { ...this.alarms },
    };
  }

  // ---------------------------------------------------------------- helpers

  private track(p: Promise<void>): Promise<void> {
    const safe = p.catch((err: unknown) => {
      this.log.error({ err: errText(err) }, 'BUG: push dispatcher task failed');
    });
    this.tasks.add(safe);
    const drop = (): void => {
      this.tasks.delete(safe);
    };
    safe.then(drop, drop);
    return safe;
  }

  private readonly pushCounters = new Map<PushResult, { inc(n?: number): void }>();

  private count(result: PushResult, n = 1): void {
    let counter = this.pushCounters.get(result);
    if (!counter) {
      counter = this.metrics.pushes.labels({ result });
      this.pushCounters.set(result, counter);
    }
    counter.inc(n);
  }

  private warnLimited(key: string, fields: Record<string, unknown>, msg: string): void {
    const suppressed = this.limiter.hit(key);
    if (suppressed !== undefined) this.log.warn({ ...fields, suppressed }, msg);
  }

  private errorLimited(key: string, fields: Record<string, unknown>, msg: string): void {
    const suppressed = this.limiter.hit(key);
    if (suppressed !== undefined) this.log.error({ ...fields, suppressed }, msg);
  }

  private infoLimited(key: string, fields: Record<string, unknown>, msg: string): void {
    const suppressed = this.limiter.hit(key);
    if (suppressed !== undefined) this.log.info({ ...fields, suppressed }, msg);
  }
}
