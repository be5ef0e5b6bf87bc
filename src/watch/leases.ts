/**
 * Watcher leases: which instance watches which user (LeaseManager, ./types.ts).
 *
 *   RedisLeaseManager   one key per user, next to the user's registrations (same hash tag, same Cluster slot):
 *                         <prefix>:{u:<user>}:lease   string  <instanceId>, with a PX expiry of `ttlMs`
 *                       acquire  SET NX PX ttl (one script: PEXPIRE instead when the lease is already ours)
 *                       renew    compare-and-PEXPIRE of every lease we hold: one script call per slot group
 *                                (a single server: one call per 500 users; a Cluster: one per hash slot, all sent
 *                                at once, so pipelined on each node's connection)
 *                       release  compare-and-DEL (never deletes another instance's lease)
 *   LocalLeaseManager   always grants: the embedded store belongs to one instance.
 *
 * Timing (defaults): ttl 20 s, renewed every 5 s (the supervisor's renew tick, `renewIntervalMs`). An instance that
 * dies stops renewing: its leases run out within 20 s, and the others — which try to take unwatched users on every
 * renew tick — pick them up within one more tick, ~25 s in all.
 *
 * Redis unreachable (or too slow: every call has a deadline): renew does not throw. We keep the users whose lease is
 * still valid by our own reckoning — `ttlMs` after the start of the last acquire/renew Redis confirmed, a lower bound
 * of the real expiry — and report them as lost once that time has passed, so the supervisor stops their watchers
 * right when another instance may have taken them over. Until then both may briefly watch a user; the change guard
 * (src/apns/change-guard.ts) makes a change push once anyway. acquire and release reject (the supervisor logs and
 * retries).
 *
 * Polling cost: a lease found held by another instance is not asked about again until it would expire (its PTTL),
 * since its holder renews it well before; so an unwatched user costs about one call per ttl, not one per tick. A
 * lease released by a graceful stop is therefore picked up within ttl too, like that of a crashed instance (pushes
 * are delayed, not lost: the watchers catch up from the stored mailbox states).
 *
 * Instance ids must be unique among the instances sharing Redis (two instances with one id would both watch).
 */
import { Cluster, type Redis } from 'ioredis';
import { LogLimiter } from '../apns/queue.js';
import { silentLogger, type Logger } from '../ops/log.js';
import { userKeys, type RedisRegistrationStore } from '../store/redis.js';
import type { LeaseManager } from './types.js';

/** How long a lease lives without renewal (default). */
export const DEFAULT_LEASE_TTL_MS = 20_000;
/** How often the supervisor renews leases and looks for free ones (default). */
export const DEFAULT_LEASE_RENEW_MS = 5_000;

/** Lease timing a supervisor reads from its lease manager. */
export interface LeaseTiming {
  /** How long a lease lives without renewal (Infinity: never expires). */
  readonly ttlMs: number;
  /** How often to renew (and to look for free leases). */
  readonly renewIntervalMs: number;
}

export class LocalLeaseManager implements LeaseManager, LeaseTiming {
  readonly instanceId: string;
  readonly ttlMs = Infinity;
  readonly renewIntervalMs: number;

  constructor(opts: { instanceId?: string; renewIntervalMs?: number } = {}) {
    this.instanceId = opts.instanceId ?? 'local';
    this.renewIntervalMs = opts.renewIntervalMs ?? DEFAULT_LEASE_RENEW_MS;
  }

  acquire(_user: string): Promise<boolean> {
    return Promise.resolve(true);
  }

  renew(_users: string[]): Promise<string[]> {
    return Promise.resolve([]);
  }

  release(_user: string): Promise<void> {
    return Promise.resolve();
  }
}

export interface RedisLeaseManagerOptions {
  /** A connected ioredis client (single server, Sentinel or Cluster); shared, never closed here. */
  client: Redis | Cluster;
  /** Key prefix, the store's (default `xaps`). */
  keyPrefix?: string;
  /** The value of our leases (--instance-id); unique per instance. */
  instanceId: string;
  /** Default DEFAULT_LEASE_TTL_MS (20 s). */
  ttlMs?: number;
  /** Default ttlMs / 4 (5 s); must be well below ttlMs. */
  renewIntervalMs?: number;
  /** Deadline of each Redis call (default min(2000, ttlMs / 4)). */
  timeoutMs?: number;
  /** ms since epoch (default Date.now); our reckoning of lease validity. */
  clock?: () => number;
  logger?: Logger;
  /** Repeated warnings at most once per this long (default 60 s). */
  logIntervalMs?: number;
}

