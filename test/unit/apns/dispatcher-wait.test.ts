/**
 * PushDispatcher.notifyAndWait (the watchers store a mailbox's new state only once it resolves) and the retry of
 * changes whose registrations cannot be read (store down). Manual clock, fake APNs transport whose answers are held
 * until released, a real embedded store behind a wrapper that can be made to fail reads.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { Registry } from 'prom-client';
import type { ChangeGuard } from '../../../src/apns/change-guard.js';
import { PushDispatcher, type DispatcherOptions } from '../../../src/apns/dispatcher.js';
import type { RegistrationStore } from '../../../src/store/types.js';
import {
  ApnsTransportError,
  FakeTransport,
  flush,
  ManualScheduler,
  metric,
  register,
  removeTempDirs,
  results,
  T0,
  tempStore,
  token,
  TOPIC,
  type Answer,
} from './dispatcher-helpers.js';

/** listByUser fails while `failing`; `reads` counts every call by user. */
class FlakyStore implements Pick<RegistrationStore, 'listByUser' | 'remove'> {
  failing = false;
  readonly reads: string[] = [];
  constructor(private readonly inner: RegistrationStore) {}
  listByUser(user: string): ReturnType<RegistrationStore['listByUser']> {
    this.reads.push(user);
    if (this.failing) return Promise.reject(new Error('redis: connection refused'));
    return this.inner.listByUser(user);
  }
  remove(...args: Parameters<RegistrationStore['remove']>): ReturnType<RegistrationStore['remove']> {
    return this.inner.remove(...args);
  }
}

interface H {
  sched: ManualScheduler;
  store: RegistrationStore;
  flaky: FlakyStore;
  transport: FakeTransport;
  registry: Registry;
  dispatcher: PushDispatcher;
  topic: { value: string | null };
}

const open: H[] = [];
afterEach(async () => {
  for (const h of open.splice(0)) {
    h.transport.release(); // nothing left hanging in the fake transport
    await h.dispatcher.close();
    await h.store.close();
  }
  await removeTempDirs();
});

async function make(opts: Partial<DispatcherOptions> = {}): Promise<H> {
  const sched = new ManualScheduler();
  const store = await tempStore(sched);
  const flaky = new FlakyStore(store);
  const transport = new FakeTransport(sched);
  const registry = new Registry();
  const topic = { value: TOPIC as string | null };
  const dispatcher = new PushDispatcher({
    store: flaky,
    transport,
    topic: () => topic.value,
    registry,
    scheduler: sched,
    random: () => 0.5,
    ...opts,
  });
  const h = { sched, store, flaky, transport, registry, dispatcher, topic };
  open.push(h);
  return h;
}

/** Watches a promise without awaiting it. */
function watch(p: Promise<unknown>): { readonly done: boolean } {
  const w = { done: false };
  void p.then(() => {
    w.done = true;
  });
  return w;
}

/** Answers the held requests one by one with `answer`, letting the dispatcher react after each. */
async function answerHeld(h: H, answer: Answer = { status: 200 }): Promise<void> {
  while (h.transport.heldCount > 0) {
    h.transport.release(1, answer);
    await flush();
  }
}

