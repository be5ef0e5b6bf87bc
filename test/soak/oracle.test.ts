/** The soak's oracle and memory verdict on hand-made records: what counts as lost, duplicate, wrong and flat. */
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { analyze, modeTimings, SOAK_MAILBOXES, type DeliveryRecord, type DeviceRecord, type Interval, type PushRecord } from './oracle.js';
import { memoryVerdict, metricByLabel, metricSum, type MemorySample } from './memory.js';

const md5 = (s: string) => createHash('md5').update(s, 'utf8').digest('hex');
const TOPIC = 'com.apple.mail.XServer.test';
const OPTS = { topic: TOPIC, mailboxByMd5: new Map(SOAK_MAILBOXES.map((m) => [md5(m), m] as [string, string])), removeGuardMs: 1000, wrongGraceMs: 1000 };
const T = 'a1'.repeat(32);
const T2 = 'b2'.repeat(32);

function device(token: string, user: string, intervals: Record<string, Interval[]>, extra: Partial<DeviceRecord> = {}): DeviceRecord {
  return { token, user, accountId: `ACC-${token.slice(0, 4)}`, intervals: new Map(Object.entries(intervals)), ...extra };
}
const open = (from: number): Interval => ({ sentAt: from, okAt: from, armedAt: from });
let nextId = 0;
const delivery = (user: string, mailbox: string, startAt: number, ok = true): DeliveryRecord => ({ id: ++nextId, user, mailbox, startAt, endAt: startAt + 10, ok });
const push = (token: string, at: number, mailboxes: string[] | null, over: Partial<PushRecord> = {}): PushRecord => ({
  at,
  token,
  topic: TOPIC,
  accountId: `ACC-${token.slice(0, 4)}`,
  m: mailboxes === null ? null : mailboxes.map(md5),
  ...over,
});

