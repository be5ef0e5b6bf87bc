/**
 * The APNs client's pure parts: endpoint resolution, Retry-After and error-body parsing,
 * error classification, provider tokens (ES256 JWT) and their refresh schedule, metric
 * label bounding.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { generateKeyPairSync, verify } from 'node:crypto';
import {
  APNS_PRODUCTION_URL,
  APNS_SANDBOX_URL,
  classifyConnectError,
  parseErrorBody,
  parseRetryAfter,
  resolveEndpoint,
} from '../../../src/apns/client.js';
import { ProviderTokenCache, TOKEN_MIN_REFRESH_MS, TOKEN_REFRESH_MS, loadSigningKey, signProviderToken } from '../../../src/apns/jwt.js';
import { goawayReasonLabel } from '../../../src/apns/client-metrics.js';

describe('resolveEndpoint', () => {
  it('knows production and sandbox', () => {
    expect(resolveEndpoint('production').origin).toBe('https://api.push.apple.com');
    expect(resolveEndpoint('sandbox').origin).toBe('https://api.sandbox.push.apple.com');
    expect(APNS_PRODUCTION_URL).toBe('https://api.push.apple.com:443');
    expect(APNS_SANDBOX_URL).toBe('https://api.sandbox.push.apple.com:443');
  });
  it('takes an https URL (port kept, path dropped) and refuses anything else', () => {
    expect(resolveEndpoint('https://127.0.0.1:2197/x').origin).toBe('https://127.0.0.1:2197');
    expect(() => resolveEndpoint('http://127.0.0.1:80')).toThrow(/https/);
    expect(() => resolveEndpoint('api.push.apple.com')).toThrow();
  });
});

describe('parseRetryAfter', () => {
  it('delta seconds → ms', () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: 10_000_000 }), (n) => parseRetryAfter(String(n)) === n * 1000));
  });
  it('HTTP date → ms from now, never negative', () => {
    const now = Date.parse('2026-01-01T00:00:00Z');
    expect(parseRetryAfter('Thu, 01 Jan 2026 00:05:00 GMT', now)).toBe(300_000);
    expect(parseRetryAfter('Wed, 31 Dec 2025 23:00:00 GMT', now)).toBe(0);
  });
  it('absent or unreadable → undefined', () => {
    expect(parseRetryAfter(undefined)).toBeUndefined();
    expect(parseRetryAfter('')).toBeUndefined();
    expect(parseRetryAfter('soon')).toBeUndefined();
    expect(parseRetryAfter(['7', '9'])).toBe(7000);
  });
});

describe('parseErrorBody', () => {
  it('reads reason and a ms timestamp', () => {
    expect(parseErrorBody('{"reason":"Unregistered","timestamp":1700000000123}')).toEqual({ reason: 'Unregistered', timestamp: 1700000000123 });
    expect(parseErrorBody('{"reason":"Unregistered","timestamp":"1700000000123"}')).toEqual({ reason: 'Unregistered', timestamp: 1700000000123 });
    expect(parseErrorBody('{"reason":"BadDeviceToken"}')).toEqual({ reason: 'BadDeviceToken' });
  });
  it('never throws on garbage', () => {
    fc.assert(
      fc.property(fc.string(), (s) => {
        const r = parseErrorBody(s);
        return typeof r === 'object' && (r.reason === undefined || typeof r.reason === 'string');
      }),
    );
    expect(parseErrorBody('')).toEqual({});
    expect(parseErrorBody('null')).toEqual({});
    expect(parseErrorBody('{"reason":5}')).toEqual({});
  });
});

describe('classifyConnectError', () => {
  it('tls for handshake and certificate errors, connect otherwise', () => {
    const e = (code: string, message = code): Error => Object.assign(new Error(message), { code });
    expect(classifyConnectError(e('ERR_SSL_TLSV1_ALERT_UNKNOWN_CA'))).toBe('tls');
    expect(classifyConnectError(e('UNABLE_TO_VERIFY_LEAF_SIGNATURE'))).toBe('tls');
    expect(classifyConnectError(e('ERR_TLS_CERT_ALTNAME_INVALID'))).toBe('tls');
    expect(classifyConnectError(e('ECONNRESET', 'Client network socket disconnected before secure TLS connection was established'))).toBe('tls');
    expect(classifyConnectError(e('ECONNREFUSED'))).toBe('connect');
    expect(classifyConnectError(e('ENOTFOUND'))).toBe('connect');
    expect(classifyConnectError(e('ECONNRESET'))).toBe('connect');
    expect(classifyConnectError('weird')).toBe('connect');
  });
});

describe('provider tokens', () => {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
  const pem = privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();

  function decode(token: string): { header: unknown; claims: { iss: string; iat: number }; valid: boolean } {
    const [h, c, s] = token.split('.') as [string, string, string];
    return {
      header: JSON.parse(Buffer.from(h, 'base64url').toString()),
      claims: JSON.parse(Buffer.from(c, 'base64url').toString()) as { iss: string; iat: number },
      valid: verify('sha256', Buffer.from(`${h}.${c}`), { key: publicKey, dsaEncoding: 'ieee-p1363' }, Buffer.from(s, 'base64url')),
    };
  }

  it('signs ES256 with header {alg, kid} and claims {iss, iat}', () => {
    const t = signProviderToken(loadSigningKey(pem), 'KEY1234567', 'TEAM123456', 1_700_000_000);
    const d = decode(t);
    expect(d.header).toEqual({ alg: 'ES256', kid: 'KEY1234567' });
    expect(d.claims).toEqual({ iss: 'TEAM123456', iat: 1_700_000_000 });
    expect(d.valid).toBe(true);
  });

  it('refuses keys that are not P-256', () => {
    const p384 = generateKeyPairSync('ec', { namedCurve: 'secp384r1' }).privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    expect(() => loadSigningKey(p384)).toThrow(/P-256/);
    expect(() => loadSigningKey('-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----')).toThrow(/signing key/);
  });

  it('reuses the token for 50 minutes, then signs a new one', () => {
    let now = 1_700_000_000_000;
    const cache = new ProviderTokenCache({ signingKeyPem: pem, keyId: 'K', teamId: 'T' }, () => now);
    const first = cache.get();
    now += TOKEN_REFRESH_MS - 1;
    expect(cache.get()).toBe(first);
    now += 1;
    const second = cache.get();
    expect(second).not.toBe(first);
    expect(decode(second).claims.iat).toBe(Math.floor(now / 1000));
    expect(TOKEN_REFRESH_MS).toBeLessThan(60 * 60_000);
    expect(TOKEN_REFRESH_MS).toBeGreaterThanOrEqual(TOKEN_MIN_REFRESH_MS);
  });

  it('expire(): re-signs only if the token is at least 20 minutes old', () => {
    let now = 1_700_000_000_000;
    const cache = new ProviderTokenCache({ signingKeyPem: pem, keyId: 'K', teamId: 'T' }, () => now);
    const first = cache.get();
    now += TOKEN_MIN_REFRESH_MS - 1;
    expect(cache.expire()).toBe(false);
    expect(cache.get()).toBe(first);
    now += 1;
    expect(cache.expire()).toBe(true);
    expect(cache.get()).not.toBe(first);
  });
});

describe('goawayReasonLabel', () => {
  it('keeps Apple reasons, buckets the rest', () => {
    expect(goawayReasonLabel('Shutdown')).toBe('Shutdown');
    expect(goawayReasonLabel('BadCertificate')).toBe('BadCertificate');
    expect(goawayReasonLabel(undefined)).toBe('none');
    expect(goawayReasonLabel('x'.repeat(100))).toBe('other');
  });
});
