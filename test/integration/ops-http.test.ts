/**
 * The operations HTTP listener (--metrics-listen): /metrics, /healthz and /readyz
 * against a real Dovecot, a mock APNs and (for the store check) a real Redis.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDovecot, type DovecotInstance } from '../../src/testbed/dovecot.js';
import { startRedis, type RedisInstance } from '../../src/testbed/redis.js';
import { freePort } from '../../src/testbed/ports.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';
import { apnsFixture, type ApnsFixture } from '../helpers/apns-fixture.js';

/** The mock APNs and the flags that point the proxy at it. */
const apnsFlags = () => apnsFixture();

async function get(port: number, p: string, method = 'GET'): Promise<{ status: number; type: string | null; text: string }> {
  const res = await fetch(`http://127.0.0.1:${port}${p}`, { method });
  return { status: res.status, type: res.headers.get('content-type'), text: await res.text() };
}

async function waitForStatus(port: number, want: number, timeoutMs = 15_000): Promise<{ status: number; text: string }> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = await get(port, '/readyz');
    if (r.status === want) return r;
    if (Date.now() > deadline) throw new Error(`/readyz stayed ${r.status}: ${r.text}`);
    await new Promise((res) => setTimeout(res, 200));
  }
}

describe('operations listener with the embedded store', () => {
  let dovecot: DovecotInstance;
  let apns: ApnsFixture;
  let proxy: TestProxy;
  let port: number;
  beforeAll(async () => {
    dovecot = await startDovecot({ users: { alice: 'alicepw' } });
    apns = await apnsFlags();
    port = await freePort();
    proxy = await startTestProxy({
      upstreamPort: dovecot.imapPort,
      flags: [...apns.flags, '--metrics-listen', `127.0.0.1:${port}`],
    });
  });
  afterAll(async () => {
    await proxy?.stop();
    await apns?.mock.close();
    await dovecot?.destroy();
  });

  it('exposes its address on the App', () => {
    expect(proxy.app.ops?.address).toEqual({ host: '127.0.0.1', port });
  });

  it('serves Prometheus text with the push and process metrics', async () => {
    const r = await get(port, '/metrics');
    expect(r.status).toBe(200);
    expect(r.type).toMatch(/^text\/plain; version=0\.0\.4/);
    expect(r.text).toMatch(/^# TYPE xaps_pushes_total counter$/m);
    expect(r.text).toMatch(/^xaps_process_resident_memory_bytes \d+/m);
    expect(r.text).toMatch(/^xaps_nodejs_eventloop_lag_seconds /m);
  });

  it('answers /healthz, HEAD, 404 and 405', async () => {
    const h = await get(port, '/healthz');
    expect(h.status).toBe(200);
    expect(JSON.parse(h.text)).toEqual({ status: 'ok' });
    const head = await get(port, '/metrics', 'HEAD');
    expect(head.status).toBe(200);
    expect(head.text).toBe('');
    expect((await get(port, '/nope')).status).toBe(404);
    expect((await get(port, '/metrics', 'POST')).status).toBe(405);
  });

  it('is ready with Dovecot up, not ready without it, and ready again after a restart', async () => {
    const up = await get(port, '/readyz');
    expect(up.status).toBe(200);
    const report = JSON.parse(up.text);
    expect(report.ready).toBe(true);
    expect(report.checks.listeners).toEqual({ ok: true });
    expect(report.checks.upstream).toEqual({ ok: true });
    expect(report.checks.store).toEqual({ ok: true });
    expect(report.checks.certificate.ok).toBe(true);
    expect(report.checks.certificate.daysLeft).toBeGreaterThan(0);
    expect(new Date(report.checks.certificate.notAfter).getTime()).toBeGreaterThan(Date.now());

    await dovecot.stop();
    const down = JSON.parse((await waitForStatus(port, 503)).text);
    expect(down.ready).toBe(false);
    expect(down.checks.upstream.ok).toBe(false);
    expect(down.checks.upstream.error).toEqual(expect.any(String));
    expect(down.checks.store.ok).toBe(true);
    expect(down.checks.listeners.ok).toBe(true);
    expect((await get(port, '/healthz')).status).toBe(200);

    await dovecot.restart();
    const again = JSON.parse((await waitForStatus(port, 200)).text);
    expect(again.checks.upstream).toEqual({ ok: true });
  });
});

describe('operations listener with the Redis store', () => {
  let dovecot: DovecotInstance;
  let redis: RedisInstance;
  let apns: ApnsFixture;
  let proxy: TestProxy;
  let port: number;
  beforeAll(async () => {
    dovecot = await startDovecot({ users: { alice: 'alicepw' } });
    redis = await startRedis();
    apns = await apnsFlags();
    port = await freePort();
    proxy = await startTestProxy({
      upstreamPort: dovecot.imapPort,
      flags: [...apns.flags, '--redis-url', redis.url, '--metrics-listen', `127.0.0.1:${port}`],
    });
  });
  afterAll(async () => {
    await proxy?.stop();
    await apns?.mock.close();
    await redis?.destroy();
    await dovecot?.destroy();
  });

  it('is not ready while Redis is down, and ready again after it restarts', async () => {
    expect((await get(port, '/readyz')).status).toBe(200);
    await redis.stop();
    const down = JSON.parse((await waitForStatus(port, 503)).text);
    expect(down.checks.store.ok).toBe(false);
    expect(down.checks.store.error).toEqual(expect.any(String));
    expect(down.checks.upstream).toEqual({ ok: true });
    await redis.restart();
    const again = JSON.parse((await waitForStatus(port, 200, 30_000)).text);
    expect(again.checks.store).toEqual({ ok: true });
  });
});
