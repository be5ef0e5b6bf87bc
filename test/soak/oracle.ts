/**
 * The soak's oracle: from what the load generator did (deliveries, registrations with their timing) and what the
 * mock APNs received, decide which pushes were lost, which were duplicates and which were wrong. Pure functions over
 * plain records; every time is ms since epoch on the soak runner's clock (the mock APNs runs in the same process).
 *
 * Definitions (what the report calls them):
 *
 * What the LOST criterion cannot see (by design, since coalescing may legitimately merge a change into a later push):
 * a dropped push followed by another push for the same device and mailbox (a later delivery's, or the follow-up of
 * the same coalescing window). With ~50 s between deliveries to one mailbox, a drop masked by a later delivery
 * shows up as LATE instead; one masked by its own window's follow-up is invisible (and harmless to the device).
 *
 * - A registration interval of (device D, mailbox M) is the time D had M in its registered list. It opens when the
 *   registering XAPPLEPUSHSERVICE is sent (`sentAt`; a push may legitimately appear from then on) and counts for
 *   deliveries only once the proxy has surely applied it (`armedAt`: the watchers reported connected for the
 *   registrations made before the load, the OK + an arm delay for later ones: a new watcher or a mailbox new to a
 *   watcher takes its baseline snapshot first, and mail delivered before that snapshot is, by design, not news).
 *   It closes when a re-registration without M is sent, or when the device is retired (the mock APNs answers 410 for
 *   it from then on): `endSentAt`, `endOkAt`.
 *
 * - Expected push: a delivery d (LMTP 250) to user U's mailbox M, started at s(d), and a device D of U whose (D, M)
 *   interval has armedAt <= s(d) <= endSentAt - removeGuardMs. For an expected pair, D must receive (HTTP 200 at the
 *   mock) at least one push whose mailboxes include M at a time >= s(d) — any such push, since coalescing merges
 *   several changes into one push. A pair without one by the end of the drain is LOST.
 *
 * - The mailboxes a push covers: `aps.m` (MD5s of the names) when present, else INBOX alone (a version-2
 *   registration gets `m` exactly when some changed mailbox is not INBOX).
 *
 * - WRONG push: to a token never registered, with another account id or topic than the device registered, listing
 *   an MD5 of no known mailbox, or covering a mailbox M at a time p outside every (D, M) interval stretched to
 *   [sentAt, endOkAt + wrongGraceMs] (the grace lets a push already waiting in a coalescing window or a retry when
 *   M was dropped go out). Archive is never registered by anyone: any push covering it is wrong.
 *
 * - LATE (reported, not a failure): an expected pair whose first push came more than `lateAfterMs` (the coalescing
 *   window + 5 s in the soak, plus the poll interval in idle mode) after s(d). Normal is Dovecot's ~0.5 s NOTIFY
 *   delay, IDLE's ~0 s (Cyrus with idled) or STATUS polling's up to one poll interval, the events hook's ~0 s — plus
 *   at most one window.
 *
 * - DUPLICATE push: a push that no delivery can account for, counted per (device, mailbox): the k-th push of (D, M)
 *   in time order is a duplicate when, after the earlier pushes of (D, M) were each paired with a distinct delivery
 *   to (U, M) started before them, no unpaired delivery started before it is left. (Greedy pairing in time order is
 *   optimal here, so this is the least number of pushes that cannot be explained one delivery each: coalescing only
 *   ever makes fewer pushes than deliveries, never more.) Failed deliveries count as possible causes too.
 *
 * The watch modes differ in how deliveries become changes, not in what a push must do, so the definitions above hold
 * for all three; only the timings differ (`modeTimings`):
 *   notify  one `* STATUS` per mailbox ~0.5 s after a delivery (several deliveries close together may make one);
 *   idle    an EXISTS on the mailbox's own IDLE connection, then a STATUS (one change may cover several deliveries);
 *           mailboxes beyond --idle-max-per-user are STATUSed every poll interval, so one change there covers every
 *           delivery of the interval and comes up to a poll interval late: the removal guard and LATE grow by it;
 *   events  one event per delivery (one per mailbox and transaction: an LMTP delivery to one recipient is one), each
 *           with its own change id: never fewer changes than deliveries, merged only by the coalescing window.
 * In every mode a change is pushed at once to a device that had no push within the coalescing window, else merged
 * into one push at the window's end: a push covers every mailbox changed in its window, so pushes <= deliveries per
 * (device, mailbox) holds everywhere, and a push beyond that is a duplicate whatever the mode.
 */

