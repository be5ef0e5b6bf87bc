/**
 * Http2ApnsClient when APNs misbehaves, against the real mock APNs: GOAWAY in the
 * middle of a burst, stream limits, stalls and timeouts, dropped connections, silent
 * connections (PING), stream resets.
 */
import { describe, expect, it } from 'vitest';
import { Registry } from 'prom-client';
import { ApnsTransportError } from '../../../src/apns/types.js';
import type { MockApns } from '../../../src/testbed/mock-apns.js';
import { certClient, note, startMock, startRelay, token, useMockApns, waitUntil } from './helpers.js';

let mock: MockApns;
const track = useMockApns((m) => (mock = m));

async function metricValue(registry: Registry, name: string): Promise<number> {
  const m = await registry.getSingleMetric(name)?.get();
  return (m?.values ?? []).reduce((sum, v) => sum + v.value, 0);
}


describe('GOAWAY', () => {
  it('mid-burst of 500: every send gets exactly one 200, APNs saw each token exactly once', async () => {
    const registry = new Registry();
    const client = track(certClient(mock, { registry, connections: 2 }));
    await client.send(note(0)); // pool up
    await waitUntil(() => client.stats().sessions.ready === 2, 5_000, 'pool');
    const opened = mock.stats().sessionsOpened;
    const before = mock.requests.length;
    const refusedBefore = mock.stats().refusedStreams;
    mock.goawayAfter(120);
    const N = 500;
    const results = await Promise.allSettled(Array.from({ length: N }, (_, i) => client.send(note(1_000 + i))));
    const rejected = results.filter((r) => r.status === 'rejected');
    expect(rejected).toEqual([]);
    expect(results.every((r) => r.status === 'fulfilled' && r.value.status === 200)).toBe(true);

    const seen = mock.requests.slice(before).map((r) => r.deviceToken);
    const counts = new Map<string, number>();
    for (const t of seen) counts.set(t, (counts.get(t) ?? 0) + 1);
    expect(seen.length).toBe(N);
    for (let i = 0; i < N; i++) expect(counts.get(token(1_000 + i))).toBe(1);

    const st = mock.stats();
    expect(st.goawaysSent).toBeGreaterThanOrEqual(1);
    expect(st.refusedStreams - refusedBefore).toBeGreaterThan(0); // the GOAWAY really refused streams
    // a new session replaced the retired one
    await waitUntil(() => mock.stats().sessionsOpened > opened, 5_000, 'replacement session');
    expect(await metricValue(registry, 'xaps_apns_goaways_total')).toBe(1);
    expect(await metricValue(registry, 'xaps_apns_retried_refused_streams_total')).toBeGreaterThan(0);
    expect(await metricValue(registry, 'xaps_apns_reconnects_total')).toBeGreaterThanOrEqual(1);
    expect(client.stats()).toMatchObject({ pending: 0, queued: 0 });
    // the GOAWAY reason is counted with a bounded label
    const goaways = await registry.getSingleMetric('xaps_apns_goaways_total')!.get();
    expect(goaways.values[0]!.labels).toEqual({ reason: 'Shutdown' });
  });

  it('GOAWAY without debug data and with an error code: in-flight requests are either answered or transport errors, none lost', async () => {
    const client = track(certClient(mock, { connections: 1, reconnectBackoff: { initialMs: 50 } }));
    await client.send(note(0));
    mock.goawayAfter(10, { reason: null, errorCode: 2 /* INTERNAL_ERROR */ });
    const results = await Promise.allSettled(Array.from({ length: 100 }, (_, i) => client.send(note(3_000 + i))));
    for (const r of results) {
      if (r.status === 'fulfilled') expect(r.value.status).toBe(200);
      else expect(r.reason).toBeInstanceOf(ApnsTransportError);
    }
    expect(results.filter((r) => r.status === 'fulfilled').length).toBeGreaterThanOrEqual(10);
    expect(client.stats()).toMatchObject({ pending: 0, queued: 0 });
    // after the short back-off the client works normally
    await new Promise((r) => setTimeout(r, 100));
    expect((await client.send(note(3_999))).status).toBe(200);
  });

  it('an error GOAWAY (Forbidden) backs off instead of reconnecting at once', async () => {
    const registry = new Registry();
    const client = track(certClient(mock, { connections: 1, registry, reconnectBackoff: { initialMs: 300 } }));
    await client.send(note(0));
    const opened = client.stats().sessionsOpened;
    mock.respond(() => ({ status: 200, delayMs: 20 }));
    mock.goawayAfter(1, { reason: 'Forbidden' });
    const results = await Promise.allSettled(Array.from({ length: 50 }, (_, i) => client.send(note(4_000 + i))));
    const answered = results.filter((r) => r.status === 'fulfilled');
    expect(answered.length).toBeGreaterThanOrEqual(1);
    for (const r of answered) expect(r.value.status).toBe(200);
    for (const r of results) {
      if (r.status === 'rejected') {
        expect(r.reason).toBeInstanceOf(ApnsTransportError);
        expect((r.reason as ApnsTransportError).kind).toBe('protocol');
        expect((r.reason as Error).message).toMatch(/Forbidden/);
      }
    }
    expect(client.stats().sessionsOpened).toBe(opened); // no reconnect during the back-off
    const failures = await registry.getSingleMetric('xaps_apns_connect_failures_total')!.get();
    expect(failures.values.find((v) => v.labels.kind === 'protocol')?.value).toBe(1);
    const goaways = await registry.getSingleMetric('xaps_apns_goaways_total')!.get();
    expect(goaways.values[0]!.labels).toEqual({ reason: 'Forbidden' });
    mock.respond(() => ({ status: 200 }));
    await new Promise((r) => setTimeout(r, 350));
    expect((await client.send(note(4_999))).status).toBe(200);
    expect(client.stats().sessionsOpened).toBe(opened + 1);
  });
});