describe('notifyAndWait: resolves once the push is done with', () => {
  it('not before the transport answered; at once after a 200 (notify, by contrast, resolves when scheduled)', async () => {
    const h = await make({ coalesceWindowMs: 0 });
    await register(h.store, 'alice', 1);
    h.transport.manual = true;
    const w = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1:5', detectedAt: T0 }));
    await h.sched.advance(0);
    expect(h.transport.sent).toHaveLength(1);
    expect(h.transport.heldCount).toBe(1);
    expect(w.done).toBe(false);
    await h.sched.advance(10 * 60_000); // no timer stands in for the answer
    expect(w.done).toBe(false);
    h.transport.release(1, { status: 200 });
    await flush();
    expect(w.done).toBe(true);
    expect(await results(h.registry)).toEqual({ delivered: 1 });

    const plain = watch(h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1:6' }));
    await flush();
    expect(h.transport.heldCount).toBe(1);
    expect(plain.done).toBe(true);
  });

  const finals: Array<[string, Answer]> = [
    ['410 Unregistered', { status: 410, reason: 'Unregistered', timestamp: T0 + 1 }],
    ['400 BadDeviceToken', { status: 400, reason: 'BadDeviceToken' }],
    ['400 TopicDisallowed', { status: 400, reason: 'TopicDisallowed' }],
    ['400 BadPriority (rejected)', { status: 400, reason: 'BadPriority' }],
  ];
  for (const [name, answer] of finals) {
    it(`after a final answer that is not a delivery: ${name}`, async () => {
      const h = await make({ coalesceWindowMs: 0 });
      await register(h.store, 'alice', 1);
      h.transport.manual = true;
      const w = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX' }));
      await h.sched.advance(0);
      expect(w.done).toBe(false);
      h.transport.release(1, answer);
      await h.dispatcher.settled();
      await flush();
      expect(w.done).toBe(true);
      expect(h.transport.sent).toHaveLength(1);
    });
  }

  it('keeps waiting through 5xx and transport-error retries; resolves after the final give-up at maxAttempts', async () => {
    const h = await make({ coalesceWindowMs: 0, maxAttempts: 3, retryBaseMs: 1000 });
    await register(h.store, 'alice', 1);
    h.transport.manual = true;
    const w = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX' }));
    await h.sched.advance(0);
    h.transport.release(1, { status: 503, reason: 'ServiceUnavailable' });
    await flush();
    expect(w.done).toBe(false);
    await h.sched.advance(500); // 0.5 · 1000
    expect(h.transport.sent).toHaveLength(2);
    h.transport.release(1, new ApnsTransportError('reset', 'ECONNRESET'));
    await flush();
    expect(w.done).toBe(false);
    await h.sched.advance(1000); // 0.5 · 2000
    expect(h.transport.sent).toHaveLength(3);
    expect(w.done).toBe(false);
    h.transport.release(1, { status: 500, reason: 'InternalServerError' });
    await flush();
    expect(w.done).toBe(true);
    expect(await results(h.registry)).toEqual({ retried: 2, failed: 1 });
    await h.sched.advance(60 * 60_000);
    expect(h.transport.sent).toHaveLength(3);
  });

  it('a retry that then succeeds resolves with the 200, not with the 5xx', async () => {
    const h = await make({ coalesceWindowMs: 0, retryBaseMs: 1000 });
    await register(h.store, 'alice', 1);
    h.transport.manual = true;
    const w = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX' }));
    await h.sched.advance(0);
    h.transport.release(1, { status: 503 });
    await h.sched.advance(500);
    expect(h.transport.sent).toHaveLength(2);
    expect(w.done).toBe(false);
    h.transport.release(1, { status: 200 });
    await flush();
    expect(w.done).toBe(true);
    expect(await results(h.registry)).toEqual({ retried: 1, delivered: 1 });
  });

  it('keeps waiting through a 429 back-off and a 403 pause; resolves once the push finally goes out and is answered', async () => {
    const h = await make({ coalesceWindowMs: 0 });
    await register(h.store, 'alice', 1);
    h.transport.manual = true;
    const w = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX' }));
    await h.sched.advance(0);
    h.transport.release(1, { status: 429, reason: 'TooManyRequests', retryAfterMs: 5000 });
    await h.sched.advance(4999);
    expect(h.transport.sent).toHaveLength(1);
    expect(w.done).toBe(false);
    await h.sched.advance(1);
    expect(h.transport.sent).toHaveLength(2);
    h.transport.release(1, { status: 403, reason: 'BadCertificate' });
    await h.sched.advance(1000);
    expect(h.dispatcher.stats().paused).toBe(true);
    expect(w.done).toBe(false);
    h.dispatcher.credentialsChanged();
    await flush();
    expect(h.transport.sent).toHaveLength(3);
    expect(w.done).toBe(false);
    h.transport.release(1, { status: 200 });
    await flush();
    expect(w.done).toBe(true);
  });

  it('a change merged into a waiting follow-up resolves when that follow-up is answered, not with the first push', async () => {
    const h = await make({ coalesceWindowMs: 2000 });
    await register(h.store, 'alice', 1, { mailboxes: ['INBOX', 'Work'] });
    h.transport.manual = true;
    const first = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1:5' }));
    await h.sched.advance(100);
    const second = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1:6' })); // follow-up at 2000
    await h.sched.advance(100);
    const third = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'Work', changeId: 'Work:1:2' })); // merged into it
    h.transport.release(1, { status: 200 });
    await flush();
    expect([first.done, second.done, third.done]).toEqual([true, false, false]);
    await h.sched.advance(1799);
    expect(h.transport.sent).toHaveLength(1);
    await h.sched.advance(1);
    expect(h.transport.sent).toHaveLength(2);
    expect([second.done, third.done]).toEqual([false, false]);
    h.transport.release(1, { status: 200 });
    await flush();
    expect([second.done, third.done]).toEqual([true, true]);
  });

  it('a failed push merged back into the waiting follow-up keeps its waiter until the merged push is answered', async () => {
    const h = await make({ coalesceWindowMs: 2000, retryBaseMs: 500 });
    await register(h.store, 'alice', 1, { mailboxes: ['INBOX', 'Work'] });
    h.transport.manual = true;
    const first = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX' }));
    await h.sched.advance(100);
    const second = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'Work' })); // follow-up at 2000
    h.transport.release(1, { status: 503 }); // the first push goes into the waiting follow-up
    await flush();
    expect([first.done, second.done]).toEqual([false, false]);
    await h.sched.advance(1900);
    expect(h.transport.sent).toHaveLength(2);
    expect(h.transport.sent[1]!.payload.aps.m).toHaveLength(2); // INBOX and Work in one push
    expect([first.done, second.done]).toEqual([false, false]);
    h.transport.release(1, { status: 200 });
    await flush();
    expect([first.done, second.done]).toEqual([true, true]);
  });

  it('every device of the change must be done: one answered is not enough', async () => {
    const h = await make({ coalesceWindowMs: 0 });
    await register(h.store, 'alice', 2);
    h.transport.manual = true;
    const w = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX' }));
    await h.sched.advance(0);
    expect(h.transport.heldCount).toBe(2);
    h.transport.release(1, { status: 200 });
    await flush();
    expect(w.done).toBe(false);
    h.transport.release(1, { status: 200 });
    await flush();
    expect(w.done).toBe(true);
  });

  it('when the push is dropped by the queue bound, without being sent', async () => {
    const h = await make({ coalesceWindowMs: 0, queueSize: 1, maxInFlight: 1 });
    for (const [u, i] of [['a', 0], ['b', 1], ['c', 2]] as const) await register(h.store, u, 1, { from: i });
    h.transport.manual = true;
    const a = watch(h.dispatcher.notifyAndWait({ user: 'a', mailbox: 'INBOX' })); // sent, holds the only slot
    const b = watch(h.dispatcher.notifyAndWait({ user: 'b', mailbox: 'INBOX' })); // waits for the slot
    await h.sched.advance(0);
    expect([a.done, b.done]).toEqual([false, false]);
    const c = watch(h.dispatcher.notifyAndWait({ user: 'c', mailbox: 'INBOX' })); // full: b is dropped
    await h.sched.advance(0);
    expect([a.done, b.done, c.done]).toEqual([false, true, false]);
    expect(await metric(h.registry, 'xaps_push_queue_dropped_total', { kind: 'other' })).toBe(1);
    await answerHeld(h);
    expect([a.done, c.done]).toEqual([true, true]);
    expect(h.transport.sent.map((s) => s.n.deviceToken)).toEqual([token(0), token(2)]);
  });

  it('when the push is dropped at shutdown (waiting for its window, or for its retry)', async () => {
    const h = await make({ coalesceWindowMs: 2000, retryBaseMs: 60_000 });
    await register(h.store, 'alice', 1);
    await register(h.store, 'bob', 1, { from: 1 });
    h.transport.respond = (n) => (n.deviceToken === token(1) ? { status: 503 } : { status: 200 });
    const a1 = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX' }));
    const b1 = watch(h.dispatcher.notifyAndWait({ user: 'bob', mailbox: 'INBOX' })); // 503: retry in 30 s
    await h.sched.advance(100);
    const a2 = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX' })); // follow-up at 2000
    await flush();
    expect([a1.done, b1.done, a2.done]).toEqual([true, false, false]);
    await h.dispatcher.close({ flushMs: 0 });
    await flush();
    expect([b1.done, a2.done]).toEqual([true, true]);
    expect(h.transport.sent).toHaveLength(2);
    expect(await metric(h.registry, 'xaps_push_queue_dropped_total', { kind: 'shutdown' })).toBe(2);
  });

  it('a push in flight at close: resolves with its answer, or when its retry falls after the flush deadline', async () => {
    const h = await make({ coalesceWindowMs: 0, retryBaseMs: 60_000 });
    await register(h.store, 'alice', 1);
    await register(h.store, 'bob', 1, { from: 1 });
    h.transport.manual = true;
    const a = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX' }));
    const b = watch(h.dispatcher.notifyAndWait({ user: 'bob', mailbox: 'INBOX' }));
    await h.sched.advance(0);
    expect(h.transport.heldCount).toBe(2);
    const closing = h.dispatcher.close({ flushMs: 5000 });
    await flush();
    expect([a.done, b.done]).toEqual([false, false]);
    h.transport.release(1, { status: 200 });
    await flush();
    expect([a.done, b.done]).toEqual([true, false]);
    h.transport.release(1, { status: 503 }); // retry in 30 s: after the deadline, so dropped
    await flush();
    expect(b.done).toBe(true);
    await closing;
    expect(h.transport.sent).toHaveLength(2);
    expect(await metric(h.registry, 'xaps_push_queue_dropped_total', { kind: 'shutdown' })).toBe(1);
  });

  it('at once after close, for no device, for a mailbox no device pushes, for a deduplicated change, and without a topic', async () => {
    const claimed = new Set<string>(['INBOX:1:5']);
    const guard: ChangeGuard = { claim: async (_u, id) => !claimed.has(id) };
    const h = await make({ coalesceWindowMs: 0, guard });
    await register(h.store, 'alice', 1, { mailboxes: ['INBOX'] });
    h.transport.manual = true;
    await h.dispatcher.notifyAndWait({ user: 'nobody', mailbox: 'INBOX' });
    await h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'Archive' });
    await h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1:5' });
    h.topic.value = null;
    await h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1:6' });
    expect(h.transport.sent).toHaveLength(0);
    expect(await results(h.registry)).toEqual({ deduplicated: 1, no_topic: 1 });
    await h.dispatcher.close();
    await h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX' });
    expect(await metric(h.registry, 'xaps_push_changes_total', { result: 'closed' })).toBe(1);
  });
});

