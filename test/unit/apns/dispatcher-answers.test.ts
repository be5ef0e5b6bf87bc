/**
 * Push dispatcher: every row of the APNs answer table (protocol notes §b), against a real embedded store and a
 * scripted transport on a manual clock; 403 pause/resume; the queue bound.
 */
import { Writable } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import { PushDispatcher } from '../../../src/apns/dispatcher.js';
import type { ApnsNotification, ApnsResponse, ApnsTransport } from '../../../src/apns/types.js';
import { createLogger } from '../../../src/ops/log.js';
import {
  ApnsTransportError,
  harness,
  md5,
  metric,
  register,
  regInput,
  removeTempDirs,
  results,
  T0,
  token,
  TOPIC,
  type Answer,
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
    h.transport.manual = false;
    h.transport.release();
    await h.dispatcher.settled();
    await h.store.close();
  }
  await removeTempDirs();
});

function captureLogs(): { logger: ReturnType<typeof createLogger>; lines: () => Array<Record<string, unknown>> } {
  const chunks: string[] = [];
  const dest = new Writable({
    write(chunk: Buffer, _enc, cb) {
      chunks.push(chunk.toString('utf8'));
      cb();
    },
  });
  return {
    logger: createLogger({ level: 'debug', pretty: false, destination: dest }),
    lines: () => chunks.join('').split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>),
  };
}

/** Answers per device token: a fixed answer or a list consumed in order (last one repeats). */
function script(h: Harness, byToken: Record<string, Answer | Answer[]>, fallback: Answer = { status: 200 }): void {
  const used = new Map<string, number>();
  h.transport.respond = (n) => {
    const a = byToken[n.deviceToken];
    if (a === undefined) return fallback;
    if (!Array.isArray(a)) return a;
    const i = used.get(n.deviceToken) ?? 0;
    used.set(n.deviceToken, i + 1);
    return a[Math.min(i, a.length - 1)] as Answer;
  };
}

const times = (h: Harness, tok: string): number[] => h.transport.to(tok).map((s) => s.at - T0);

describe('200', () => {
  it('is delivered and counted by status and reason', async () => {
    const h = await make();
    await register(h.store, 'alice', 1);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.dispatcher.settled();
    expect(await results(h.registry)).toEqual({ delivered: 1 });
    expect(await metric(h.registry, 'xaps_apns_responses_total', { status: '200', reason: 'none' })).toBe(1);
  });
});

describe('410 Unregistered / ExpiredToken', () => {
  it('removes the registration when it was not seen after the timestamp', async () => {
    const h = await make();
    await register(h.store, 'alice', 2); // lastSeen = T0
    script(h, {
      [token(0)]: { status: 410, reason: 'Unregistered', timestamp: T0 + 500 },
      [token(1)]: { status: 410, reason: 'ExpiredToken', timestamp: T0 },
    });
    await h.sched.advance(1000);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.dispatcher.settled();
    expect(await h.store.listByUser('alice')).toEqual([]);
    expect(await results(h.registry)).toEqual({ unregistered: 2 });
    expect(await metric(h.registry, 'xaps_registrations_removed_total', { reason: 'unregistered' })).toBe(2);
    expect(await metric(h.registry, 'xaps_apns_responses_total', { status: '410', reason: 'Unregistered' })).toBe(1);
    expect(await metric(h.registry, 'xaps_apns_responses_total', { status: '410', reason: 'ExpiredToken' })).toBe(1);
    await h.sched.advance(600_000);
    expect(h.transport.sent).toHaveLength(2); // never retried
  });

  it('keeps a registration renewed after the timestamp', async () => {
    const h = await make();
    await register(h.store, 'alice', 1); // lastSeen T0
    await h.sched.advance(1000);
    await h.store.upsert(regInput('alice', 0)); // re-registered at T0+1000
    script(h, { [token(0)]: { status: 410, reason: 'Unregistered', timestamp: T0 + 500 } });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.dispatcher.settled();
    expect(await h.store.get('alice', token(0))).not.toBeNull();
    expect(await results(h.registry)).toEqual({ unregistered: 1 });
    expect(await metric(h.registry, 'xaps_registrations_removed_total')).toBe(0);
  });

  it('without a timestamp, uses the time the push was sent', async () => {
    const h = await make();
    await register(h.store, 'alice', 1);
    h.transport.manual = true;
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' }); // sent at T0
    await h.sched.advance(100);
    await h.store.upsert(regInput('alice', 0)); // renewed at T0+100, while the request was out
    h.transport.release(1, { status: 410, reason: 'Unregistered' });
    await h.dispatcher.settled();
    expect(await h.store.get('alice', token(0))).not.toBeNull();
  });

  it('drops what was still waiting for the removed device', async () => {
    const h = await make();
    await register(h.store, 'alice', 1);
    h.transport.manual = true;
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(100);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' }); // follow-up, due at 2000
    expect(h.dispatcher.stats().pending).toBe(1);
    h.transport.release(1, { status: 410, reason: 'Unregistered', timestamp: T0 + 50 });
    await h.dispatcher.settled();
    await h.sched.advance(5000);
    expect(h.transport.sent).toHaveLength(1);
    expect(h.dispatcher.stats().pending).toBe(0);
    expect(await results(h.registry)).toEqual({ unregistered: 2 });
  });
});

