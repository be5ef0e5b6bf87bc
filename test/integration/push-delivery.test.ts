/**
 * Issue 4 acceptance: pushes go through the real pipeline (dispatcher, HTTP/2
 * client) to a mock APNs over TLS+HTTP/2 that verifies the client certificate
 * and answers like Apple; registrations come through the proxy from a real Dovecot.
 */
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import fs from 'node:fs/promises';
import { startDovecot, type DovecotInstance } from '../../src/testbed/dovecot.js';
import type { MockAnswer } from '../../src/testbed/mock-apns.js';
import { issueMailPushCert } from '../../src/testbed/apns-certs.js';
import { apnsFixture, type ApnsFixture } from '../helpers/apns-fixture.js';
import { RawImap } from '../helpers/raw-imap.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';
import { runCli } from '../unit/cli/helpers.js';
import type { RegistrationStore } from '../../src/store/types.js';
import { mailboxRef } from '../../src/store/common.js';
import type { PushDispatcher } from '../../src/apns/dispatcher.js';

const ACCOUNT = '0715A26B-1C2D-4E3F-8A9B-0C1D2E3F4A5B';
const token = (n: number) => n.toString(16).padStart(8, '0').repeat(8);

function registerCommand(tag: string, tok: string, mailboxes = '("INBOX" "Sent Messages")'): string {
  return `${tag} XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "${ACCOUNT}" "aps-device-token" "${tok}" "aps-subtopic" "com.apple.mobilemail" "mailboxes" ${mailboxes}`;
}

async function metric(proxy: TestProxy, name: string, labels: Record<string, string> = {}): Promise<number> {
  const m = await proxy.app.registry.getSingleMetric(name)?.get();
  if (!m) return 0;
  return m.values
    .filter((v) => Object.entries(labels).every(([k, want]) => String(v.labels[k]) === want))
    .reduce((sum, v) => sum + v.value, 0);
}

