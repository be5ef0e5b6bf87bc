/**
 * Fault: Redis (the registration store, --redis-url) killed with `kill -9` under a load of concurrent
 * XAPPLEPUSHSERVICE registrations from many sessions, then restarted on the same port and data dir.
 *
 * Redis runs with `appendonly yes` + `appendfsync always` (src/testbed/redis.ts, persistence 'aof'): Redis replies to
 * a write only once it is fsync'ed to the AOF, so a write Redis acknowledged survives its own `kill -9`. How durable
 * Redis is, is the operator's choice; the proxy's promise is narrower — it answers OK only once Redis acknowledged the
 * write — and this configuration is what makes that promise observable across a crash of Redis.
 *
 * Guards:
 * - every registration answered OK is in Redis afterwards; NO [UNAVAILABLE] is allowed (and must happen while
 *   Redis is down); nothing else (no BAD, no hang, no dropped connection);
 * - the sessions stay open through the outage: IMAP is still proxied (NOOP, SELECT, FETCH) and the registering
 *   sessions get OK again once Redis is back;
 * - pushes resume after Redis returns, for a device registered before the outage; mail delivered during the outage
 *   is pushed once Redis is back;
 * - the in-process proxy never crashes (no unhandled rejection or exception).
 *
 * Breaks that turn this red (tried): answering OK when the store write failed (src/push/handler.ts, the catch that
 * answers NO [UNAVAILABLE]) — hundreds of OK'd registrations are then missing; dropping a change whose registrations
 * cannot be read instead of trying it again (src/apns/dispatcher.ts, retryUnreadable) — the mail delivered during
 * the outage is never pushed.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { startDovecot, type DovecotInstance } from '../../../src/testbed/dovecot.js';
import { startRedis, type RedisInstance } from '../../../src/testbed/redis.js';
import { createStore, type RegistrationStore } from '../../../src/store/index.js';
import type { RawImap } from '../../helpers/raw-imap.js';
import { startTestProxy, type TestProxy } from '../../helpers/proxy.js';
import { apnsFixture, type ApnsFixture } from '../../helpers/apns-fixture.js';
import { lmtpDeliver } from '../../helpers/lmtp.js';
import {
  crashDetector,
  deviceToken,
  loggedIn,
  masterPasswordFile,
  message,
  metric,
  pushesTo,
  registerDevice,
  registerOn,
  sleep,
  waitForPushes,
  waitUntil,
} from '../../helpers/faults.js';

const LOAD_USERS = 20;
const USERS = Array.from({ length: LOAD_USERS + 1 }, (_, i) => `user${String(i + 1).padStart(4, '0')}`);
const LOADED = USERS.slice(0, LOAD_USERS);
/** Registered once before the outage; receives the mail. */
const WATCHED = USERS[LOAD_USERS]!;
const WATCHED_TOKEN = deviceToken(0xfeed, 1);

type Phase = 'before' | 'down' | 'after';
interface Attempt {
  user: string;
  token: string;
  phase: Phase;
  outcome: 'OK' | 'NO';
}