describe('stream limits and queueing', () => {
  it("never opens more streams on a session than the server's maxConcurrentStreams", async () => {
    const small = await startMock({ maxConcurrentStreams: 8 });
    try {
      small.respond(() => ({ status: 200, delayMs: 2 }));
      const client = certClient(small, { connections: 2 });
      const results = await Promise.all(Array.from({ length: 300 }, (_, i) => client.send(note(i))));
      await client.close();
      expect(results.every((r) => r.status === 200)).toBe(true);
      expect(small.stats().maxConcurrentStreamsSeen).toBeLessThanOrEqual(8);
      expect(small.stats().maxConcurrentStreamsSeen).toBeGreaterThan(1);
      expect(small.requests.length).toBe(300);
    } finally {
      await small.close();
    }
  });
});

describe('stalls and timeouts', () => {
  it('2,500 stalled sends reject with timeout and release all pending state; then sends work', async () => {
    const client = track(certClient(mock, { requestTimeoutMs: 300, connections: 2 }));
    await client.send(note(0));
    await waitUntil(() => client.stats().sessions.ready === 2, 5_000, 'pool');
    mock.stallAll(true);
    const N = 2_500; // more than 2 × 1000 streams: some wait in the client's queue
    const results = await Promise.allSettled(Array.from({ length: N }, (_, i) => client.send(note(10_000 + i))));
    const kinds = new Set(results.map((r) => (r.status === 'rejected' ? (r.reason as ApnsTransportError).kind : 'fulfilled')));
    expect([...kinds]).toEqual(['timeout']);
    expect(client.stats()).toMatchObject({ pending: 0, queued: 0 });
    // Too many to RST (rapid-reset limits): the stalled sessions are dropped instead.
    await waitUntil(() => client.stats().inFlight === 0 && client.stats().sessions.draining === 0, 5_000, 'stalled sessions to go');
    mock.stallAll(false);
    expect((await client.send(note(1))).status).toBe(200);
    await waitUntil(() => client.stats().sessions.ready === 2, 5_000, 'pool');

    // A smaller stall is not a broken connection: each timed-out stream is RST, the sessions stay.
    const opened = client.stats().sessionsOpened;
    mock.stallAll(true);
    const wave = await Promise.allSettled(Array.from({ length: 400 }, (_, i) => client.send(note(20_000 + i))));
    expect(wave.every((r) => r.status === 'rejected' && (r.reason as ApnsTransportError).kind === 'timeout')).toBe(true);
    await waitUntil(() => client.stats().inFlight === 0, 5_000, 'cancelled streams to close');
    expect(client.stats()).toMatchObject({ pending: 0, queued: 0, inFlight: 0, sessionsOpened: opened });
    expect(client.stats().sessions.ready).toBe(2);
    mock.stallAll(false);
    expect((await client.send(note(2))).status).toBe(200);
  });

  it('a slow answer beyond requestTimeoutMs is a timeout; the RST reaches the server', async () => {
    const client = track(certClient(mock, { requestTimeoutMs: 200 }));
    mock.respond(() => ({ status: 200, delayMs: 600 }));
    const err = await client.send(note(2)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ApnsTransportError);
    expect((err as ApnsTransportError).kind).toBe('timeout');
    mock.respond(() => ({ status: 200 }));
    expect((await client.send(note(3))).status).toBe(200);
  });
});

