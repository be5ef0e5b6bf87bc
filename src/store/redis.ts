/**
 * Redis registration store (ioredis): a single server, Sentinel or Cluster; see redis-url.ts for the URL forms.
 *
 * Key layout (prefix `xaps` by default). Every per-user key carries the hash tag `{u:<encoded user>}`, so all of a
 * user's keys live in one Cluster slot and per-user updates are single-slot Lua scripts (atomic):
 *
 *   xaps:{u:<user>}:regs    hash  deviceToken -> registration JSON, always starting `{"firstSeen":F,"lastSeen":L,`
 *   xaps:{u:<user>}:seen    zset  deviceToken -> lastSeen (ms): drives expiry; kept in step with :regs by the scripts
 *   xaps:{u:<user>}:mbx     hash  mailbox (UTF-8) -> last STATUS a watcher saw, JSON {"uidValidity","uidNext","messages"}
 *                                 (MailboxStateStore); written only while :seen exists, deleted by the remove/purge
 *                                 scripts when they empty :seen — atomically, as all three share the slot
 *   xaps:users              zset  user -> newest lastSeen seen for that user (ZADD GT): the global users index
 * Other per-user keys under the same tag, owned elsewhere: `:lease` (src/watch/leases.ts, which instance watches the
 * user) and `:chg:<changeId>` (src/apns/change-guard.ts).
 *
 * `<user>` is the username with `%`, `{`, `}` and control characters percent-encoded, so the hash tag is always well
 * formed whatever the name contains. Later per-user state belongs under the same tag (`xaps:{u:<user>}:…`).
 *
 * The users index lives in another slot, so it is maintained separately and idempotently: an upsert adds the user
 * before and after its per-user write (so a crash in between, or a concurrent remove of the last registration,
 * cannot hide a live user), and a remove or purge that empties a user drops it, then re-checks the user's zset and
 * re-adds it if a registration arrived meanwhile. Readers treat the index as a superset: entries whose
 * registrations all expired are skipped, and purgeExpired drops them.
 *
 * Durability: an upsert resolves once Redis acknowledged the script (no WAIT); how durable that is is the Redis
 * server's persistence configuration (appendonly/replicas). Failures are fast: no offline queue, in-flight commands
 * fail when the connection drops, every command has a timeout, and each single-user operation has an overall
 * deadline, so callers get StoreUnavailableError within ~2 s while the client reconnects forever in the background
 * with capped exponential back-off. Requires Redis >= 6.2 (ZADD GT).
 */
import { Redis, Cluster, type RedisOptions, type ClusterOptions } from 'ioredis';
import { silentLogger, type Logger } from '../ops/log.js';
import {
  compareRegistrations,
  compareStrings,
  copyRegistration,
  isLive,
  mapLimit,
  normalizeInput,
  normalizeToken,
  parseRegistration,
  validateTtl,
  validateUser,
} from './common.js';
import { parseRedisUrl, redactRedisUrl, type RedisTarget } from './redis-url.js';
import {
  StoreUnavailableError,
  checkMailboxStateInput,
  mailboxStateRecord,
  parseMailboxStatus,
  type MailboxStatus,
  type Registration,
  type RegistrationInput,
  type RegistrationStore,
} from './types.js';

export interface RedisStoreOptions {
  /** `--redis-url`; see redis-url.ts. */
  url: string;
  ttlMs: number;
  logger?: Logger;
  /** Key prefix, default `xaps`; must not contain `{` or `}`. */
  keyPrefix?: string;
  /** Clock for reads and for upserts without `now` (ms since epoch). */
  clock?: () => number;
  /** Per-command timeout (default 2000 ms). */
  commandTimeoutMs?: number;
  /** Overall deadline of single-user operations (default commandTimeoutMs + 500). */
  operationTimeoutMs?: number;
  /** How long `open` waits for the first connection before failing (default 10 000 ms; 0 = don't wait). */
  connectWaitMs?: number;
  /** Cap of the reconnect back-off (default 5000 ms). */
  maxBackoffMs?: number;
}

