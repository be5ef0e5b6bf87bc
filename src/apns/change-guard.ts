/**
 * Change guard: makes one mailbox change push each device once even when several proxy instances (or two watchers in
 * one instance, during a hand-over) report it. The first `claim(user, changeId)` wins; later claims of the same id
 * within the TTL return false.
 *
 *   RedisChangeGuard   SET xaps:{u:<user>}:chg:<changeId> 1 NX PX <ttl>   (the store's hash-tag encoding: one slot per
 *                      user, like every per-user key)
 *   LocalChangeGuard   the same in memory, bounded and expiring, for a single instance
 *
 * A guard may reject (Redis down, timeout); the dispatcher then pushes anyway (fail open: a duplicate push carries the
 * same collapse id and is harmless) and counts it.
 */
import type { Cluster, Redis } from 'ioredis';
import { userKeys, type RedisRegistrationStore } from '../store/redis.js';

export interface ChangeGuard {
  /** true: this caller owns the change and pushes it; false: someone already did. Rejects when undecidable. */
  claim(user: string, changeId: string): Promise<boolean>;
}

/** How long a claimed change id is remembered (default of both implementations): 10 minutes. */
export const DEFAULT_CHANGE_TTL_MS = 10 * 60 * 1000;

export interface LocalChangeGuardOptions {
  /** Default DEFAULT_CHANGE_TTL_MS. */
  ttlMs?: number;
  /** Most remembered ids; the oldest are forgotten first (default 100 000). */
  maxEntries?: number;
  /** ms since epoch (default Date.now). */
  clock?: () => number;
}

export class LocalChangeGuard implements ChangeGuard {
  /** key -> expiry; insertion order = claim order = expiry order (one TTL). */
  private readonly seen = new Map<string, number>();
  private readonly ttlMs: number;
  private readonly maxEntries: number;
  private readonly clock: () => number;

  constructor(opts: LocalChangeGuardOptions = {}) {
    this.ttlMs = positive(opts.ttlMs ?? DEFAULT_CHANGE_TTL_MS, 'ttlMs');
    this.maxEntries = positive(opts.maxEntries ?? 100_000, 'maxEntries');
    this.clock = opts.clock ?? Date.now;
  }

  get size(): number {
    return this.seen.size;
  }

  claim(user: string, changeId: string): Promise<boolean> {
    const now = this.clock();
    for (const [k, expires] of this.seen) {
      if (expires > now) break;
      this.seen.delete(k);
    }
    const key = `${user}\u0000${changeId}`;
    const expires = this.seen.get(key);
    if (expires !== undefined && expires > now) return Promise.resolve(false);
    this.seen.delete(key);
    this.seen.set(key, now + this.ttlMs);
    while (this.seen.size > this.maxEntries) {
      const oldest = this.seen.keys().next();
      if (oldest.done) break;
      this.seen.delete(oldest.value);
    }
    return Promise.resolve(true);
  }
}

export interface RedisChangeGuardOptions {
  /**
   * A connected ioredis client (single server, Sentinel or Cluster). Shared: the guard never closes it. Use
   * `RedisChangeGuard.forStore` to share the registration store's connection.
   */
  client: Redis | Cluster;
  /** Key prefix, the store's (default `xaps`). */
  keyPrefix?: string;
  /** Default DEFAULT_CHANGE_TTL_MS. */
  ttlMs?: number;
  /** A claim with no answer within this long rejects (default 1000 ms). */
  timeoutMs?: number;
}

export class RedisChangeGuard implements ChangeGuard {
  private readonly client: Redis | Cluster;
  private readonly prefix: string;
  private readonly ttlMs: number;
  private readonly timeoutMs: number;

  constructor(opts: RedisChangeGuardOptions) {
    const prefix = opts.keyPrefix ?? 'xaps';
    if (prefix === '' || /[{}]/.test(prefix)) throw new Error(`redis key prefix must be non-empty without "{" or "}": ${JSON.stringify(prefix)}`);
    this.client = opts.client;
    this.prefix = prefix;
    this.ttlMs = positive(opts.ttlMs ?? DEFAULT_CHANGE_TTL_MS, 'ttlMs');
    this.timeoutMs = positive(opts.timeoutMs ?? 1000, 'timeoutMs');
  }

  /**
   * A guard on the registration store's own Redis connection (same URL, TLS, auth, timeouts, reconnects, key prefix).
   * The store does not expose its client publicly yet, so this reads it at run time and fails loudly if that ever
   * changes.
   */
  static forStore(store: RedisRegistrationStore, opts: Omit<RedisChangeGuardOptions, 'client'> = {}): RedisChangeGuard {
    const { client, keyPrefix } = store.connection;
    return new RedisChangeGuard({ keyPrefix, ...opts, client });
  }

  /** The key of one change: `<prefix>:{u:<user>}:chg:<changeId>`. */
  key(user: string, changeId: string): string {
    return `${this.prefix}:${userKeys(this.prefix, user).tag}:chg:${changeId}`;
  }

  async claim(user: string, changeId: string): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    try {
      const reply = await Promise.race([
        this.client.set(this.key(user, changeId), '1', 'PX', this.ttlMs, 'NX'),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`change guard: no answer from Redis within ${this.timeoutMs} ms`)), this.timeoutMs);
          timer.unref();
        }),
      ]);
      return reply === 'OK';
    } finally {
      if (timer) clearTimeout(timer);
    }
  }
}

function positive(n: number, what: string): number {
  if (typeof n !== 'number' || !Number.isFinite(n) || n <= 0) throw new RangeError(`${what} must be a positive number, got ${String(n)}`);
  return Math.floor(n);
}