describe('400 BadDeviceToken', () => {
  it('removes the registration, even if renewed meanwhile; other devices are untouched', async () => {
    const h = await make();
    await register(h.store, 'alice', 2);
    await h.sched.advance(1000);
    await h.store.upsert(regInput('alice', 0));
    script(h, { [token(0)]: { status: 400, reason: 'BadDeviceToken' } });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.dispatcher.settled();
    expect((await h.store.listByUser('alice')).map((r) => r.deviceToken)).toEqual([token(1)]);
    expect(await results(h.registry)).toEqual({ bad_token: 1, delivered: 1 });
    expect(await metric(h.registry, 'xaps_registrations_removed_total', { reason: 'bad_token' })).toBe(1);
    expect(await metric(h.registry, 'xaps_apns_responses_total', { status: '400', reason: 'BadDeviceToken' })).toBe(1);
  });

  it('a store that cannot remove is counted, not thrown', async () => {
    const h = await make();
    await register(h.store, 'alice', 1);
    const store = Object.assign(Object.create(h.store) as typeof h.store, {
      remove: () => Promise.reject(new Error('journal failed')),
    });
    const d = new PushDispatcher({ store, transport: h.transport, topic: () => TOPIC, registry: h.registry, scheduler: h.sched });
    script(h, { [token(0)]: { status: 400, reason: 'BadDeviceToken' } });
    await d.notify({ user: 'alice', mailbox: 'INBOX' });
    await d.settled();
    expect(await metric(h.registry, 'xaps_registration_remove_errors_total')).toBe(1);
    await d.close();
  });
});