/** Lua shared by the scripts: drop this user's registrations with lastSeen <= cutoff; returns how many. */
const LUA_PURGE_FN = `
local function purge(regs, seen, cutoff)
  local dead = redis.call('ZRANGEBYSCORE', seen, '-inf', cutoff)
  local n = #dead
  if n > 0 then
    for i = 1, n, 500 do
      redis.call('HDEL', regs, unpack(dead, i, math.min(i + 499, n)))
    end
    redis.call('ZREMRANGEBYSCORE', seen, '-inf', cutoff)
  end
  return n
end
`;

/** KEYS: regs, seen. ARGV: token, now, cutoff (= now - ttl), body (registration JSON without its leading `{`). */
const LUA_UPSERT = `${LUA_PURGE_FN}
local token, now, cutoff = ARGV[1], ARGV[2], ARGV[3]
local first, created = now, 1
local old = redis.call('HGET', KEYS[1], token)
if old then
  local score = redis.call('ZSCORE', KEYS[2], token)
  if score and tonumber(score) > tonumber(cutoff) then
    local f = string.match(old, '^{"firstSeen":(%d+),')
    if f then first, created = f, 0 end
  end
end
redis.call('HSET', KEYS[1], token, '{"firstSeen":' .. first .. ',"lastSeen":' .. now .. ',' .. ARGV[4])
redis.call('ZADD', KEYS[2], now, token)
local purged = purge(KEYS[1], KEYS[2], cutoff)
return {created, first, purged}
`;

/**
 * KEYS: regs, seen, mbx. ARGV: token, cutoff, unlessSeenAfter ('' = unconditional). Returns {removed, remaining}.
 * The user's mailbox states go when the last registration does.
 */
const LUA_REMOVE = `${LUA_PURGE_FN}
local token, cutoff = ARGV[1], ARGV[2]
local removed = 0
local score = redis.call('ZSCORE', KEYS[2], token)
if score then
  local s = tonumber(score)
  if ARGV[3] == '' or s <= tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], token)
    redis.call('ZREM', KEYS[2], token)
    if s > tonumber(cutoff) then removed = 1 end
  end
else
  redis.call('HDEL', KEYS[1], token)
end
purge(KEYS[1], KEYS[2], cutoff)
local remaining = redis.call('ZCARD', KEYS[2])
if remaining == 0 then redis.call('DEL', KEYS[3]) end
return {removed, remaining}
`;

/** KEYS: regs, seen, mbx. ARGV: cutoff. Returns {purged, remaining}; an emptied user loses its mailbox states. */
const LUA_PURGE = `${LUA_PURGE_FN}
local n = purge(KEYS[1], KEYS[2], ARGV[1])
local remaining = redis.call('ZCARD', KEYS[2])
if remaining == 0 then redis.call('DEL', KEYS[3]) end
return {n, remaining}
`;

/** KEYS: seen, mbx. ARGV: mailbox, status JSON. Stores it only for a user with registrations; returns 1 if stored. */
const LUA_SET_STATE = `
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
`;

type Client = Redis | Cluster;
interface ScriptedClient {
  xapsUpsert(regs: string, seen: string, token: string, now: string, cutoff: string, body: string): Promise<[number, string, number]>;
  xapsRemove(regs: string, seen: string, mbx: string, token: string, cutoff: string, unlessSeenAfter: string): Promise<[number, number]>;
  xapsPurge(regs: string, seen: string, mbx: string, cutoff: string): Promise<[number, number]>;
  xapsSetState(seen: string, mbx: string, mailbox: string, status: string): Promise<number>;
}

