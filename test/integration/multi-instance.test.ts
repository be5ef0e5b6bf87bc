/**
 * Acceptance, with real processes: two `xaps-proxy serve` instances on one Redis in front of a real Dovecot with 200
 * registered users. Every user is watched exactly once (one lease per user, held by A or B, both holding some);
 * `kill -9` of A hands all of A's users over to B within 30 s (lease ttl 20 s, renew 5 s); and every delivery —
 * before, during and after the hand-over — gives exactly one push per device at the mock APNs.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Redis } from 'ioredis';
import { startDovecot, type DovecotInstance } from '../../src/testbed/dovecot.js';
import { startRedis, type RedisInstance } from '../../src/testbed/redis.js';
import { startMockApns, type MockApns } from '../../src/testbed/mock-apns.js';
import { createTestCa, issueMailPushCert } from '../../src/testbed/apns-certs.js';
import { userKeys } from '../../src/store/redis.js';
import { RawImap } from '../helpers/raw-imap.js';
import { spawnServe, type ServeProcess } from '../helpers/serve-process.js';

const ACCOUNT = '0715A26B-1C2D-4E3F-8A9B-0C1D2E3F4A5B';
const N_USERS = 200;
const USERS = Array.from({ length: N_USERS }, (_, i) => `user${String(i + 1).padStart(4, '0')}`);
/** One device per user, a distinct 64-hex token. */
const tokenOf = (user: string) => `${user.slice(4)}`.padStart(4, '0').repeat(16);
const TOKEN_USER = new Map(USERS.map((u) => [tokenOf(u), u]));
const message = (subject: string) => `From: a@example.org\r\nTo: b@example.org\r\nSubject: ${subject}\r\n\r\nhello\r\n`;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function mapLimit<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

async function register(port: number, user: string): Promise<void> {
  const c = await RawImap.connect({ port });
  try {
    await c.greeting();
    const login = await c.command('l', `LOGIN ${user} password`);
    if (!/^l OK/m.test(login)) throw new Error(`login of ${user} failed: ${login}`);
    const reply = await c.command(
      'x',
      `XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "${ACCOUNT}" "aps-device-token" "${tokenOf(user)}" "aps-subtopic" "com.apple.mobilemail" "mailboxes" ("INBOX")`,
    );
    if (!/^x OK/m.test(reply)) throw new Error(`registration of ${user} failed: ${reply}`);
    await c.command('o', 'LOGOUT').catch(() => undefined);
  } finally {
    c.close();
  }
}

