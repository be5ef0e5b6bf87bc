import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createLogger, type Logger } from '../../../src/ops/log.js';
import { createStore } from '../../../src/store/index.js';
import { RedisRegistrationStore, userKeys, type RedisStoreOptions } from '../../../src/store/redis.js';
import { StoreUnavailableError } from '../../../src/store/types.js';
import { inputFor, storeContract, tokenFor } from '../../unit/store/contract.js';
import { startRedisServer, type RedisServer } from './redis-server.js';

let server: RedisServer;
let prefixes = 0;
const nextPrefix = (): string => `t${process.pid}x${++prefixes}`;

beforeAll(async () => {
  server = await startRedisServer({ appendonly: false });
});
afterAll(async () => {
  await server?.destroy();
});

function open(opts: Partial<RedisStoreOptions> & { url: string }): Promise<RedisRegistrationStore> {
  return RedisRegistrationStore.open({ ttlMs: 30 * 24 * 3600 * 1000, keyPrefix: nextPrefix(), ...opts });
}

function captureLogger(): { logger: Logger; text: () => string } {
  const lines: string[] = [];
  const dest = new Writable({
    write(chunk: Buffer, _enc, cb) {
      lines.push(chunk.toString('utf8'));
      cb();
    },
  });
  return { logger: createLogger({ level: 'debug', pretty: false, destination: dest }), text: () => lines.join('') };
}