describe('soak oracle', () => {
  const alice = device(T, 'alice', { INBOX: [open(0)], Work: [open(0)] });

  it('a delivery followed by a push covering its mailbox is satisfied; INBOX is what a push without "m" covers', () => {
    const r = analyze([alice], [delivery('alice', 'INBOX', 100), delivery('alice', 'Work', 5000)], [push(T, 600, null), push(T, 5500, ['Work'])], OPTS);
    expect(r).toMatchObject({ expected: 2, satisfied: 2, lost: 0, duplicates: 0, wrong: 0, pushes: 2 });
    expect(r.latencyMs).toEqual({ p50: 500, p90: 500, p99: 500, max: 500 });
  });

  it('no push, or only one before the delivery started, is a lost push', () => {
    const r = analyze([alice], [delivery('alice', 'Work', 1000)], [push(T, 900, ['Work']), push(T, 1200, null)], OPTS);
    expect(r.lost).toBe(1);
    expect(r.lostExamples[0]).toMatchObject({ user: 'alice', mailbox: 'Work', token: T, pushesForMailbox: 1, lastPushBefore: 900 });
  });

  it('coalescing: one push after two deliveries serves both, and is no duplicate', () => {
    const r = analyze([alice], [delivery('alice', 'INBOX', 100), delivery('alice', 'Work', 200)], [push(T, 2100, ['INBOX', 'Work'])], OPTS);
    expect(r).toMatchObject({ expected: 2, satisfied: 2, lost: 0, duplicates: 0, pushMailboxes: 2 });
  });

  it('more pushes of a mailbox than deliveries to it before them are duplicates', () => {
    const r = analyze([alice], [delivery('alice', 'INBOX', 100), delivery('alice', 'INBOX', 3000)], [push(T, 600, null), push(T, 700, null), push(T, 3500, null)], OPTS);
    expect(r.duplicates).toBe(1);
    expect(r.duplicateExamples[0]).toMatchObject({ at: 700, pushesSoFar: 2, deliveriesBefore: 1 });
    // a delivery to another mailbox does not explain an INBOX push
    const other = analyze([alice], [delivery('alice', 'Work', 100)], [push(T, 600, ['Work']), push(T, 700, null)], OPTS);
    expect(other.duplicates).toBe(1);
  });

  it('wrong pushes: unknown token, other account or topic, unknown or unregistered mailbox', () => {
    const r = analyze(
      [alice],
      [delivery('alice', 'Archive', 100)],
      [
        push(T2, 500, null),
        push(T, 500, null, { accountId: 'someone else' }),
        push(T, 500, null, { topic: 'other.topic' }),
        push(T, 500, null, { m: ['0'.repeat(32)] }),
        push(T, 500, ['Archive']),
        push(T, 600, ['Lists', 'INBOX']),
      ],
      OPTS,
    );
    expect(r.wrongByKind).toEqual({ unknown_token: 1, account_id: 1, topic: 1, unknown_mailbox: 1, unregistered_mailbox: 2 });
    expect(r.wrong).toBe(6);
    // the registered part of a push with an unregistered mailbox still counts as a push of that mailbox
    expect(r.pushMailboxes).toBe(1);
  });

  it('arming and removal: no push is expected before armedAt or near the end; pushes are allowed until the grace ends', () => {
    const bob = device(T2, 'bob', { INBOX: [open(0)], Work: [{ sentAt: 1000, okAt: 1010, armedAt: 5000, endSentAt: 20_000, endOkAt: 20_010 }] });
    const r = analyze(
      [bob],
      [delivery('bob', 'Work', 2000), delivery('bob', 'Work', 10_000), delivery('bob', 'Work', 19_500), delivery('bob', 'Work', 25_000)],
      [push(T2, 10_500, ['Work']), push(T2, 20_900, ['Work']), push(T2, 21_100, ['Work'])],
      OPTS,
    );
    // 2000: not armed yet; 19 500: within removeGuardMs of the end; 25 000: after the end
    expect(r).toMatchObject({ expected: 1, satisfied: 1, lost: 0 });
    // 20 900 is within endOkAt + wrongGraceMs; 21 100 is not
    expect(r.wrongByKind.unregistered_mailbox).toBe(1);
    expect(r.wrongExamples[0]).toMatchObject({ at: 21_100, mailbox: 'Work' });
  });

  it('a retired device expects nothing near or after its retirement; a tainted one nothing after the failure', () => {
    const retired = device(T, 'carol', { INBOX: [{ ...open(0), endSentAt: 10_000, endOkAt: 10_000 }] }, { retiredAt: 10_000 });
    const tainted = device(T2, 'carol', { INBOX: [open(0)] }, { taintedAt: 5000 });
    const r = analyze([retired, tainted], [delivery('carol', 'INBOX', 3000), delivery('carol', 'INBOX', 9500)], [push(T, 3500, null), push(T2, 3500, null), push(T2, 9900, null)], OPTS);
    // 3000: both devices; 9500: near the retirement (guard 1 s) and after the taint: none
    expect(r).toMatchObject({ expected: 2, satisfied: 2, lost: 0, wrong: 0 });
  });

  it('failed deliveries require no push but may explain one', () => {
    const r = analyze([alice], [delivery('alice', 'INBOX', 100, false)], [push(T, 600, null)], OPTS);
    expect(r).toMatchObject({ deliveriesFailed: 1, expected: 0, lost: 0, duplicates: 0, wrong: 0 });
  });
});

describe('soak oracle per watch mode', () => {
  const base = { coalesceWindowMs: 2000, pollIntervalMs: 10_000 };
  const opts = (watch: 'notify' | 'idle' | 'events') => ({ topic: TOPIC, mailboxByMd5: OPTS.mailboxByMd5, ...modeTimings(watch, base) });

  it('notify keeps the timings it always had; events has the same; idle adds one poll interval to the guard and LATE', () => {
    expect(modeTimings('notify', base)).toEqual({ removeGuardMs: 15_000, wrongGraceMs: 17_000, lateAfterMs: 7000 });
    expect(modeTimings('events', base)).toEqual(modeTimings('notify', base));
    expect(modeTimings('idle', base)).toEqual({ removeGuardMs: 25_000, wrongGraceMs: 17_000, lateAfterMs: 17_000 });
  });

  it('a STATUS poll that finds three deliveries makes one push: all satisfied, no duplicate, late only for notify timings', () => {
    const dev = device(T, 'dave', { INBOX: [open(0)], Work: [open(0)] });
    const ds = [delivery('dave', 'Work', 1000), delivery('dave', 'Work', 4000), delivery('dave', 'Work', 8000)];
    const ps = [push(T, 10_500, ['Work'])];
    expect(analyze([dev], ds, ps, opts('idle'))).toMatchObject({ expected: 3, satisfied: 3, lost: 0, duplicates: 0, wrong: 0, late: 0 });
    expect(analyze([dev], ds, ps, opts('notify'))).toMatchObject({ expected: 3, satisfied: 3, lost: 0, late: 1 });
  });

  it('events: one push per delivery (nothing merged outside a window) is no duplicate; a second push for one delivery is', () => {
    const dev = device(T, 'erin', { INBOX: [open(0)] });
    const ds = [delivery('erin', 'INBOX', 1000), delivery('erin', 'INBOX', 5000)];
    expect(analyze([dev], ds, [push(T, 1020, null), push(T, 5020, null)], opts('events'))).toMatchObject({ satisfied: 2, duplicates: 0 });
    expect(analyze([dev], ds, [push(T, 1020, null), push(T, 3020, null), push(T, 5020, null)], opts('events')).duplicates).toBe(1);
  });

  it('idle: a delivery to a polled mailbox shortly before its removal is not expected (the poll may come after it)', () => {
    const dev = device(T, 'fred', { INBOX: [open(0)], Work: [{ sentAt: 0, okAt: 0, armedAt: 0, endSentAt: 60_000, endOkAt: 60_010 }] });
    const ds = [delivery('fred', 'Work', 40_000)];
    expect(analyze([dev], ds, [], opts('idle'))).toMatchObject({ expected: 0, lost: 0 });
    expect(analyze([dev], ds, [], opts('notify'))).toMatchObject({ expected: 1, lost: 1 });
  });
});