export const SOAK_MAILBOXES = ['INBOX', 'Work', 'Lists', 'Archive'] as const;
export type SoakMailbox = (typeof SOAK_MAILBOXES)[number];

export interface Interval {
  sentAt: number;
  okAt: number;
  armedAt: number;
  /** Unset while open. */
  endSentAt?: number;
  endOkAt?: number;
}

export interface DeviceRecord {
  token: string;
  user: string;
  accountId: string;
  /** mailbox → its registration intervals, in time order. */
  intervals: Map<string, Interval[]>;
  /** A registration of this device failed: its state is unknown from then on (nothing is expected after it). */
  taintedAt?: number;
  retiredAt?: number;
}

export interface DeliveryRecord {
  id: number;
  user: string;
  mailbox: string;
  startAt: number;
  endAt: number;
  ok: boolean;
}

/** A push the mock APNs answered 200. */
export interface PushRecord {
  at: number;
  token: string;
  topic: string | undefined;
  accountId: string | undefined;
  /** aps.m as sent, or null when absent. */
  m: string[] | null;
}

export interface OracleOptions {
  topic: string;
  /** md5 (lowercase hex) → mailbox name. */
  mailboxByMd5: Map<string, string>;
  /** Deliveries this close before the end of an interval are not expected to push (default 15 s). */
  removeGuardMs?: number;
  /** Pushes this long after an interval ended are still allowed (default 17 s). */
  wrongGraceMs?: number;
  /** A satisfied pair whose first push came later than this after s(d) is counted as late (default 7 s). */
  lateAfterMs?: number;
  /** Keep at most this many examples per kind (default 20). */
  examples?: number;
}

export type WrongKind = 'unknown_token' | 'account_id' | 'topic' | 'unknown_mailbox' | 'unregistered_mailbox';

export interface LostPush {
  delivery: number;
  user: string;
  mailbox: string;
  token: string;
  startAt: number;
  /** Pushes D got for M at all, and the last one before s(d) (for diagnosis). */
  pushesForMailbox: number;
  lastPushBefore: number | null;
}

export interface SlowPush {
  delivery: number;
  user: string;
  mailbox: string;
  token: string;
  startAt: number;
  latencyMs: number;
  /** When the (D, M) interval that made it expected was armed. */
  armedAt: number;
}

export interface WrongPush {
  kind: WrongKind;
  token: string;
  at: number;
  mailbox?: string;
  detail?: string;
}

export interface DuplicatePush {
  token: string;
  mailbox: string;
  at: number;
  /** Pushes and deliveries of (D, M) up to this push. */
  pushesSoFar: number;
  deliveriesBefore: number;
}

export interface OracleResult {
  deliveries: number;
  deliveriesOk: number;
  deliveriesFailed: number;
  /** (delivery, device) pairs that required a push. */
  expected: number;
  satisfied: number;
  /** Satisfied pairs whose first push came more than lateAfterMs after s(d) (reported, not a failure). */
  late: number;
  lateAfterMs: number;
  lost: number;
  pushes: number;
  /** (push, mailbox) pairs: a push covering two mailboxes counts twice. */
  pushMailboxes: number;
  duplicates: number;
  wrong: number;
  wrongByKind: Record<WrongKind, number>;
  /** ms from s(d) to the first push covering it, over satisfied pairs. */
  latencyMs: { p50: number; p90: number; p99: number; max: number } | null;
  lostExamples: LostPush[];
  wrongExamples: WrongPush[];
  duplicateExamples: DuplicatePush[];
  /** The slowest satisfied pairs (at most `examples`), slowest first. */
  slowest: SlowPush[];
}

export type WatchMode = 'notify' | 'idle' | 'events';

/** The timing options of `analyze` for a watch mode (see the header). */
export function modeTimings(
  watch: WatchMode,
  o: { coalesceWindowMs: number; pollIntervalMs: number },
): Required<Pick<OracleOptions, 'removeGuardMs' | 'wrongGraceMs' | 'lateAfterMs'>> {
  // how much later than its delivery a change may be noticed, beyond the mode's usual delay
  const detection = watch === 'idle' ? o.pollIntervalMs : 0;
  return {
    removeGuardMs: 15_000 + detection,
    wrongGraceMs: o.coalesceWindowMs + 15_000,
    lateAfterMs: o.coalesceWindowMs + 5000 + detection,
  };
}