async function waitUntil(what: string, fn: () => Promise<unknown>, timeoutMs = 60_000): Promise<void> {
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

storeContract('redis', async ({ ttlMs }) => {
  const store = await open({ url: server.url, ttlMs });
  return { store, cleanup: () => store.close() };
});

describe('redis store: keys', () => {
  it('puts every per-user key in one well-formed hash tag', () => {
    for (const user of ['alice', '{', '}', '}{', 'a{b}c', '%7B', '', 'x:y', 'ünï😀', 'line\nbreak']) {
      const k = userKeys('xaps', user);
      for (const key of [k.regs, k.seen]) {
        const open = key.indexOf('{');
        const close = key.indexOf('}', open + 1);
        expect(key.slice(open, close + 1)).toBe(k.tag);
        expect(close - open).toBeGreaterThan(1); // never the empty tag "{}"
      }
      expect(k.tag.slice(1, -1)).not.toMatch(/[{}]/);
    }
    expect(userKeys('xaps', '{').tag).not.toBe(userKeys('xaps', '%7B').tag);
  });

  it('stores data under the documented keys', async () => {
    const prefix = nextPrefix();
    const store = await RedisRegistrationStore.open({ url: server.url, ttlMs: 60_000, keyPrefix: prefix });
    await store.upsert(inputFor('a{b}', 1));
    const keys = server.cli('--scan', '--pattern', `${prefix}:*`).trim().split('\n').sort();
    expect(keys).toEqual([`${prefix}:users`, `${prefix}:{u:a%7Bb%7D}:regs`, `${prefix}:{u:a%7Bb%7D}:seen`]);
    const json = server.cli('hget', `${prefix}:{u:a%7Bb%7D}:regs`, tokenFor(1));
    expect(JSON.parse(json)).toMatchObject({ user: 'a{b}', deviceToken: tokenFor(1) });
    await store.close();
  });
});

describe('redis store: createStore and URLs', () => {
  it('creates a Redis store from a URL and authenticates with a password', async () => {
    const secret = 'p@ss:w/rd%1';
    const guarded = await startRedisServer({ password: secret });
    try {
      const { logger, text } = captureLogger();
      const store = await createStore({ redisUrl: guarded.url, dataDir: '/nonexistent', ttlMs: 60_000, logger });
      expect(store.kind).toBe('redis');
      await store.upsert(inputFor('alice', 1));
      expect((await store.get('alice', tokenFor(1)))?.user).toBe('alice');
      await store.close();
      const bad = await createStore({
        redisUrl: `redis://:wrong-one@127.0.0.1:${guarded.port}`, dataDir: '/x', ttlMs: 60_000,
      }).catch((e: unknown) => e);
      expect(bad).toBeInstanceOf(Error);
      expect(String(bad)).not.toContain('wrong-one');
      expect(text()).not.toContain(secret);
      expect(text()).not.toContain(encodeURIComponent(secret));
    } finally {
      await guarded.destroy();
    }
  });

  it('fails to open within the wait when nothing listens, without echoing the password', async () => {
    const down = await startRedisServer();
    const url = `redis://:hunter2@127.0.0.1:${down.port}`;
    await down.destroy();
    const { logger, text } = captureLogger();
    const err = await RedisRegistrationStore.open({ url, ttlMs: 1000, connectWaitMs: 1500, logger }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StoreUnavailableError);
    expect(String(err)).toContain(`127.0.0.1:${down.port}`);
    expect(String(err)).not.toContain('hunter2');
    expect(text()).not.toContain('hunter2');
  });

  it('rejects malformed URLs naming --redis-url', async () => {
    await expect(createStore({ redisUrl: 'redis://:secret@host:99999', dataDir: '/x', ttlMs: 1000 })).rejects.toThrow(/--redis-url.*port/);
    await expect(createStore({ redisUrl: 'redis://:secret@host:99999', dataDir: '/x', ttlMs: 1000 })).rejects.not.toThrow(/secret/);
  });
});

describe('redis store: Sentinel', () => {
  it('finds the master through a real Sentinel and works', async () => {
    const sentinel = await startRedisServer({ sentinelOf: { masterName: 'mymaster', port: server.port } });
    try {
      const store = await createStore({
        redisUrl: `redis+sentinel://127.0.0.1:${sentinel.port}/mymaster?db=1`, dataDir: '/nonexistent', ttlMs: 60_000,
      });
      expect(store.kind).toBe('redis');
      await store.upsert(inputFor('sentinel-user', 1));
      expect((await store.get('sentinel-user', tokenFor(1)))?.user).toBe('sentinel-user');
      expect(server.cli('-n', '1', 'zrange', 'xaps:users', '0', '-1').trim()).toBe('sentinel-user');
      await store.ping();
      await store.close();
    } finally {
      await sentinel.destroy();
    }
  });
});

describe('redis store: outages', () => {
  it('rejects quickly while Redis is down, recovers after it restarts, and keeps AOF data', async () => {
    const own = await startRedisServer({ appendonly: true, fsyncAlways: true });
    const { logger, text } = captureLogger();
    const store = await open({ url: own.url, logger, maxBackoffMs: 500 });
    try {
      await store.upsert(inputFor('alice', 1));
      await own.stop();

      const err = await store.upsert(inputFor('alice', 2)).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(StoreUnavailableError);
      await expect(store.ping()).rejects.toBeInstanceOf(StoreUnavailableError);
      await expect(store.get('alice', tokenFor(1))).rejects.toBeInstanceOf(StoreUnavailableError);
      await expect(store.listUsers()).rejects.toBeInstanceOf(StoreUnavailableError);

      await own.start();
      await waitUntil('store reconnects', () => store.ping());
      expect((await store.get('alice', tokenFor(1)))?.user).toBe('alice'); // survived the graceful restart
      await store.upsert(inputFor('alice', 2));

      await own.kill(); // crash: appendfsync always keeps every acknowledged write
      await expect(store.upsert(inputFor('alice', 3))).rejects.toBeInstanceOf(StoreUnavailableError);
      await own.start();
      await waitUntil('store reconnects', () => store.ping());
      expect((await store.listByUser('alice')).map((r) => r.deviceToken)).toEqual([tokenFor(1), tokenFor(2)]);
      expect(text()).toMatch(/redis connection (lost|problem)/);
      expect(text()).toMatch(/redis connection restored/);
      for (let i = 1; i <= 3; i++) expect(text()).not.toContain(tokenFor(i));
    } finally {
      await store.close();
      await own.destroy();
    }
  });

  it('rejects when Redis hangs (SIGSTOP) instead of waiting for it, and goes on when it resumes', async () => {
    const own = await startRedisServer();
    const store = await open({ url: own.url, commandTimeoutMs: 1000 });
    try {
      await store.upsert(inputFor('alice', 1));
      own.pause();
      await expect(store.upsert(inputFor('alice', 2))).rejects.toBeInstanceOf(StoreUnavailableError);
      await expect(store.ping()).rejects.toBeInstanceOf(StoreUnavailableError);
      own.resume();
      await waitUntil('store answers again', () => store.ping());
      await store.upsert(inputFor('alice', 3));
      expect((await store.get('alice', tokenFor(3)))?.user).toBe('alice');
    } finally {
      own.resume();
      await store.close();
      await own.destroy();
    }
  });

  it('keeps data across a Redis restart for a new store instance (appendonly yes)', async () => {
    const own = await startRedisServer({ appendonly: true });
    try {
      const prefix = nextPrefix();
      const s1 = await RedisRegistrationStore.open({ url: own.url, ttlMs: 60_000, keyPrefix: prefix });
      await s1.upsert(inputFor('bob', 5));
      await s1.close();
      await own.stop();
      await own.start();
      const s2 = await RedisRegistrationStore.open({ url: own.url, ttlMs: 60_000, keyPrefix: prefix });
      expect(await s2.listUsers()).toEqual(['bob']);
      await s2.close();
    } finally {
      await own.destroy();
    }
  });

  it('rejects operations on a closed store', async () => {
    const store = await open({ url: server.url });
    await store.close();
    await store.close();
    await expect(store.upsert(inputFor('alice', 1))).rejects.toBeInstanceOf(StoreUnavailableError);
    await expect(store.ping()).rejects.toBeInstanceOf(StoreUnavailableError);
  });
});

describe('redis store: users index', () => {
  it('repairs and tolerates stale index entries', async () => {
    const prefix = nextPrefix();
    const store = await RedisRegistrationStore.open({ url: server.url, ttlMs: 60_000, keyPrefix: prefix });
    // an index entry whose registrations are gone (e.g. a crash between the two writes)
    server.cli('zadd', `${prefix}:users`, String(Date.now()), 'ghost');
    await store.upsert(inputFor('alice', 1));
    expect(await store.listUsers()).toEqual(['alice']);
    expect(await store.counts()).toEqual({ users: 1, registrations: 1 });
    expect(await store.purgeExpired()).toBe(0);
    expect(server.cli('zrange', `${prefix}:users`, '0', '-1').trim().split('\n')).toEqual(['alice']);
    // concurrent remove of the last registration and re-registration leave a consistent index
    await Promise.all([store.remove('alice', tokenFor(1)), store.upsert(inputFor('alice', 2))]);
    expect(await store.listUsers()).toEqual(['alice']);
    expect(server.cli('zrange', `${prefix}:users`, '0', '-1').trim()).toBe('alice');
    await store.close();
  });
});
