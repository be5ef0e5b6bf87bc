/**
 * The store contract against a real 3-master Redis Cluster (no replicas), built with `redis-cli --cluster create`:
 * every per-user script must stay in one slot whatever the username, and users spread over the masters.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStore } from '../../../src/store/index.js';
import { RedisRegistrationStore } from '../../../src/store/redis.js';
import { inputFor, storeContract } from '../../unit/store/contract.js';
import { startRedisCluster, type RedisCluster } from './redis-server.js';

let cluster: RedisCluster;
let prefixes = 0;
const nextPrefix = (): string => `c${process.pid}x${++prefixes}`;

beforeAll(async () => {
  cluster = await startRedisCluster(3);
});
afterAll(async () => {
  await cluster?.destroy();
});

storeContract('redis cluster', async ({ ttlMs }) => {
  const store = await RedisRegistrationStore.open({ url: cluster.url, ttlMs, keyPrefix: nextPrefix() });
  return { store, cleanup: () => store.close() };
});

describe('redis cluster store', () => {
  it('spreads users over the masters and finds them all again', async () => {
    const prefix = nextPrefix();
    const store = await RedisRegistrationStore.open({ url: cluster.url, ttlMs: 60_000, keyPrefix: prefix });
    const users = Array.from({ length: 40 }, (_, i) => (i % 2 ? `user${i}@example.org` : `{weird}:${i}:ü`));
    for (const [i, u] of users.entries()) await store.upsert(inputFor(u, i));
    const perNode = cluster.nodes.map((n) => n.cli('--scan', '--pattern', `${prefix}:{*`).trim().split('\n').filter(Boolean).length);
    expect(perNode.filter((k) => k > 0).length).toBeGreaterThanOrEqual(2);
    expect(perNode.reduce((a, b) => a + b, 0)).toBe(2 * users.length);
    expect(await store.listUsers()).toEqual([...users].sort());
    expect(await store.counts()).toEqual({ users: 40, registrations: 40 });
    await expect(store.ping()).resolves.toBeUndefined();
    await store.close();
  });

  it('is chosen by createStore for a redis+cluster:// URL', async () => {
    const store = await createStore({ redisUrl: cluster.url, dataDir: '/nonexistent', ttlMs: 60_000 });
    expect(store.kind).toBe('redis');
    await store.ping();
    await store.close();
  });
});
