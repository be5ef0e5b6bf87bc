/**
 * Mailbox states in the Redis store against a real redis-server (the contract runs in redis.test.ts and
 * redis-cluster.test.ts): key layout, removal with the last registration, durability across a Redis crash with AOF,
 * and failing fast while Redis is down.
 */
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RedisRegistrationStore, userKeys } from '../../../src/store/redis.js';
import { StoreUnavailableError } from '../../../src/store/types.js';
import { startRedis, type RedisInstance } from '../../../src/testbed/redis.js';
import { inputFor, status, tokenFor } from '../../unit/store/contract.js';

let redis: RedisInstance;
let probe: Redis;
let prefixes = 0;
const nextPrefix = (): string => `m${process.pid}x${++prefixes}`;

beforeAll(async () => {
  redis = await startRedis({ persistence: 'aof' });
  probe = new Redis(redis.url, { lazyConnect: true, maxRetriesPerRequest: 1 });
  probe.on('error', () => undefined); // reconnects by itself after the crash test
  await probe.connect();
});
afterAll(async () => {
  probe?.disconnect();
  await redis?.destroy();
});

function open(prefix: string, ttlMs = 30 * 24 * 3600 * 1000, clock?: () => number): Promise<RedisRegistrationStore> {
  return RedisRegistrationStore.open({ url: redis.url, ttlMs, keyPrefix: prefix, ...(clock ? { clock } : {}) });
}

async function waitUntil(what: string, fn: () => Promise<unknown>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await fn();
      return;
    } catch (err) {
      if (Date.now() > deadline) throw new Error(`${what}: ${String(err)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

describe('redis store: mailbox states', () => {
  it('keeps them in the hash <prefix>:{u:<user>}:mbx, next to the registrations (same hash tag)', async () => {
    const prefix = nextPrefix();
    const store = await open(prefix);
    try {
      await store.upsert(inputFor('a{b}', 1));
      await store.setMailboxState('a{b}', 'INBOX', status(7, 42, 41));
      await store.setMailboxState('a{b}', 'Entwürfe', status(8, 2, 1));
      const k = userKeys(prefix, 'a{b}');
      expect(k.mbx).toBe(`${prefix}:{u:a%7Bb%7D}:mbx`);
      expect(k.mbx.startsWith(`${prefix}:${k.tag}:`) && k.regs.startsWith(`${prefix}:${k.tag}:`)).toBe(true);
      expect(await probe.type(k.mbx)).toBe('hash');
      const raw = await probe.hgetall(k.mbx);
      expect(Object.keys(raw).sort()).toEqual(['Entwürfe', 'INBOX']);
      expect(JSON.parse(raw.INBOX as string)).toEqual({ uidValidity: 7, uidNext: 42, messages: 41 });
      const keys = (await probe.keys(`${prefix}:*`)).sort();
      expect(keys).toEqual([`${prefix}:users`, k.mbx, k.regs, k.seen].sort());
    } finally {
      await store.close();
    }
  });

  it('creates no key for a user without registrations, and deletes the hash with the last registration', async () => {
    const prefix = nextPrefix();
    const store = await open(prefix);
    try {
      await store.setMailboxState('ghost', 'INBOX', status(1, 2, 1));
      expect(await probe.exists(userKeys(prefix, 'ghost').mbx)).toBe(0);

      await store.upsert(inputFor('alice', 1));
      await store.upsert(inputFor('alice', 2));
      await store.setMailboxState('alice', 'INBOX', status(1, 2, 1));
      const key = userKeys(prefix, 'alice').mbx;
      await store.remove('alice', tokenFor(1));
      expect(await probe.exists(key)).toBe(1);
      await store.remove('alice', tokenFor(2));
      expect(await probe.exists(key)).toBe(0);
    } finally {
      await store.close();
    }
  });

  it('purgeExpired deletes the hash of a user it empties', async () => {
    const prefix = nextPrefix();
    const ttl = 60_000;
    let now = Date.now();
    const store = await open(prefix, ttl, () => now);
    try {
      await store.upsert(inputFor('alice', 1, { now }));
      await store.upsert(inputFor('bob', 2, { now: now + 30_000 }));
      await store.setMailboxState('alice', 'INBOX', status(1, 2, 1));
      await store.setMailboxState('bob', 'INBOX', status(3, 4, 3));
      now += ttl + 1;
      expect(await store.purgeExpired()).toBe(1);
      expect(await probe.exists(userKeys(prefix, 'alice').mbx)).toBe(0);
      expect(await store.getMailboxStates('bob')).toEqual({ INBOX: status(3, 4, 3) });
    } finally {
      await store.close();
    }
  });

  it('survives a Redis crash (SIGKILL) with AOF: every acknowledged state is there after the restart', async () => {
    const prefix = nextPrefix();
    const store = await open(prefix);
    try {
      for (let u = 0; u < 5; u++) await store.upsert(inputFor(`user${u}`, u));
      await Promise.all(Array.from({ length: 100 }, (_, i) => store.setMailboxState(`user${i % 5}`, `box${i}`, status(1, i + 1, i))));
      await redis.kill();
      await expect(store.setMailboxState('user0', 'INBOX', status(1, 1, 0))).rejects.toBeInstanceOf(StoreUnavailableError);
      await expect(store.getMailboxStates('user0')).rejects.toBeInstanceOf(StoreUnavailableError);
      await redis.restart();
      await waitUntil('store reconnected', () => store.ping());
      for (let u = 0; u < 5; u++) {
        const got = await store.getMailboxStates(`user${u}`);
        expect(Object.keys(got)).toHaveLength(20);
        expect(got[`box${u}`]).toEqual(status(1, u + 1, u));
      }
      // and a second store (another instance, or this one restarted) sees them too
      const other = await open(prefix);
      expect(Object.keys(await other.getMailboxStates('user3'))).toHaveLength(20);
      await other.close();
    } finally {
      await store.close();
      await waitUntil('probe reconnected', () => probe.ping());
    }
  });
});
