/**
 * Fault: APNs misbehaving, driven end to end — a device registers through the proxy, mail arrives over LMTP at the
 * real Dovecot, the NOTIFY watcher sees it, and the push goes through the dispatcher and the HTTP/2 client to the mock
 * APNs, which answers 500, drops its connections mid-request, sends GOAWAY mid-burst, or stalls. (The existing tests
 * in push-delivery.test.ts and apns/ call the dispatcher or the client directly.)
 *
 * "Delivered" below means: the mock answered 200 to a request that is in its record (requests refused by a GOAWAY
 * are not). Each mail must be delivered exactly once to each device, the registrations stay stored, the in-process
 * proxy neither crashes nor stops serving. The request timeout is 2 s: long enough that a mock on a busy machine is
 * never slower than it (a late 200 after a timeout would blur "exactly once"), short enough for the stall case.
 *
 * A break that turns this red (tried): treating 5xx as final in classifyAnswer (src/apns/dispatcher.ts: 'rejected'
 * instead of 'retry') — the mail after the 500 is never pushed. Likewise giving up on transport errors (the dropped
 * connection, the timed-out requests of the stall). Note that the GOAWAY case checks the end result only: a client
 * that failed refused streams instead of re-sending them would still be rescued by the dispatcher's retry.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDovecot, type DovecotInstance } from '../../../src/testbed/dovecot.js';
import type { MockAnswer, RecordedRequest } from '../../../src/testbed/mock-apns.js';
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
  registerOn,
  sleep,
  waitUntil,
} from '../../helpers/faults.js';

type Scripted = MockAnswer | 'drop-connections';

describe('APNs faults, end to end from an LMTP delivery', () => {
  let dovecot: DovecotInstance;
  let apns: ApnsFixture;
  let proxy: TestProxy;
  let crashes: ReturnType<typeof crashDetector>;
  /** Answers to give, per device token, before answering 200. */
  const script = new Map<string, Scripted[]>();
  /** What the handler answered to each recorded request (stalled requests never reach it). */
  const decided = new Map<RecordedRequest, number | 'dropped'>();
  const registered: Array<{ user: string; token: string }> = [];

  beforeAll(async () => {
    crashes = crashDetector();
    dovecot = await startDovecot({ users: { alice: 'alicepw', bob: 'bobpw', carol: 'carolpw', dave: 'davepw' } });
    apns = await apnsFixture([
      '--push-coalesce-window', '300ms',
      '--apns-request-timeout', '2s',
      '--apns-max-attempts', '20',
      '--apns-connections', '1',
    ]);
    const pw = await masterPasswordFile(apns.dir, dovecot.masterPassword);
    proxy = await startTestProxy({
      upstreamPort: dovecot.imapPort,
      flags: [...apns.flags, '--master-user', dovecot.masterUser, '--master-password-file', pw],
    });
    apns.mock.respond((req) => {
      const next = script.get(req.deviceToken)?.shift();
      if (next === 'drop-connections') {
        decided.set(req, 'dropped');
        setImmediate(() => apns.mock.destroyConnections());
        return { status: 200, stall: true };
      }
      const answer = next ?? { status: 200 };
      decided.set(req, answer.status);
      return answer;
    });
  });

  afterAll(async () => {
    await proxy?.stop();
    await apns?.mock.close();
    await dovecot?.destroy();
    crashes?.dispose();
  });

  /** Requests for `token` the mock answered 200 (and kept: not refused by a GOAWAY). */
  const delivered = (token: string) => pushesTo(apns.mock, token).filter((r) => decided.get(r) === 200).length;

  /** The user's phone registers its devices; then its mailboxes are watched. */
  async function registerUser(user: string, password: string, tokens: string[]): Promise<void> {
    const c = await loggedIn(proxy.plainPort, user, password);
    for (const token of tokens) {
      expect(await registerOn(c, token)).toBe('OK');
      registered.push({ user, token });
    }
    await c.command('o', 'LOGOUT');
    c.close();
    await waitUntil(`${user} watched`, () => proxy.app.watch!.isWatching(user));
  }

  /** One mail, then: every device delivered exactly once, nothing more after the dispatcher settled. */
  async function mailDeliveredOnce(user: string, tokens: string[], timeoutMs = 30_000): Promise<void> {
    await lmtpDeliver(dovecot.lmtpPort, user, message(`fault test for ${user}`));
    await waitUntil(`a delivered push for each of ${user}'s ${tokens.length} devices`, () => tokens.every((t) => delivered(t) >= 1), timeoutMs);
    await proxy.app.push!.dispatcher!.settled();
    await sleep(1000); // past the coalescing window: a duplicate would be here by now
    expect(tokens.map((t) => delivered(t))).toEqual(tokens.map(() => 1));
  }

  it('500, then healthy: retried and delivered exactly once', async () => {
    const token = deviceToken(0x500, 1);
    await registerUser('alice', 'alicepw', [token]);
    script.set(token, [{ status: 500, reason: 'InternalServerError' }]);
    await mailDeliveredOnce('alice', [token]);
    expect(pushesTo(apns.mock, token).map((r) => decided.get(r))).toEqual([500, 200]);
  });

  it('connections dropped mid-request: delivered exactly once after reconnecting', async () => {
    const token = deviceToken(0xc105, 1);
    await registerUser('bob', 'bobpw', [token]);
    const opened = apns.mock.stats().sessionsOpened;
    script.set(token, ['drop-connections']);
    await mailDeliveredOnce('bob', [token]);
    expect(pushesTo(apns.mock, token).map((r) => decided.get(r))).toEqual(['dropped', 200]);
    expect(apns.mock.stats().sessionsOpened).toBeGreaterThan(opened);
  });

  it('GOAWAY in the middle of a burst: every device delivered exactly once', async () => {
    const tokens = Array.from({ length: 12 }, (_, i) => deviceToken(0x60a, i + 1));
    await registerUser('dave', 'davepw', tokens);
    const before = apns.mock.stats();
    apns.mock.goawayAfter(4);
    await mailDeliveredOnce('dave', tokens);
    const after = apns.mock.stats();
    expect(after.goawaysSent).toBe(before.goawaysSent + 1);
    // the twelve went out at once on the one connection: those after the fourth answer were refused, and re-sent
    expect(after.refusedStreams).toBeGreaterThan(before.refusedStreams);
  });

  it('stalled (no answers): requests time out and are retried; delivered exactly once when it recovers', async () => {
    const token = deviceToken(0x57a1, 1);
    await registerUser('carol', 'carolpw', [token]);
    const retried = await metric(proxy.app.registry, 'xaps_pushes_total', { result: 'retried' });
    apns.mock.stallAll(true);
    try {
      await lmtpDeliver(dovecot.lmtpPort, 'carol', message('while APNs stalls'));
      // the first request times out and is sent again, into the stall
      await waitUntil('a timed-out request sent again', () => pushesTo(apns.mock, token).length >= 2, 60_000);
      expect(await metric(proxy.app.registry, 'xaps_pushes_total', { result: 'retried' })).toBeGreaterThan(retried);
      expect(delivered(token)).toBe(0);
    } finally {
      apns.mock.stallAll(false);
    }
    await waitUntil('delivered after the stall', () => delivered(token) >= 1, 60_000);
    await proxy.app.push!.dispatcher!.settled();
    await sleep(1000);
    expect(delivered(token)).toBe(1);
  });

  it('afterwards: every registration is still stored, the proxy serves, nothing crashed', async () => {
    for (const { user, token } of registered) expect(await proxy.app.store!.get(user, token)).not.toBeNull();
    const c = await loggedIn(proxy.plainPort, 'alice', 'alicepw');
    expect(await c.command('s', 'SELECT INBOX')).toMatch(/^s OK/m);
    await c.command('o', 'LOGOUT');
    c.close();
    // and a healthy APNs gets the next mail of every user once
    for (const user of ['alice', 'bob', 'carol']) {
      const token = registered.find((r) => r.user === user)!.token;
      const before = delivered(token);
      await lmtpDeliver(dovecot.lmtpPort, user, message(`after the faults, ${user}`));
      await waitUntil(`${user} pushed after the faults`, () => delivered(token) === before + 1);
    }
    expect(crashes.errors).toEqual([]);
  });
});