/** Percent-encodes what would break a `{…}` hash tag (and control characters, for readable keys). */
export function encodeUserForKey(user: string): string {
  return user.replace(/[%{}\u0000-\u001f\u007f]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase().padStart(2, '0')}`);
}

/** The key names used for one user (exported for tests and future per-user state). */
export function userKeys(prefix: string, user: string): { tag: string; regs: string; seen: string; mbx: string; lease: string } {
  const tag = `{u:${encodeUserForKey(user)}}`;
  return {
    tag,
    regs: `${prefix}:${tag}:regs`,
    seen: `${prefix}:${tag}:seen`,
    mbx: `${prefix}:${tag}:mbx`,
    lease: `${prefix}:${tag}:lease`,
  };
}

function errMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

export class RedisRegistrationStore implements RegistrationStore {
  readonly kind = 'redis' as const;
  private readonly client: Client;
  private readonly scripts: ScriptedClient;
  private readonly ttlMs: number;
  private readonly prefix: string;
  private readonly usersKey: string;
  private readonly clock: () => number;
  private readonly opTimeoutMs: number;
  private readonly log: Logger;
  private readonly where: string;
  private closed = false;
  private up = false;
  private lastError: string | undefined;

  private constructor(client: Client, opts: RedisStoreOptions, where: string, log: Logger) {
    this.client = client;
    this.scripts = client as unknown as ScriptedClient;
    this.ttlMs = validateTtl(opts.ttlMs);
    this.prefix = opts.keyPrefix ?? 'xaps';
    this.usersKey = `${this.prefix}:users`;
    this.clock = opts.clock ?? Date.now;
    this.opTimeoutMs = opts.operationTimeoutMs ?? (opts.commandTimeoutMs ?? 2000) + 500;
    this.log = log;
    this.where = where;
  }

  /**
   * The store's connection and key prefix, for features that keep their own keys
   * next to the registrations (change dedupe, watcher leases) on the same slots.
   */
  get connection(): { client: Client; keyPrefix: string } {
    return { client: this.client, keyPrefix: this.prefix };
  }

  /** Connects (waiting up to `connectWaitMs` for the first connection) and returns the store. */
  static async open(opts: RedisStoreOptions): Promise<RedisRegistrationStore> {
    const prefix = opts.keyPrefix ?? 'xaps';
    if (prefix === '' || /[{}]/.test(prefix)) throw new Error(`redis key prefix must be non-empty without "{" or "}": ${JSON.stringify(prefix)}`);
    validateTtl(opts.ttlMs);
    const target = parseRedisUrl(opts.url);
    const where = redactRedisUrl(opts.url);
    const log = (opts.logger ?? silentLogger()).child({ component: 'store', store: 'redis' });
    const client = buildClient(target, opts);
    const store = new RedisRegistrationStore(client, opts, where, log);
    store.watchConnection();
    for (const [name, lua, numberOfKeys] of [
      ['xapsUpsert', LUA_UPSERT, 2], ['xapsRemove', LUA_REMOVE, 3], ['xapsPurge', LUA_PURGE, 3], ['xapsSetState', LUA_SET_STATE, 2],
    ] as const) {
      client.defineCommand(name, { numberOfKeys, lua });
    }
    const waitMs = opts.connectWaitMs ?? 10_000;
    if (waitMs > 0) {
      try {
        await store.waitReady(waitMs);
      } catch (err) {
        client.disconnect();
        store.closed = true;
        throw err;
      }
    }
    log.info({ redis: where, mode: target.mode }, 'redis registration store ready');
    return store;
  }

  private watchConnection(): void {
    this.client.on('ready', () => {
      if (!this.up) {
        if (this.lastError !== undefined) this.log.info({ redis: this.where }, 'redis connection restored');
        this.up = true;
      }
    });
    this.client.on('error', (err: unknown) => {
      const msg = errMessage(err);
      if (this.up || this.lastError === undefined) {
        this.log.warn({ redis: this.where, error: msg }, 'redis connection problem; retrying in the background');
      } else {
        this.log.debug({ redis: this.where, error: msg }, 'redis still unreachable');
      }
      this.lastError = msg;
      this.up = false;
    });
    const down = (): void => {
      if (this.closed) return;
      if (this.up) this.log.warn({ redis: this.where }, 'redis connection lost; reconnecting');
      this.up = false;
      this.lastError ??= 'connection closed';
    };
    this.client.on('close', down);
    this.client.on('node error', (err: unknown) => {
      this.log.debug({ redis: this.where, error: errMessage(err) }, 'redis cluster node error');
    });
  }

  private waitReady(ms: number): Promise<void> {
    if (this.client.status === 'ready') {
      this.up = true;
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      const done = (): void => {
        clearTimeout(timer);
        this.client.off('ready', onReady);
        this.client.off('error', onError);
      };
      const onReady = (): void => {
        done();
        this.up = true;
        resolve();
      };
      // Wrong credentials or database will not fix themselves: fail at once instead of waiting.
      const onError = (err: unknown): void => {
        const msg = errMessage(err);
        if (!/WRONGPASS|NOAUTH|NOPERM|invalid password|invalid username|ERR DB index|invalid DB index/i.test(msg)) return;
        done();
        reject(new StoreUnavailableError(`Redis at ${this.where} refused the connection: ${msg}`));
      };
      const timer = setTimeout(() => {
        done();
        reject(new StoreUnavailableError(
          `cannot reach Redis at ${this.where} within ${ms} ms${this.lastError ? `: ${this.lastError}` : ''}`,
        ));
      }, ms);
      this.client.on('ready', onReady);
      this.client.on('error', onError);
    });
  }

  private keys(user: string): { regs: string; seen: string; mbx: string } {
    return userKeys(this.prefix, user);
  }

  /** Runs a store operation: Redis failures become StoreUnavailableError (no command arguments in the message). */
  private async run<T>(what: string, fn: () => Promise<T>, deadline = false): Promise<T> {
    if (this.closed) throw new StoreUnavailableError('redis registration store is closed');
    let timer: NodeJS.Timeout | undefined;
    try {
      const p = fn();
      if (!deadline) return await p;
      return await Promise.race([
        p,
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`no answer within ${this.opTimeoutMs} ms`)), this.opTimeoutMs);
        }),
      ]);
    } catch (err) {
      if (err instanceof StoreUnavailableError) throw err;
      throw new StoreUnavailableError(`redis ${what} failed (${this.where}): ${errMessage(err)}`);
    } finally {
      if (timer) clearTimeout(timer);
    }
  }

  async upsert(input: RegistrationInput): Promise<{ created: boolean; registration: Registration }> {
    const reg = normalizeInput(input);
    const now = input.now ?? this.clock();
    const { regs, seen } = this.keys(reg.user);
    const body = JSON.stringify({
      user: reg.user,
      deviceToken: reg.deviceToken,
      accountId: reg.accountId,
      subtopic: reg.subtopic,
      mailboxes: reg.mailboxes,
      version: reg.version,
    }).slice(1);
    return this.run('upsert', async () => {
      // Index first (so a crash after the per-user write cannot leave a live user unindexed), then again after
      // (in case a concurrent remove dropped the user in between).
      await this.client.zadd(this.usersKey, 'GT', now, reg.user);
      const [created, first] = await this.scripts.xapsUpsert(
        regs, seen, reg.deviceToken, String(now), String(now - this.ttlMs), body,
      );
      await this.client.zadd(this.usersKey, 'GT', now, reg.user);
      return {
        created: Number(created) === 1,
        registration: { ...reg, firstSeen: Number(first), lastSeen: now },
      };
    }, true);
  }

  async get(user: string, deviceToken: string): Promise<Registration | null> {
    validateUser(user);
    const token = normalizeToken(deviceToken);
    const raw = await this.run('get', () => this.client.hget(this.keys(user).regs, token), true);
    if (raw === null) return null;
    const reg = this.decode(raw);
    return reg && isLive(reg, this.ttlMs, this.clock()) ? reg : null;
  }

  async listByUser(user: string): Promise<Registration[]> {
    validateUser(user);
    const all = await this.run('listByUser', () => this.client.hgetall(this.keys(user).regs), true);
    const now = this.clock();
    const out: Registration[] = [];
    for (const raw of Object.values(all)) {
      const reg = this.decode(raw);
      if (reg && isLive(reg, this.ttlMs, now)) out.push(reg);
    }
    return out.sort(compareRegistrations);
  }

  /** Index entries that may have live registrations (superset). */
  private async candidateUsers(cutoff: number): Promise<string[]> {
    return this.client.zrangebyscore(this.usersKey, `(${cutoff}`, '+inf');
  }

  /** Live registrations per candidate user (0 for stale index entries). */
  private async liveCounts(cutoff: number): Promise<Array<[string, number]>> {
    const users = await this.candidateUsers(cutoff);
    return mapLimit(users, 32, async (u) => [u, await this.client.zcount(this.keys(u).seen, `(${cutoff}`, '+inf')] as [string, number]);
  }

  async listUsers(): Promise<string[]> {
    return this.run('listUsers', async () => {
      const counts = await this.liveCounts(this.clock() - this.ttlMs);
      return counts.filter(([, n]) => n > 0).map(([u]) => u).sort(compareStrings);
    });
  }

  async listAll(): Promise<Registration[]> {
    const users = await this.listUsers();
    const lists = await mapLimit(users, 16, (u) => this.listByUser(u));
    return lists.flat().sort(compareRegistrations);
  }

  async remove(user: string, deviceToken: string, opts: { unlessSeenAfter?: number } = {}): Promise<boolean> {
    validateUser(user);
    const token = normalizeToken(deviceToken);
    const { unlessSeenAfter } = opts;
    if (unlessSeenAfter !== undefined && (typeof unlessSeenAfter !== 'number' || !Number.isFinite(unlessSeenAfter))) {
      throw new TypeError('unlessSeenAfter must be ms since epoch');
    }
    const { regs, seen, mbx } = this.keys(user);
    const cutoff = this.clock() - this.ttlMs;
    return this.run('remove', async () => {
      const [removed, remaining] = await this.scripts.xapsRemove(
        regs, seen, mbx, token, String(cutoff), unlessSeenAfter === undefined ? '' : String(Math.floor(unlessSeenAfter)),
      );
      if (Number(remaining) === 0) await this.dropUserFromIndex(user);
      return Number(removed) === 1;
    }, true);
  }

  /** Drops a user with no registrations from the index, then repairs the entry if one arrived meanwhile. */
  private async dropUserFromIndex(user: string): Promise<void> {
    await this.client.zrem(this.usersKey, user);
    const newest = await this.client.zrange(this.keys(user).seen, -1, -1, 'WITHSCORES');
    if (newest.length >= 2) await this.client.zadd(this.usersKey, 'GT', newest[1] as string, user);
  }

  async purgeExpired(now?: number): Promise<number> {
    const cutoff = (now ?? this.clock()) - this.ttlMs;
    return this.run('purgeExpired', async () => {
      let total = 0;
      let cursor = '0';
      do {
        const [next, flat] = await this.client.zscan(this.usersKey, cursor, 'COUNT', 500);
        cursor = next;
        const users: string[] = [];
        for (let i = 0; i < flat.length; i += 2) users.push(flat[i] as string);
        const results = await mapLimit(users, 16, async (u) => {
          const { regs, seen, mbx } = this.keys(u);
          const [purged, remaining] = await this.scripts.xapsPurge(regs, seen, mbx, String(cutoff));
          if (Number(remaining) === 0) await this.dropUserFromIndex(u);
          return Number(purged);
        });
        for (const n of results) total += n;
      } while (cursor !== '0');
      if (total > 0) this.log.info({ purged: total }, 'purged expired registrations');
      return total;
    });
  }

  async counts(): Promise<{ users: number; registrations: number }> {
    return this.run('counts', async () => {
      const counts = await this.liveCounts(this.clock() - this.ttlMs);
      let users = 0;
      let registrations = 0;
      for (const [, n] of counts) {
        if (n > 0) {
          users++;
          registrations += n;
        }
      }
      return { users, registrations };
    });
  }

  async getMailboxStates(user: string): Promise<Record<string, MailboxStatus>> {
    validateUser(user);
    const all = await this.run('getMailboxStates', () => this.client.hgetall(this.keys(user).mbx), true);
    const out: Array<[string, MailboxStatus]> = [];
    for (const [mailbox, raw] of Object.entries(all)) {
      let v: unknown;
      try {
        v = JSON.parse(raw);
      } catch {
        v = undefined;
      }
      const status = parseMailboxStatus(v);
      if (status) out.push([mailbox, status]);
      else this.log.warn('ignoring an unreadable mailbox state in Redis');
    }
    return mailboxStateRecord(out);
  }

  /** HSET on :mbx, only while the user has registrations (one script: atomic with remove/purge). */
  async setMailboxState(user: string, mailbox: string, status: MailboxStatus): Promise<void> {
    const st = checkMailboxStateInput(user, mailbox, status);
    const { seen, mbx } = this.keys(user);
    const json = JSON.stringify({ uidValidity: st.uidValidity, uidNext: st.uidNext, messages: st.messages });
    await this.run('setMailboxState', () => this.scripts.xapsSetState(seen, mbx, mailbox, json), true);
  }

  async ping(): Promise<void> {
    await this.run('ping', async () => {
      if (this.client instanceof Cluster) {
        if (this.client.status !== 'ready') throw new Error(`cluster is ${this.client.status}`);
        const masters = this.client.nodes('master');
        if (masters.length === 0) throw new Error('no cluster master known');
        await Promise.all(masters.map((n) => n.ping()));
      } else {
        await this.client.ping();
      }
    }, true);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        this.client.quit(),
        new Promise((resolve) => {
          timer = setTimeout(resolve, 1000);
        }),
      ]);
    } catch {
      // not connected: nothing to say goodbye to
    } finally {
      if (timer) clearTimeout(timer);
      this.client.disconnect();
    }
  }

  private decode(raw: string): Registration | null {
    let v: unknown;
    try {
      v = JSON.parse(raw);
    } catch {
      v = undefined;
    }
    const reg = parseRegistration(v);
    if (!reg) this.log.warn('ignoring an unreadable registration record in Redis');
    return reg ? copyRegistration(reg) : null;
  }
}

function backoff(times: number, maxMs: number): number {
  const base = Math.min(maxMs, 100 * 2 ** Math.min(times, 16));
  return Math.round(base / 2 + Math.random() * (base / 2));
}

function buildClient(t: RedisTarget, opts: RedisStoreOptions): Client {
  const commandTimeout = opts.commandTimeoutMs ?? 2000;
  const maxBackoff = opts.maxBackoffMs ?? 5000;
  const common: RedisOptions = {
    commandTimeout,
    connectTimeout: Math.max(commandTimeout, 5000),
    maxRetriesPerRequest: 0,
    autoResendUnfulfilledCommands: false,
    enableReadyCheck: true,
    // A master demoted by a Sentinel failover answers READONLY: reconnect (to the new master); the command fails.
    reconnectOnError: (err) => /^READONLY/.test(err.message),
    connectionName: 'xaps-proxy',
    disableClientInfo: true,
  };
  if (t.username !== undefined) common.username = t.username;
  if (t.password !== undefined) common.password = t.password;
  if (t.tls) common.tls = {};
  switch (t.mode) {
    case 'standalone':
      return new Redis({
        ...common,
        host: t.host,
        port: t.port,
        db: t.db,
        enableOfflineQueue: false,
        retryStrategy: (times) => backoff(times, maxBackoff),
      });
    case 'sentinel': {
      const o: RedisOptions = {
        ...common,
        sentinels: t.sentinels,
        name: t.masterName,
        db: t.db,
        enableOfflineQueue: false,
        retryStrategy: (times) => backoff(times, maxBackoff),
        sentinelRetryStrategy: (times) => backoff(times, maxBackoff),
        sentinelCommandTimeout: commandTimeout,
      };
      if (t.tls) {
        o.enableTLSForSentinelMode = true;
        o.sentinelTLS = {};
      }
      if (t.sentinelUsername !== undefined) o.sentinelUsername = t.sentinelUsername;
      if (t.sentinelPassword !== undefined) o.sentinelPassword = t.sentinelPassword;
      return new Redis(o);
    }
    case 'cluster': {
      const { tls, ...nodeOpts } = common;
      const o: ClusterOptions = {
        redisOptions: { ...nodeOpts, ...(tls ? { tls } : {}) },
        enableOfflineQueue: false,
        enableReadyCheck: true,
        clusterRetryStrategy: (times) => backoff(times, maxBackoff),
        slotsRefreshTimeout: Math.max(commandTimeout, 1000),
        retryDelayOnClusterDown: 200,
        retryDelayOnFailover: 200,
        maxRedirections: 8,
      };
      return new Cluster(t.nodes, o);
    }
  }
}
