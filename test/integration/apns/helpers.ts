import { afterAll, afterEach, beforeAll } from 'vitest';
/**
 * Shared set-up for the APNs client tests: a test CA with Mail push certificates, a
 * real mock APNs (TLS + HTTP/2 on loopback), client factories and a freezable TCP
 * relay (to make a connection go silent without closing it).
 */
import net from 'node:net';
import type { AddressInfo } from 'node:net';
import { Http2ApnsClient, type Http2ApnsClientOptions } from '../../../src/apns/client.js';
import type { ApnsNotification } from '../../../src/apns/types.js';
import { createTestCa, issueMailPushCert, type IssuedCert, type TestCa } from '../../../src/testbed/apns-certs.js';
import { startMockApns, type MockApns, type MockApnsOptions } from '../../../src/testbed/mock-apns.js';

export interface Pki {
  ca: TestCa;
  cert: IssuedCert;
}

let shared: Pki | undefined;

/** One CA + Mail push certificate per test file (RSA key generation is the slow part). */
export function pki(): Pki {
  if (!shared) {
    const ca = createTestCa();
    shared = { ca, cert: issueMailPushCert(ca) };
  }
  return shared;
}

export function startMock(opts: Partial<MockApnsOptions> = {}): Promise<MockApns> {
  return startMockApns({ clientCa: pki().ca.certPem, ...opts });
}

export function certClient(mock: MockApns, opts: Partial<Http2ApnsClientOptions> = {}, cert: IssuedCert = pki().cert): Http2ApnsClient {
  return new Http2ApnsClient({
    endpoint: mock.url,
    ca: mock.caPem,
    credentials: { kind: 'certificate', certPem: cert.certPem, keyPem: cert.keyPem },
    ...opts,
  });
}

/** A valid 32-byte hex token derived from n (distinct n → distinct tokens). */
export function token(n: number): string {
  return n.toString(16).padStart(64, '0');
}

export function note(n: number, overrides: Partial<ApnsNotification> = {}): ApnsNotification {
  return {
    deviceToken: token(n),
    topic: pki().cert.topic,
    pushType: 'background',
    priority: 5,
    expiration: 0,
    payload: JSON.stringify({ aps: { 'account-id': `acct-${n}` } }),
    ...overrides,
  };
}

export async function waitUntil(cond: () => boolean, timeoutMs = 5_000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

export interface Relay {
  port: number;
  url: string;
  /** Existing connections stop forwarding (silently drop bytes both ways); new ones work. */
  freeze(): void;
  connections(): number;
  close(): Promise<void>;
}

/** A TCP relay to `targetPort` on 127.0.0.1 whose existing connections can be frozen. */
export async function startRelay(targetPort: number): Promise<Relay> {
  const pairs = new Set<{ a: net.Socket; b: net.Socket; frozen: boolean }>();
  const server = net.createServer((a) => {
    const b = net.connect(targetPort, '127.0.0.1');
    const pair = { a, b, frozen: false };
    pairs.add(pair);
    a.on('data', (d) => {
      if (!pair.frozen) b.write(d);
    });
    b.on('data', (d) => {
      if (!pair.frozen) a.write(d);
    });
    const end = (): void => {
      pairs.delete(pair);
      a.destroy();
      b.destroy();
    };
    a.on('close', end);
    b.on('close', end);
    a.on('error', end);
    b.on('error', end);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    port,
    url: `https://127.0.0.1:${port}`,
    freeze() {
      for (const p of pairs) p.frozen = true;
    },
    connections: () => pairs.size,
    close() {
      for (const p of pairs) {
        p.a.destroy();
        p.b.destroy();
      }
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

/**
 * The lifecycle both client test files share: one mock APNs per file (handed to
 * `onReady`), every tracked client closed and the mock reset after each test.
 * Returns `track`, which registers a client for that cleanup.
 */
export function useMockApns(onReady: (mock: MockApns) => void): <T extends Http2ApnsClient>(client: T) => T {
  let mock: MockApns;
  const clients: Http2ApnsClient[] = [];
  beforeAll(async () => {
    pki();
    mock = await startMock();
    onReady(mock);
  });
  afterEach(async () => {
    await Promise.all(clients.splice(0).map((c) => c.close()));
    mock.respond(() => ({ status: 200 }));
    mock.stallAll(false);
  });
  afterAll(async () => {
    await mock.close();
  });
  return (client) => {
    clients.push(client);
    return client;
  };
}
