/**
 * Http2ApnsClient against the real mock APNs (TLS + HTTP/2 on loopback): what goes on
 * the wire, how every APNs answer is reported, certificate and token authentication,
 * credential changes.
 */
import { describe, expect, it } from 'vitest';
import { generateKeyPairSync, verify } from 'node:crypto';
import { Registry } from 'prom-client';
import { Http2ApnsClient } from '../../../src/apns/client.js';
import { ApnsTransportError, type ApnsResponse } from '../../../src/apns/types.js';
import { createTestCa, issueMailPushCert } from '../../../src/testbed/apns-certs.js';
import type { MockAnswer, MockApns } from '../../../src/testbed/mock-apns.js';
import { certClient, note, pki, startMock, token, useMockApns, waitUntil } from './helpers.js';

let mock: MockApns;
const mockDefault = (): MockApns => mock;
const track = useMockApns((m) => (mock = m));

describe('request on the wire', () => {
  it('sends POST /3/device/<token> with exactly the APNs headers and the payload', async () => {
    const client = track(certClient(mock));
    const before = mock.requests.length;
    const n = note(1, { collapseId: 'account-1', expiration: 1_900_000_000, priority: 5, pushType: 'background' });
    const res = await client.send(n);
    expect(res.status).toBe(200);
    const r = mock.requests[before]!;
    expect(r.method).toBe('POST');
    expect(r.path).toBe(`/3/device/${token(1)}`);
    expect(r.deviceToken).toBe(token(1));
    expect(r.headers['apns-topic']).toBe(pki().cert.topic);
    expect(r.headers['apns-push-type']).toBe('background');
    expect(r.headers['apns-priority']).toBe('5');
    expect(r.headers['apns-expiration']).toBe('1900000000');
    expect(r.headers['apns-collapse-id']).toBe('account-1');
    expect(r.headers['content-type']).toBe('application/json');
    expect(r.headers.authorization).toBeUndefined();
    expect(r.rawBody).toBe(n.payload);
    expect(r.body).toEqual({ aps: { 'account-id': 'acct-1' } });
    // the mock saw the Mail push certificate, topic in the subject UID
    expect(r.clientCertSubject?.UID).toBe(pki().cert.topic);
    expect(r.clientCertSubject?.CN).toMatch(/^APSP:/);
    expect(res.apnsId).toMatch(/^[0-9a-f-]{36}$/i);
  });

  it('omits apns-collapse-id when unset and sends alert / priority 10 as given', async () => {
    const client = track(certClient(mock));
    const before = mock.requests.length;
    await client.send(note(2, { pushType: 'alert', priority: 10, expiration: 0 }));
    const r = mock.requests[before]!;
    expect(r.headers['apns-collapse-id']).toBeUndefined();
    expect(r.headers['apns-push-type']).toBe('alert');
    expect(r.headers['apns-priority']).toBe('10');
    expect(r.headers['apns-expiration']).toBe('0');
  });

  it('spreads requests over the pool and keeps the sessions open', async () => {
    const client = track(certClient(mock, { connections: 3 }));
    const opened = mock.stats().sessionsOpened;
    const before = mock.requests.length;
    await Promise.all(Array.from({ length: 60 }, (_, i) => client.send(note(100 + i))));
    await waitUntil(() => client.stats().sessions.ready === 3, 5_000, 'three ready sessions');
    await Promise.all(Array.from({ length: 60 }, (_, i) => client.send(note(200 + i))));
    const sessions = new Set(mock.requests.slice(before).map((r) => r.sessionId));
    expect(sessions.size).toBe(3);
    expect(mock.stats().sessionsOpened - opened).toBe(3);
    expect(client.stats().sessions.ready).toBe(3);
  });
});

