/**
 * Push dispatcher: payload and headers, mailbox filter, coalescing, concurrency, guard, direct send, shutdown.
 * Manual clock (ManualScheduler), fake APNs transport, real embedded store in a temp dir.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { LocalChangeGuard } from '../../../src/apns/change-guard.js';
import { classifyAnswer, dispatcherSettings, NoTopicError, PushDispatcher } from '../../../src/apns/dispatcher.js';
import { buildNotification, buildPayload, MAX_PAYLOAD_BYTES } from '../../../src/apns/payload.js';
import { fullJitterBackoff, MinHeap } from '../../../src/apns/queue.js';
import { mailboxRef } from '../../../src/store/common.js';
import type { RegistrationStore } from '../../../src/store/types.js';
import {
  accountId,
  ApnsTransportError,
  harness,
  histogram,
  md5,
  metric,
  register,
  removeTempDirs,
  results,
  T0,
  token,
  TOPIC,
  type Harness,
} from './dispatcher-helpers.js';

const open: Harness[] = [];
async function make(...args: Parameters<typeof harness>): Promise<Harness> {
  const h = await harness(...args);
  open.push(h);
  return h;
}
afterEach(async () => {
  for (const h of open.splice(0)) {
    await h.dispatcher.close();
    await h.store.close();
  }
  await removeTempDirs();
});

describe('payload and headers', () => {
  it('v1 registration: account id only, headers from the options', async () => {
    const h = await make();
    await register(h.store, 'alice', 1, { version: 1 });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    expect(h.transport.sent).toHaveLength(1);
    const { n } = h.transport.sent[0]!;
    expect(n.payload).toBe(`{"aps":{"account-id":"${accountId(0)}"}}`);
    expect(n).toEqual({
      deviceToken: token(0),
      topic: TOPIC,
      pushType: 'background',
      priority: 5,
      expiration: Math.floor((T0 + 86_400_000) / 1000),
      collapseId: accountId(0),
      payload: n.payload,
    });
  });

  it('v1 registration never carries m, and only INBOX matches', async () => {
    const h = await make();
    // A v1 registration that (unlike what the handler stores) lists another mailbox still gets no `m`.
    await register(h.store, 'alice', 1, { version: 1, mailboxes: ['INBOX', 'Notes'] });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'Notes' });
    expect(h.transport.sent).toHaveLength(1);
    expect(h.transport.sent[0]!.payload.aps.m).toBeUndefined();
  });

  it('v2 registration: INBOX alone has no m; another mailbox gets its stored md5', async () => {
    const h = await make({ coalesceWindowMs: 0 });
    await register(h.store, 'alice', 1, { mailboxes: ['INBOX', 'Sent Messages', 'Entwürfe/Ünïcødé'] });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'Sent Messages' });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'Entwürfe/Ünïcødé' });
    expect(h.transport.sent.map((s) => s.payload)).toEqual([
      { aps: { 'account-id': accountId(0) } },
      { aps: { 'account-id': accountId(0), m: [md5('Sent Messages')] } },
      { aps: { 'account-id': accountId(0), m: [md5('Entwürfe/Ünïcødé')] } },
    ]);
    expect(md5('Entwürfe/Ünïcødé')).toBe(mailboxRef('Entwürfe/Ünïcødé').md5);
  });

  it('INBOX and another mailbox merged in one window: m lists both, INBOX included', async () => {
    const h = await make();
    await register(h.store, 'alice', 1, { mailboxes: ['INBOX', 'Sent Messages'] });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'Archive' }); // not pushed by the device
    expect(h.transport.sent).toHaveLength(0);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'Sent Messages' });
    await h.sched.advance(100);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'inbox' });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'Sent Messages' });
    await h.sched.advance(2000);
    expect(h.transport.sent.map((s) => [s.at - T0, s.payload.aps.m])).toEqual([
      [0, [md5('Sent Messages')]],
      [2000, [md5('INBOX'), md5('Sent Messages')]],
    ]);
  });

  it('mailbox filter: a change in a mailbox no device registered pushes nothing; INBOX is case-insensitive', async () => {
    const h = await make();
    await register(h.store, 'alice', 2, { mailboxes: ['INBOX', 'Work'] });
    await register(h.store, 'alice', 1, { mailboxes: ['INBOX'], from: 2 });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'work' }); // not INBOX: exact match only
    await h.dispatcher.notify({ user: 'alice', mailbox: 'Archive' });
    await h.dispatcher.notify({ user: 'bob', mailbox: 'INBOX' });
    expect(h.transport.sent).toHaveLength(0);
    expect(await metric(h.registry, 'xaps_push_changes_total', { result: 'no_device' })).toBe(3);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'Work' });
    expect(h.transport.sent.map((s) => s.n.deviceToken).sort()).toEqual([token(0), token(1)]);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'Inbox' });
    expect(h.transport.to(token(2))).toHaveLength(1);
  });

  it('push type, priority and expiration 0 from the options; collapse id only when it fits', async () => {
    const h = await make({ pushType: 'alert', priority: 10, expirationMs: 0 });
    await register(h.store, 'alice', 1);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    expect(h.transport.sent[0]!.n).toMatchObject({ pushType: 'alert', priority: 10, expiration: 0 });
    const long = buildNotification({ deviceToken: token(1), accountId: 'x'.repeat(65), version: 2 }, [], {
      topic: TOPIC, pushType: 'background', priority: 5, expirationMs: 1000, now: 1_500,
    });
    expect(long.collapseId).toBeUndefined();
    expect(long.expiration).toBe(2);
  });

  it('no topic: nothing is sent, and it is counted', async () => {
    const h = await make();
    h.topic.value = null;
    await register(h.store, 'alice', 2);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    expect(h.transport.sent).toHaveLength(0);
    expect(await metric(h.registry, 'xaps_pushes_total', { result: 'no_topic' })).toBe(2);
    expect(h.dispatcher.stats().pending).toBe(0);
  });

  it('payload stays within 4 KB and m has no duplicates', () => {
    const refs = Array.from({ length: 300 }, (_, i) => mailboxRef(`Folder ${i}`));
    const body = buildPayload({ accountId: accountId(1), version: 2 }, [...refs, ...refs]);
    expect(Buffer.byteLength(body)).toBeLessThanOrEqual(MAX_PAYLOAD_BYTES);
    const m = (JSON.parse(body) as { aps: { m: string[] } }).aps.m;
    expect(new Set(m).size).toBe(m.length);
    expect(m[0]).toBe(refs[0]!.md5);
    expect(buildPayload({ accountId: 'a', version: 2 }, [mailboxRef('INBOX'), mailboxRef('INBOX')])).toBe('{"aps":{"account-id":"a"}}');
  });
});

describe('coalescing', () => {
  it('10 changes within the window give 2 pushes: one at once, one merged at the window end', async () => {
    const h = await make();
    const boxes = ['INBOX', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I'];
    await register(h.store, 'alice', 1, { mailboxes: boxes });
    for (let i = 0; i < 10; i++) {
      await h.dispatcher.notify({ user: 'alice', mailbox: boxes[i]!, detectedAt: h.sched.now() });
      if (i < 9) await h.sched.advance(150);
    }
    expect(h.transport.sent).toHaveLength(1);
    await h.sched.advance(2000 - 1350 - 1);
    expect(h.transport.sent).toHaveLength(1);
    await h.sched.advance(1);
    expect(h.transport.sent).toHaveLength(2);
    expect(h.transport.sent.map((s) => s.at - T0)).toEqual([0, 2000]);
    expect(h.transport.sent[0]!.payload.aps.m).toBeUndefined();
    expect(h.transport.sent[1]!.payload.aps.m).toEqual(boxes.slice(1).map(md5));
    await h.sched.advance(60_000);
    expect(h.transport.sent).toHaveLength(2);
    expect(await results(h.registry)).toEqual({ delivered: 2 });
    // latency of the merged push counts from its earliest change (150 ms after the first)
    expect(await histogram(h.registry, 'xaps_push_latency_seconds')).toEqual({ count: 2, sum: 0 + (2000 - 150) / 1000 });
    expect(h.dispatcher.stats()).toMatchObject({ pending: 0, devices: 0, inFlight: 0 });
  });

  it('changes for 1,000 devices give 1,000 pushes', async () => {
    const h = await make();
    await register(h.store, 'big', 1000);
    await h.dispatcher.notify({ user: 'big', mailbox: 'INBOX' });
    expect(h.transport.sent).toHaveLength(1000);
    expect(new Set(h.transport.sent.map((s) => s.n.deviceToken)).size).toBe(1000);
    await h.sched.advance(10_000);
    expect(h.transport.sent).toHaveLength(1000);
  });

  it('1,000 users with one device each give 1,000 pushes', async () => {
    const h = await make();
    await Promise.all(Array.from({ length: 1000 }, (_, u) => register(h.store, `user${u}`, 1)));
    await Promise.all(Array.from({ length: 1000 }, (_, u) => h.dispatcher.notify({ user: `user${u}`, mailbox: 'INBOX' })));
    expect(h.transport.sent).toHaveLength(1000);
  });

  it('a change after the window starts a new cycle with an immediate push', async () => {
    const h = await make();
    await register(h.store, 'alice', 1);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(2500);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    expect(h.transport.sent.map((s) => s.at - T0)).toEqual([0, 2500]);
    // and that cycle coalesces again
    await h.sched.advance(10);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(5000);
    expect(h.transport.sent.map((s) => s.at - T0)).toEqual([0, 2500, 4500]);
  });

  it('a change exactly at the window end, after the follow-up went out, is pushed at once', async () => {
    const h = await make();
    await register(h.store, 'alice', 1);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(1000);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(1000);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    expect(h.transport.sent.map((s) => s.at - T0)).toEqual([0, 2000, 2000]);
  });

  it('devices coalesce independently', async () => {
    const h = await make();
    await register(h.store, 'alice', 1);
    await register(h.store, 'alice', 1, { from: 1, mailboxes: ['INBOX', 'Work'] });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'Work' }); // device 1 only
    await h.sched.advance(500);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' }); // device 0 first, device 1 follow-up
    await h.sched.advance(5000);
    expect(h.transport.to(token(0)).map((s) => s.at - T0)).toEqual([500]);
    expect(h.transport.to(token(1)).map((s) => s.at - T0)).toEqual([0, 2000]);
  });

  it('window 0: every change is pushed', async () => {
    const h = await make({ coalesceWindowMs: 0 });
    await register(h.store, 'alice', 1);
    for (let i = 0; i < 5; i++) await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    expect(h.transport.sent).toHaveLength(5);
  });
});

describe('concurrency', () => {
  it('never hands more than maxInFlight requests to the transport, one per device', async () => {
    const h = await make({ maxInFlight: 7 });
    h.transport.manual = true;
    await register(h.store, 'big', 100);
    await h.dispatcher.notify({ user: 'big', mailbox: 'INBOX' });
    expect(h.transport.sent).toHaveLength(7);
    expect(h.dispatcher.stats()).toMatchObject({ inFlight: 7, pending: 93 });
    expect(await metric(h.registry, 'xaps_push_queue_depth')).toBe(93);
    while (h.transport.heldCount > 0) {
      h.transport.release(3);
      await h.sched.advance(0);
    }
    expect(h.transport.sent).toHaveLength(100);
    expect(h.transport.maxInFlight).toBe(7);
    expect(await results(h.registry)).toEqual({ delivered: 100 });
    expect(await metric(h.registry, 'xaps_push_queue_depth')).toBe(0);
  });

  it('a device with a request in flight gets its next push only after the answer', async () => {
    const h = await make({ coalesceWindowMs: 0 });
    h.transport.manual = true;
    await register(h.store, 'alice', 1, { mailboxes: ['INBOX', 'A', 'B'] });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'A' });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'B' });
    expect(h.transport.sent).toHaveLength(1);
    h.transport.release(1);
    await h.sched.advance(0);
    expect(h.transport.sent).toHaveLength(2);
    expect(h.transport.sent[1]!.payload.aps.m).toEqual([md5('A'), md5('B')]);
    h.transport.release();
    await h.sched.advance(0);
  });
});

describe('change guard', () => {
  it('the same changeId is pushed once (local guard); other ids coalesce as usual', async () => {
    const h = await make({ coalesceWindowMs: 0 });
    await register(h.store, 'alice', 3);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1:42' });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1:42' });
    expect(h.transport.sent).toHaveLength(3);
    expect(await metric(h.registry, 'xaps_pushes_total', { result: 'deduplicated' })).toBe(3);
    expect(await metric(h.registry, 'xaps_push_changes_total', { result: 'deduplicated' })).toBe(1);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1:43' });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' }); // no id: no guard
    expect(h.transport.sent).toHaveLength(9);
    // the same id for another user is another change
    await register(h.store, 'bob', 1);
    await h.dispatcher.notify({ user: 'bob', mailbox: 'INBOX', changeId: 'INBOX:1:42' });
    expect(h.transport.sent).toHaveLength(10);
  });

  it('a failing guard fails open and is counted', async () => {
    const h = await make({ guard: { claim: () => Promise.reject(new Error('redis down')) } });
    await register(h.store, 'alice', 2);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX', changeId: 'c1' });
    expect(h.transport.sent).toHaveLength(2);
    expect(await metric(h.registry, 'xaps_push_guard_errors_total')).toBe(1);
  });

  it('the guard is only asked when some device matches', async () => {
    const claims: string[] = [];
    const h = await make({ guard: { claim: async (_u, id) => (claims.push(id), true) } });
    await register(h.store, 'alice', 1);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'Archive', changeId: 'a' });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX', changeId: 'b' });
    expect(claims).toEqual(['b']);
  });

  it('LocalChangeGuard expires ids and stays bounded', async () => {
    let now = 0;
    const g = new LocalChangeGuard({ ttlMs: 1000, maxEntries: 3, clock: () => now });
    expect(await g.claim('u', '1')).toBe(true);
    expect(await g.claim('u', '1')).toBe(false);
    expect(await g.claim('v', '1')).toBe(true);
    now = 1000;
    expect(await g.claim('u', '1')).toBe(true);
    for (let i = 0; i < 10; i++) await g.claim('u', `x${i}`);
    expect(g.size).toBe(3);
    expect(await g.claim('u', 'x9')).toBe(false);
    expect(await g.claim('u', 'x0')).toBe(true); // forgotten: bounded beats exact
  });
});

describe('robustness', () => {
  it('a store that cannot list registrations is counted, not thrown', async () => {
    const h = await make();
    const broken: RegistrationStore = Object.assign(Object.create(h.store) as RegistrationStore, {
      listByUser: () => Promise.reject(new Error('disk on fire')),
    });
    const d = new PushDispatcher({ store: broken, transport: h.transport, topic: () => TOPIC, registry: h.registry, scheduler: h.sched });
    await expect(d.notify({ user: 'alice', mailbox: 'INBOX' })).resolves.toBeUndefined();
    expect(await metric(h.registry, 'xaps_push_changes_total', { result: 'store_error' })).toBe(1);
    await d.close();
  });

  it('malformed changes are ignored and counted', async () => {
    const h = await make();
    await h.dispatcher.notify({ user: '', mailbox: 'INBOX' });
    await h.dispatcher.notify({ user: 'a', mailbox: '' });
    await h.dispatcher.notify(null as never);
    expect(await metric(h.registry, 'xaps_push_changes_total', { result: 'invalid' })).toBe(3);
  });
});

describe('sendNow (test-push)', () => {
  it('bypasses coalescing and the guard and returns the answer', async () => {
    const h = await make();
    const [reg] = await register(h.store, 'alice', 1, { mailboxes: ['INBOX', 'Sent Messages'] });
    const a = await h.dispatcher.sendNow(reg!);
    const b = await h.dispatcher.sendNow(reg!, { mailboxes: ['Sent Messages', 'inbox', 'Elsewhere'] });
    expect(a).toMatchObject({ status: 200 });
    expect(b).toMatchObject({ status: 200 });
    expect(h.transport.sent.map((s) => s.payload.aps.m)).toEqual([
      undefined,
      [md5('Sent Messages'), md5('INBOX'), md5('Elsewhere')],
    ]);
    expect(await results(h.registry)).toEqual({ delivered: 2 });
  });

  it('applies 410 and BadDeviceToken to the registration before resolving', async () => {
    const h = await make();
    const regs = await register(h.store, 'alice', 2);
    h.transport.respond = (n) => n.deviceToken === token(0)
      ? { status: 410, reason: 'Unregistered', timestamp: T0 + 1 }
      : { status: 400, reason: 'BadDeviceToken' };
    expect(await h.dispatcher.sendNow(regs[0]!)).toMatchObject({ status: 410, reason: 'Unregistered' });
    expect(await h.dispatcher.sendNow(regs[1]!)).toMatchObject({ status: 400, reason: 'BadDeviceToken' });
    expect(await h.store.listByUser('alice')).toEqual([]);
    expect(await metric(h.registry, 'xaps_registrations_removed_total', { reason: 'unregistered' })).toBe(1);
    expect(await metric(h.registry, 'xaps_registrations_removed_total', { reason: 'bad_token' })).toBe(1);
  });

  it('returns the transport error when no answer came; throws without a topic', async () => {
    const h = await make();
    const [reg] = await register(h.store, 'alice', 1);
    h.transport.respond = () => new ApnsTransportError('connect', 'ECONNREFUSED');
    const r = await h.dispatcher.sendNow(reg!);
    expect(r).toBeInstanceOf(ApnsTransportError);
    expect((r as ApnsTransportError).kind).toBe('connect');
    h.transport.respond = () => new TypeError('oops');
    const r2 = await h.dispatcher.sendNow(reg!);
    expect(r2).toBeInstanceOf(ApnsTransportError);
    expect(await metric(h.registry, 'xaps_pushes_total', { result: 'failed' })).toBe(2);
    h.topic.value = null;
    await expect(h.dispatcher.sendNow(reg!)).rejects.toBeInstanceOf(NoTopicError);
  });
});

describe('close', () => {
  it('sends follow-ups due within flushMs, then stops every timer', async () => {
    const h = await make();
    await register(h.store, 'alice', 1);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(500);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    const closing = h.dispatcher.close({ flushMs: 5000 });
    await h.sched.advance(0);
    await closing;
    expect(h.transport.sent.map((s) => s.at - T0)).toEqual([0, 500]);
    expect(h.sched.timerCount).toBe(0);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(10_000);
    expect(h.transport.sent).toHaveLength(2);
    expect(await metric(h.registry, 'xaps_push_changes_total', { result: 'closed' })).toBe(1);
  });

  it('drops what is not due within flushMs (counted) and waits for answers up to the deadline', async () => {
    const h = await make();
    await register(h.store, 'alice', 2);
    h.transport.respond = (n) => (n.deviceToken === token(0) ? { status: 429, retryAfterMs: 60_000 } : { status: 200 });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(100);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' }); // device 1: follow-up at 2000
    h.transport.manual = true;
    let closed = false;
    const closing = h.dispatcher.close({ flushMs: 3000 }).then(() => {
      closed = true;
    });
    await h.sched.advance(0);
    expect(h.transport.sent.map((s) => [s.n.deviceToken, s.at - T0])).toEqual([
      [token(0), 0], [token(1), 0], [token(1), 100],
    ]);
    expect(closed).toBe(false);
    await h.sched.advance(2999);
    expect(closed).toBe(false);
    await h.sched.advance(1);
    await closing;
    expect(closed).toBe(true);
    expect(await metric(h.registry, 'xaps_push_queue_dropped_total', { kind: 'shutdown' })).toBe(1);
    h.transport.release();
    await h.sched.advance(0);
    expect(h.sched.timerCount).toBe(0);
  });
});

describe('pieces', () => {
  it('classifies every row of the APNs table', () => {
    expect(classifyAnswer({ status: 200 })).toBe('delivered');
    expect(classifyAnswer({ status: 410, reason: 'Unregistered' })).toBe('unregistered');
    expect(classifyAnswer({ status: 410, reason: 'ExpiredToken' })).toBe('unregistered');
    expect(classifyAnswer({ status: 400, reason: 'BadDeviceToken' })).toBe('bad_token');
    for (const r of ['DeviceTokenNotForTopic', 'BadTopic', 'TopicDisallowed']) expect(classifyAnswer({ status: 400, reason: r })).toBe('wrong_topic');
    for (const r of ['BadCertificate', 'BadCertificateEnvironment', 'Forbidden', 'InvalidProviderToken']) expect(classifyAnswer({ status: 403, reason: r })).toBe('bad_certificate');
    expect(classifyAnswer({ status: 429, reason: 'TooManyRequests' })).toBe('throttled');
    for (const s of [500, 503]) expect(classifyAnswer({ status: s })).toBe('retry');
    for (const s of [400, 404, 405, 413, 301]) expect(classifyAnswer({ status: s, reason: 'BadPriority' })).toBe('rejected');
  });

  it('full-jitter back-off stays within [0, min(cap, base·2^(n-1))]', () => {
    expect(fullJitterBackoff(1, 500, 60_000, () => 1)).toBe(500);
    expect(fullJitterBackoff(4, 500, 60_000, () => 1)).toBe(4000);
    expect(fullJitterBackoff(20, 500, 60_000, () => 0.999999)).toBeLessThanOrEqual(60_000);
    expect(fullJitterBackoff(3, 500, 60_000, () => 0)).toBe(0);
  });

  it('MinHeap pops in order', () => {
    const h = new MinHeap<number>((a, b) => a < b);
    for (const n of [5, 3, 9, 1, 1, 7]) h.push(n);
    const out: number[] = [];
    for (let x = h.pop(); x !== undefined; x = h.pop()) out.push(x);
    expect(out).toEqual([1, 1, 3, 5, 7, 9]);
  });

  it('maps configuration to options', () => {
    expect(dispatcherSettings({ apnsPushType: 'background', apnsPriority: '10', apnsExpiration: 86_400_000, apnsMaxAttempts: 8, pushCoalesceWindow: 2000, pushQueueSize: 100 }))
      .toEqual({ pushType: 'background', priority: 10, expirationMs: 86_400_000, maxAttempts: 8, coalesceWindowMs: 2000, queueSize: 100 });
  });
});
