/**
 * Issue 5 acceptance, end to end: an iPhone registers through the proxy, mail
 * arrives at the real IMAP server, and the mock APNs receives the push — with
 * NOTIFY (Dovecot), IDLE (Cyrus 3.6) and the events hook (Dovecot's Lua driver),
 * across a proxy restart, without any change to the IMAP server.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { startDovecot, type DovecotInstance } from '../../src/testbed/dovecot.js';
import { startCyrus, type CyrusInstance } from '../../src/testbed/cyrus.js';
import type { MockApns } from '../../src/testbed/mock-apns.js';
import { freePort } from '../../src/testbed/ports.js';
import { RawImap } from '../helpers/raw-imap.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';
import { apnsFixture, type ApnsFixture } from '../helpers/apns-fixture.js';
import { lmtpDeliver } from '../helpers/lmtp.js';

const ACCOUNT = '0715A26B-1C2D-4E3F-8A9B-0C1D2E3F4A5B';
const md5 = (s: string) => createHash('md5').update(s, 'utf8').digest('hex');
const message = (subject: string) => `From: a@example.org\r\nTo: b@example.org\r\nSubject: ${subject}\r\n\r\nhello\r\n`;

type Apns = ApnsFixture;

/** The mock APNs, the proxy flags for it, and a master password file. */
async function apnsMock(): Promise<Apns> {
  const apns = await apnsFixture(['--push-coalesce-window', '300ms']);
  await fs.writeFile(path.join(apns.dir, 'master.pw'), 'masterpw\n', { mode: 0o600 });
  return apns;
}

/** Every push so far went to `token` with the certificate's topic and the account id. */
function expectWellFormed(apns: Apns, token: string): void {
  for (const r of apns.mock.requests.filter((q) => q.deviceToken === token)) {
    expect(r.path).toBe(`/3/device/${token}`);
    expect(r.headers['apns-topic']).toBe(apns.topic);
    expect((r.body as { aps: { 'account-id': string } }).aps['account-id']).toBe(ACCOUNT);
  }
}

/** A delivery to a mailbox or user nobody registered pushes nothing. */
async function expectNoPush(apns: Apns, deliver: () => Promise<void>): Promise<void> {
  const before = apns.mock.requests.length;
  await deliver();
  await new Promise((r) => setTimeout(r, 2000)); // servers notify within ~0.5 s
  expect(apns.mock.requests.length).toBe(before);
}

async function register(port: number, user: string, pass: string, token: string, mailboxes: string): Promise<void> {
  const c = await RawImap.connect({ port });
  await c.greeting();
  const login = await c.command('l', `LOGIN ${user} ${pass}`);
  if (!/^l OK/m.test(login)) throw new Error(`login failed: ${login}`);
  const reply = await c.command(
    'x',
    `XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "${ACCOUNT}" "aps-device-token" "${token}" "aps-subtopic" "com.apple.mobilemail" "mailboxes" ${mailboxes}`,
  );
  if (!/^x OK/m.test(reply)) throw new Error(`registration failed: ${reply}`);
  c.close();
}

