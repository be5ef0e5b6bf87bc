/**
 * Change guard against a real redis-server (127.0.0.1, free port, temp dir; stopped by its pid): two dispatchers
 * sharing Redis push each device once per change; Redis down or hung → fail open, counted.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Redis } from 'ioredis';
import { Registry } from 'prom-client';
import { RedisChangeGuard } from '../../../src/apns/change-guard.js';
import { PushDispatcher } from '../../../src/apns/dispatcher.js';
import { RedisRegistrationStore, userKeys } from '../../../src/store/redis.js';
import { startRedis, type RedisInstance } from '../../../src/testbed/redis.js';
import type { RegistrationStore } from '../../../src/store/types.js';
import {
  FakeTransport,
  flush,
  ManualScheduler,
  metric,
  register,
  removeTempDirs,
  T0,
  tempStore,
  token,
  TOPIC,
} from '../../unit/apns/dispatcher-helpers.js';

const DAY = 24 * 3600 * 1000;
let redis: RedisInstance;
let prefixes = 0;
const nextPrefix = (): string => `g${process.pid}x${++prefixes}`;
const closers: Array<() => Promise<void>> = [];

beforeAll(async () => {
  redis = await startRedis();
});
afterAll(async () => {
  await redis?.destroy();
  await removeTempDirs();
});
afterEach(async () => {
  for (const c of closers.splice(0).reverse()) await c();
});

async function openStore(keyPrefix: string): Promise<RedisRegistrationStore> {
  const s = await RedisRegistrationStore.open({ url: redis.url, ttlMs: 30 * DAY, keyPrefix, clock: () => T0, connectWaitMs: 10_000 });
  closers.push(() => s.close());
  return s;
}

interface Instance {
  store: RegistrationStore;
  transport: FakeTransport;
  registry: Registry;
  dispatcher: PushDispatcher;
}

function instance(store: RegistrationStore, guard: RedisChangeGuard, sched: ManualScheduler, coalesceWindowMs = 2000): Instance {
  const transport = new FakeTransport(sched);
  const registry = new Registry();
  const dispatcher = new PushDispatcher({ store, transport, topic: () => TOPIC, registry, scheduler: sched, guard, coalesceWindowMs });
  closers.push(() => dispatcher.close());
  return { store, transport, registry, dispatcher };
}

async function waitUntil(what: string, fn: () => Promise<unknown>): Promise<void> {
  let last: unknown;
  for (let i = 0; i < 600; i++) {
    try {
      await fn();
      return;
    } catch (err) {
      last = err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  throw new Error(`${what}: ${String(last)}`);
}

describe('RedisChangeGuard', () => {
  it('SET <prefix>:{u:<user>}:chg:<id> NX PX: first claim wins, in the user\'s hash slot, with a TTL', async () => {
    const prefix = nextPrefix();
    const store = await openStore(prefix);
    const guard = RedisChangeGuard.forStore(store, { ttlMs: 60_000 });
    expect(guard.key('alice', 'INBOX:7:42')).toBe(`${prefix}:{u:alice}:chg:INBOX:7:42`);
    expect(guard.key('we{ir}d', 'x')).toBe(`${prefix}:${userKeys(prefix, 'we{ir}d').tag}:chg:x`);
    expect(await guard.claim('alice', 'INBOX:7:42')).toBe(true);
    expect(await guard.claim('alice', 'INBOX:7:42')).toBe(false);
    expect(await guard.claim('bob', 'INBOX:7:42')).toBe(true);
    expect(await guard.claim('we{ir}d', 'INBOX:7:42')).toBe(true);
    const probe = new Redis(redis.url, { lazyConnect: true });
    closers.push(async () => probe.disconnect());
    await probe.connect();
    const pttl = await probe.pttl(guard.key('alice', 'INBOX:7:42'));
    expect(pttl).toBeGreaterThan(0);
    expect(pttl).toBeLessThanOrEqual(60_000);
  });

  it('two dispatchers sharing Redis, given the same change, push each device once', async () => {
    const prefix = nextPrefix();
    const storeA = await openStore(prefix);
    const storeB = await openStore(prefix);
    await register(storeA, 'alice', 5);
    const sched = new ManualScheduler();
    const a = instance(storeA, RedisChangeGuard.forStore(storeA), sched, 0);
    const b = instance(storeB, RedisChangeGuard.forStore(storeB), sched, 0);
    for (let n = 1; n <= 10; n++) {
      const change = { user: 'alice', mailbox: 'INBOX', changeId: `INBOX:1:${n}` };
      await Promise.all([a.dispatcher.notify(change), b.dispatcher.notify(change)]);
      await flush();
      const all = [...a.transport.sent, ...b.transport.sent];
      expect(all).toHaveLength(5 * n);
      for (let i = 0; i < 5; i++) expect(all.filter((s) => s.n.deviceToken === token(i))).toHaveLength(n);
    }
    const dedupA = await metric(a.registry, 'xaps_pushes_total', { result: 'deduplicated' });
    const dedupB = await metric(b.registry, 'xaps_pushes_total', { result: 'deduplicated' });
    expect(dedupA + dedupB).toBe(50);
    expect(a.transport.sent.length + b.transport.sent.length).toBe(50);
    // a change without an id is not guarded: both instances push it
    await Promise.all([a.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' }), b.dispatcher.notify({ user: 'alice', mailbox: 'INBOX' })]);
    expect(a.transport.sent.length + b.transport.sent.length).toBe(60);
  });

  it('Redis down: the guard fails open (the change is pushed) and it is counted; claims work again after a restart', async () => {
    const sched = new ManualScheduler();
    const regStore = await tempStore(sched); // registrations elsewhere: only the guard depends on Redis here
    closers.push(() => regStore.close());
    await register(regStore, 'alice', 2);
    const guardStore = await openStore(nextPrefix());
    const x = instance(regStore, RedisChangeGuard.forStore(guardStore, { timeoutMs: 500 }), sched);
    await redis.stop();
    try {
      await x.dispatcher.notify({ user: 'alice', mailbox: 'INBOX', changeId: 'c1' });
      expect(x.transport.sent).toHaveLength(2);
      expect(await metric(x.registry, 'xaps_push_guard_errors_total')).toBe(1);
    } finally {
      await redis.restart();
    }
    await waitUntil('redis reachable again', () => guardStore.ping());
    await sched.advance(5000);
    await x.dispatcher.notify({ user: 'alice', mailbox: 'INBOX', changeId: 'c2' });
    await x.dispatcher.notify({ user: 'alice', mailbox: 'INBOX', changeId: 'c2' });
    await sched.advance(5000);
    expect(x.transport.sent).toHaveLength(4);
    expect(await metric(x.registry, 'xaps_pushes_total', { result: 'deduplicated' })).toBe(2);
    expect(await metric(x.registry, 'xaps_push_guard_errors_total')).toBe(1);
  });

  it('Redis hung: the claim times out and the change is pushed anyway', async () => {
    const sched = new ManualScheduler();
    const regStore = await tempStore(sched);
    closers.push(() => regStore.close());
    await register(regStore, 'alice', 1);
    const guardStore = await openStore(nextPrefix());
    const x = instance(regStore, RedisChangeGuard.forStore(guardStore, { timeoutMs: 300 }), sched);
    process.kill(redis.pid, 'SIGSTOP');
    try {
      await x.dispatcher.notify({ user: 'alice', mailbox: 'INBOX', changeId: 'c1' });
    } finally {
      process.kill(redis.pid, 'SIGCONT');
    }
    expect(x.transport.sent).toHaveLength(1);
    expect(await metric(x.registry, 'xaps_push_guard_errors_total')).toBe(1);
  });
});
