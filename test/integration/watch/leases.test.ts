/**
 * Watcher leases against a real redis-server (127.0.0.1, free port, temp dir, stopped by its pid), and two
 * supervisors (instances A and B) sharing it with fake watcher factories: every user is watched by exactly one
 * instance; when A crashes (its renewals stop, nothing is released) B takes all of A's users over once their leases
 * run out; a change both A's orphaned watcher and B's new one report during the hand-over is pushed once.
 */
import { Redis } from 'ioredis';
import { Registry } from 'prom-client';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { RedisChangeGuard } from '../../../src/apns/change-guard.js';
import { PushDispatcher } from '../../../src/apns/dispatcher.js';
import { createLogger } from '../../../src/ops/log.js';
import { mailboxRef } from '../../../src/store/common.js';
import { RedisRegistrationStore, userKeys } from '../../../src/store/redis.js';
import { startRedis, type RedisInstance } from '../../../src/testbed/redis.js';
import { keySlot, RedisLeaseManager } from '../../../src/watch/leases.js';
import { WatchSupervisor, type SupervisorTimers } from '../../../src/watch/supervisor.js';
import type { MailboxChange } from '../../../src/watch/types.js';
import { FakeTransport, flush, ManualScheduler, TOPIC } from '../../unit/apns/dispatcher-helpers.js';
import { inputFor, tokenFor } from '../../unit/store/contract.js';
import { startRedisCluster, type RedisCluster } from '../store/redis-server.js';
import { FakeFactory, type FakeWatcher } from '../../helpers/fake-watchers.js';

const DAY = 24 * 3600 * 1000;
let redis: RedisInstance;
let probe: Redis;
let prefixes = 0;
const nextPrefix = (): string => `l${process.pid}x${++prefixes}`;
const cleanups: Array<() => Promise<void>> = [];

beforeAll(async () => {
  redis = await startRedis();
  probe = new Redis(redis.url, { lazyConnect: true, maxRetriesPerRequest: 1 });
  probe.on('error', () => undefined); // reconnects after the outage test
  await probe.connect();
});
afterAll(async () => {
  probe?.disconnect();
  await redis?.destroy();
});
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => undefined);
});

async function openStore(keyPrefix: string, url = redis.url): Promise<RedisRegistrationStore> {
  const s = await RedisRegistrationStore.open({ url, ttlMs: 30 * DAY, keyPrefix, connectWaitMs: 10_000 });
  cleanups.push(() => s.close());
  return s;
}

