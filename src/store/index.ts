/**
 * Registration store: Redis (single server, Sentinel or Cluster) when `--redis-url` is given, else the embedded
 * journal+snapshot store in the data directory.
 */
import type { Logger } from '../ops/log.js';
import { EmbeddedReadOnlyStore } from './embedded-readonly.js';
import { EmbeddedRegistrationStore } from './embedded.js';
import { RedisRegistrationStore } from './redis.js';
import { StoreLockedError, type RegistrationStore } from './types.js';

export * from './types.js';
export { mailboxRef } from './common.js';
export { EmbeddedRegistrationStore, type EmbeddedStoreOptions } from './embedded.js';
export { EmbeddedReadOnlyStore, StoreReadOnlyError, type EmbeddedReadOnlyOptions } from './embedded-readonly.js';
export { RedisRegistrationStore, type RedisStoreOptions } from './redis.js';
export { parseRedisUrl, redactRedisUrl, type RedisTarget } from './redis-url.js';

export interface CreateStoreOptions {
  /** `--redis-url`; when set, the Redis store is used and `dataDir` is ignored. */
  redisUrl?: string;
  /** Directory of the embedded store. */
  dataDir: string;
  /** How long a registration lives after its last upsert (default elsewhere: DEFAULT_TTL_MS, 30 days). */
  ttlMs: number;
  logger?: Logger;
  /** Clock (ms since epoch) for reads and default write times; tests only. */
  clock?: () => number;
  /**
   * Embedded store only (Redis is shared by design): 'read-write' (default) takes the data-dir lock and throws
   * StoreLockedError when a live process holds it; 'read-only-if-locked' then returns a read-only view instead
   * (EmbeddedReadOnlyStore: `readOnly`, `holderPid`; writes reject with StoreReadOnlyError). The lock attempt before
   * the fallback is the ordinary one: it may briefly create and remove a temp file next to store.lock.
   */
  access?: StoreAccess;
}

export type StoreAccess = 'read-write' | 'read-only-if-locked';

export async function createStore(opts: CreateStoreOptions): Promise<RegistrationStore> {
  const common = {
    ttlMs: opts.ttlMs,
    ...(opts.logger ? { logger: opts.logger } : {}),
    ...(opts.clock ? { clock: opts.clock } : {}),
  };
  if (opts.redisUrl !== undefined && opts.redisUrl !== '') {
    return RedisRegistrationStore.open({ url: opts.redisUrl, ...common });
  }
  try {
    return await EmbeddedRegistrationStore.open({ dataDir: opts.dataDir, ...common });
  } catch (err) {
    // Only a live holder (the lock names its pid): an unreadable or flapping lock stays an error.
    if (opts.access !== 'read-only-if-locked' || !(err instanceof StoreLockedError) || err.pid === undefined) throw err;
    return EmbeddedReadOnlyStore.open({ dataDir: opts.dataDir, ...common, holderPid: err.pid });
  }
}