/** KEYS: lease. ARGV: instanceId, ttl. Returns {1, 0} when ours now, else {0, pttl of the holder's lease}. */
const LUA_ACQUIRE = `
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, 0}
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, 0}
end
return {0, redis.call('PTTL', KEYS[1])}
`;

/** KEYS: leases (one slot). ARGV: instanceId, ttl. Returns 1 (renewed) or 0 (not ours any more) per key. */
const LUA_RENEW = `
local out = {}
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then
    redis.call('PEXPIRE', k, ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
`;

/** KEYS: lease. ARGV: instanceId. Returns 1 when deleted. */
const LUA_RELEASE = `
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
`;

interface LeaseScripts {
  xapsLeaseAcquire(key: string, id: string, ttl: number): Promise<[number, number]>;
  xapsLeaseRenew(numKeys: number, ...args: Array<string | number>): Promise<number[]>;
  xapsLeaseRelease(key: string, id: string): Promise<number>;
}

/** Most leases renewed by one script call. */
const RENEW_CHUNK = 500;

export class RedisLeaseManager implements LeaseManager, LeaseTiming {
  readonly instanceId: string;
  readonly ttlMs: number;
  readonly renewIntervalMs: number;
  private readonly client: Redis | Cluster;
  private readonly scripts: LeaseScripts;
  private readonly prefix: string;
  private readonly timeoutMs: number;
  private readonly clock: () => number;
  private readonly log: Logger;
  private readonly limiter: LogLimiter;
  /** user -> until when our lease is certainly valid (our clock). */
  private readonly held = new Map<string, number>();
  /** user -> until when another instance's lease is known to last (no need to ask before). */
  private readonly foreign = new Map<string, number>();

  constructor(opts: RedisLeaseManagerOptions) {
    const prefix = opts.keyPrefix ?? 'xaps';
    if (prefix === '' || /[{}]/.test(prefix)) throw new Error(`redis key prefix must be non-empty without "{" or "}": ${JSON.stringify(prefix)}`);
    if (typeof opts.instanceId !== 'string' || opts.instanceId === '') throw new TypeError('lease instanceId must be a non-empty string');
    this.client = opts.client;
    this.scripts = opts.client as unknown as LeaseScripts;
    this.prefix = prefix;
    this.instanceId = opts.instanceId;
    this.ttlMs = positive(opts.ttlMs ?? DEFAULT_LEASE_TTL_MS, 'lease ttlMs');
    this.renewIntervalMs = positive(opts.renewIntervalMs ?? Math.floor(this.ttlMs / 4), 'lease renewIntervalMs');
    if (this.renewIntervalMs >= this.ttlMs) {
      throw new RangeError(`lease renewIntervalMs (${this.renewIntervalMs}) must be shorter than ttlMs (${this.ttlMs})`);
    }
    this.timeoutMs = positive(opts.timeoutMs ?? Math.min(2000, Math.floor(this.ttlMs / 4)), 'lease timeoutMs');
    this.clock = opts.clock ?? Date.now;
    this.log = (opts.logger ?? silentLogger()).child({ component: 'leases', instance: this.instanceId });
    this.limiter = new LogLimiter(opts.logIntervalMs ?? 60_000, this.clock);
    this.client.defineCommand('xapsLeaseAcquire', { numberOfKeys: 1, lua: LUA_ACQUIRE });
    this.client.defineCommand('xapsLeaseRenew', { lua: LUA_RENEW });
    this.client.defineCommand('xapsLeaseRelease', { numberOfKeys: 1, lua: LUA_RELEASE });
  }

  /** Leases on the registration store's own connection and key prefix. */
  static forStore(
    store: RedisRegistrationStore,
    opts: Omit<RedisLeaseManagerOptions, 'client' | 'keyPrefix'>,
  ): RedisLeaseManager {
    const { client, keyPrefix } = store.connection;
    return new RedisLeaseManager({ ...opts, client, keyPrefix });
  }

  /** The key of one user's lease: `<prefix>:{u:<user>}:lease`. */
  key(user: string): string {
    return userKeys(this.prefix, user).lease;
  }

  /** Users whose lease we hold by our reckoning (for tests and health). */
  get heldCount(): number {
    return this.held.size;
  }