describe('answers are reported faithfully', () => {
  const tsGone = 1_700_000_000_123;
  const httpDate = new Date(Date.now() + 120_000).toUTCString();
  const cases: Array<{ name: string; answer: MockAnswer; expected: Partial<ApnsResponse> }> = [
    { name: '200', answer: { status: 200, apnsId: '11111111-2222-3333-4444-555555555555' }, expected: { status: 200, apnsId: '11111111-2222-3333-4444-555555555555' } },
    { name: '400 BadDeviceToken', answer: { status: 400, reason: 'BadDeviceToken' }, expected: { status: 400, reason: 'BadDeviceToken' } },
    { name: '400 DeviceTokenNotForTopic', answer: { status: 400, reason: 'DeviceTokenNotForTopic' }, expected: { status: 400, reason: 'DeviceTokenNotForTopic' } },
    { name: '400 TopicDisallowed', answer: { status: 400, reason: 'TopicDisallowed' }, expected: { status: 400, reason: 'TopicDisallowed' } },
    { name: '400 BadTopic', answer: { status: 400, reason: 'BadTopic' }, expected: { status: 400, reason: 'BadTopic' } },
    { name: '403 BadCertificate', answer: { status: 403, reason: 'BadCertificate' }, expected: { status: 403, reason: 'BadCertificate' } },
    { name: '404 BadPath', answer: { status: 404, reason: 'BadPath' }, expected: { status: 404, reason: 'BadPath' } },
    { name: '405 MethodNotAllowed', answer: { status: 405, reason: 'MethodNotAllowed' }, expected: { status: 405, reason: 'MethodNotAllowed' } },
    { name: '410 Unregistered', answer: { status: 410, reason: 'Unregistered', timestamp: tsGone }, expected: { status: 410, reason: 'Unregistered', timestamp: tsGone } },
    { name: '413 PayloadTooLarge', answer: { status: 413, reason: 'PayloadTooLarge' }, expected: { status: 413, reason: 'PayloadTooLarge' } },
    { name: '429 TooManyRequests, Retry-After seconds', answer: { status: 429, reason: 'TooManyRequests', retryAfter: 300 }, expected: { status: 429, reason: 'TooManyRequests', retryAfterMs: 300_000 } },
    { name: '500 InternalServerError', answer: { status: 500, reason: 'InternalServerError' }, expected: { status: 500, reason: 'InternalServerError' } },
    { name: '503 ServiceUnavailable', answer: { status: 503, reason: 'ServiceUnavailable', retryAfter: 5 }, expected: { status: 503, reason: 'ServiceUnavailable', retryAfterMs: 5_000 } },
  ];

  it.each(cases)('$name', async ({ answer, expected }) => {
    const client = track(certClient(mock));
    mock.respond(() => answer);
    const res = await client.send(note(7));
    expect(res).toMatchObject(expected);
    expect(res.apnsId).toBeTruthy();
    if (expected.timestamp === undefined) expect(res.timestamp).toBeUndefined();
    if (expected.retryAfterMs === undefined) expect(res.retryAfterMs).toBeUndefined();
    if (expected.status === 200) expect(res.reason).toBeUndefined();
  });

  it('410 without an explicit timestamp still carries one (ms)', async () => {
    const client = track(certClient(mock));
    mock.respond(() => ({ status: 410, reason: 'ExpiredToken' }));
    const t0 = Date.now();
    const res = await client.send(note(8));
    expect(res.status).toBe(410);
    expect(res.reason).toBe('ExpiredToken');
    expect(res.timestamp).toBeGreaterThanOrEqual(t0 - 1000);
    expect(res.timestamp).toBeLessThanOrEqual(Date.now() + 1000);
  });

  it('429 with an HTTP-date Retry-After', async () => {
    const client = track(certClient(mock));
    mock.respond(() => ({ status: 429, reason: 'TooManyRequests', retryAfter: httpDate }));
    const res = await client.send(note(9));
    expect(res.retryAfterMs).toBeGreaterThan(100_000);
    expect(res.retryAfterMs).toBeLessThanOrEqual(121_000);
  });

  it("the mock's own validation answers like Apple", async () => {
    const client = track(certClient(mock));
    expect(await client.send(note(10, { deviceToken: 'not-a-token' }))).toMatchObject({ status: 400, reason: 'BadDeviceToken' });
    expect(await client.send(note(10, { deviceToken: 'abcd' }))).toMatchObject({ status: 400, reason: 'BadDeviceToken' });
    expect(await client.send(note(10, { topic: 'com.apple.mobilemail.push.org.example' }))).toMatchObject({ status: 400, reason: 'TopicDisallowed' });
    expect(await client.send(note(10, { payload: JSON.stringify({ aps: { x: 'y'.repeat(5000) } }) }))).toMatchObject({ status: 413, reason: 'PayloadTooLarge' });
    expect(await client.send(note(10, { collapseId: 'c'.repeat(65) }))).toMatchObject({ status: 400, reason: 'BadCollapseId' });
    expect(await client.send(note(10, { payload: '' }))).toMatchObject({ status: 400, reason: 'PayloadEmpty' });
    // a single-topic certificate: no apns-topic means its topic (Apple's rule)
    expect(await client.send(note(10, { topic: '' }))).toMatchObject({ status: 200 });
  });

  it('topics extension: any listed topic is allowed, none given → MissingTopic', async () => {
    const multi = issueMailPushCert(pki().ca, { uidTopic: null, extensionTopics: ['com.apple.mobilemail.push.org.example', 'com.example.other'] });
    const client = track(certClient(mock, {}, multi));
    expect(await client.send(note(11, { topic: 'com.example.other' }))).toMatchObject({ status: 200 });
    expect(await client.send(note(11, { topic: 'com.apple.mobilemail.push.org.example' }))).toMatchObject({ status: 200 });
    expect(await client.send(note(11, { topic: pki().cert.topic }))).toMatchObject({ status: 400, reason: 'TopicDisallowed' });
    expect(await client.send(note(11, { topic: '' }))).toMatchObject({ status: 400, reason: 'MissingTopic' });
  });
});