describe('400 DeviceTokenNotForTopic / BadTopic / TopicDisallowed', () => {
  for (const reason of ['BadTopic', 'TopicDisallowed']) {
    it(`${reason}: keeps the registration, no retry, alarm until a 200`, async () => {
      const h = await make();
      await register(h.store, 'alice', 1);
      script(h, { [token(0)]: [{ status: 400, reason }, { status: 200 }] });
      await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
      await h.sched.advance(600_000);
      expect(h.transport.sent).toHaveLength(1);
      expect(await h.store.get('alice', token(0))).not.toBeNull();
      expect(await metric(h.registry, 'xaps_apns_alarm', { kind: 'wrong_topic' })).toBe(1);
      expect(await results(h.registry)).toEqual({ wrong_topic: 1 });
      expect(await metric(h.registry, 'xaps_apns_responses_total', { status: '400', reason })).toBe(1);
      await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
      await h.dispatcher.settled();
      expect(await metric(h.registry, 'xaps_apns_alarm', { kind: 'wrong_topic' })).toBe(0);
    });
  }

  it('credentialsChanged() clears the alarm', async () => {
    const h = await make();
    await register(h.store, 'alice', 1);
    script(h, { [token(0)]: { status: 400, reason: 'TopicDisallowed' } });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.dispatcher.settled();
    expect(h.dispatcher.stats().alarms.wrong_topic).toBe(true);
    h.dispatcher.credentialsChanged();
    expect(await metric(h.registry, 'xaps_apns_alarm', { kind: 'wrong_topic' })).toBe(0);
  });

  it('DeviceTokenNotForTopic alarms only when nothing was delivered recently', async () => {
    const h = await make();
    await register(h.store, 'alice', 2);
    script(h, { [token(1)]: { status: 400, reason: 'DeviceTokenNotForTopic' } });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' }); // token 0 delivered, token 1 not for topic
    await h.dispatcher.settled();
    expect(await results(h.registry)).toEqual({ delivered: 1, wrong_topic: 1 });
    expect(await metric(h.registry, 'xaps_apns_alarm', { kind: 'wrong_topic' })).toBe(0);
    expect(await h.store.get('alice', token(1))).not.toBeNull();
    // eleven minutes later with no delivery in between: only this device answers → alarm
    await h.sched.advance(11 * 60_000);
    script(h, { [token(0)]: { status: 400, reason: 'DeviceTokenNotForTopic' }, [token(1)]: { status: 400, reason: 'DeviceTokenNotForTopic' } });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.dispatcher.settled();
    expect(await metric(h.registry, 'xaps_apns_alarm', { kind: 'wrong_topic' })).toBe(1);
    expect((await h.store.listByUser('alice')).length).toBe(2);
  });

  it('the alarm is logged at error level, at most once per interval', async () => {
    const logs = captureLogs();
    const h = await make({ logger: logs.logger, coalesceWindowMs: 0 });
    await register(h.store, 'alice', 10);
    h.transport.respond = () => ({ status: 400, reason: 'BadTopic' });
    for (let i = 0; i < 3; i++) await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.dispatcher.settled();
    expect(await results(h.registry)).toEqual({ wrong_topic: 30 });
    const alarms = logs.lines().filter((l) => l.level === 50 && String(l.msg).includes('refuses the topic'));
    expect(alarms).toHaveLength(1);
    await h.sched.advance(60_000);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.dispatcher.settled();
    const again = logs.lines().filter((l) => l.level === 50 && String(l.msg).includes('refuses the topic'));
    expect(again).toHaveLength(2);
    expect(again[1]!.suppressed).toBe(29);
    expect(logs.lines().some((l) => JSON.stringify(l).includes(token(0)))).toBe(false); // never a full token
  });
});