describe('changes whose registrations cannot be read (store down)', () => {
  it('are read again after 1 s, doubling to 30 s, and pushed once when the store reads again', async () => {
    const h = await make({ coalesceWindowMs: 0 });
    await register(h.store, 'alice', 1);
    h.flaky.failing = true;
    h.transport.manual = true;
    const w = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1:5' }));
    await h.sched.advance(0);
    expect(h.flaky.reads).toEqual(['alice']);
    expect(await metric(h.registry, 'xaps_push_changes_total', { result: 'store_error' })).toBe(1);
    const delays: number[] = [];
    for (let i = 0; i < 8; i++) {
      const next = h.sched.nextAt();
      expect(next).toBeDefined();
      delays.push(next! - h.sched.now());
      await h.sched.advanceTo(next!);
      expect(h.flaky.reads).toHaveLength(i + 2);
    }
    expect(delays).toEqual([1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]);
    expect(h.transport.sent).toHaveLength(0);
    expect(w.done).toBe(false);

    h.flaky.failing = false;
    await h.sched.advance(30_000);
    expect(h.transport.sent).toHaveLength(1);
    expect(w.done).toBe(false); // read and sent, not yet answered
    h.transport.release(1, { status: 200 });
    await flush();
    expect(w.done).toBe(true);
    await h.sched.advance(10 * 60_000);
    expect(h.transport.sent).toHaveLength(1);
    expect(h.flaky.reads).toHaveLength(10);
    expect(h.sched.timerCount).toBe(0);
  });

  it('the back-off starts again at 1 s once a read succeeded', async () => {
    const h = await make({ coalesceWindowMs: 0 });
    await register(h.store, 'alice', 1);
    h.flaky.failing = true;
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    await h.sched.advance(1000);
    await h.sched.advance(2000);
    expect(h.sched.nextAt()! - h.sched.now()).toBe(4000);
    h.flaky.failing = false;
    await h.sched.advance(4000);
    expect(h.transport.sent).toHaveLength(1);
    h.flaky.failing = true;
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    expect(h.sched.nextAt()! - h.sched.now()).toBe(1000);
  });

  it('plain notify (nobody waiting) is retried too', async () => {
    const h = await make({ coalesceWindowMs: 0 });
    await register(h.store, 'alice', 1);
    h.flaky.failing = true;
    await h.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' });
    h.flaky.failing = false;
    await h.sched.advance(1000);
    expect(h.transport.sent.map((s) => s.n.deviceToken)).toEqual([token(0)]);
  });

  it('one retained change per user and mailbox: two changes are pushed once, both waiters resolved by it', async () => {
    const claims: string[] = [];
    const guard: ChangeGuard = {
      claim: async (_u, id) => {
        claims.push(id);
        return true;
      },
    };
    const h = await make({ coalesceWindowMs: 0, guard });
    await register(h.store, 'alice', 1);
    h.flaky.failing = true;
    const w1 = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1:5' }));
    await h.sched.advance(200);
    const w2 = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1:6' }));
    await h.sched.advance(0);
    h.flaky.failing = false;
    await h.sched.advance(800);
    expect(h.transport.sent).toHaveLength(1);
    expect(claims).toHaveLength(1);
    expect([w1.done, w2.done]).toEqual([true, true]);
  });

  it('are capped at queueSize: the oldest retained change is let go (its waiter resolved), the others pushed', async () => {
    const h = await make({ coalesceWindowMs: 0, queueSize: 2 });
    for (const [u, i] of [['u1', 1], ['u2', 2], ['u3', 3]] as const) await register(h.store, u, 1, { from: i });
    h.flaky.failing = true;
    const w1 = watch(h.dispatcher.notifyAndWait({ user: 'u1', mailbox: 'INBOX' }));
    const w2 = watch(h.dispatcher.notifyAndWait({ user: 'u2', mailbox: 'INBOX' }));
    await h.sched.advance(0);
    expect([w1.done, w2.done]).toEqual([false, false]);
    const w3 = watch(h.dispatcher.notifyAndWait({ user: 'u3', mailbox: 'INBOX' }));
    await h.sched.advance(0);
    expect([w1.done, w2.done, w3.done]).toEqual([true, false, false]);
    h.flaky.failing = false;
    h.flaky.reads.length = 0;
    await h.sched.advance(1000);
    expect(h.flaky.reads.sort()).toEqual(['u2', 'u3']);
    expect(h.transport.sent.map((s) => s.n.deviceToken).sort()).toEqual([token(2), token(3)]);
    expect([w2.done, w3.done]).toEqual([true, true]);
  });

  it('the cap holds while the store stays down: many mailboxes, never more than queueSize re-read per round', async () => {
    const h = await make({ coalesceWindowMs: 0, queueSize: 3 });
    h.flaky.failing = true;
    const ws = Array.from({ length: 10 }, (_, i) => watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: `Box${i}` })));
    await h.sched.advance(0);
    expect(ws.filter((w) => !w.done)).toHaveLength(3);
    for (let round = 0; round < 4; round++) {
      h.flaky.reads.length = 0;
      await h.sched.advanceTo(h.sched.nextAt()!);
      expect(h.flaky.reads).toHaveLength(3);
    }
    expect(ws.slice(7).map((w) => w.done)).toEqual([false, false, false]);
  });

  it('are let go at close: waiters resolved, no timer left, no read afterwards', async () => {
    const h = await make({ coalesceWindowMs: 0 });
    await register(h.store, 'alice', 1);
    h.flaky.failing = true;
    const w = watch(h.dispatcher.notifyAndWait({ user: 'alice', mailbox: 'INBOX' }));
    await h.sched.advance(0);
    expect(w.done).toBe(false);
    await h.dispatcher.close();
    await flush();
    expect(w.done).toBe(true);
    expect(h.sched.timerCount).toBe(0);
    h.flaky.failing = false;
    await h.sched.advance(60_000);
    expect(h.flaky.reads).toHaveLength(1);
    expect(h.transport.sent).toHaveLength(0);
  });
});