describe('authentication', () => {
  it.each(['TLSv1.3', 'TLSv1.2'] as const)('a client certificate from another CA is refused (%s): transport error, not a crash', async (version) => {
    const otherCa = createTestCa('Not Apple');
    const stranger = issueMailPushCert(otherCa);
    const tls12 = version === 'TLSv1.2' ? await startMock({ tlsMaxVersion: 'TLSv1.2' }) : undefined;
    const mock = tls12 ?? mockDefault();
    const client = track(certClient(mock, { reconnectBackoff: { initialMs: 60_000 } }, stranger));
    const tlsFailures = mock.stats().tlsFailures;
    const before = mock.requests.length;
    const err = await client.send(note(20)).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(ApnsTransportError);
    expect((err as ApnsTransportError).kind).toBe('tls');
    expect(mock.stats().tlsFailures).toBeGreaterThan(tlsFailures);
    // backing off: the next send fails at once with the same kind, without a new handshake
    const opened = client.stats().sessionsOpened;
    const again = await client.send(note(21)).catch((e: unknown) => e);
    expect((again as ApnsTransportError).kind).toBe('tls');
    expect(client.stats().sessionsOpened).toBe(opened);
    expect(mock.requests.length).toBe(before);
    expect(client.stats()).toMatchObject({ pending: 0, queued: 0 });
    await tls12?.close();
  });

  it('a server certificate nobody trusts is a tls error', async () => {
    const client = track(
      new Http2ApnsClient({ endpoint: mock.url, credentials: { kind: 'certificate', certPem: pki().cert.certPem, keyPem: pki().cert.keyPem } }),
    );
    const err = await client.send(note(22)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ApnsTransportError);
    expect((err as ApnsTransportError).kind).toBe('tls');
  });

  it('nothing listening is a connect error, and connects back off', async () => {
    const closed = await startMock();
    const url = closed.url;
    await closed.close();
    const client = track(
      new Http2ApnsClient({
        endpoint: url,
        ca: mock.caPem,
        credentials: { kind: 'certificate', certPem: pki().cert.certPem, keyPem: pki().cert.keyPem },
        connections: 1,
        reconnectBackoff: { initialMs: 60_000 },
      }),
    );
    const err = await client.send(note(23)).catch((e: unknown) => e);
    expect((err as ApnsTransportError).kind).toBe('connect');
    const s = client.stats();
    expect(s.connectFailures).toBe(1);
    await client.send(note(24)).catch(() => undefined);
    expect(client.stats().sessionsOpened).toBe(s.sessionsOpened);
  });

  it('token auth: a valid ES256 provider token with kid and iss, reused across requests', async () => {
    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
    const signingKeyPem = privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    const publicPem = publicKey.export({ type: 'spki', format: 'pem' }).toString();
    const tokenMock = await startMock({ tokenKeys: { ABC123DEFG: publicPem }, teamId: 'TEAM123456' });
    try {
      const client = new Http2ApnsClient({
        endpoint: tokenMock.url,
        ca: tokenMock.caPem,
        credentials: { kind: 'token', signingKeyPem, keyId: 'ABC123DEFG', teamId: 'TEAM123456' },
      });
      const t0 = Math.floor(Date.now() / 1000);
      const res = await client.send(note(30, { topic: 'com.apple.mobilemail.push.org.example' }));
      const res2 = await client.send(note(31, { topic: 'com.apple.mobilemail.push.org.example' }));
      await client.close();
      expect(res.status).toBe(200);
      expect(res2.status).toBe(200);
      const [r1, r2] = tokenMock.requests;
      expect(r1!.clientCertSubject).toBeNull();
      const auth = r1!.headers.authorization!;
      expect(auth).toMatch(/^bearer [\w-]+\.[\w-]+\.[\w-]+$/);
      expect(r2!.headers.authorization).toBe(auth);
      const [h, c, sig] = auth.slice('bearer '.length).split('.') as [string, string, string];
      expect(JSON.parse(Buffer.from(h, 'base64url').toString())).toEqual({ alg: 'ES256', kid: 'ABC123DEFG' });
      const claims = JSON.parse(Buffer.from(c, 'base64url').toString()) as { iss: string; iat: number };
      expect(claims.iss).toBe('TEAM123456');
      expect(claims.iat).toBeGreaterThanOrEqual(t0 - 1);
      expect(claims.iat).toBeLessThanOrEqual(Math.floor(Date.now() / 1000));
      const signature = Buffer.from(sig, 'base64url');
      expect(signature.length).toBe(64); // raw r||s, not DER
      expect(verify('sha256', Buffer.from(`${h}.${c}`), { key: publicKey, dsaEncoding: 'ieee-p1363' }, signature)).toBe(true);
    } finally {
      await tokenMock.close();
    }
  });

  it('token auth: a token signed with another key is answered 403 InvalidProviderToken', async () => {
    const { publicKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
    const other = generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    const tokenMock = await startMock({ tokenKeys: { K1: publicKey.export({ type: 'spki', format: 'pem' }).toString() } });
    try {
      const client = new Http2ApnsClient({ endpoint: tokenMock.url, ca: tokenMock.caPem, credentials: { kind: 'token', signingKeyPem: other, keyId: 'K1', teamId: 'T' } });
      const res = await client.send(note(32));
      await client.close();
      expect(res).toMatchObject({ status: 403, reason: 'InvalidProviderToken' });
    } finally {
      await tokenMock.close();
    }
  });

  it('rejects unusable credentials up front', () => {
    expect(() => new Http2ApnsClient({ endpoint: 'production', credentials: { kind: 'token', signingKeyPem: 'nope', keyId: 'K', teamId: 'T' } })).toThrow(/signing key/);
    const rsa = generateKeyPairSync('rsa', { modulusLength: 1024 }).privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    expect(() => new Http2ApnsClient({ endpoint: 'production', credentials: { kind: 'token', signingKeyPem: rsa, keyId: 'K', teamId: 'T' } })).toThrow(/P-256/);
    expect(() => new Http2ApnsClient({ endpoint: 'production', credentials: { kind: 'certificate', certPem: pki().cert.certPem, keyPem: rsa } })).toThrow(/certificate\/key/);
    expect(() => new Http2ApnsClient({ endpoint: 'http://example.com', credentials: { kind: 'certificate', certPem: pki().cert.certPem, keyPem: pki().cert.keyPem } })).toThrow(/https/);
  });

  it('setCredentials: new requests use the new certificate, in-flight ones finish on the old session', async () => {
    const client = track(certClient(mock, { connections: 1 }));
    const next = issueMailPushCert(pki().ca);
    const slowToken = token(40);
    mock.respond((r) => (r.deviceToken === slowToken ? { status: 200, delayMs: 300 } : { status: 200 }));
    const before = mock.requests.length;
    const slow = client.send(note(40));
    await mock.waitForRequests(before + 1);
    client.setCredentials({ kind: 'certificate', certPem: next.certPem, keyPem: next.keyPem });
    const fresh = await client.send(note(41, { topic: next.topic }));
    expect(fresh.status).toBe(200);
    expect((await slow).status).toBe(200);
    const [rOld, rNew] = mock.requests.slice(before);
    expect(rOld!.clientCertSubject?.UID).toBe(pki().cert.topic);
    expect(rNew!.clientCertSubject?.UID).toBe(next.topic);
    expect(rNew!.sessionId).not.toBe(rOld!.sessionId);
    // the old session drained and closed
    await waitUntil(() => client.stats().sessions.draining === 0, 5_000, 'old session closed');
    expect(client.stats().sessions).toEqual({ ready: 1, connecting: 0, draining: 0 });
  });

  it('close(): queued and later sends reject with closed', async () => {
    const client = certClient(mock, { closeGraceMs: 200 });
    mock.stallAll(true);
    const inFlight = client.send(note(50)).catch((e: unknown) => e);
    await mock.waitForRequests(mock.requests.length + 1);
    await client.close();
    expect(((await inFlight) as ApnsTransportError).kind).toBe('closed');
    const after = await client.send(note(51)).catch((e: unknown) => e);
    expect((after as ApnsTransportError).kind).toBe('closed');
  }, 10_000);

  it('registers its metrics on the given registry', async () => {
    const registry = new Registry();
    const client = track(certClient(mock, { registry }));
    await client.send(note(60));
    const text = await registry.metrics();
    expect(text).toMatch(/xaps_apns_request_duration_seconds_count\{outcome="answered"\} 1/);
    expect(text).toMatch(/xaps_apns_sessions\{state="ready"\} 2/);
    for (const name of ['xaps_apns_goaways_total', 'xaps_apns_reconnects_total', 'xaps_apns_retried_refused_streams_total']) {
      expect(text).toContain(`# TYPE ${name} counter`);
    }
    // a second client on the same registry shares the metrics instead of throwing
    const second = track(certClient(mock, { registry }));
    await second.send(note(61));
    expect(await registry.metrics()).toMatch(/xaps_apns_sessions\{state="ready"\} 4/);
  });
});