describe('403 (credentials)', () => {
  it('pauses everything, keeps the pushes, and resumes on credentialsChanged()', async () => {
    const h = await make();
    await register(h.store, 'alice', 3, { mailboxes: ['INBOX', 'Work'] });
    let certOk = false;
    h.transport.respond = () => (certOk ? { status: 200 } : { status: 403, reason: 'BadCertificate' });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.dispatcher.settled();
    expect(h.transport.sent).toHaveLength(3);
    expect(h.dispatcher.stats()).toMatchObject({ paused: true, pending: 3 });
    expect(await metric(h.registry, 'xaps_apns_alarm', { kind: 'bad_certificate' })).toBe(1);
    expect(await h.store.listByUser('alice')).toHaveLength(3); // never pruned
    await h.sched.advance(60_000);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'Work' }); // merged into the waiting pushes
    await h.sched.advance(60_000);
    expect(h.transport.sent).toHaveLength(3);
    certOk = true;
    h.dispatcher.credentialsChanged();
    await h.dispatcher.settled();
    expect(h.transport.sent).toHaveLength(6);
    for (const s of h.transport.sent.slice(3)) expect(s.payload.aps.m).toEqual([md5('INBOX'), md5('Work')]);
    expect(h.dispatcher.stats()).toMatchObject({ paused: false, pending: 0 });
    expect(await metric(h.registry, 'xaps_apns_alarm', { kind: 'bad_certificate' })).toBe(0);
    expect(await results(h.registry)).toEqual({ bad_certificate: 3, delivered: 3 });
    expect(await metric(h.registry, 'xaps_apns_responses_total', { status: '403', reason: 'BadCertificate' })).toBe(3);
  });

  it('while paused the queue stays within its bound; the newest pushes go out after', async () => {
    const h = await make({ queueSize: 5 });
    await register(h.store, 'first', 1);
    for (let u = 1; u <= 20; u++) await register(h.store, `u${u}`, 1, { from: u });
    let certOk = false;
    h.transport.respond = () => (certOk ? { status: 200 } : { status: 403, reason: 'Forbidden' });
    await h.dispatcher.notify({ user: 'first', mailbox: 'INBOX' });
    await h.dispatcher.settled();
    expect(h.dispatcher.stats().paused).toBe(true);
    for (let u = 1; u <= 20; u++) {
      await h.dispatcher.notify({ user: `u${u}`, mailbox: 'INBOX' });
      expect(h.dispatcher.stats().pending).toBeLessThanOrEqual(5);
    }
    expect(h.transport.sent).toHaveLength(1);
    expect(await metric(h.registry, 'xaps_push_queue_depth')).toBe(5);
    expect(await metric(h.registry, 'xaps_push_queue_dropped_total', { kind: 'other' })).toBe(16);
    certOk = true;
    h.dispatcher.credentialsChanged();
    await h.dispatcher.settled();
    expect(h.transport.sent.slice(1).map((s) => s.n.deviceToken)).toEqual([16, 17, 18, 19, 20].map((i) => token(i)));
    expect(await results(h.registry)).toEqual({ bad_certificate: 1, dropped: 16, delivered: 5 });
  });

  it('probes once every 5 minutes and resumes when a probe is accepted', async () => {
    const h = await make();
    await register(h.store, 'alice', 4);
    let certOk = false;
    h.transport.respond = () => (certOk ? { status: 200 } : { status: 403, reason: 'InvalidProviderToken' });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.dispatcher.settled();
    expect(h.transport.sent).toHaveLength(4);
    await h.sched.advance(5 * 60_000 - 1);
    expect(h.transport.sent).toHaveLength(4);
    await h.sched.advance(1);
    expect(h.transport.sent).toHaveLength(5); // one probe, refused
    expect(h.dispatcher.stats().paused).toBe(true);
    certOk = true;
    await h.sched.advance(5 * 60_000 - 1);
    expect(h.transport.sent).toHaveLength(5);
    await h.sched.advance(1);
    await h.dispatcher.settled();
    expect(h.transport.sent).toHaveLength(9); // probe accepted, then the other three
    expect(h.dispatcher.stats()).toMatchObject({ paused: false, pending: 0 });
    expect(await metric(h.registry, 'xaps_apns_alarm', { kind: 'bad_certificate' })).toBe(0);
  });

  it('a test push that is accepted resumes sending', async () => {
    const h = await make();
    const regs = await register(h.store, 'alice', 2);
    script(h, { [token(0)]: [{ status: 403, reason: 'BadCertificateEnvironment' }, { status: 200 }] });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.dispatcher.settled();
    // token 1 got its 200 before the pause was known; token 0 waits
    expect(h.dispatcher.stats()).toMatchObject({ paused: true, pending: 1 });
    expect(await h.dispatcher.sendNow(regs[1]!)).toMatchObject({ status: 200 });
    await h.dispatcher.settled();
    expect(h.dispatcher.stats()).toMatchObject({ paused: false, pending: 0 });
    expect(times(h, token(0))).toEqual([0, 0]);
  });
});

