/**
 * RSA keys and PKCS#10 certificate signing requests: SHA-256 for the developer-portal
 * route (`cert csr`), SHA-1 for the historical PushCertRequest flow (what macOS Server sent).
 */
import { generateKeyPair } from 'node:crypto';
import { promisify } from 'node:util';
import forge from 'node-forge';
import { CertificateError } from './errors.js';
import { UID_OID } from './x509.js';

const generateKeyPairAsync = promisify(generateKeyPair);

/** A new RSA key (default 2048 bits) as PKCS#8 PEM. Async: does not block the event loop. */
export async function generateRsaKeyPem(bits = 2048): Promise<string> {
  const { privateKey } = await generateKeyPairAsync('rsa', {
    modulusLength: bits,
    publicKeyEncoding: { type: 'spki', format: 'pem' },
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
  });
  return privateKey;
}

export interface SubjectField {
  /** Short name as written in `/CN=…` (CN, O, OU, C, ST, L, emailAddress, UID). */
  short: string;
  value: string;
}

const NAMES: Record<string, string> = {
  CN: 'commonName',
  C: 'countryName',
  ST: 'stateOrProvinceName',
  L: 'localityName',
  O: 'organizationName',
  OU: 'organizationalUnitName',
  EMAILADDRESS: 'emailAddress',
  E: 'emailAddress',
};

/**
 * Parse an OpenSSL-style subject: `/CN=Mail push/O=Example Ltd/C=DE` (`\/` escapes a slash).
 * Throws CertificateError (bad-input) with a one-line reason.
 */
export function parseSubject(text: string): SubjectField[] {
  const s = text.trim();
  if (!s.startsWith('/')) throw new CertificateError(`--subject: expected /CN=…/O=…/C=…, got ${JSON.stringify(text)}`, { code: 'bad-input' });
  const parts: string[] = [];
  let cur = '';
  for (let i = 1; i < s.length; i++) {
    const ch = s[i]!;
    if (ch === '\\' && i + 1 < s.length) {
      cur += s[++i];
    } else if (ch === '/') {
      parts.push(cur);
      cur = '';
    } else cur += ch;
  }
  parts.push(cur);
  const fields: SubjectField[] = [];
  for (const part of parts) {
    if (part === '') continue;
    const eq = part.indexOf('=');
    if (eq <= 0) throw new CertificateError(`--subject: "${part}" is not NAME=VALUE`, { code: 'bad-input' });
    const short = part.slice(0, eq).trim();
    const value = part.slice(eq + 1).trim();
    if (!NAMES[short.toUpperCase()] && short.toUpperCase() !== 'UID') {
      throw new CertificateError(`--subject: unknown attribute "${short}" (use CN, O, OU, C, ST, L, emailAddress or UID)`, {
        code: 'bad-input',
      });
    }
    if (value === '') throw new CertificateError(`--subject: ${short} has no value`, { code: 'bad-input' });
    if (short.toUpperCase() === 'C' && !/^[A-Za-z]{2}$/.test(value)) {
      throw new CertificateError(`--subject: C must be a two-letter country code, got "${value}"`, { code: 'bad-input' });
    }
    fields.push({ short, value });
  }
  if (fields.length === 0) throw new CertificateError('--subject: no attributes', { code: 'bad-input' });
  return fields;
}

function forgeFields(fields: readonly SubjectField[]): forge.pki.CertificateField[] {
  const utf8 = forge.asn1.Type.UTF8 as unknown as forge.asn1.Class;
  return fields.map((f) => {
    const upper = f.short.toUpperCase();
    if (upper === 'UID') return { type: UID_OID, value: f.value, valueTagClass: utf8 };
    const name = NAMES[upper]!;
    if (name === 'countryName') return { name, value: f.value.toUpperCase() };
    if (name === 'emailAddress') return { name, value: f.value, valueTagClass: forge.asn1.Type.IA5STRING as unknown as forge.asn1.Class };
    return { name, value: f.value, valueTagClass: utf8 };
  });
}

/** A PKCS#10 CSR (PEM) for `keyPem` (RSA), signed with SHA-256 or SHA-1. */
export function createCsrPem(opts: { keyPem: string; subject: readonly SubjectField[]; hash: 'sha256' | 'sha1' }): string {
  const key = forge.pki.privateKeyFromPem(opts.keyPem) as forge.pki.rsa.PrivateKey;
  const csr = forge.pki.createCertificationRequest();
  csr.publicKey = forge.pki.setRsaPublicKey(key.n, key.e);
  csr.setSubject(forgeFields(opts.subject));
  csr.sign(key, opts.hash === 'sha1' ? forge.md.sha1.create() : forge.md.sha256.create());
  return forge.pki.certificationRequestToPem(csr);
}