/** The mailboxes a push covers (null: an MD5 of no known mailbox is listed; see `unknown`). */
export function coveredMailboxes(p: PushRecord, mailboxByMd5: Map<string, string>): { names: string[]; unknown: string[] } {
  if (p.m === null) return { names: ['INBOX'], unknown: [] };
  const names: string[] = [];
  const unknown: string[] = [];
  for (const h of p.m) {
    const name = mailboxByMd5.get(String(h).toLowerCase());
    if (name === undefined) unknown.push(String(h));
    else if (!names.includes(name)) names.push(name);
  }
  return { names, unknown };
}

function lowerBound(sorted: number[], x: number): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (sorted[mid]! < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Number of elements <= x in a sorted array. */
function countAtMost(sorted: number[], x: number): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (sorted[mid]! <= x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function percentile(sorted: number[], q: number): number {
  if (sorted.length === 0) return 0;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[i]!;
}

/** The (D, M) interval that makes a delivery started at `s` one that must be pushed, if any. */
export function expectingInterval(device: DeviceRecord, mailbox: string, s: number, removeGuardMs: number): Interval | undefined {
  if (device.taintedAt !== undefined && s >= device.taintedAt) return undefined;
  if (device.retiredAt !== undefined && s > device.retiredAt - removeGuardMs) return undefined;
  for (const iv of device.intervals.get(mailbox) ?? []) {
    if (s < iv.armedAt) continue;
    if (iv.endSentAt !== undefined && s > iv.endSentAt - removeGuardMs) continue;
    return iv;
  }
  return undefined;
}

/** Whether a push covering `mailbox` at time `at` is within a registration of it (stretched by the grace). */
export function allowsPush(device: DeviceRecord, mailbox: string, at: number, wrongGraceMs: number): boolean {
  if (device.taintedAt !== undefined && at >= device.taintedAt) {
    // state unknown since the failed registration: anything it ever registered may be pushed
    return (device.intervals.get(mailbox) ?? []).length > 0;
  }
  for (const iv of device.intervals.get(mailbox) ?? []) {
    if (at < iv.sentAt) continue;
    if (iv.endSentAt !== undefined && at > (iv.endOkAt ?? Number.POSITIVE_INFINITY) + wrongGraceMs) continue;
    return true;
  }
  return false;
}

export function analyze(
  devices: Iterable<DeviceRecord>,
  deliveries: readonly DeliveryRecord[],
  pushes: readonly PushRecord[],
  opts: OracleOptions,
): OracleResult {
  const removeGuardMs = opts.removeGuardMs ?? 15_000;
  const wrongGraceMs = opts.wrongGraceMs ?? 17_000;
  const maxExamples = opts.examples ?? 20;
  const lateAfterMs = opts.lateAfterMs ?? 7000;
  const byToken = new Map<string, DeviceRecord>();
  const byUser = new Map<string, DeviceRecord[]>();
  for (const d of devices) {
    byToken.set(d.token, d);
    const list = byUser.get(d.user);
    if (list) list.push(d);
    else byUser.set(d.user, [d]);
  }

  // pushes per (token, mailbox), in time order
  const key = (a: string, b: string) => `${a}\u0000${b}`;
  const pushTimes = new Map<string, number[]>();
  const wrongByKind: Record<WrongKind, number> = { unknown_token: 0, account_id: 0, topic: 0, unknown_mailbox: 0, unregistered_mailbox: 0 };
  const wrongExamples: WrongPush[] = [];
  let wrong = 0;
  let pushMailboxes = 0;
  const addWrong = (w: WrongPush) => {
    wrong++;
    wrongByKind[w.kind]++;
    if (wrongExamples.length < maxExamples) wrongExamples.push(w);
  };
  const sortedPushes = [...pushes].sort((a, b) => a.at - b.at);
  for (const p of sortedPushes) {
    const device = byToken.get(p.token);
    if (!device) {
      addWrong({ kind: 'unknown_token', token: p.token, at: p.at });
      continue;
    }
    // one push is wrong once, for its first problem
    if (p.topic !== opts.topic) {
      addWrong({ kind: 'topic', token: p.token, at: p.at, detail: String(p.topic) });
      continue;
    }
    if (p.accountId !== device.accountId) {
      addWrong({ kind: 'account_id', token: p.token, at: p.at, detail: String(p.accountId) });
      continue;
    }
    const { names, unknown } = coveredMailboxes(p, opts.mailboxByMd5);
    if (unknown.length > 0) {
      addWrong({ kind: 'unknown_mailbox', token: p.token, at: p.at, detail: unknown.join(',') });
      continue;
    }
    const outside = names.filter((mb) => !allowsPush(device, mb, p.at, wrongGraceMs));
    if (outside.length > 0) addWrong({ kind: 'unregistered_mailbox', token: p.token, at: p.at, mailbox: outside.join(',') });
    for (const mb of names) {
      if (outside.includes(mb)) continue;
      pushMailboxes++;
      const k = key(p.token, mb);
      const list = pushTimes.get(k);
      if (list) list.push(p.at);
      else pushTimes.set(k, [p.at]);
    }
  }

  // deliveries per (user, mailbox), start times sorted (all attempts: a failed one may have been stored anyway)
  const deliveryStarts = new Map<string, number[]>();
  for (const d of deliveries) {
    const k = key(d.user, d.mailbox);
    const list = deliveryStarts.get(k);
    if (list) list.push(d.startAt);
    else deliveryStarts.set(k, [d.startAt]);
  }
  for (const list of deliveryStarts.values()) list.sort((a, b) => a - b);

  // lost: every expected (delivery, device) pair needs a push covering the mailbox at or after s(d)
  let expected = 0;
  let satisfied = 0;
  let late = 0;
  const latencies: number[] = [];
  const slow: SlowPush[] = [];
  const lostExamples: LostPush[] = [];
  let lost = 0;
  for (const d of deliveries) {
    if (!d.ok) continue;
    for (const device of byUser.get(d.user) ?? []) {
      const iv = expectingInterval(device, d.mailbox, d.startAt, removeGuardMs);
      if (!iv) continue;
      expected++;
      const times = pushTimes.get(key(device.token, d.mailbox)) ?? [];
      const i = lowerBound(times, d.startAt);
      if (i < times.length) {
        satisfied++;
        const latencyMs = times[i]! - d.startAt;
        latencies.push(latencyMs);
        if (latencyMs > lateAfterMs) late++;
        slow.push({ delivery: d.id, user: d.user, mailbox: d.mailbox, token: device.token, startAt: d.startAt, latencyMs, armedAt: iv.armedAt });
        if (slow.length > 4 * maxExamples) {
          slow.sort((a, b) => b.latencyMs - a.latencyMs);
          slow.length = maxExamples;
        }
      } else {
        lost++;
        if (lostExamples.length < maxExamples) {
          lostExamples.push({
            delivery: d.id,
            user: d.user,
            mailbox: d.mailbox,
            token: device.token,
            startAt: d.startAt,
            pushesForMailbox: times.length,
            lastPushBefore: i > 0 ? times[i - 1]! : null,
          });
        }
      }
    }
  }

  // duplicates: pushes of (D, M) beyond one per delivery to (U, M) started before them
  let duplicates = 0;
  const duplicateExamples: DuplicatePush[] = [];
  for (const [k, times] of pushTimes) {
    const [token, mailbox] = k.split('\u0000') as [string, string];
    const device = byToken.get(token)!;
    const starts = deliveryStarts.get(key(device.user, mailbox)) ?? [];
    let paired = 0;
    times.forEach((at, idx) => {
      const available = countAtMost(starts, at);
      if (paired < available) {
        paired++;
        return;
      }
      duplicates++;
      if (duplicateExamples.length < maxExamples) {
        duplicateExamples.push({ token, mailbox, at, pushesSoFar: idx + 1, deliveriesBefore: available });
      }
    });
  }

  latencies.sort((a, b) => a - b);
  const okCount = deliveries.filter((d) => d.ok).length;
  return {
    deliveries: deliveries.length,
    deliveriesOk: okCount,
    deliveriesFailed: deliveries.length - okCount,
    expected,
    satisfied,
    late,
    lateAfterMs,
    lost,
    pushes: pushes.length,
    pushMailboxes,
    duplicates,
    wrong,
    wrongByKind,
    latencyMs:
      latencies.length === 0
        ? null
        : { p50: percentile(latencies, 0.5), p90: percentile(latencies, 0.9), p99: percentile(latencies, 0.99), max: latencies[latencies.length - 1]! },
    lostExamples,
    wrongExamples,
    duplicateExamples,
    slowest: slow.sort((a, b) => b.latencyMs - a.latencyMs).slice(0, maxExamples),
  };
}