describe('two instances on one Redis, 200 users, kill -9 of one', () => {
  let dovecot: DovecotInstance;
  let redis: RedisInstance;
  let mock: MockApns;
  let client: Redis;
  let dir: string;
  const procs: Record<'A' | 'B', ServeProcess | undefined> = { A: undefined, B: undefined };
  /** token → pushes it must have received so far. */
  const expected = new Map<string, number>(USERS.map((u) => [tokenOf(u), 0]));
  const t0 = Date.now();
  const log = (what: string) => console.log(`[multi-instance +${((Date.now() - t0) / 1000).toFixed(1)}s] ${what}`);

  /** user → lease holder (null: none), and whether the user's INBOX state is stored (the watcher's baseline). */
  async function leases(): Promise<Map<string, { holder: string | null; baseline: boolean }>> {
    const p = client.pipeline();
    for (const u of USERS) {
      const k = userKeys('xaps', u);
      p.get(k.lease);
      p.hexists(k.mbx, 'INBOX');
    }
    const res = (await p.exec())!;
    const out = new Map<string, { holder: string | null; baseline: boolean }>();
    USERS.forEach((u, i) => {
      const [e1, holder] = res[2 * i]!;
      const [e2, baseline] = res[2 * i + 1]!;
      if (e1 || e2) throw e1 ?? e2;
      out.set(u, { holder: holder as string | null, baseline: baseline === 1 });
    });
    return out;
  }

  /** Polls until every user's lease is held by one of `holders` with its baseline stored; returns the final map. */
  async function allLeased(holders: string[], timeoutMs: number) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = await leases();
      const missing = [...m].filter(([, v]) => v.holder === null || !holders.includes(v.holder) || !v.baseline);
      if (missing.length === 0) return m;
      if (Date.now() > deadline) {
        throw new Error(`${missing.length} users not leased by ${holders.join('/')} with a baseline: ${JSON.stringify(missing.slice(0, 10))}`);
      }
      await sleep(200);
    }
  }

  const pushCount = (token: string) => mock.requests.filter((r) => r.deviceToken === token).length;

  /** Delivers one message to each user's INBOX and bumps what their device must get. */
  async function deliverTo(users: string[], label: string): Promise<void> {
    await mapLimit(users, 10, async (u) => {
      await dovecot.deliver(u, message(`${label} ${u}`));
      expected.set(tokenOf(u), expected.get(tokenOf(u))! + 1);
    });
  }

  /** Waits until every device has at least its expected pushes, settles, then checks exactly: all 200 devices. */
  async function exactlyOnce(timeoutMs: number, settleMs = 2500): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const short = [...expected].filter(([t, n]) => pushCount(t) < n);
      if (short.length === 0) break;
      if (Date.now() > deadline) break; // the exact check below reports them
      await sleep(100);
    }
    await sleep(settleMs); // well past the 300 ms coalescing window: a duplicate would have arrived
    const holders = await leases();
    const wrong = [...expected]
      .filter(([t, n]) => pushCount(t) !== n)
      .map(([t, n]) => {
        const user = TOKEN_USER.get(t)!;
        return {
          user,
          expected: n,
          got: pushCount(t),
          lease: holders.get(user)?.holder,
          pushes: mock.requests.filter((r) => r.deviceToken === t).map((r) => ({ at: r.at - t0, session: r.sessionId, apnsId: r.headers['apns-id'], collapse: r.headers['apns-collapse-id'] })),
        };
      });
    const unknown = mock.requests.filter((r) => !TOKEN_USER.has(r.deviceToken)).map((r) => r.deviceToken);
    expect(unknown).toEqual([]);
    expect(wrong).toEqual([]);
    for (const r of mock.requests) expect(r.body).toEqual({ aps: { 'account-id': ACCOUNT } });
  }

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'xaps-multi-'));
    const ca = createTestCa();
    const cert = issueMailPushCert(ca);
    [dovecot, redis, mock] = await Promise.all([
      startDovecot({ users: {}, genUsers: N_USERS, maxConnections: 2000 }),
      startRedis(),
      startMockApns({ clientCa: ca.certPem }),
    ]);
    client = new Redis(redis.url, { lazyConnect: false, maxRetriesPerRequest: 2 });
    await fs.writeFile(path.join(dir, 'mail.pem'), cert.certPem);
    await fs.writeFile(path.join(dir, 'mail.key'), cert.keyPem, { mode: 0o600 });
    await fs.writeFile(path.join(dir, 'apns-ca.pem'), mock.caPem);
    await fs.writeFile(path.join(dir, 'master.pw'), `${dovecot.masterPassword}\n`, { mode: 0o600 });
    const common = [
      '--upstream', `127.0.0.1:${dovecot.imapPort}`,
      '--redis-url', redis.url,
      '--apns-cert', path.join(dir, 'mail.pem'),
      '--apns-key', path.join(dir, 'mail.key'),
      '--apns-endpoint', mock.url,
      '--apns-ca', path.join(dir, 'apns-ca.pem'),
      '--push-coalesce-window', '300ms',
      '--master-user', dovecot.masterUser,
      '--master-password-file', path.join(dir, 'master.pw'),
      '--log-level', 'warn',
    ];
    const spawnOne = async (id: 'A' | 'B') => {
      const dataDir = path.join(dir, `data-${id}`);
      await fs.mkdir(dataDir);
      procs[id] = await spawnServe([...common, '--data-dir', dataDir, '--instance-id', id]);
    };
    await Promise.all([spawnOne('A'), spawnOne('B')]);
    log(`started: dovecot, redis, mock APNs, A (pid ${procs.A!.pid}) and B (pid ${procs.B!.pid})`);
  }, 120_000);

  afterAll(async () => {
    await Promise.all([procs.A?.stop(), procs.B?.stop()]);
    for (const id of ['A', 'B'] as const) {
      const err = procs[id]?.stderr().trim();
      if (err) console.log(`[multi-instance] stderr of ${id}:\n${err.slice(-4000)}`);
    }
    client?.disconnect();
    await mock?.close();
    await redis?.destroy();
    await dovecot?.destroy();
    if (dir) await fs.rm(dir, { recursive: true, force: true });
  }, 60_000);

  let heldByA: string[] = [];
  let heldByB: string[] = [];

  it('200 users registered through both instances are each watched exactly once', async () => {
    // odd users register through A, even ones through B (the registering instance starts the watcher at once)
    await mapLimit(USERS, 20, (u) => register(Number(u.slice(4)) % 2 === 1 ? procs.A!.port : procs.B!.port, u));
    log('200 registrations done');
    const m = await allLeased(['A', 'B'], 60_000);
    heldByA = USERS.filter((u) => m.get(u)!.holder === 'A');
    heldByB = USERS.filter((u) => m.get(u)!.holder === 'B');
    log(`all leased: A ${heldByA.length}, B ${heldByB.length}`);
    expect(heldByA.length + heldByB.length).toBe(N_USERS);
    expect(heldByA.length).toBeGreaterThan(0);
    expect(heldByB.length).toBeGreaterThan(0);
    // and upstream: one watcher session per user (master-user logins of the two proxies), none twice
    const who = await dovecot.doveadm(['who', '-1']);
    const sessions = new Map<string, number>();
    for (const line of who.split('\n')) {
      const user = /^(user\d{4})\s/.exec(line)?.[1];
      if (user) sessions.set(user, (sessions.get(user) ?? 0) + 1);
    }
    expect([...sessions].filter(([, n]) => n !== 1)).toEqual([]);
    expect(sessions.size).toBe(N_USERS);
  }, 180_000);

  it('deliveries to 40 users: exactly one push per device', async () => {
    const sample = [...heldByA.slice(0, 20), ...heldByB.slice(0, 20)];
    await deliverTo(sample, 'before');
    await exactlyOnce(20_000);
    log(`before the kill: ${mock.requests.length} pushes, one per delivery`);
  }, 180_000);

  it('kill -9 of A: B watches all 200 users within 30 s; one push per device during and after the hand-over', async () => {
    const killedAt = Date.now();
    await procs.A!.kill9();
    log(`A killed (SIGKILL, pid ${procs.A!.pid})`);
    // during the hand-over: nobody watches A's users; B catches up from the stored states once it takes them
    const during = [...heldByA.slice(10, 40), ...heldByB.slice(20, 30)];
    await deliverTo(during, 'during');
    log(`delivered to ${during.length} users during the hand-over (${Date.now() - killedAt} ms after the kill)`);
    await allLeased(['B'], 40_000);
    const handOverMs = Date.now() - killedAt;
    log(`all 200 leases held by B ${handOverMs} ms after the kill`);
    expect(handOverMs).toBeLessThan(30_000);
    await exactlyOnce(20_000);
    log(`during the hand-over: ${mock.requests.length} pushes in all, one per delivery`);
    // after the hand-over: former A users (some already caught up, some not), and B's own
    const after = [...heldByA.slice(0, 5), ...heldByA.slice(30, 45), ...heldByA.slice(-10), ...heldByB.slice(40, 50)];
    await deliverTo(after, 'after');
    await exactlyOnce(20_000);
    log(`after the hand-over: ${mock.requests.length} pushes in all, one per delivery`);
    const who = await dovecot.doveadm(['who', '-1']);
    const sessions = new Map<string, number>();
    for (const line of who.split('\n')) {
      const user = /^(user\d{4})\s/.exec(line)?.[1];
      if (user) sessions.set(user, (sessions.get(user) ?? 0) + 1);
    }
    expect([...sessions].filter(([, n]) => n !== 1)).toEqual([]);
    expect(sessions.size).toBe(N_USERS);
  }, 180_000);
});
