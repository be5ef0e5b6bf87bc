/**
 * Registration store: Redis (single server, Sentinel or Cluster) when `--redis-url` is given, else the embedded
 * journal+snapshot store in the data directory.
 */
import type { Logger } from '../ops/log.js';
import { EmbeddedRegistrationStore } from './embedded.js';
import { RedisRegistrationStore } from './redis.js';
import type { RegistrationStore } from './types.js';

export * from './types.js';
export { mailboxRef } from './common.js';
export { EmbeddedRegistrationStore, type EmbeddedStoreOptions } from './embedded.js';
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
}

export async function createStore(opts: CreateStoreOptions): Promise<RegistrationStore> {
  const common = {
    ttlMs: opts.ttlMs,
    ...(opts.logger ? { logger: opts.logger } : {}),
    ...(opts.clock ? { clock: opts.clock } : {}),
  };
  if (opts.redisUrl !== undefined && opts.redisUrl !== '') {
    return RedisRegistrationStore.open({ url: opts.redisUrl, ...common });
  }
  return EmbeddedRegistrationStore.open({ dataDir: opts.dataDir, ...common });
}