async function waitFor(pred: () => boolean | Promise<boolean>, timeoutMs = 20_000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

describe('registration through the proxy, then test-push', () => {
  let dovecot: DovecotInstance;
  let apns: ApnsFixture;
  let proxy: TestProxy;
  beforeAll(async () => {
    dovecot = await startDovecot({ users: { alice: 'alicepw' } });
    apns = await apnsFixture();
    proxy = await startTestProxy({ upstreamPort: dovecot.imapPort, flags: apns.flags });
  });
  afterAll(async () => {
    await proxy?.stop();
    await apns?.mock.close();
    await dovecot?.stop();
  });

  it('replies with the certificate topic, and test-push produces exactly one request as Apple expects it', async () => {
    expect(apns.cert.topic).toMatch(/^com\.apple\.mail\.XServer\.[0-9A-F-]{36}$/);
    const c = await RawImap.connect({ port: proxy.plainPort });
    await c.greeting();
    await c.command('l', 'LOGIN alice alicepw');
    const reply = await c.command('r', registerCommand('', token(1)).trim());
    expect(reply).toContain(`* XAPPLEPUSHSERVICE "aps-version" "2" "aps-topic" "${apns.cert.topic}"\r\n`);
    c.close();

    const before = Math.floor(Date.now() / 1000);
    const out = await runCli(['test-push', '--user', 'alice', '--data-dir', proxy.dataDir, ...apns.flags]);
    expect(out.stderr).not.toMatch(/error/i);
    expect(out.code).toBe(0);
    expect(out.stdout).toMatch(/200 delivered/);

    expect(apns.mock.requests).toHaveLength(1);
    const req = apns.mock.requests[0]!;
    expect(req.method).toBe('POST');
    expect(req.path).toBe(`/3/device/${token(1)}`);
    expect(req.clientCertSubject?.UID).toBe(apns.cert.topic);
    expect(req.headers['apns-topic']).toBe(apns.cert.topic);
    expect(req.headers['apns-push-type']).toBe('background');
    expect(req.headers['apns-priority']).toBe('5');
    expect(req.headers['apns-collapse-id']).toBe(ACCOUNT);
    expect(req.headers['content-type']).toBe('application/json');
    const expiration = Number(req.headers['apns-expiration']);
    expect(expiration).toBeGreaterThanOrEqual(before + 86_400 - 5);
    expect(expiration).toBeLessThanOrEqual(Math.floor(Date.now() / 1000) + 86_400 + 5);
    expect(req.body).toEqual({ aps: { 'account-id': ACCOUNT } });
  });
});

describe('APNs answers through the whole pipeline', () => {
  let apns: ApnsFixture;
  let proxy: TestProxy;
  let store: RegistrationStore;
  let dispatcher: PushDispatcher;
  const answers = new Map<string, MockAnswer[]>();

  beforeAll(async () => {
    const dovecot = await startDovecot({ users: { u: 'p' } });
    apns = await apnsFixture(['--apns-max-attempts', '3', '--apns-request-timeout', '1s', '--push-coalesce-window', '200ms']);
    proxy = await startTestProxy({ upstreamPort: dovecot.imapPort, flags: apns.flags });
    // the upstream is not needed beyond startup
    await dovecot.stop();
    store = proxy.app.store!;
    dispatcher = proxy.app.push!.dispatcher!;
    apns.mock.respond((req) => {
      const queue = answers.get(req.deviceToken);
      return queue && queue.length > 0 ? queue.shift()! : { status: 200 };
    });
  });
  afterAll(async () => {
    await proxy?.stop();
    await apns?.mock.close();
  });
  beforeEach(() => answers.clear());

  let next = 100;
  async function device(user = `user${next}`) {
    const tok = token(next++);
    await store.upsert({
      user,
      deviceToken: tok,
      accountId: ACCOUNT,
      subtopic: 'com.apple.mobilemail',
      mailboxes: [mailboxRef('INBOX')],
      version: 2,
    });
    return { user, tok };
  }
  const requestsFor = (tok: string) => apns.mock.requests.filter((r) => r.deviceToken === tok).length;

  it('200: delivered and counted', async () => {
    const d = await device();
    const before = await metric(proxy, 'xaps_pushes_total', { result: 'delivered' });
    await dispatcher.notify({ user: d.user, mailbox: 'INBOX' });
    await waitFor(async () => (await metric(proxy, 'xaps_pushes_total', { result: 'delivered' })) > before);
    expect(requestsFor(d.tok)).toBe(1);
    expect(await store.get(d.user, d.tok)).not.toBeNull();
  });

  it('410 Unregistered: removed, unless the device registered again after the timestamp', async () => {
    const gone = await device();
    const back = await device();
    answers.set(gone.tok, [{ status: 410, reason: 'Unregistered', timestamp: Date.now() }]);
    answers.set(back.tok, [{ status: 410, reason: 'Unregistered', timestamp: Date.now() - 3_600_000 }]);
    await dispatcher.notify({ user: gone.user, mailbox: 'INBOX' });
    await dispatcher.notify({ user: back.user, mailbox: 'INBOX' });
    await waitFor(async () => (await store.get(gone.user, gone.tok)) === null, 20_000, 'removal');
    await dispatcher.settled();
    expect(await store.get(back.user, back.tok)).not.toBeNull();
    expect(requestsFor(gone.tok)).toBe(1);
    expect(await metric(proxy, 'xaps_registrations_removed_total')).toBeGreaterThanOrEqual(1);
  });

  it('400 BadDeviceToken: removed, not retried', async () => {
    const d = await device();
    answers.set(d.tok, [{ status: 400, reason: 'BadDeviceToken' }]);
    await dispatcher.notify({ user: d.user, mailbox: 'INBOX' });
    await waitFor(async () => (await store.get(d.user, d.tok)) === null, 20_000, 'removal');
    await dispatcher.settled();
    expect(requestsFor(d.tok)).toBe(1);
  });

  it.each(['DeviceTokenNotForTopic', 'TopicDisallowed'])('400 %s: kept, not retried, counted as a wrong-certificate answer', async (reason) => {
    const d = await device();
    const wrong = await metric(proxy, 'xaps_pushes_total', { result: 'wrong_topic' });
    answers.set(d.tok, [{ status: 400, reason }]);
    await dispatcher.notify({ user: d.user, mailbox: 'INBOX' });
    await waitFor(async () => (await metric(proxy, 'xaps_apns_responses_total', { status: '400', reason })) > 0);
    await dispatcher.settled();
    expect(await store.get(d.user, d.tok)).not.toBeNull();
    expect(requestsFor(d.tok)).toBe(1);
    expect(await metric(proxy, 'xaps_pushes_total', { result: 'wrong_topic' })).toBe(wrong + 1);
  });

  it('400 TopicDisallowed raises the wrong-certificate alarm; DeviceTokenNotForTopic only when nothing was delivered lately', async () => {
    const d = await device();
    answers.set(d.tok, [{ status: 400, reason: 'TopicDisallowed' }]);
    await dispatcher.notify({ user: d.user, mailbox: 'INBOX' });
    await waitFor(async () => (await metric(proxy, 'xaps_apns_alarm', { kind: 'wrong_topic' })) === 1, 20_000, 'alarm');
    // a later delivery clears it; one device's stale token then does not raise it again
    await dispatcher.notify({ user: (await device()).user, mailbox: 'INBOX' });
    await waitFor(async () => (await metric(proxy, 'xaps_apns_alarm', { kind: 'wrong_topic' })) === 0, 20_000, 'alarm cleared');
    const stale = await device();
    answers.set(stale.tok, [{ status: 400, reason: 'DeviceTokenNotForTopic' }]);
    await dispatcher.notify({ user: stale.user, mailbox: 'INBOX' });
    await waitFor(() => requestsFor(stale.tok) === 1);
    await dispatcher.settled();
    expect(await metric(proxy, 'xaps_apns_alarm', { kind: 'wrong_topic' })).toBe(0);
  });

  it.each([500, 503])('%i: retried with back-off, then delivered once', async (status) => {
    const d = await device();
    answers.set(d.tok, [{ status, reason: status === 503 ? 'ServiceUnavailable' : 'InternalServerError' }]);
    await dispatcher.notify({ user: d.user, mailbox: 'INBOX' });
    await waitFor(() => requestsFor(d.tok) === 2, 20_000, 'retry');
    await dispatcher.settled();
    expect(requestsFor(d.tok)).toBe(2);
    const times = apns.mock.requests.filter((r) => r.deviceToken === d.tok).map((r) => r.at);
    expect(times[1]! - times[0]!).toBeGreaterThan(0);
    expect(await store.get(d.user, d.tok)).not.toBeNull();
  });

  it('500 on every attempt: gives up after --apns-max-attempts and counts it', async () => {
    const d = await device();
    answers.set(d.tok, [{ status: 500 }, { status: 500 }, { status: 500 }, { status: 500 }]);
    const failed = await metric(proxy, 'xaps_pushes_total', { result: 'failed' });
    await dispatcher.notify({ user: d.user, mailbox: 'INBOX' });
    await waitFor(async () => (await metric(proxy, 'xaps_pushes_total', { result: 'failed' })) > failed, 30_000, 'give up');
    expect(requestsFor(d.tok)).toBe(3);
  });

  it('429: backs off for that device only, honouring Retry-After', async () => {
    const slow = await device();
    const other = await device();
    answers.set(slow.tok, [{ status: 429, reason: 'TooManyRequests', retryAfter: 1 }]);
    await dispatcher.notify({ user: slow.user, mailbox: 'INBOX' });
    await waitFor(() => requestsFor(slow.tok) === 1);
    await dispatcher.notify({ user: other.user, mailbox: 'INBOX' });
    await waitFor(() => requestsFor(other.tok) === 1); // not blocked by the throttled device
    await waitFor(() => requestsFor(slow.tok) === 2, 20_000, 'retry after Retry-After');
    const times = apns.mock.requests.filter((r) => r.deviceToken === slow.tok).map((r) => r.at);
    expect(times[1]! - times[0]!).toBeGreaterThanOrEqual(900);
  });

  it('other 4xx (404, 405, 413): logged, not retried, kept', async () => {
    for (const status of [404, 405, 413]) {
      const d = await device();
      answers.set(d.tok, [{ status, reason: status === 413 ? 'PayloadTooLarge' : status === 404 ? 'BadPath' : 'MethodNotAllowed' }]);
      await dispatcher.notify({ user: d.user, mailbox: 'INBOX' });
      await waitFor(() => requestsFor(d.tok) === 1);
      await dispatcher.settled();
      expect(requestsFor(d.tok)).toBe(1);
      expect(await store.get(d.user, d.tok)).not.toBeNull();
    }
  });

  it('transport errors (connections dropped): retried and delivered', async () => {
    const d = await device();
    answers.set(d.tok, [{ status: 200, resetMidResponse: true }]);
    await dispatcher.notify({ user: d.user, mailbox: 'INBOX' });
    await waitFor(() => requestsFor(d.tok) === 2, 20_000, 'retry after reset');
    await dispatcher.settled();
    expect(await metric(proxy, 'xaps_apns_responses_total', { status: 'transport' })).toBeGreaterThan(0);
  });

  it('403 BadCertificate: stops sending and alarms until the certificate is reloaded', async () => {
    const first = await device();
    const second = await device();
    answers.set(first.tok, [{ status: 403, reason: 'BadCertificate' }]);
    await dispatcher.notify({ user: first.user, mailbox: 'INBOX' });
    await waitFor(async () => (await metric(proxy, 'xaps_apns_alarm', { kind: 'bad_certificate' })) === 1);
    await dispatcher.notify({ user: second.user, mailbox: 'INBOX' });
    await new Promise((r) => setTimeout(r, 500));
    expect(requestsFor(second.tok)).toBe(0); // paused
    // the operator installs a new certificate (SIGHUP reload)
    const renewed = issueMailPushCert(apns.ca, { uidTopic: apns.cert.topic });
    await fs.writeFile(apns.keyPath, renewed.keyPem);
    await fs.writeFile(apns.certPath, renewed.certPem);
    await proxy.app.reload();
    await waitFor(() => requestsFor(second.tok) === 1, 20_000, 'resumed after reload');
    await waitFor(async () => (await metric(proxy, 'xaps_apns_alarm', { kind: 'bad_certificate' })) === 0);
  });
});

interface Pipeline {
  apns: ApnsFixture;
  proxy: TestProxy;
  store: RegistrationStore;
  dispatcher: PushDispatcher;
}

/** A proxy with push delivery to its own mock APNs, for one describe block. */
function usePipeline(requestTimeout: string): { get: () => Pipeline } {
  let p: Pipeline | null = null;
  beforeAll(async () => {
    const dovecot = await startDovecot({ users: { u: 'p' } });
    const apns = await apnsFixture(['--push-coalesce-window', '1s', '--apns-request-timeout', requestTimeout, '--apns-max-attempts', '10', '--push-queue-size', '1500']);
    const proxy = await startTestProxy({ upstreamPort: dovecot.imapPort, flags: apns.flags });
    await dovecot.stop();
    p = { apns, proxy, store: proxy.app.store!, dispatcher: proxy.app.push!.dispatcher! };
  });
  afterAll(async () => {
    await p?.proxy.stop();
    await p?.apns.mock.close();
  });
  return { get: () => p! };
}

async function addDevices(store: RegistrationStore, prefix: string, n: number, start: number) {
  const out: Array<{ user: string; tok: string }> = [];
  for (let i = 0; i < n; i++) {
    const d = { user: `${prefix}${i}`, tok: token(start + i) };
    await store.upsert({ user: d.user, deviceToken: d.tok, accountId: ACCOUNT, subtopic: 'com.apple.mobilemail', mailboxes: [mailboxRef('INBOX')], version: 2 });
    out.push(d);
  }
  return out;
}

// A generous request timeout here: a request that times out may have been delivered
// and is then legitimately sent again, which would blur "exactly once".
describe('coalescing and GOAWAY', () => {
  const pipeline = usePipeline('15s');

  it('ten changes for one device within the window give two pushes', async () => {
    const { apns, store, dispatcher } = pipeline.get();
    const [d] = await addDevices(store, 'coalesce', 1, 10_000);
    for (let i = 0; i < 10; i++) await dispatcher.notify({ user: d!.user, mailbox: 'INBOX' });
    await waitFor(() => apns.mock.requests.filter((r) => r.deviceToken === d!.tok).length === 2, 10_000, 'second push');
    await dispatcher.settled();
    await new Promise((r) => setTimeout(r, 300));
    expect(apns.mock.requests.filter((r) => r.deviceToken === d!.tok)).toHaveLength(2);
  });

  it('changes for 1,000 devices give 1,000 pushes, each exactly once despite a GOAWAY mid-burst', async () => {
    const { apns, store, dispatcher } = pipeline.get();
    const all = await addDevices(store, 'burst', 1000, 20_000);
    const tokens = new Set(all.map((d) => d.tok));
    const seen = () => apns.mock.requests.filter((r) => tokens.has(r.deviceToken));
    const goaways = apns.mock.stats().goawaysSent;
    apns.mock.goawayAfter(300);
    await Promise.all(all.map((d) => dispatcher.notify({ user: d.user, mailbox: 'INBOX' })));
    await waitFor(() => seen().length >= 1000, 60_000, '1000 pushes');
    await dispatcher.settled();
    const counts = new Map<string, number>();
    for (const r of seen()) counts.set(r.deviceToken, (counts.get(r.deviceToken) ?? 0) + 1);
    expect(counts.size).toBe(1000);
    expect([...counts.values()].filter((n) => n !== 1)).toEqual([]);
    expect(apns.mock.stats().goawaysSent).toBe(goaways + 1);
  }, 90_000);
});

describe('a stalled APNs', () => {
  const pipeline = usePipeline('500ms');

  it('requests time out and are retried; memory stays bounded; all go out when it answers again', async () => {
    const { apns, proxy, store, dispatcher } = pipeline.get();
    const all = await addDevices(store, 'stall', 1200, 40_000);
    const tokens = new Set(all.map((d) => d.tok));
    const retried = await metric(proxy, 'xaps_pushes_total', { result: 'retried' });
    apns.mock.stallAll(true);
    await Promise.all(all.map((d) => dispatcher.notify({ user: d.user, mailbox: 'INBOX' })));
    await waitFor(() => apns.mock.requests.some((r) => tokens.has(r.deviceToken)), 30_000, 'requests at the stalled mock');
    await waitFor(async () => (await metric(proxy, 'xaps_pushes_total', { result: 'retried' })) > retried, 30_000, 'a timed-out retry');
    const stats = dispatcher.stats();
    expect(stats.pending + stats.inFlight).toBeLessThanOrEqual(1500);
    apns.mock.stallAll(false);
    await waitFor(
      async () => (await metric(proxy, 'xaps_pushes_total', { result: 'delivered' })) >= 1200,
      90_000,
      'every device delivered',
    );
    const delivered = new Set(apns.mock.requests.filter((r) => tokens.has(r.deviceToken)).map((r) => r.deviceToken));
    expect(delivered.size).toBe(1200);
  }, 120_000);
});