describe('429', () => {
  it('backs off that device for Retry-After, merging its changes; others go on', async () => {
    const h = await make();
    await register(h.store, 'alice', 1, { mailboxes: ['INBOX', 'Work'] });
    await register(h.store, 'alice', 1, { from: 1 });
    script(h, { [token(0)]: [{ status: 429, reason: 'TooManyRequests', retryAfterMs: 30_000 }, { status: 200 }] });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(5000);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'Work' });
    await h.sched.advance(5000);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(30_000);
    expect(times(h, token(0))).toEqual([0, 30_000]);
    expect(h.transport.to(token(0))[1]!.payload.aps.m).toEqual([md5('INBOX'), md5('Work')]);
    expect(times(h, token(1))).toEqual([0, 10_000]);
    expect(await results(h.registry)).toEqual({ throttled: 1, delivered: 3 });
    expect(await metric(h.registry, 'xaps_apns_responses_total', { status: '429', reason: 'TooManyRequests' })).toBe(1);
  });

  it('without Retry-After waits 5 minutes', async () => {
    const h = await make();
    await register(h.store, 'alice', 1);
    script(h, { [token(0)]: [{ status: 429, reason: 'TooManyRequests' }, { status: 200 }] });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(300_000 - 1);
    expect(h.transport.sent).toHaveLength(1);
    await h.sched.advance(1);
    expect(times(h, token(0))).toEqual([0, 300_000]);
  });
});

