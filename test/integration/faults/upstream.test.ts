/**
 * Fault: the upstream Dovecot dies (`kill -9` of its whole process tree) and comes back on the same ports, under an
 * in-process proxy with a NOTIFY watcher and the mock APNs.
 *
 * Guards:
 * - a client session whose server died gets a `* BYE` and a closed connection (no hang, no silent close);
 * - while the server is down, new clients get `* BYE [UNAVAILABLE]`; after the restart new sessions work;
 * - the watcher reconnects; mail delivered after the restart, while the watcher is still in its reconnect
 *   back-off, is pushed from the catch-up against the stored UIDNEXT, and mail delivered once it is back is pushed
 *   live: each exactly once;
 * - the proxy never crashes (no unhandled rejection or exception in this process) and keeps serving.
 *
 * Breaks that turn this red (tried): dropping the BYE src/proxy/session.ts writes when the upstream connection ends
 * without one (the client then sees a bare close: both tests); catch-up without a baseline in
 * MailboxTracker.beginCatchUp (src/watch/tracker.ts: the first observation after the reconnect only stored), which
 * loses the mail delivered while the watcher was reconnecting (second test).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash } from 'node:crypto';
import { startDovecot, type DovecotInstance } from '../../../src/testbed/dovecot.js';
import { isPidAlive } from '../../../src/testbed/processes.js';
import { RawImap } from '../../helpers/raw-imap.js';
import { startTestProxy, type TestProxy } from '../../helpers/proxy.js';
import { apnsFixture, type ApnsFixture } from '../../helpers/apns-fixture.js';
import { lmtpDeliver } from '../../helpers/lmtp.js';
import {
  crashDetector,
  deviceToken,
  loggedIn,
  mailboxHints,
  masterPasswordFile,
  message,
  metric,
  pushesTo,
  registerOn,
  sleep,
  waitForPushes,
  waitUntil,
} from '../../helpers/faults.js';

const md5 = (s: string): string => createHash('md5').update(s, 'utf8').digest('hex');

describe('upstream killed (kill -9 of the Dovecot tree) and restarted on the same ports', () => {
  let dovecot: DovecotInstance;
  let apns: ApnsFixture;
  let proxy: TestProxy;
  let crashes: ReturnType<typeof crashDetector>;
  const token = deviceToken(1, 1);

  beforeAll(async () => {
    crashes = crashDetector();
    dovecot = await startDovecot({ users: { alice: 'alicepw', bob: 'bobpw' } });
    await dovecot.doveadm(['mailbox', 'create', '-u', 'alice', 'Work']);
    apns = await apnsFixture(['--push-coalesce-window', '300ms']);
    const pw = await masterPasswordFile(apns.dir, dovecot.masterPassword);
    proxy = await startTestProxy({
      upstreamPort: dovecot.imapPort,
      flags: [...apns.flags, '--master-user', dovecot.masterUser, '--master-password-file', pw],
    });
  });

  afterAll(async () => {
    await proxy?.stop();
    await apns?.mock.close();
    await dovecot?.destroy();
    crashes?.dispose();
  });

  /** A new session through the proxy logs in, selects and logs out. */
  async function sessionWorks(): Promise<void> {
    const c = await loggedIn(proxy.plainPort, 'bob', 'bobpw');
    try {
      expect(await c.command('s', 'SELECT INBOX')).toMatch(/^s OK/m);
      expect(await c.command('o', 'LOGOUT')).toMatch(/^\* BYE/m);
    } finally {
      c.close();
    }
  }

  /** After the server died: `* BYE` at a response boundary, then the connection closes (no hang). */
  async function byeThenClose(c: RawImap): Promise<void> {
    const text = await c.until((t) => /(^|\r\n)\* BYE [^\r\n]*\r\n/.test(t), 20_000, '* BYE');
    expect(text).toMatch(/(^|\r\n)\* BYE [^\r\n]*\r\n$/); // nothing after the BYE, and at a line start
    await c.waitClosed(20_000);
  }

  it('mid-session: the client gets * BYE and a closed connection; new sessions work after the restart', async () => {
    await sessionWorks();
    const c = await loggedIn(proxy.plainPort, 'bob', 'bobpw');
    expect(await c.command('s', 'SELECT INBOX')).toMatch(/^s OK/m);
    const oldPid = dovecot.pid;
    await dovecot.kill();
    expect(isPidAlive(oldPid)).toBe(false);
    await byeThenClose(c);

    // while it is down: refused politely, and the proxy still accepts
    const down = await RawImap.connect({ port: proxy.plainPort });
    expect(await down.greeting()).toMatch(/^\* BYE \[UNAVAILABLE\]/);
    await down.waitClosed();

    await dovecot.restart();
    await sessionWorks();
    expect(crashes.errors).toEqual([]);
  });

  it('mid-IDLE: BYE and close for the client; the watcher reconnects, catches up, and pushes each mail exactly once', async () => {
    if (!isPidAlive(dovecot.pid)) await dovecot.restart(); // the previous test failed half-way
    const registry = proxy.app.registry;
    // the iPhone: registers INBOX and Work, then IDLEs on INBOX through the proxy
    const phone = await loggedIn(proxy.plainPort, 'alice', 'alicepw');
    expect(await registerOn(phone, token, '("INBOX" "Work")')).toBe('OK');
    expect(await phone.command('s', 'SELECT INBOX')).toMatch(/^s OK/m);
    phone.send('i IDLE\r\n');
    await phone.until((t) => /(^|\r\n)\+ /.test(t), 20_000, 'IDLE continuation');
    await waitUntil('alice watched', () => proxy.app.watch!.isWatching('alice'));

    // before the fault: a live push, and the IDLE session sees the mail
    await lmtpDeliver(dovecot.lmtpPort, 'alice', message('before the crash'));
    await waitForPushes(apns.mock, token, 1);
    await phone.until((t) => /\* 1 EXISTS\r\n/.test(t), 20_000, 'EXISTS in IDLE');
    await sleep(600); // past the 300 ms coalescing window: the next push is a first push again

    const reconnects = await metric(registry, 'xaps_watcher_reconnects_total');
    await dovecot.kill();
    await byeThenClose(phone);

    // Let the watcher fail three reconnect attempts while Dovecot is down: its back-off (1, 2, 4 s, then 8 s,
    // each ±25 %) then keeps it away for at least 6 s, so the next delivery lands while it is reconnecting.
    await waitUntil('three failed watcher reconnects', async () => (await metric(registry, 'xaps_watcher_reconnects_total')) >= reconnects + 3, 60_000);
    await sleep(200); // the third attempt's connect is refused at once; let it finish failing
    expect(proxy.app.watch!.isWatching('alice')).toBe(false);

    await dovecot.restart();
    await lmtpDeliver(dovecot.lmtpPort, 'alice', message('while the watcher reconnects'));
    await dovecot.deliver('alice', message('to Work while the watcher reconnects'), 'Work');
    const deliveredWhileReconnecting = !proxy.app.watch!.isWatching('alice');
    expect(deliveredWhileReconnecting).toBe(true);
    const catchUps = await metric(registry, 'xaps_watch_changes_total', { source: 'catch-up' });

    // the watcher comes back and catches up: INBOX and Work changed, one push each (the second one is the
    // follow-up at the end of the coalescing window)
    await waitUntil('alice watched again', () => proxy.app.watch!.isWatching('alice'), 60_000);
    await waitForPushes(apns.mock, token, 3);
    expect(await metric(registry, 'xaps_watch_changes_total', { source: 'catch-up' })).toBe(catchUps + 2);
    await sleep(600);

    // live again: one more delivery, one more push
    await lmtpDeliver(dovecot.lmtpPort, 'alice', message('after the watcher is back'));
    await waitForPushes(apns.mock, token, 4);
    await proxy.app.push!.dispatcher!.settled();
    await sleep(1500); // a duplicate would arrive within the coalescing window

    const pushes = pushesTo(apns.mock, token);
    expect(pushes).toHaveLength(4);
    // the catch-up pushed INBOX once and Work once
    const afterCrash = pushes.slice(1, 3).map((r) => mailboxHints(r));
    expect(afterCrash.filter((m) => m.length === 0)).toHaveLength(1);
    expect(afterCrash.filter((m) => m.length === 1 && m[0] === md5('Work'))).toHaveLength(1);
    expect(mailboxHints(pushes[3]!)).toEqual([]);

    expect(await proxy.app.store!.get('alice', token)).not.toBeNull();
    await sessionWorks();
    expect(crashes.errors).toEqual([]);
  }, 120_000);
});
