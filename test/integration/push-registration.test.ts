/**
 * Issue 3 acceptance: XAPPLEPUSHSERVICE answered like Apple's servers through the
 * proxy in front of a real Dovecot, registrations kept in the embedded store and
 * in a real redis-server, and visible through `xaps-proxy devices list --json`.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { startDovecot, type DovecotInstance } from '../../src/testbed/dovecot.js';
import { startRedis, type RedisInstance } from '../../src/testbed/redis.js';
import { RawImap } from '../helpers/raw-imap.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';
import { runCli } from '../unit/cli/helpers.js';
import { spawnServe } from '../helpers/serve-process.js';
import type { Registration } from '../../src/store/types.js';

const TOPIC = 'com.apple.mobilemail.push.org.example';
const ACCOUNT = '0715A26B-1C2D-4E3F-8A9B-0C1D2E3F4A5B';
const token = (n: number) => n.toString(16).padStart(2, '0').repeat(32);

function iosCommand(tag: string, opts: { token: string; account?: string; mailboxes?: string }): string {
  return (
    `${tag} XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "${opts.account ?? ACCOUNT}" ` +
    `"aps-device-token" "${opts.token}" "aps-subtopic" "com.apple.mobilemail" ` +
    `"mailboxes" ${opts.mailboxes ?? '("INBOX" "Sent Messages" "Work/Projects")'}`
  );
}

async function login(port: number, user: string, pass: string): Promise<RawImap> {
  const c = await RawImap.connect({ port });
  await c.greeting();
  const ok = await c.command('l', `LOGIN ${user} ${pass}`);
  if (!/^l OK/m.test(ok)) throw new Error(`login failed: ${ok}`);
  return c;
}

async function devicesList(storeFlags: string[]): Promise<Registration[]> {
  const r = await runCli(['devices', 'list', '--json', ...storeFlags]);
  if (r.code !== 0) throw new Error(`devices list failed (${r.code}): ${r.stderr}`);
  return JSON.parse(r.stdout) as Registration[];
}

type StoreKind = 'embedded' | 'redis';

describe.each<StoreKind>(['embedded', 'redis'])('XAPPLEPUSHSERVICE with the %s store', (kind) => {
  let dovecot: DovecotInstance;
  let redis: RedisInstance | null = null;
  let proxy: TestProxy;
  let storeFlags: string[];

  beforeAll(async () => {
    dovecot = await startDovecot({ users: { alice: 'alicepw', bob: 'bobpw', carol: 'carolpw' } });
    const flags = ['--apns-topic', TOPIC];
    if (kind === 'redis') {
      redis = await startRedis({ persistence: 'aof' });
      flags.push('--redis-url', redis.url);
    }
    proxy = await startTestProxy({ upstreamPort: dovecot.imapPort, flags });
    storeFlags = kind === 'redis' ? ['--redis-url', redis!.url] : ['--data-dir', proxy.dataDir];
  });
  afterAll(async () => {
    await proxy?.stop();
    await redis?.stop();
    await dovecot?.stop();
  });

  /** What an operator sees: `xaps-proxy devices list --json`, while the proxy runs. */
  function listed(): Promise<Registration[]> {
    return devicesList(storeFlags);
  }

  it('answers the exact iOS 26 command and stores the registration', async () => {
    const c = await login(proxy.plainPort, 'alice', 'alicepw');
    const reply = await c.command('A7', iosCommand('A7', { token: token(1) }).slice(3));
    expect(reply).toBe(
      '* XAPPLEPUSHSERVICE "mailbox" "INBOX"\r\n' +
        '* XAPPLEPUSHSERVICE "mailbox" "Sent Messages"\r\n' +
        '* XAPPLEPUSHSERVICE "mailbox" "Work/Projects"\r\n' +
        `* XAPPLEPUSHSERVICE "aps-version" "2" "aps-topic" "${TOPIC}"\r\n` +
        'A7 OK XAPPLEPUSHSERVICE completed.\r\n',
    );
    c.close();
    const regs = (await listed()).filter((r) => r.deviceToken === token(1));
    expect(regs).toHaveLength(1);
    expect(regs[0]).toMatchObject({
      user: 'alice',
      deviceToken: token(1),
      accountId: ACCOUNT,
      subtopic: 'com.apple.mobilemail',
      version: 2,
      mailboxes: [
        { name: 'INBOX', md5: expect.stringMatching(/^[0-9a-f]{32}$/) },
        { name: 'Sent Messages', md5: expect.any(String) },
        { name: 'Work/Projects', md5: expect.any(String) },
      ],
    });
    const { createHash } = await import('node:crypto');
    expect(regs[0].mailboxes[1].md5).toBe(createHash('md5').update('Sent Messages').digest('hex'));
  });

  it('accepts version 1, atoms, literals and any key order; rejects malformed forms with BAD and stays usable', async () => {
    const c = await login(proxy.plainPort, 'bob', 'bobpw');
    const v1 = await c.command('v1', `XAPPLEPUSHSERVICE "aps-version" "1" "aps-account-id" "${ACCOUNT}" "aps-device-token" "${token(2)}" "aps-subtopic" "com.apple.mobilemail"`);
    expect(v1).toBe(`* XAPPLEPUSHSERVICE "aps-version" "1" "aps-topic" "${TOPIC}"\r\nv1 OK XAPPLEPUSHSERVICE completed.\r\n`);

    const atoms = await c.command('v2', `XAPPLEPUSHSERVICE mailboxes (INBOX Notes) aps-subtopic com.apple.mobilemail aps-device-token ${token(3)} aps-account-id ${ACCOUNT} aps-version 2`);
    expect(atoms).toMatch(/\* XAPPLEPUSHSERVICE "mailbox" "Notes"\r\n.*\r\nv2 OK/s);

    // synchronizing literal: the proxy itself sends the continuation
    c.send(`v3 XAPPLEPUSHSERVICE aps-version 2 aps-account-id ${ACCOUNT} aps-device-token {64}\r\n`);
    expect(await c.until((t) => t.startsWith('+'), 10_000, 'continuation')).toMatch(/^\+ /);
    c.send(`${token(4)} aps-subtopic {20+}\r\ncom.apple.mobilemail mailboxes ("INBOX" {6+}\r\nDrafts)\r\n`);
    expect(await c.tagged('v3')).toMatch(/"mailbox" "Drafts"\r\n.*v3 OK/s);

    const bad: Array<[string, RegExp]> = [
      [`XAPPLEPUSHSERVICE "aps-version" "2" "aps-device-token" "${token(5)}" "aps-subtopic" "com.apple.mobilemail"`, /missing aps-account-id/],
      [iosCommand('', { token: token(5) }).replace('"aps-version" "2"', '"aps-version" "9"').trim(), /unknown aps-version/],
      [iosCommand('', { token: 'abc' }).trim(), /not 64 hex/],
      [iosCommand('', { token: token(5), account: 'nope' }).trim(), /not a UUID/],
      [iosCommand('', { token: token(5), mailboxes: 'NIL' }).trim(), /NIL/],
      [`${iosCommand('', { token: token(5) }).trim()} "aps-version" "2"`, /duplicate key/],
      [iosCommand('', { token: token(5), mailboxes: `(${Array.from({ length: 101 }, (_, i) => `"m${i}"`).join(' ')})` }).trim(), /more than 100/],
    ];
    for (const [i, [cmd, why]] of bad.entries()) {
      const r = await c.command(`b${i}`, cmd);
      expect(r).toMatch(new RegExp(`^b${i} BAD XAPPLEPUSHSERVICE: `, 'm'));
      expect(r).toMatch(why);
    }
    expect(await c.command('n', 'NOOP')).toMatch(/^n OK NOOP completed/m);
    c.close();
    const mine = (await listed()).filter((r) => r.user === 'bob');
    expect(mine.map((r) => r.deviceToken).sort()).toEqual([token(2), token(3), token(4)]);
    expect(mine.find((r) => r.deviceToken === token(2))?.mailboxes.map((m) => m.name)).toEqual(['INBOX']);
  });

  it('answers BAD before login, and never forwards the command upstream', async () => {
    const c = await RawImap.connect({ port: proxy.plainPort });
    await c.greeting();
    expect(await c.command('p', iosCommand('', { token: token(6) }).trim())).toMatch(/^p BAD XAPPLEPUSHSERVICE: log in first/m);
    expect(await c.command('q', 'LOGIN carol carolpw')).toMatch(/^q OK/m);
    c.close();
    expect(await dovecot.readLog()).not.toMatch(/XAPPLEPUSHSERVICE/i);
  });

  it('keeps every response intact and in order when pipelined between a large FETCH and a NOOP', async () => {
    const big = Buffer.from(`Subject: big\r\n\r\n${'0123456789abcdef'.repeat(64 * 1024)}\r\n`);
    await dovecot.deliver('carol', big);
    const c = await login(proxy.plainPort, 'carol', 'carolpw');
    await c.command('s', 'SELECT INBOX');
    c.send(`f1 UID FETCH 1 (BODY.PEEK[])\r\n${iosCommand('x1', { token: token(7) })}\r\nn1 NOOP\r\n`);
    const text = await c.tagged('n1');
    const fetchStart = text.indexOf('* 1 FETCH');
    const literal = /BODY\[\] \{(\d+)\}\r\n/.exec(text)!;
    const bodyStart = text.indexOf(literal[0]) + literal[0].length;
    expect(Number(literal[1])).toBe(big.length);
    expect(Buffer.from(text.slice(bodyStart, bodyStart + big.length), 'latin1').equals(big)).toBe(true);
    const order = ['f1 OK', '* XAPPLEPUSHSERVICE "mailbox" "INBOX"', 'x1 OK', 'n1 OK'].map((s) => text.indexOf(s));
    expect(fetchStart).toBeGreaterThanOrEqual(0);
    expect(order.every((i) => i > bodyStart)).toBe(true);
    expect([...order].sort((a, b) => a - b)).toEqual(order);
    c.close();
  });

  it('replaces a registration on a new account id, and keeps one per user for a shared token', async () => {
    const newAccount = '11111111-2222-4333-8444-555555555555';
    const a = await login(proxy.plainPort, 'alice', 'alicepw');
    expect(await a.command('r1', iosCommand('', { token: token(8) }).trim())).toMatch(/^r1 OK/m);
    expect(await a.command('r2', iosCommand('', { token: token(8), account: newAccount, mailboxes: '("INBOX")' }).trim())).toMatch(/^r2 OK/m);
    a.close();
    const b = await login(proxy.plainPort, 'bob', 'bobpw');
    expect(await b.command('r3', iosCommand('', { token: token(8) }).trim())).toMatch(/^r3 OK/m);
    b.close();
    const rows = (await listed()).filter((r) => r.deviceToken === token(8));
    expect(rows.map((r) => [r.user, r.accountId, r.mailboxes.length]).sort()).toEqual([
      ['alice', newAccount, 1],
      ['bob', ACCOUNT, 3],
    ]);
  });
});