describe('5xx and transport errors', () => {
  it('retries with exponential back-off and full jitter, then gives up after maxAttempts', async () => {
    const h = await make({ maxAttempts: 4 }); // random() = 0.5: delays 250, 500, 1000
    await register(h.store, 'alice', 1);
    script(h, { [token(0)]: { status: 500, reason: 'InternalServerError' } });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(249);
    expect(times(h, token(0))).toEqual([0]);
    await h.sched.advance(600_000);
    expect(times(h, token(0))).toEqual([0, 250, 750, 1750]);
    expect(await results(h.registry)).toEqual({ retried: 3, failed: 1 });
    expect(await metric(h.registry, 'xaps_apns_responses_total', { status: '500', reason: 'InternalServerError' })).toBe(4);
    expect(await h.store.get('alice', token(0))).not.toBeNull();
    expect(h.dispatcher.stats()).toMatchObject({ pending: 0, devices: 0 });
  });

  it('default: 8 attempts, back-off doubling up to the cap', async () => {
    const h = await make({ random: () => 1 });
    await register(h.store, 'alice', 1);
    script(h, { [token(0)]: { status: 503, reason: 'ServiceUnavailable' } });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(3_600_000);
    const t = times(h, token(0));
    expect(t).toHaveLength(8);
    expect(t.slice(1).map((x, i) => x - t[i]!)).toEqual([500, 1000, 2000, 4000, 8000, 16000, 32000]);
    expect(await results(h.registry)).toEqual({ retried: 7, failed: 1 });
  });

  it('the cap bounds the back-off', async () => {
    const h = await make({ random: () => 1, maxAttempts: 12, retryCapMs: 5000 });
    await register(h.store, 'alice', 1);
    script(h, { [token(0)]: { status: 503 } });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(3_600_000);
    const t = times(h, token(0));
    expect(Math.max(...t.slice(1).map((x, i) => x - t[i]!))).toBe(5000);
  });

  it('honours Retry-After on 503', async () => {
    const h = await make();
    await register(h.store, 'alice', 1);
    script(h, { [token(0)]: [{ status: 503, reason: 'ServiceUnavailable', retryAfterMs: 10_000 }, { status: 200 }] });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(9_999);
    expect(h.transport.sent).toHaveLength(1);
    await h.sched.advance(1);
    expect(times(h, token(0))).toEqual([0, 10_000]);
    expect(await results(h.registry)).toEqual({ retried: 1, delivered: 1 });
  });

  it('transport errors are retried like 5xx and counted by kind', async () => {
    const h = await make();
    await register(h.store, 'alice', 1);
    script(h, {
      [token(0)]: [new ApnsTransportError('timeout', 'no answer in 15 s'), new ApnsTransportError('reset', 'ECONNRESET'), { status: 200 }],
    });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(60_000);
    expect(times(h, token(0))).toEqual([0, 250, 750]);
    expect(await results(h.registry)).toEqual({ retried: 2, delivered: 1 });
    expect(await metric(h.registry, 'xaps_apns_responses_total', { status: 'transport', reason: 'timeout' })).toBe(1);
    expect(await metric(h.registry, 'xaps_apns_responses_total', { status: 'transport', reason: 'reset' })).toBe(1);
  });

  it('changes arriving during the back-off ride along with the retry', async () => {
    const h = await make();
    await register(h.store, 'alice', 1, { mailboxes: ['INBOX', 'Work'] });
    script(h, { [token(0)]: [{ status: 503, retryAfterMs: 5000 }, { status: 200 }] });
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(3000);
    await h.dispatcher.notify({ user: 'alice', mailbox: 'Work' });
    await h.sched.advance(10_000);
    expect(times(h, token(0))).toEqual([0, 5000]);
    expect(h.transport.sent[1]!.payload.aps.m).toEqual([md5('INBOX'), md5('Work')]);
  });

  it('one failing token never blocks the others', async () => {
    const h = await make({ maxInFlight: 2 });
    await register(h.store, 'alice', 1);
    await register(h.store, 'bob', 1, { from: 1 });
    script(h, { [token(0)]: { status: 500 } });
    for (let i = 0; i < 5; i++) {
      await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
      await h.dispatcher.notify({ user: 'bob', mailbox: 'INBOX' });
      await h.sched.advance(3000);
    }
    expect(times(h, token(1))).toEqual([0, 3000, 6000, 9000, 12000]);
  });

  it('whatever the transport does, nothing escapes', async () => {
    const h = await make({ maxAttempts: 2 });
    const regs = await register(h.store, 'alice', 4);
    let calls = 0;
    const weird: ApnsTransport = {
      send(n: ApnsNotification): Promise<ApnsResponse> {
        calls++;
        if (n.deviceToken === token(0)) throw new Error('synchronous throw');
        if (n.deviceToken === token(1)) return Promise.resolve(undefined as unknown as ApnsResponse);
        if (n.deviceToken === token(2)) return Promise.reject('a string');
        return Promise.resolve({ status: 'nonsense' } as unknown as ApnsResponse);
      },
      setCredentials() {},
      close: async () => {},
    };
    const d = new PushDispatcher({ store: h.store, transport: weird, topic: () => TOPIC, registry: h.registry, scheduler: h.sched, random: () => 0, maxAttempts: 2 });
    await d.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(10_000);
    await d.settled();
    expect(calls).toBe(8);
    expect(await results(h.registry)).toEqual({ retried: 4, failed: 4 });
    expect(await d.sendNow(regs[0]!)).toBeInstanceOf(ApnsTransportError);
    await d.close();
  });
});

describe('other 4xx', () => {
  for (const [status, reason] of [[400, 'BadPriority'], [400, undefined], [404, 'BadPath'], [405, 'MethodNotAllowed'], [413, 'PayloadTooLarge'], [418, 'Teapot']] as const) {
    it(`${status} ${reason ?? ''}: logged, not retried, registration kept`, async () => {
      const logs = captureLogs();
      const h = await make({ logger: logs.logger });
      await register(h.store, 'alice', 1);
      script(h, { [token(0)]: reason === undefined ? { status } : { status, reason } });
      await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
      await h.sched.advance(600_000);
      expect(h.transport.sent).toHaveLength(1);
      expect(await results(h.registry)).toEqual({ rejected: 1 });
      expect(await h.store.get('alice', token(0))).not.toBeNull();
      const statusLabel = status === 418 ? '4xx' : String(status);
      const reasonLabel = reason === undefined ? 'none' : reason === 'Teapot' ? 'other' : reason;
      expect(await metric(h.registry, 'xaps_apns_responses_total', { status: statusLabel, reason: reasonLabel })).toBe(1);
      expect(logs.lines().filter((l) => l.level === 50 && String(l.msg).includes('rejected'))).toHaveLength(1);
    });
  }
});