async function pushesFor(mock: MockApns, token: string, n: number, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const got = mock.requests.filter((r) => r.deviceToken === token);
    if (got.length >= n) return got;
    if (Date.now() > deadline) throw new Error(`expected ${n} pushes for ${token.slice(0, 8)}, got ${got.length}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const settle = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Until the user's watcher is connected, plus a moment for its first snapshot. */
async function watching(proxy: TestProxy, user: string): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (!proxy.app.watch?.isWatching(user)) {
    if (Date.now() > deadline) throw new Error(`${user} is not being watched`);
    await settle(50);
  }
  await settle(300);
}

describe('NOTIFY against Dovecot (--watch auto)', () => {
  let dovecot: DovecotInstance;
  let apns: Apns;
  let proxy: TestProxy;
  const token = 'a1'.repeat(32);
  beforeAll(async () => {
    dovecot = await startDovecot({ users: { alice: 'alicepw', bob: 'bobpw' } });
    await dovecot.doveadm(['mailbox', 'create', '-u', 'alice', 'Work/Projects']);
    await dovecot.doveadm(['mailbox', 'create', '-u', 'alice', 'Unregistered']);
    apns = await apnsMock();
    proxy = await startTestProxy({
      upstreamPort: dovecot.imapPort,
      flags: [...apns.flags, '--master-user', 'master', '--master-password-file', path.join(apns.dir, 'master.pw')],
    });
  });
  afterAll(async () => {
    await proxy?.stop();
    await apns?.mock.close();
    await dovecot?.stop();
  });

  it('pushes INBOX mail without "m" and other mailboxes with their MD5', async () => {
    await register(proxy.plainPort, 'alice', 'alicepw', token, '("INBOX" "Work/Projects")');
    expect(proxy.app.watch?.mode).toBe('auto');
    await watching(proxy, 'alice');
    await lmtpDeliver(dovecot.lmtpPort, 'alice', message('one'));
    const [first] = await pushesFor(apns.mock, token, 1);
    expect(first!.body).toEqual({ aps: { 'account-id': ACCOUNT } });
    expect(first!.headers['apns-topic']).toBe(first!.clientCertSubject?.UID);
    expect(first!.path).toBe(`/3/device/${token}`);
    await settle(600); // past the coalescing window
    await dovecot.deliver('alice', message('two'), 'Work/Projects');
    const pushes = await pushesFor(apns.mock, token, 2);
    expect(pushes[1]!.body).toEqual({ aps: { 'account-id': ACCOUNT, m: [md5('Work/Projects')] } });
  });

  it('pushes nothing for an unregistered mailbox or an unregistered user', async () => {
    await settle(600);
    await expectNoPush(apns, () => dovecot.deliver('alice', message('not registered'), 'Unregistered'));
    await expectNoPush(apns, () => lmtpDeliver(dovecot.lmtpPort, 'bob', message('bob has no device')));
    expectWellFormed(apns, token);
  });

  it('the upstream killed with kill -9: after its restart the watcher reconnects and the push arrives', async () => {
    const before = apns.mock.requests.filter((r) => r.deviceToken === token).length;
    await dovecot.kill();
    await settle(300);
    await dovecot.restart();
    await lmtpDeliver(dovecot.lmtpPort, 'alice', message('right after the crash'));
    await pushesFor(apns.mock, token, before + 1, 60_000);
    await settle(1500);
    expect(apns.mock.requests.filter((r) => r.deviceToken === token)).toHaveLength(before + 1);
  }, 90_000);

  it('a restart misses nothing: mail delivered while the proxy was down is pushed once after it comes back', async () => {
    const before = apns.mock.requests.filter((r) => r.deviceToken === token).length;
    const dataDir = proxy.dataDir;
    await proxy.stop();
    await dovecot.deliver('alice', message('while down'));
    proxy = await startTestProxy({
      upstreamPort: dovecot.imapPort,
      dataDir,
      flags: [...apns.flags, '--master-user', 'master', '--master-password-file', path.join(apns.dir, 'master.pw')],
    });
    await pushesFor(apns.mock, token, before + 1);
    await settle(1500);
    expect(apns.mock.requests.filter((r) => r.deviceToken === token)).toHaveLength(before + 1);
  });
});

describe('IDLE against Cyrus 3.6 (--watch auto, no NOTIFY there)', () => {
  let cyrus: CyrusInstance;
  let apns: Apns;
  let proxy: TestProxy;
  const token = 'b2'.repeat(32);
  beforeAll(async () => {
    cyrus = await startCyrus({ users: { alice: 'alicepw', bob: 'bobpw' } });
    await cyrus.createMailbox('alice', 'Work');
    await cyrus.createMailbox('alice', 'Other');
    apns = await apnsMock();
    await fs.writeFile(path.join(apns.dir, 'master.pw'), `${cyrus.masterPassword}\n`);
    proxy = await startTestProxy({
      upstreamPort: cyrus.imapPort,
      flags: [...apns.flags, '--master-user', cyrus.masterUser, '--master-password-file', path.join(apns.dir, 'master.pw'), '--poll-interval', '1s'],
    });
  });
  afterAll(async () => {
    await proxy?.stop();
    await apns?.mock.close();
    await cyrus?.stop();
  });

  it('pushes INBOX and another mailbox', async () => {
    await register(proxy.plainPort, 'alice', 'alicepw', token, '("INBOX" "Work")');
    await watching(proxy, 'alice');
    await lmtpDeliver(cyrus.lmtpPort, 'alice', message('cyrus one'));
    const [first] = await pushesFor(apns.mock, token, 1);
    expect(first!.body).toEqual({ aps: { 'account-id': ACCOUNT } });
    await settle(600);
    await cyrus.deliver('alice', message('cyrus two'), 'Work');
    const pushes = await pushesFor(apns.mock, token, 2);
    expect(pushes[1]!.body).toEqual({ aps: { 'account-id': ACCOUNT, m: [md5('Work')] } });
    await settle(600);
    await expectNoPush(apns, () => cyrus.deliver('alice', message('not registered'), 'Other'));
    await expectNoPush(apns, () => lmtpDeliver(cyrus.lmtpPort, 'bob', message('bob has no device')));
    expectWellFormed(apns, token);
  });
});

describe('events from Dovecot\'s push_notification Lua driver (--watch events)', () => {
  let dovecot: DovecotInstance;
  let apns: Apns;
  let proxy: TestProxy;
  const token = 'c3'.repeat(32);
  beforeAll(async () => {
    apns = await apnsMock();
    const eventsPort = await freePort();
    await fs.writeFile(path.join(apns.dir, 'events.secret'), 's3cret-events\n');
    dovecot = await startDovecot({
      users: { alice: 'alicepw', bob: 'bobpw' },
      pushLuaUrl: `http://127.0.0.1:${eventsPort}/events`,
      pushLuaToken: 's3cret-events',
    });
    proxy = await startTestProxy({
      upstreamPort: dovecot.imapPort,
      flags: [...apns.flags, '--watch', 'events', '--events-listen', `127.0.0.1:${eventsPort}`, '--events-secret-file', path.join(apns.dir, 'events.secret')],
    });
  });
  afterAll(async () => {
    await proxy?.stop();
    await apns?.mock.close();
    await dovecot?.stop();
  });

  it('a delivery becomes a push with no upstream connection per user', async () => {
    await register(proxy.plainPort, 'alice', 'alicepw', token, '("INBOX" "Sent")');
    await lmtpDeliver(dovecot.lmtpPort, 'alice', message('event one'));
    const [push] = await pushesFor(apns.mock, token, 1);
    expect(push!.body).toEqual({ aps: { 'account-id': ACCOUNT } });
    await settle(600);
    await dovecot.deliver('alice', message('event two'), 'Sent');
    const pushes = await pushesFor(apns.mock, token, 2);
    expect(pushes[1]!.body).toEqual({ aps: { 'account-id': ACCOUNT, m: [md5('Sent')] } });
    await settle(600);
    await expectNoPush(apns, () => dovecot.deliver('alice', message('not registered'), 'Trash'));
    await expectNoPush(apns, () => lmtpDeliver(dovecot.lmtpPort, 'bob', message('bob has no device')));
    expectWellFormed(apns, token);
  });
});