describe('durability', () => {
  let dovecot: DovecotInstance;
  beforeAll(async () => {
    dovecot = await startDovecot({ users: { alice: 'alicepw' } });
  });
  afterAll(async () => {
    await dovecot?.stop();
  });

  /** `xaps-proxy serve` as its own process, as operators run it. */
  const serve = (args: string[]) =>
    spawnServe(['--upstream', `127.0.0.1:${dovecot.imapPort}`, '--apns-topic', TOPIC, '--log-level', 'warn', ...args]);

  it('embedded store: kill -9 right after the OK, restart, the registration is there', async () => {
    const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'xaps-kill9-'));
    const first = await serve(['--data-dir', dataDir]);
    const c = await login(first.port, 'alice', 'alicepw');
    const reply = await c.command('k', iosCommand('', { token: token(9) }).trim());
    expect(reply).toMatch(/^k OK/m);
    await first.kill9();
    c.close();
    // the lock of the killed process is stale; a restarted proxy takes over the directory
    const second = await serve(['--data-dir', dataDir]);
    await second.stop();
    const regs = await devicesList(['--data-dir', dataDir]);
    expect(regs.map((r) => [r.user, r.deviceToken])).toEqual([['alice', token(9)]]);
    await fs.rm(dataDir, { recursive: true, force: true });
  }, 60_000);

  describe('redis', () => {
    let redis: RedisInstance;
    let proxy: TestProxy;
    beforeAll(async () => {
      redis = await startRedis({ persistence: 'aof' });
      proxy = await startTestProxy({ upstreamPort: dovecot.imapPort, flags: ['--apns-topic', TOPIC, '--redis-url', redis.url] });
    });
    afterAll(async () => {
      await proxy?.stop();
      await redis?.stop();
    });

    it('a registration survives a redis-server restart with persistence on', async () => {
      const c = await login(proxy.plainPort, 'alice', 'alicepw');
      expect(await c.command('r', iosCommand('', { token: token(10) }).trim())).toMatch(/^r OK/m);
      c.close();
      await redis.restart();
      const regs = await devicesList(['--redis-url', redis.url]);
      expect(regs.map((r) => r.deviceToken)).toContain(token(10));
    });

    it('Redis down: tagged NO, IMAP unaffected; Redis back: registrations work again', async () => {
      const c = await login(proxy.plainPort, 'alice', 'alicepw');
      await redis.stop();
      const no = await c.command('d1', iosCommand('', { token: token(11) }).trim(), 30_000);
      expect(no).toMatch(/^d1 NO /m);
      expect(no).not.toMatch(/\* XAPPLEPUSHSERVICE/);
      expect(await c.command('d2', 'SELECT INBOX')).toMatch(/^d2 OK/m);
      expect(await c.command('d3', 'NOOP')).toMatch(/^d3 OK/m);
      await redis.restart();
      // the store reconnects by itself; the first attempts may still find it down
      let ok = '';
      for (let i = 0; i < 50 && !/ OK XAPPLEPUSHSERVICE/.test(ok); i++) {
        ok = await c.command(`d4x${i}`, iosCommand('', { token: token(11) }).trim(), 30_000);
        if (!/ OK /.test(ok)) await new Promise((r) => setTimeout(r, 200));
      }
      expect(ok).toMatch(/ OK XAPPLEPUSHSERVICE completed/);
      c.close();
      expect((await devicesList(['--redis-url', redis.url])).map((r) => r.deviceToken)).toContain(token(11));
    }, 60_000);
  });
});