describe('Redis killed (kill -9) and restarted under a load of registrations', () => {
  let dovecot: DovecotInstance;
  let redis: RedisInstance;
  let apns: ApnsFixture;
  let proxy: TestProxy;
  let reader: RegistrationStore;
  let dir: string;
  let crashes: ReturnType<typeof crashDetector>;

  beforeAll(async () => {
    crashes = crashDetector();
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'xaps-fault-redis-'));
    [dovecot, redis, apns] = await Promise.all([
      startDovecot({ users: {}, genUsers: USERS.length }),
      startRedis({ persistence: 'aof' }),
      apnsFixture(['--push-coalesce-window', '300ms']),
    ]);
    const pw = await masterPasswordFile(dir, dovecot.masterPassword);
    proxy = await startTestProxy({
      upstreamPort: dovecot.imapPort,
      flags: [
        ...apns.flags,
        '--redis-url', redis.url,
        '--instance-id', 'fault-redis',
        '--master-user', dovecot.masterUser,
        '--master-password-file', pw,
      ],
    });
    // an independent reader of what Redis holds (not the proxy's own client)
    reader = await createStore({ redisUrl: redis.url, dataDir: dir, ttlMs: 30 * 24 * 3600 * 1000 });
  }, 120_000);

  afterAll(async () => {
    await reader?.close().catch(() => undefined);
    await proxy?.stop();
    await apns?.mock.close();
    await redis?.destroy();
    await dovecot?.destroy();
    if (dir) await fs.rm(dir, { recursive: true, force: true });
    crashes?.dispose();
  }, 60_000);

  it('every registration answered OK survives; sessions keep proxying; pushes resume when Redis is back', async () => {
    // a device registered before the outage, watched, with one push through
    await registerDevice(proxy.plainPort, WATCHED, 'password', WATCHED_TOKEN);
    await waitUntil(`${WATCHED} watched`, () => proxy.app.watch!.isWatching(WATCHED));
    await lmtpDeliver(dovecot.lmtpPort, WATCHED, message('before the outage'));
    await waitForPushes(apns.mock, WATCHED_TOKEN, 1);

    // sessions that only read mail during the outage
    const readers: RawImap[] = [];
    for (const u of LOADED.slice(0, 4)) {
      const c = await loggedIn(proxy.plainPort, u, 'password');
      expect(await c.command('s', 'SELECT INBOX')).toMatch(/^s OK/m);
      readers.push(c);
    }

    // the load: every user's session registers new devices one after the other, all sessions at once
    let phase: Phase = 'before';
    let stop = false;
    const attempts: Attempt[] = [];
    const failures: string[] = [];
    const sessions = await Promise.all(LOADED.map((u) => loggedIn(proxy.plainPort, u, 'password')));
    const loops = sessions.map(async (c, i) => {
      const user = LOADED[i]!;
      for (let n = 1; !stop; n++) {
        const token = deviceToken(i + 1, n);
        const at = phase; // the phase when the command was sent
        try {
          attempts.push({ user, token, phase: at, outcome: await registerOn(c, token) });
        } catch (err) {
          failures.push(`${user} ${token.slice(0, 8)} (${at}): ${(err as Error).message}`);
          return;
        }
        await sleep(5); // pacing, so that two cores also serve Redis and Dovecot
      }
    });
    const count = (p: Phase, o: 'OK' | 'NO') => attempts.filter((a) => a.phase === p && a.outcome === o).length;

    await waitUntil('100 registrations acknowledged before the kill', () => count('before', 'OK') >= 100 || failures.length > 0, 60_000);
    phase = 'down';
    await redis.kill();
    // the sessions keep registering while Redis is down (the store refuses: NO answers; the sessions stay open)
    await waitUntil(
      'registrations answered during the outage',
      () => count('down', 'OK') + count('down', 'NO') >= 2 * LOAD_USERS || failures.length > 0,
      60_000,
    );
    expect(failures).toEqual([]);

    // IMAP is still proxied during the outage
    for (const [i, c] of readers.entries()) {
      expect(await c.command(`n${i}`, 'NOOP')).toMatch(new RegExp(`^n${i} OK`, 'm'));
      expect(await c.command(`e${i}`, 'EXAMINE INBOX')).toMatch(new RegExp(`^e${i} OK`, 'm'));
      expect(await c.command(`f${i}`, 'UID FETCH 1:* (FLAGS)')).toMatch(new RegExp(`^f${i} OK`, 'm'));
    }
    // mail arriving during the outage: the watcher sees it, the dispatcher cannot read the registrations now
    const storeErrors = await metric(proxy.app.registry, 'xaps_push_changes_total', { result: 'store_error' });
    await lmtpDeliver(dovecot.lmtpPort, WATCHED, message('during the outage'));
    await waitUntil('the change of the outage mail to meet the unavailable store', async () =>
      (await metric(proxy.app.registry, 'xaps_push_changes_total', { result: 'store_error' })) > storeErrors,
    );
    expect(pushesTo(apns.mock, WATCHED_TOKEN)).toHaveLength(1);

    phase = 'after';
    await redis.restart();
    // every registering session gets OK again: it stayed open, and the store reconnected
    await waitUntil(
      'an acknowledged registration on every session after the restart',
      () => failures.length > 0 || LOADED.every((u) => attempts.some((a) => a.user === u && a.phase === 'after' && a.outcome === 'OK')),
      60_000,
    );
    stop = true;
    await Promise.all(loops);
    expect(failures).toEqual([]);
    for (const c of [...sessions, ...readers]) expect(c.closed).toBe(false);

    // no acknowledged registration lost
    await waitUntil('the independent reader reconnected', async () => (await reader.ping(), true));
    const acked = attempts.filter((a) => a.outcome === 'OK');
    const missing: string[] = [];
    for (const a of acked) if ((await reader.get(a.user, a.token)) === null) missing.push(`${a.user} ${a.token.slice(0, 8)} (${a.phase})`);
    expect(missing).toEqual([]);
    expect(count('down', 'NO')).toBeGreaterThanOrEqual(LOAD_USERS);
    expect(await reader.get(WATCHED, WATCHED_TOKEN)).not.toBeNull();

    // pushes resume: the mail of the outage is pushed once Redis is back, and so is new mail
    await waitForPushes(apns.mock, WATCHED_TOKEN, 2, 60_000);
    await sleep(600);
    const beforeNew = pushesTo(apns.mock, WATCHED_TOKEN).length;
    await lmtpDeliver(dovecot.lmtpPort, WATCHED, message('after the outage'));
    await waitForPushes(apns.mock, WATCHED_TOKEN, beforeNew + 1, 60_000);

    for (const c of [...sessions, ...readers]) {
      expect(await c.command('z', 'LOGOUT')).toMatch(/^\* BYE/m);
      c.close();
    }
    expect(crashes.errors).toEqual([]);
    console.log(
      `[faults/redis] registrations: before the kill ${count('before', 'OK')} OK; during the outage ${count('down', 'OK')} OK, ` +
        `${count('down', 'NO')} NO; after the restart ${count('after', 'OK')} OK, ${count('after', 'NO')} NO`,
    );
  }, 180_000);
});