describe('soak memory verdict', () => {
  const MB = 1024 * 1024;
  const samples = (loadMs: number, live: (t: number) => number | null): MemorySample[] => {
    const out: MemorySample[] = [];
    for (let t = 0; t <= loadMs; t += 2000) {
      const v = live(t);
      // RSS and the sampled heap wobble wildly; they must not matter
      const wobble = (t / 2000) % 2 === 0 ? 1.4 : 0.7;
      out.push({ t, rssBytes: 100 * MB * wobble, heapUsedBytes: 30 * MB * wobble, heapTotalBytes: null, externalBytes: null, cpuMs: null, liveBytes: v, liveHeapBytes: v, liveExternalBytes: 0, clientConnections: null, watchers: null });
    }
    return out;
  };

  it('compares the medians of the first and last third after a warm-up of 25 % (at least 20 s)', () => {
    const v = memoryVerdict(samples(120_000, () => 30 * MB), 120_000);
    expect(v).toMatchObject({ warmupMs: 30_000, windowMs: 30_000, criterion: 'live', flat: true });
    expect(v.live).toMatchObject({ ratio: 1, start: { fromMs: 30_000, toMs: 60_000, samples: 16 }, end: { fromMs: 90_000, toMs: 120_000, samples: 16 } });
    expect(memoryVerdict(samples(40_000, () => MB), 40_000).warmupMs).toBe(20_000);
  });

  it('growth beyond the tolerance is not flat; growth within the warm-up does not count', () => {
    expect(memoryVerdict(samples(120_000, (t) => (30 + (t / 120_000) * 10) * MB), 120_000).flat).toBe(false);
    expect(memoryVerdict(samples(120_000, (t) => (t < 30_000 ? 10 + t / 1000 : 40) * MB), 120_000).flat).toBe(true);
    // one odd sample in a window does not decide
    expect(memoryVerdict(samples(120_000, (t) => (t === 118_000 ? 90 : 30) * MB), 120_000).flat).toBe(true);
  });

  it('no verdict (and not flat) without enough live samples', () => {
    const v = memoryVerdict(samples(120_000, (t) => (t < 94_000 ? 30 * MB : null)), 120_000);
    expect(v.live).toBeNull();
    expect(v.flat).toBe(false);
    expect(v.notes.join()).toMatch(/no verdict/);
    expect(memoryVerdict(samples(15_000, () => MB), 15_000).notes.join()).toMatch(/within the warm-up/);
  });
});

describe('metrics text', () => {
  const text = [
    '# HELP xaps_watchers x',
    'xaps_watchers{mode="notify"} 3',
    'xaps_watchers{mode="idle"} 1',
    'xaps_watchers_total 99',
    'xaps_pushes_total{result="delivered"} 7',
    'xaps_pushes_total{result="retried"} 2',
    'xaps_nodejs_heap_size_used_bytes 1234',
  ].join('\n');
  it('sums series, by label', () => {
    expect(metricSum(text, 'xaps_watchers')).toBe(4);
    expect(metricSum(text, 'xaps_watchers', { mode: 'idle' })).toBe(1);
    expect(metricSum(text, 'xaps_nodejs_heap_size_used_bytes')).toBe(1234);
    expect(metricSum(text, 'xaps_missing')).toBeUndefined();
    expect(metricByLabel(text, 'xaps_pushes_total', 'result')).toEqual({ delivered: 7, retried: 2 });
  });
});