describe('queue bound', () => {
  it('drops the oldest merged follow-up first, then the oldest of anything; counted', async () => {
    const h = await make({ queueSize: 2, maxInFlight: 1 });
    h.transport.manual = true;
    for (const [u, i] of [['a', 0], ['b', 1], ['c', 2], ['d', 3]] as const) await register(h.store, u, 1, { from: i });
    await h.dispatcher.notify({ user: 'a', mailbox: 'INBOX' }); // sent; holds the only slot
    await h.dispatcher.notify({ user: 'b', mailbox: 'INBOX' }); // waits for a slot (oldest)
    await h.sched.advance(100);
    await h.dispatcher.notify({ user: 'a', mailbox: 'INBOX' }); // follow-up of a
    expect(h.dispatcher.stats()).toMatchObject({ pending: 2, followups: 1 });
    await h.dispatcher.notify({ user: 'c', mailbox: 'INBOX' }); // full: a's follow-up goes, although b is older
    expect(await metric(h.registry, 'xaps_push_queue_dropped_total', { kind: 'followup' })).toBe(1);
    expect(h.dispatcher.stats()).toMatchObject({ pending: 2, followups: 0 });
    await h.dispatcher.notify({ user: 'd', mailbox: 'INBOX' }); // full, no follow-ups: the oldest (b) goes
    expect(await metric(h.registry, 'xaps_push_queue_dropped_total', { kind: 'other' })).toBe(1);
    while (h.transport.heldCount > 0) {
      h.transport.release();
      await h.sched.advance(0);
    }
    await h.sched.advance(10_000);
    expect(h.transport.sent.map((s) => s.n.deviceToken)).toEqual([token(0), token(2), token(3)]);
    expect(await results(h.registry)).toEqual({ delivered: 3, dropped: 2 });
    // b never got its push, so its next change goes out at once
    await h.dispatcher.notify({ user: 'b', mailbox: 'INBOX' });
    expect(h.transport.sent.at(-1)!.n.deviceToken).toBe(token(1));
  });

  it('memory stays bounded while APNs is unreachable', async () => {
    const h = await make({ queueSize: 50, maxInFlight: 20, maxAttempts: 50 });
    h.transport.respond = () => new ApnsTransportError('connect', 'ECONNREFUSED');
    for (let u = 0; u < 40; u++) await register(h.store, `u${u}`, 25, { from: u * 25 });
    for (let round = 0; round < 5; round++) {
      for (let u = 0; u < 40; u++) {
        await h.dispatcher.notify({ user: `u${u}`, mailbox: 'INBOX' });
        const s = h.dispatcher.stats();
        expect(s.pending).toBeLessThanOrEqual(50);
        expect(s.inFlight).toBeLessThanOrEqual(20);
      }
      await h.sched.advance(1000);
    }
    await h.sched.advance(120_000);
    const s = h.dispatcher.stats();
    expect(s.pending).toBeLessThanOrEqual(50);
    expect(s.devices).toBeLessThanOrEqual(70);
    expect(h.transport.maxInFlight).toBeLessThanOrEqual(20);
    expect(await metric(h.registry, 'xaps_push_queue_dropped_total')).toBeGreaterThan(0);
    expect(await metric(h.registry, 'xaps_push_queue_depth')).toBe(s.pending);
  });
});
