/**
 * Issue 6, item 1: the metrics an operator alerts and graphs on, scraped over HTTP from
 * /metrics after a scripted session against a real Dovecot, a mock APNs and (second
 * describe) a real Redis. Each value asserted is what the script made happen.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { X509Certificate } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { startDovecot, type DovecotInstance } from '../../src/testbed/dovecot.js';
import { startRedis, type RedisInstance } from '../../src/testbed/redis.js';
import { selfSignedCertificate } from '../../src/cert/selfsigned.js';
import { RawImap } from '../helpers/raw-imap.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';
import { apnsFixture, type ApnsFixture } from '../helpers/apns-fixture.js';
import { lmtpDeliver } from '../helpers/lmtp.js';
import { parsePromText, type Exposition } from '../helpers/prom-text.js';
import { COMMAND_LABELS } from '../../src/proxy/metrics.js';
import { STORE_OPERATIONS } from '../../src/store/metrics.js';

const ACCOUNT = '0715A26B-1C2D-4E3F-8A9B-0C1D2E3F4A5B';
const TOKEN = 'd4'.repeat(32);
const register = (token: string) =>
  `XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "${ACCOUNT}" "aps-device-token" "${token}" "aps-subtopic" "com.apple.mobilemail" "mailboxes" ("INBOX")`;

async function scrape(proxy: TestProxy): Promise<Exposition> {
  const ops = proxy.app.ops!.address;
  const res = await fetch(`http://127.0.0.1:${ops.port}/metrics`);
  expect(res.status).toBe(200);
  return parsePromText(await res.text());
}

/** Scrapes until `pred` holds (session teardown and readiness are asynchronous). */
async function scrapeUntil(proxy: TestProxy, pred: (m: Exposition) => boolean, what: string, timeoutMs = 20_000): Promise<Exposition> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const m = await scrape(proxy);
    if (pred(m)) return m;
    if (Date.now() > deadline) throw new Error(`metrics never showed ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function notAfterSeconds(pem: string | Buffer): number {
  return Math.floor(Date.parse(new X509Certificate(pem).validTo) / 1000);
}

describe('metrics after a scripted session (embedded store, NOTIFY watcher)', () => {
  let dovecot: DovecotInstance;
  let apns: ApnsFixture;
  let proxy: TestProxy;
  let ca: Buffer;
  let tlsCert: string;
  let tlsKey: string;
  let a: RawImap; // plain listener, STARTTLS, registered, kept open
  let c: RawImap; // plain listener, no STARTTLS, kept open
  let m: Exposition;
  let scrapedFrom = 0;
  let scrapedTo = 0;

  beforeAll(async () => {
    dovecot = await startDovecot({ users: { alice: 'alicepw' } });
    ca = await fs.readFile(dovecot.caCertPath);
    apns = await apnsFixture(['--push-coalesce-window', '300ms']);
    await fs.writeFile(path.join(apns.dir, 'master.pw'), 'masterpw\n', { mode: 0o600 });
    // the proxy's own copy of the client-facing certificate, so that a test can replace it
    tlsCert = path.join(apns.dir, 'tls.pem');
    tlsKey = path.join(apns.dir, 'tls.key');
    await fs.copyFile(dovecot.caCertPath, tlsCert);
    await fs.copyFile(dovecot.tlsKeyPath, tlsKey);
    proxy = await startTestProxy({
      upstreamPort: dovecot.imapPort,
      tlsCert,
      tlsKey,
      flags: [...apns.flags, '--master-user', 'master', '--master-password-file', path.join(apns.dir, 'master.pw')],
    });

    a = await RawImap.connect({ port: proxy.plainPort });
    await a.greeting();
    await a.command('a1', 'CAPABILITY');
    expect(await a.command('a2', 'STARTTLS')).toMatch(/^a2 OK/m);
    await a.starttls(ca);
    expect(await a.command('a3', 'LOGIN alice alicepw')).toMatch(/^a3 OK/m);
    await a.command('a4', 'SELECT INBOX');
    await a.command('a5', 'UID FETCH 1:* (FLAGS)');
    await a.command('a6', 'NOOP');
    expect(await a.command('a7', 'FOO bar')).toMatch(/^a7 BAD/m);
    expect(await a.command('a8', register(TOKEN))).toMatch(/^a8 OK/m);

    const b = await RawImap.connect({ port: proxy.tlsPort, tls: true, ca });
    await b.greeting();
    expect(await b.command('b1', register('e5'.repeat(32)))).toMatch(/^b1 BAD/m);
    expect(await b.command('b2', 'LOGIN alice alicepw')).toMatch(/^b2 OK/m);
    await b.command('b3', 'NOOP');
    await b.command('b4', 'LOGOUT');
    await b.waitClosed();

    c = await RawImap.connect({ port: proxy.plainPort });
    await c.greeting();
    await c.command('c1', 'NOOP');

    const deadline = Date.now() + 20_000;
    while (!proxy.app.watch?.isWatching('alice')) {
      if (Date.now() > deadline) throw new Error('alice is not being watched');
      await new Promise((r) => setTimeout(r, 50));
    }
    await new Promise((r) => setTimeout(r, 300)); // the watcher's first snapshot
    await lmtpDeliver(dovecot.lmtpPort, 'alice', 'From: x@example.org\r\nSubject: push me\r\n\r\nhello\r\n');
    await apns.mock.waitForRequests(1, 20_000);
    // the session of b has closed on the proxy's side too; the push's outcome is recorded
    scrapedFrom = Date.now();
    m = await scrapeUntil(
      proxy,
      (x) => x.value('xaps_client_connections', { listener: 'listen-tls', tls: 'true' }) === 0 && x.value('xaps_pushes_total', { result: 'delivered' }) === 1,
      'b closed and the push delivered',
    );
    scrapedTo = Date.now();
  });
  afterAll(async () => {
    a?.close();
    c?.close();
    await proxy?.stop();
    await apns?.mock.close();
    await dovecot?.destroy();
  });

  it('client connections: current by listener and TLS (STARTTLS moved one), accepted, STARTTLS, rejected', () => {
    expect(m.types.get('xaps_client_connections')).toBe('gauge');
    expect(m.value('xaps_client_connections', { listener: 'listen', tls: 'true' })).toBe(1);
    expect(m.value('xaps_client_connections', { listener: 'listen', tls: 'false' })).toBe(1);
    expect(m.value('xaps_client_connections', { listener: 'listen-tls', tls: 'true' })).toBe(0);
    expect(m.types.get('xaps_client_connections_total')).toBe('counter');
    expect(m.value('xaps_client_connections_total', { listener: 'listen' })).toBe(2);
    expect(m.value('xaps_client_connections_total', { listener: 'listen-tls' })).toBe(1);
    expect(m.value('xaps_client_starttls_total')).toBe(1);
    expect(m.value('xaps_client_connections_rejected_total', { reason: 'shutting_down' })).toBe(0);
  });

  it('commands proxied, by command from the fixed list; XAPPLEPUSHSERVICE included, FOO is "other"', () => {
    const expected: Record<string, number> = {
      CAPABILITY: 1,
      STARTTLS: 1,
      LOGIN: 2,
      SELECT: 1,
      'UID FETCH': 1,
      NOOP: 3,
      other: 1,
      XAPPLEPUSHSERVICE: 2,
      LOGOUT: 1,
    };
    const samples = m.find('xaps_imap_commands_total');
    expect(samples.map((s) => s.labels.command).sort()).toEqual([...COMMAND_LABELS].sort());
    for (const s of samples) expect([s.labels.command, s.value]).toEqual([s.labels.command, expected[s.labels.command!] ?? 0]);
  });

  it('registrations: outcomes and the stored count', () => {
    expect(m.value('xaps_push_registrations_total', { result: 'ok' })).toBe(1);
    expect(m.value('xaps_push_registrations_total', { result: 'bad' })).toBe(1);
    expect(m.value('xaps_push_registrations_total', { result: 'no' })).toBe(0);
    expect(m.types.get('xaps_registrations')).toBe('gauge');
    expect(m.value('xaps_registrations')).toBe(1);
    for (const operation of STORE_OPERATIONS) expect(m.value('xaps_store_errors_total', { operation })).toBe(0);
  });

  it('watching, events received, the push and its latency, APNs answers and the queue', () => {
    expect(m.value('xaps_watchers', { mode: 'notify' })).toBe(1);
    expect(m.value('xaps_watchers', { mode: 'idle' })).toBe(0);
    expect(m.value('xaps_watcher_reconnects_total', { mode: 'notify' })).toBe(0);
    expect(m.value('xaps_watch_changes_total', { source: 'notify' })).toBeGreaterThanOrEqual(1);
    expect(m.value('xaps_watch_changes_total', { source: 'events' })).toBe(0);
    expect(m.value('xaps_lease_handovers_total')).toBe(0);
    expect(m.value('xaps_pushes_total', { result: 'delivered' })).toBe(1);
    expect(m.value('xaps_pushes_total', { result: 'failed' })).toBe(0);
    expect(m.value('xaps_apns_responses_total', { status: '200', reason: 'none' })).toBe(1);
    expect(m.find('xaps_apns_responses_total').reduce((n, s) => n + s.value, 0)).toBe(1);
    expect(m.value('xaps_push_latency_seconds_count')).toBe(1);
    expect(m.value('xaps_push_latency_seconds_sum')).toBeGreaterThan(0);
    expect(m.value('xaps_apns_request_duration_seconds_count', { outcome: 'answered' })).toBe(1);
    expect(m.value('xaps_push_queue_depth')).toBe(0);
    for (const kind of ['followup', 'other', 'shutdown']) expect(m.value('xaps_push_queue_dropped_total', { kind })).toBe(0);
  });

  it('certificates: APNs expiry and seconds left, client-facing TLS expiry', () => {
    const apnsNotAfter = notAfterSeconds(apns.cert.certPem);
    expect(m.value('xaps_apns_certificate_expiry_timestamp_seconds')).toBe(apnsNotAfter);
    const left = m.value('xaps_apns_certificate_seconds_left')!;
    expect(left).toBeGreaterThanOrEqual(apnsNotAfter - Math.ceil(scrapedTo / 1000));
    expect(left).toBeLessThanOrEqual(apnsNotAfter - Math.floor(scrapedFrom / 1000));
    expect(m.value('xaps_tls_certificate_expiry_timestamp_seconds')).toBe(notAfterSeconds(ca));
  });

  it('the client-facing certificate expiry follows a reload', async () => {
    const next = selfSignedCertificate({ days: 10 });
    await fs.writeFile(tlsCert, next.certPem);
    await fs.writeFile(tlsKey, next.keyPem);
    await proxy.app.reload();
    const after = await scrape(proxy);
    expect(after.value('xaps_tls_certificate_expiry_timestamp_seconds')).toBe(notAfterSeconds(next.certPem));
    expect(notAfterSeconds(next.certPem)).toBeLessThan(notAfterSeconds(ca));
  });

  it('readiness: every check 1', () => {
    for (const check of ['listeners', 'upstream', 'store', 'certificate', 'all']) expect(m.value('xaps_ready', { check })).toBe(1);
    expect(m.value('xaps_process_resident_memory_bytes')).toBeGreaterThan(0);
  });

  it('sessions closing bring the gauge to 0; with Dovecot down a session counts an upstream failure and readiness drops', async () => {
    a.close();
    c.close();
    const closed = await scrapeUntil(
      proxy,
      (x) => x.find('xaps_client_connections').every((s) => s.value === 0),
      'every client connection closed',
    );
    expect(closed.find('xaps_client_connections')).toHaveLength(3);
    for (const s of closed.find('xaps_upstream_connect_failures_total')) expect(s.value).toBe(0);

    await dovecot.stop();
    const d = await RawImap.connect({ port: proxy.plainPort });
    expect(await d.greeting()).toMatch(/^\* BYE \[UNAVAILABLE\]/);
    await d.waitClosed();
    const down = await scrapeUntil(proxy, (x) => x.value('xaps_ready', { check: 'all' }) === 0, 'not ready');
    expect(down.value('xaps_upstream_connect_failures_total', { reason: 'refused' })).toBe(1);
    for (const reason of ['timeout', 'tls', 'greeting', 'closed', 'other']) {
      expect(down.value('xaps_upstream_connect_failures_total', { reason })).toBe(0);
    }
    expect(down.value('xaps_ready', { check: 'upstream' })).toBe(0);
    expect(down.value('xaps_ready', { check: 'store' })).toBe(1);
    expect(down.value('xaps_client_connections_total', { listener: 'listen' })).toBe(3);
  });
});

describe('metrics with the Redis store', () => {
  let dovecot: DovecotInstance;
  let redis: RedisInstance;
  let apns: ApnsFixture;
  let proxy: TestProxy;
  beforeAll(async () => {
    dovecot = await startDovecot({ users: { alice: 'alicepw' } });
    redis = await startRedis();
    apns = await apnsFixture();
    proxy = await startTestProxy({ upstreamPort: dovecot.imapPort, flags: [...apns.flags, '--redis-url', redis.url] });
  });
  afterAll(async () => {
    await proxy?.stop();
    await apns?.mock.close();
    await redis?.destroy();
    await dovecot?.destroy();
  });

  it('counts registrations in Redis, and a registration Redis cannot store as "no" and as a store error', async () => {
    const s = await RawImap.connect({ port: proxy.plainPort });
    await s.greeting();
    await s.command('l', 'LOGIN alice alicepw');
    expect(await s.command('r1', register(TOKEN))).toMatch(/^r1 OK/m);
    const up = await scrape(proxy);
    expect(up.value('xaps_registrations')).toBe(1);
    expect(up.value('xaps_store_errors_total', { operation: 'upsert' })).toBe(0);
    expect(up.value('xaps_ready', { check: 'store' })).toBe(1);

    await redis.stop();
    expect(await s.command('r2', register('f6'.repeat(32)))).toMatch(/^r2 NO/m);
    // readiness gives up on a ping before the store does; the failed ping is counted when it fails
    const down = await scrapeUntil(
      proxy,
      (x) => x.value('xaps_ready', { check: 'store' }) === 0 && x.value('xaps_store_errors_total', { operation: 'ping' })! >= 1,
      'the store not ready and its failed ping counted',
    );
    expect(down.value('xaps_push_registrations_total', { result: 'ok' })).toBe(1);
    expect(down.value('xaps_push_registrations_total', { result: 'no' })).toBe(1);
    expect(down.value('xaps_store_errors_total', { operation: 'upsert' })).toBe(1);
    expect(down.value('xaps_ready', { check: 'all' })).toBe(0);
    expect(down.value('xaps_ready', { check: 'upstream' })).toBe(1);
    // the last count stays while Redis cannot be asked
    expect(down.value('xaps_registrations')).toBe(1);
    s.close();
    await redis.restart();
  });
});