  async acquire(user: string): Promise<boolean> {
    const start = this.clock();
    const until = this.foreign.get(user);
    if (until !== undefined) {
      if (until > start) return false;
      this.foreign.delete(user);
    }
    const [ok, pttl] = await this.deadline(this.scripts.xapsLeaseAcquire(this.key(user), this.instanceId, this.ttlMs));
    if (Number(ok) === 1) {
      this.held.set(user, start + this.ttlMs);
      return true;
    }
    this.held.delete(user);
    // PTTL: ms left; -1 no expiry (not ours to fix: ask again after a ttl); -2 gone meanwhile (ask next time).
    const left = Number(pttl) === -1 ? this.ttlMs : Math.max(0, Math.min(Number(pttl), this.ttlMs));
    if (left > 0) this.foreign.set(user, start + left);
    return false;
  }

  async renew(users: string[]): Promise<string[]> {
    if (users.length === 0) return [];
    const start = this.clock();
    for (const [u, until] of this.foreign) if (until <= start) this.foreign.delete(u);
    const lost: string[] = [];
    let failed = 0;
    let lastError = '';
    await Promise.all(this.groups(users).map(async (group) => {
      try {
        const keys = group.map((u) => this.key(u));
        const res = await this.deadline(this.scripts.xapsLeaseRenew(keys.length, ...keys, this.instanceId, this.ttlMs));
        group.forEach((u, i) => {
          if (Number(res[i]) === 1) this.held.set(u, start + this.ttlMs);
          else {
            this.held.delete(u);
            lost.push(u);
          }
        });
      } catch (err) {
        failed += group.length;
        lastError = err instanceof Error ? err.message : String(err);
        const now = this.clock();
        for (const u of group) {
          const until = this.held.get(u);
          if (until === undefined || until <= now) {
            this.held.delete(u);
            lost.push(u);
          }
        }
      }
    }));
    if (failed > 0) {
      const suppressed = this.limiter.hit('renew');
      if (suppressed !== undefined) {
        this.log.warn(
          { users: failed, error: lastError, suppressed },
          'cannot renew watcher leases; watching on until they would have expired',
        );
      }
    }
    return lost;
  }

  async release(user: string): Promise<void> {
    this.held.delete(user);
    await this.deadline(this.scripts.xapsLeaseRelease(this.key(user), this.instanceId));
  }

  /** Renewal groups: keys of one script call must share a slot on a Cluster. */
  private groups(users: string[]): string[][] {
    const out: string[][] = [];
    if (this.client instanceof Cluster) {
      const bySlot = new Map<number, string[]>();
      for (const u of users) {
        const slot = keySlot(this.key(u));
        let g = bySlot.get(slot);
        if (!g) bySlot.set(slot, (g = []));
        g.push(u);
      }
      for (const g of bySlot.values()) for (let i = 0; i < g.length; i += RENEW_CHUNK) out.push(g.slice(i, i + RENEW_CHUNK));
    } else {
      for (let i = 0; i < users.length; i += RENEW_CHUNK) out.push(users.slice(i, i + RENEW_CHUNK));
    }
    return out;
  }

  private async deadline<T>(p: Promise<T>): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    try {
      return await Promise.race([
        p,
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`leases: no answer from Redis within ${this.timeoutMs} ms`)), this.timeoutMs);
          timer.unref();
        }),
      ]);
    } finally {
      if (timer) clearTimeout(timer);
    }
  }
}

/** CRC16-CCITT (XMODEM), as Redis Cluster uses for key slots. */
function crc16(buf: Uint8Array): number {
  let crc = 0;
  for (const byte of buf) {
    crc ^= byte << 8;
    for (let i = 0; i < 8; i++) crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
  }
  return crc;
}

/** The Redis Cluster hash slot of a key (hash tag rules included). */
export function keySlot(key: string): number {
  const buf = Buffer.from(key, 'utf8');
  const open = buf.indexOf(0x7b);
  if (open >= 0) {
    const close = buf.indexOf(0x7d, open + 1);
    if (close > open + 1) return crc16(buf.subarray(open + 1, close)) & 16383;
  }
  return crc16(buf) & 16383;
}

function positive(n: number, what: string): number {
  if (typeof n !== 'number' || !Number.isFinite(n) || n <= 0) throw new RangeError(`${what} must be a positive number, got ${String(n)}`);
  return Math.floor(n);
}