async function waitUntil(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out (${timeoutMs} ms) waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Real intervals that a test can "crash": they stop firing, and nothing else happens (no release). */
class CrashableTimers implements SupervisorTimers {
  private readonly handles = new Set<NodeJS.Timeout>();
  setInterval(fn: () => void, ms: number): unknown {
    const t = setInterval(fn, ms);
    this.handles.add(t);
    return t;
  }
  clearInterval(handle: unknown): void {
    clearInterval(handle as NodeJS.Timeout);
    this.handles.delete(handle as NodeJS.Timeout);
  }
  crash(): void {
    for (const t of this.handles) clearInterval(t);
    this.handles.clear();
  }
}

async function metric(registry: Registry, name: string): Promise<number> {
  const m = registry.getSingleMetric(name);
  if (!m) throw new Error(`no metric ${name}`);
  return (await m.get()).values.reduce((n, v) => n + v.value, 0);
}

describe('RedisLeaseManager', () => {
  it('SET NX PX under the user\'s hash tag; compare-and-PEXPIRE renew; compare-and-DEL release', async () => {
    const prefix = nextPrefix();
    const store = await openStore(prefix);
    const a = RedisLeaseManager.forStore(store, { instanceId: 'A', ttlMs: 10_000 });
    const b = RedisLeaseManager.forStore(store, { instanceId: 'B', ttlMs: 10_000 });
    expect(a.renewIntervalMs).toBe(2500);
    expect(a.key('a{b}')).toBe(`${prefix}:{u:a%7Bb%7D}:lease`);
    expect(a.key('a{b}')).toBe(userKeys(prefix, 'a{b}').lease);
    const key = a.key('alice');

    expect(await a.acquire('alice')).toBe(true);
    expect(await probe.get(key)).toBe('A');
    const pttl = await probe.pttl(key);
    expect(pttl).toBeGreaterThan(0);
    expect(pttl).toBeLessThanOrEqual(10_000);
    expect(await b.acquire('alice')).toBe(false);
    expect(await a.acquire('alice')).toBe(true); // already ours: taken again (and extended)

    await b.release('alice'); // not B's: untouched
    expect(await probe.get(key)).toBe('A');

    await probe.pexpire(key, 300);
    expect(await a.renew(['alice'])).toEqual([]);
    expect(await probe.pttl(key)).toBeGreaterThan(5000);

    await probe.set(key, 'B', 'PX', 10_000); // as if B had taken it after ours ran out
    expect(await a.renew(['alice'])).toEqual(['alice']);
    await a.release('alice'); // not ours any more: untouched
    expect(await probe.get(key)).toBe('B');

    await probe.del(key);
    expect(await a.acquire('alice')).toBe(true);
    await a.release('alice');
    expect(await probe.exists(key)).toBe(0);
    expect(await a.renew(['alice'])).toEqual(['alice']);
  });

  it('renews many leases in chunked single-script calls and reports exactly the lost ones', async () => {
    const prefix = nextPrefix();
    const store = await openStore(prefix);
    const a = RedisLeaseManager.forStore(store, { instanceId: 'A', ttlMs: 30_000 });
    const users = Array.from({ length: 1200 }, (_, i) => `user${i}@example.org`);
    const got = await Promise.all(users.map((u) => a.acquire(u)));
    expect(got.every(Boolean)).toBe(true);
    expect(a.heldCount).toBe(1200);
    await probe.del(a.key('user7@example.org'), a.key('user1100@example.org'));
    await probe.set(a.key('user600@example.org'), 'B');
    expect((await a.renew(users)).sort()).toEqual(['user1100@example.org', 'user600@example.org', 'user7@example.org']);
    expect(a.heldCount).toBe(1197);
  });

  it('lets another instance take a lease once it runs out, asking Redis again only when it would have expired', async () => {
    const prefix = nextPrefix();
    const store = await openStore(prefix);
    const clock = { now: Date.now() };
    const a = RedisLeaseManager.forStore(store, { instanceId: 'A', ttlMs: 600 });
    const b = RedisLeaseManager.forStore(store, { instanceId: 'B', ttlMs: 600, clock: () => clock.now });
    expect(await a.acquire('bob')).toBe(true);
    expect(await b.acquire('bob')).toBe(false);
    await a.release('bob');
    // B saw A's lease with <= 600 ms left: it does not ask again before then (a crashed holder could not release)
    expect(await b.acquire('bob')).toBe(false);
    clock.now += 600;
    expect(await b.acquire('bob')).toBe(true);
    expect(await probe.get(b.key('bob'))).toBe('B');

    // a lease nobody renews runs out in Redis and is taken (real clock here)
    const c = RedisLeaseManager.forStore(store, { instanceId: 'C', ttlMs: 600 });
    expect(await a.acquire('carol')).toBe(true);
    expect(await c.acquire('carol')).toBe(false);
    await waitUntil('C gets the lease', () => c.acquire('carol'), 5000);
    expect(await probe.get(c.key('carol'))).toBe('C');
    expect(await a.renew(['carol'])).toEqual(['carol']);
    expect(await a.acquire('carol')).toBe(false);
  });

  it('Redis unreachable: keeps reporting our leases as held until they would have expired, then as lost', async () => {
    const prefix = nextPrefix();
    const store = await openStore(prefix);
    const clock = { now: Date.now() };
    const lines: string[] = [];
    const logger = createLogger({
      level: 'debug',
      pretty: false,
      destination: { write: (s: string) => lines.push(s) } as unknown as NodeJS.WritableStream,
    });
    const a = new RedisLeaseManager({
      ...store.connection, instanceId: 'A', ttlMs: 20_000, timeoutMs: 500, clock: () => clock.now, logger,
    });
    expect(await a.acquire('alice')).toBe(true);
    clock.now += 5000;
    expect(await a.renew(['alice'])).toEqual([]); // valid until +25 s now
    expect(await a.acquire('bob')).toBe(true); // valid until +25 s too
    await redis.stop();
    try {
      clock.now += 19_000;
      expect(await a.renew(['alice', 'bob'])).toEqual([]);
      expect(lines.some((l) => l.includes('cannot renew watcher leases'))).toBe(true);
      await expect(a.acquire('carol')).rejects.toThrow();
      await expect(a.release('carol')).rejects.toThrow();
      clock.now += 1001; // 20.001 s after the last confirmed renewal
      expect((await a.renew(['alice', 'bob'])).sort()).toEqual(['alice', 'bob']);
      expect(a.heldCount).toBe(0);
    } finally {
      await redis.restart();
    }
    await waitUntil('store reconnected', async () => store.ping().then(() => true, () => false));
  });

  it('a supervisor keeps its watchers while Redis is down until the leases would have expired, then stops them', async () => {
    const prefix = nextPrefix();
    const store = await openStore(prefix);
    for (let i = 0; i < 3; i++) await store.upsert(inputFor(`u${i}`, i));
    const clock = { now: Date.now() };
    const leases = RedisLeaseManager.forStore(store, { instanceId: 'A', ttlMs: 20_000, timeoutMs: 500, clock: () => clock.now });
    const factory = new FakeFactory();
    const registry = new Registry();
    const idle: SupervisorTimers = { setInterval: () => 0, clearInterval: () => undefined };
    const sup = new WatchSupervisor({
      store, factory, leases, onChange: () => undefined, maxWatchers: 10, registry, timers: idle, clock: () => clock.now,
    });
    cleanups.push(() => sup.stop());
    await sup.start();
    expect(factory.liveUsers()).toEqual(['u0', 'u1', 'u2']);
    await redis.stop();
    try {
      clock.now += 5000;
      await sup.renewLeases();
      await sup.reconcile(); // the store is unreachable too: logged, nothing changes
      clock.now += 14_000;
      await sup.renewLeases();
      expect(factory.liveUsers()).toEqual(['u0', 'u1', 'u2']);
      expect(await metric(registry, 'xaps_lease_losses_total')).toBe(0);
      clock.now += 1001;
      await sup.renewLeases();
      expect(factory.liveUsers()).toEqual([]);
      expect(await metric(registry, 'xaps_lease_losses_total')).toBe(3);
    } finally {
      await redis.restart();
    }
    await waitUntil('store reconnected', async () => store.ping().then(() => true, () => false));
    // Redis back (this test server keeps no data across restarts: the devices register again)
    for (let i = 0; i < 3; i++) await store.upsert(inputFor(`u${i}`, i));
    await sup.reconcile();
    expect(factory.liveUsers()).toEqual(['u0', 'u1', 'u2']);
  });
});

describe('RedisLeaseManager on a Redis Cluster', () => {
  let cluster: RedisCluster;
  beforeAll(async () => {
    cluster = await startRedisCluster(3);
  });
  afterAll(async () => {
    await cluster?.destroy();
  });

  it('computes Cluster slots like Redis and renews per slot group without CROSSSLOT errors', async () => {
    const prefix = nextPrefix();
    const store = await openStore(prefix, cluster.url);
    const a = RedisLeaseManager.forStore(store, { instanceId: 'A', ttlMs: 30_000 });
    const node = cluster.nodes[0] as (typeof cluster.nodes)[number];
    for (const key of ['foo', '123456789', a.key('alice'), a.key('{weird}:ü'), a.key('😀📬'), 'no{}tag', '{}x']) {
      expect(keySlot(key), key).toBe(Number(node.cli('cluster', 'keyslot', key).trim()));
    }
    expect(keySlot('123456789')).toBe(0x31c3 & 16383);
    // more users than slots would need, so that some share a slot and are renewed in one call
    const users = Array.from({ length: 400 }, (_, i) => (i % 2 ? `user${i}@example.org` : `{weird}:${i}:ü`));
    expect((await Promise.all(users.map((u) => a.acquire(u)))).every(Boolean)).toBe(true);
    expect(await a.renew(users)).toEqual([]);
    const client = store.connection.client;
    await client.del(a.key(users[3] as string));
    await client.set(a.key(users[10] as string), 'B');
    expect((await a.renew(users)).sort()).toEqual([users[10], users[3]].sort());
  });
});

describe('two supervisors sharing Redis', () => {
  interface Instance {
    id: string;
    store: RedisRegistrationStore;
    leases: RedisLeaseManager;
    factory: FakeFactory;
    registry: Registry;
    timers: CrashableTimers;
    transport: FakeTransport;
    pending: Array<Promise<void>>;
    sup: WatchSupervisor;
  }

  async function instance(id: string, prefix: string, sched: ManualScheduler, maxWatchers = 100, ttlMs = 1500): Promise<Instance> {
    const store = await openStore(prefix);
    const leases = RedisLeaseManager.forStore(store, { instanceId: id, ttlMs });
    const factory = new FakeFactory();
    const registry = new Registry();
    const timers = new CrashableTimers();
    const transport = new FakeTransport(sched);
    const dispatcher = new PushDispatcher({
      store, transport, topic: () => TOPIC, registry, scheduler: sched, guard: RedisChangeGuard.forStore(store), coalesceWindowMs: 0,
    });
    cleanups.push(() => dispatcher.close());
    const pending: Array<Promise<void>> = [];
    const sup = new WatchSupervisor({
      store, factory, leases, maxWatchers, registry, timers, reconcileIntervalMs: 500,
      onChange: (c: MailboxChange) => pending.push(dispatcher.notify(c)),
    });
    cleanups.push(() => sup.stop());
    cleanups.push(async () => timers.crash());
    return { id, store, leases, factory, registry, timers, transport, pending, sup };
  }

  async function ownerOf(leases: RedisLeaseManager, user: string): Promise<string | null> {
    return probe.get(leases.key(user));
  }

  it('every user is watched by exactly one instance, also when both hear of a new registration', async () => {
    const prefix = nextPrefix();
    const sched = new ManualScheduler();
    // (a longer ttl than the crash test needs: nothing may move even on a loaded machine)
    const a = await instance('A', prefix, sched, 100, 4000);
    const b = await instance('B', prefix, sched, 100, 4000);
    const users = Array.from({ length: 20 }, (_, i) => `user${i}`);
    for (const [i, u] of users.entries()) await a.store.upsert(inputFor(u, i));
    await Promise.all([a.sup.start(), b.sup.start()]);
    const check = async (): Promise<void> => {
      const la = a.factory.liveUsers();
      const lb = b.factory.liveUsers();
      expect([...la, ...lb].sort()).toEqual([...users].sort());
      expect(la.filter((u) => lb.includes(u))).toEqual([]);
      for (const u of la) expect(await ownerOf(a.leases, u)).toBe('A');
      for (const u of lb) expect(await ownerOf(b.leases, u)).toBe('B');
    };
    await check();
    // new registrations both instances hear of at once (e.g. a device on each)
    const fresh = Array.from({ length: 20 }, (_, i) => `fresh${i}`);
    for (const [i, u] of fresh.entries()) await b.store.upsert(inputFor(u, 100 + i));
    users.push(...fresh);
    await Promise.all(fresh.flatMap((u) => [a.sup.registrationChanged(u), b.sup.registrationChanged(u)]));
    await check();
    // a few renew and reconcile ticks later nothing moved
    await sleep(1200);
    await check();
    expect(await metric(a.registry, 'xaps_lease_losses_total') + await metric(b.registry, 'xaps_lease_losses_total')).toBe(0);
    expect(await metric(a.registry, 'xaps_watched_users') + await metric(b.registry, 'xaps_watched_users')).toBe(40);
  });

  it('when A crashes, B takes over all of A\'s users once the leases run out, and a hand-over change is pushed once', async () => {
    const prefix = nextPrefix();
    const sched = new ManualScheduler();
    // A watches at most 6 users, so both instances have some: A starts first and takes 6, B the rest
    const a = await instance('A', prefix, sched, 6);
    const b = await instance('B', prefix, sched);
    const users = Array.from({ length: 12 }, (_, i) => `user${i}`);
    for (const [i, u] of users.entries()) {
      await a.store.upsert(inputFor(u, i, { mailboxes: [mailboxRef('INBOX'), mailboxRef(`Box${i % 3}`)] }));
      if (i % 2 === 0) await a.store.upsert(inputFor(u, 100 + i)); // a second device for some
    }
    await a.sup.start();
    await b.sup.start();
    const ofA = a.factory.liveUsers();
    expect(ofA).toHaveLength(6);
    expect(b.factory.liveUsers()).toEqual(users.filter((u) => !ofA.includes(u)).sort());
    for (const u of ofA) expect(await ownerOf(a.leases, u)).toBe('A');

    // A crashes: no more renewals, nothing released; its watchers are orphans that may still report changes
    const crashedAt = Date.now();
    a.timers.crash();
    await waitUntil('B watches every user', () => b.factory.liveUsers().length === users.length, 20_000);
    const tookMs = Date.now() - crashedAt;
    expect(tookMs).toBeLessThan(15_000); // ttl 1.5 s + renew ticks; generous bound
    expect(b.factory.liveUsers()).toEqual([...users].sort());
    for (const u of users) expect(await ownerOf(b.leases, u)).toBe('B');
    expect(await metric(b.registry, 'xaps_lease_handovers_total')).toBe(6);
    expect(await metric(b.registry, 'xaps_watched_users')).toBe(12);
    expect(b.factory.live().get(ofA[0] as string)?.mailboxes).toEqual(a.factory.live().get(ofA[0] as string)?.mailboxes);

    // the same change from A's orphaned watcher and B's new one: pushed once per device
    for (const u of ofA) {
      const change: MailboxChange = { user: u, mailbox: 'INBOX', changeId: `INBOX:77:${u}`, detectedAt: Date.now(), source: 'notify' };
      (a.factory.live().get(u) as FakeWatcher).ctx.onChange(change);
      (b.factory.live().get(u) as FakeWatcher).ctx.onChange({ ...change, source: 'catch-up' });
    }
    await Promise.all([...a.pending, ...b.pending]);
    await flush();
    const sent = [...a.transport.sent, ...b.transport.sent];
    const devices = ofA.reduce((n, u) => n + (Number(u.slice(4)) % 2 === 0 ? 2 : 1), 0);
    expect(sent).toHaveLength(devices);
    for (const u of ofA) {
      const i = Number(u.slice(4));
      expect(sent.filter((s) => s.n.deviceToken === tokenFor(i))).toHaveLength(1);
      if (i % 2 === 0) expect(sent.filter((s) => s.n.deviceToken === tokenFor(100 + i))).toHaveLength(1);
    }

    // A comes back to stop (e.g. its process is finally reaped): it cannot release what B holds now
    await a.sup.stop();
    for (const u of users) expect(await ownerOf(b.leases, u)).toBe('B');
    await b.sup.stop();
    for (const u of users) expect(await ownerOf(b.leases, u)).toBeNull();
  });
});
