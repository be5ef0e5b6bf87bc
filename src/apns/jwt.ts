/**
 * APNs provider tokens (token-based authentication): an ES256 JWT signed with the
 * team's .p8 key, header {alg:'ES256', kid}, claims {iss: teamId, iat}. Apple rejects
 * tokens older than an hour (403 ExpiredProviderToken) and refreshing more often than
 * every 20 minutes (429 TooManyProviderTokenUpdates), so one token is kept and
 * re-signed every 50 minutes.
 */
import { createPrivateKey, sign, type KeyObject } from 'node:crypto';

/** Re-sign after this long (Apple: tokens are valid for 1 h). */
export const TOKEN_REFRESH_MS = 50 * 60_000;
/** Never re-sign sooner than this (Apple: not more often than every 20 min). */
export const TOKEN_MIN_REFRESH_MS = 20 * 60_000;

export interface TokenCredentials {
  signingKeyPem: string;
  keyId: string;
  teamId: string;
}

/** Loads a .p8 (PKCS#8 PEM) P-256 key; throws a plain Error when it is not one. */
export function loadSigningKey(pem: string): KeyObject {
  let key: KeyObject;
  try {
    key = createPrivateKey(pem);
  } catch (err) {
    throw new Error(`APNs signing key is not a readable PEM private key: ${(err as Error).message}`, { cause: err });
  }
  const curve = key.asymmetricKeyDetails?.namedCurve;
  if (key.asymmetricKeyType !== 'ec' || (curve !== undefined && curve !== 'prime256v1')) {
    throw new Error(`APNs signing key must be an EC P-256 key (got ${key.asymmetricKeyType ?? 'unknown'}${curve ? ` ${curve}` : ''})`);
  }
  return key;
}

/** One ES256 provider token. `issuedAtSec` is UNIX seconds. */
export function signProviderToken(key: KeyObject, keyId: string, teamId: string, issuedAtSec: number): string {
  const header = Buffer.from(JSON.stringify({ alg: 'ES256', kid: keyId })).toString('base64url');
  const claims = Buffer.from(JSON.stringify({ iss: teamId, iat: issuedAtSec })).toString('base64url');
  const input = `${header}.${claims}`;
  const signature = sign('sha256', Buffer.from(input), { key, dsaEncoding: 'ieee-p1363' });
  return `${input}.${signature.toString('base64url')}`;
}

/** The current provider token, re-signed every `refreshMs` (default 50 min). */
export class ProviderTokenCache {
  private readonly key: KeyObject;
  private token: string | undefined;
  private issuedAt = 0;

  constructor(
    private readonly credentials: TokenCredentials,
    private readonly now: () => number = Date.now,
    private readonly refreshMs: number = TOKEN_REFRESH_MS,
  ) {
    if (!credentials.keyId) throw new Error('APNs token authentication needs a key id');
    if (!credentials.teamId) throw new Error('APNs token authentication needs a team id');
    this.key = loadSigningKey(credentials.signingKeyPem);
  }

  /** The token to send as `authorization: bearer <token>`. */
  get(): string {
    const now = this.now();
    if (this.token === undefined || now - this.issuedAt >= this.refreshMs) {
      this.issuedAt = now;
      this.token = signProviderToken(this.key, this.credentials.keyId, this.credentials.teamId, Math.floor(now / 1000));
    }
    return this.token;
  }

  /**
   * APNs answered ExpiredProviderToken: sign a new token next time, unless the current
   * one is younger than 20 minutes (refreshing sooner is itself an error). Returns
   * whether the token will be re-signed.
   */
  expire(): boolean {
    if (this.token === undefined) return true;
    if (this.now() - this.issuedAt < TOKEN_MIN_REFRESH_MS) return false;
    this.token = undefined;
    return true;
  }

  /** When the current token was signed (ms since epoch), 0 before the first. */
  get issuedAtMs(): number {
    return this.token === undefined ? 0 : this.issuedAt;
  }
}