describe('broken connections', () => {
  it('destroyed connections: in-flight sends fail with reset, the next send reconnects', async () => {
    const registry = new Registry();
    const client = track(certClient(mock, { registry }));
    await client.send(note(0));
    mock.stallAll(true);
    const before = mock.requests.length;
    const inFlight = Array.from({ length: 20 }, (_, i) => client.send(note(100 + i)).catch((e: unknown) => e));
    await mock.waitForRequests(before + 20);
    mock.destroyConnections();
    const errors = await Promise.all(inFlight);
    for (const e of errors) {
      expect(e).toBeInstanceOf(ApnsTransportError);
      expect((e as ApnsTransportError).kind).toBe('reset');
    }
    mock.stallAll(false);
    const opened = mock.stats().sessionsOpened;
    expect((await client.send(note(200))).status).toBe(200);
    expect(mock.stats().sessionsOpened).toBeGreaterThan(opened);
    expect(await metricValue(registry, 'xaps_apns_reconnects_total')).toBeGreaterThanOrEqual(1);
    expect(client.stats()).toMatchObject({ pending: 0, queued: 0 });
  });

  it('an unanswered PING replaces the dead session', async () => {
    const relay = await startRelay(mock.port);
    try {
      const registry = new Registry();
      const client = track(
        certClient(mock, { endpoint: relay.url, connections: 1, pingIntervalMs: 100, pingTimeoutMs: 150, requestTimeoutMs: 5_000, registry }),
      );
      const before = mock.requests.length;
      expect((await client.send(note(1))).status).toBe(200);
      // a PING on a healthy, idle session is answered: the session stays
      await new Promise((r) => setTimeout(r, 350));
      expect(await metricValue(registry, 'xaps_apns_ping_timeouts_total')).toBe(0);
      expect(client.stats().sessionsOpened).toBe(1);
      // the connection goes silent (no FIN, no RST): only PING can tell
      relay.freeze();
      await waitUntil(() => client.stats().sessions.ready === 0, 3_000, 'PING timeout to kill the session');
      expect(await metricValue(registry, 'xaps_apns_ping_timeouts_total')).toBe(1);
      expect((await client.send(note(2))).status).toBe(200);
      const [first, second] = mock.requests.slice(before);
      expect(second!.sessionId).not.toBe(first!.sessionId);
      expect(client.stats().sessionsOpened).toBe(2);
    } finally {
      await relay.close();
    }
  });

  it('stream resets: before the answer → reset, mid-response → reset, REFUSED_STREAM → re-sent transparently', async () => {
    const client = track(certClient(mock));
    mock.respond(() => ({ status: 200, resetStream: true }));
    const a = await client.send(note(1)).catch((e: unknown) => e);
    expect((a as ApnsTransportError).kind).toBe('reset');

    mock.respond(() => ({ status: 400, reason: 'BadDeviceToken', resetMidResponse: true }));
    const b = await client.send(note(2)).catch((e: unknown) => e);
    expect((b as ApnsTransportError).kind).toBe('reset');
    expect((b as Error).message).toMatch(/mid-response/);

    let refusedOnce = false;
    mock.respond(() => {
      if (!refusedOnce) {
        refusedOnce = true;
        return { status: 200, resetStream: 7 /* REFUSED_STREAM */ };
      }
      return { status: 200 };
    });
    const before = mock.requests.length;
    expect((await client.send(note(3))).status).toBe(200);
    expect(mock.requests.length - before).toBe(2);

    // always refused: bounded retries, then a transport error
    mock.respond(() => ({ status: 200, resetStream: 7 }));
    const c = await client.send(note(4)).catch((e: unknown) => e);
    expect((c as ApnsTransportError).kind).toBe('reset');
    expect(client.stats()).toMatchObject({ pending: 0, queued: 0 });
  });
});
