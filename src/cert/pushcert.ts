/**
 * The historical macOS Server "PushCertRequest" flow (notes §c; xapsd
 * pkg/apple_xserver_certs at 4f0809a^, Forward Email get-apn-certs.js, scintill's Makefile):
 *
 * - five RSA-2048 keys and SHA1withRSA CSRs, subject C=US + CN=com.apple.servermgrd.apns.
 *   {calendar,contact,mail,mgmt} / com.apple.server.apns.alerts;
 * - inner plist: Header + Request{CertRequestList[5], ProfileType Production, RequesterType
 *   XServer, User{AccountName, PasswordHash = hex SHA-256 of the password}};
 * - outer plist: PushCertCertificateChain (vendor chain, DER), PushCertRequestPlist (inner
 *   XML), PushCertSignature (RSA PKCS#1 v1.5 SHA-1 over the inner XML, vendor key),
 *   PushCertSignedRequest true;
 * - POST …/caservice/new (or /renew), Content-Type text/x-xml-plist;
 * - answer: Response.Status{ErrorCode, ErrorMessage, ErrorDescription} and
 *   Response.Certificates[i].Certificate (PEM), index 2 = Mail.
 *
 * Apple has refused these requests since 2024-10-29 (-80010 "ServiceType is Invalid").
 * The vendor signing material is the operator's to supply; none ships with xaps-proxy.
 */
import { createHash, createPrivateKey, sign, X509Certificate, type KeyObject } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import * as plist from 'plist';
import { createCsrPem, generateRsaKeyPem } from './csr.js';
import { CertificateError, describeFsError, PushCertRefusedError } from './errors.js';
import { fileExists, KEY_FILE_MODE, CERT_FILE_MODE, writeFileAtomic } from './files.js';
import { postOnce } from './http.js';
import { certificateForKey } from './load.js';
import { KEY_LABELS, looksLikePem, pemBlocks, splitDer } from './x509.js';

export const DEFAULT_CERT_SERVICE_URL = 'https://identity.apple.com/pushcert/caservice/new';
export const PUSHCERT_CONTENT_TYPE = 'text/x-xml-plist';
/** What macOS Server's servermgrd sent (xapsd, Forward Email). */
export const PUSHCERT_USER_AGENT = 'Servermgrd%20Plugin/6.0 CFNetwork/811.11 Darwin/16.7.0 (x86_64)';

export const PUSH_SERVICES = [
  { name: 'Calendar', commonName: 'com.apple.servermgrd.apns.calendar', file: 'calendar' },
  { name: 'Contact', commonName: 'com.apple.servermgrd.apns.contact', file: 'contact' },
  { name: 'Mail', commonName: 'com.apple.servermgrd.apns.mail', file: 'mail' },
  { name: 'Mgmt', commonName: 'com.apple.servermgrd.apns.mgmt', file: 'mgmt' },
  { name: 'Alerts', commonName: 'com.apple.server.apns.alerts', file: 'alerts' },
] as const;
export type PushServiceName = (typeof PUSH_SERVICES)[number]['name'];
/** Index of the Mail certificate in CertRequestList and Response.Certificates. */
export const MAIL_INDEX = 2;

/** The URL for `mode`: the configured …/new URL, with its last segment `new` → `renew` for renewals. */
export function serviceUrlFor(mode: 'new' | 'renew', url: string): string {
  if (mode === 'new') return url;
  const u = new URL(url);
  u.pathname = u.pathname.replace(/\/new(\/?)$/, '/renew$1');
  return u.toString();
}

/** PasswordHash: hex SHA-256 of the Apple ID password. */
export function passwordHash(password: string): string {
  return createHash('sha256').update(password, 'utf8').digest('hex');
}

// ---------------------------------------------------------------------------------------------
// Vendor signing material (operator-supplied)

export interface VendorMaterial {
  /** The chain as sent: concatenated DER certificates, signing certificate first. */
  chainDer: Buffer;
  key: KeyObject;
  /** Subject of the signing certificate (for messages). */
  subject: string;
}

/** Read the vendor certificate (chain; PEM or DER) and its private key (PEM or DER) and check they match. */
export async function loadVendorMaterial(certPath: string, keyPath: string): Promise<VendorMaterial> {
  const read = async (p: string) => {
    try {
      return await readFile(p);
    } catch (err) {
      throw new CertificateError(`cannot read ${p}: ${describeFsError(err)}`, { code: 'unreadable', file: p, cause: err });
    }
  };
  const certBuf = await read(certPath);
  let certs: X509Certificate[];
  try {
    certs = looksLikePem(certBuf)
      ? pemBlocks(certBuf.toString('utf8'))
          .filter((b) => b.label === 'CERTIFICATE')
          .map((b) => new X509Certificate(b.text))
      : splitDer(certBuf).map((d) => new X509Certificate(d));
  } catch (err) {
    throw new CertificateError(`${certPath}: not a certificate chain (PEM or DER): ${(err as Error).message}`, {
      code: 'not-a-certificate',
      file: certPath,
      cause: err,
    });
  }
  if (certs.length === 0) throw new CertificateError(`${certPath}: no certificate found`, { code: 'not-a-certificate', file: certPath });
  const keyBuf = await read(keyPath);
  let key: KeyObject;
  try {
    if (looksLikePem(keyBuf)) {
      const block = pemBlocks(keyBuf.toString('utf8')).find((b) => KEY_LABELS.has(b.label));
      if (!block) throw new Error('no private key block');
      key = createPrivateKey(block.text);
    } else {
      try {
        key = createPrivateKey({ key: keyBuf, format: 'der', type: 'pkcs1' });
      } catch {
        key = createPrivateKey({ key: keyBuf, format: 'der', type: 'pkcs8' });
      }
    }
  } catch (err) {
    throw new CertificateError(`${keyPath}: not a valid private key (PEM or DER)`, { code: 'bad-key', file: keyPath, cause: err });
  }
  if (!certs[0]!.checkPrivateKey(key)) {
    throw new CertificateError(`${keyPath}: the vendor key does not match the vendor certificate in ${certPath}`, {
      code: 'key-mismatch',
      file: keyPath,
    });
  }
  return { chainDer: Buffer.concat(certs.map((c) => c.raw)), key, subject: certs[0]!.subject.split('\n').join(', ') };
}

// ---------------------------------------------------------------------------------------------
// Request

export interface ServiceKey {
  keyPem: string;
  /** Serial of the certificate being renewed (hex). */
  serial?: string;
}

export interface PushCertRequestInput {
  appleId: string;
  /** Hex SHA-256 of the Apple ID password (see passwordHash). */
  passwordHash: string;
  /** One key per service, in PUSH_SERVICES order. */
  keys: readonly ServiceKey[];
  /** Host name in the Descriptions (default: this machine's). */
  description?: string;
}

/** The inner PushCertRequestPlist (XML) with five SHA1withRSA CSRs. */
export function buildInnerPlist(input: PushCertRequestInput): string {
  if (input.keys.length !== PUSH_SERVICES.length) throw new Error('buildInnerPlist: one key per service is needed');
  const host = input.description ?? hostname();
  const CertRequestList = PUSH_SERVICES.map((svc, i) => {
    const k = input.keys[i]!;
    return {
      CSR: createCsrPem({ keyPem: k.keyPem, hash: 'sha1', subject: [{ short: 'CN', value: svc.commonName }, { short: 'C', value: 'US' }] }),
      CertRequestNo: i,
      ...(k.serial ? { CertificateSerialNumber: k.serial } : {}),
      Description: `${host} - apns:com.apple.${svc.file}`,
      ServiceType: `Service_${svc.name}`,
    };
  });
  return plist.build(
    {
      Header: {
        ClientApplicationCredential: '1',
        ClientApplicationName: 'XServer',
        ClientIPAddress: '1',
        ClientOSName: 'MAC OSX',
        ClientOSVersion: '2.1',
        LanguagePreference: '1',
        TransactionId: '1',
        Version: '1',
      },
      Request: {
        CertRequestList,
        ProfileType: 'Production',
        RequesterType: 'XServer',
        User: { AccountName: input.appleId, PasswordHash: input.passwordHash },
      },
    },
    { pretty: true },
  );
}

/** The outer, signed plist: the request body. */
export function buildSignedRequest(innerXml: string, vendor: VendorMaterial): string {
  const innerBytes = Buffer.from(innerXml, 'utf8');
  return plist.build({
    PushCertCertificateChain: vendor.chainDer,
    PushCertRequestPlist: innerBytes,
    // RSA PKCS#1 v1.5 with SHA-1 over exactly the bytes sent as PushCertRequestPlist.
    PushCertSignature: sign('sha1', innerBytes, vendor.key),
    PushCertSignedRequest: true,
  });
}

// ---------------------------------------------------------------------------------------------
// Response

export interface PushCertStatus {
  errorCode: number;
  errorMessage: string;
  errorDescription: string;
}

export interface PushCertResponse {
  status: PushCertStatus;
  /** Response.Certificates[i].Certificate, in order (PEM). */
  certificates: string[];
}

function asRecord(v: unknown): Record<string, unknown> | undefined {
  return v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof Uint8Array) && !(v instanceof Date)
    ? (v as Record<string, unknown>)
    : undefined;
}

export function parsePushCertResponse(body: string | Buffer): PushCertResponse {
  let root: unknown;
  try {
    root = plist.parse(typeof body === 'string' ? body : body.toString('utf8'));
  } catch (err) {
    throw new CertificateError(`the certificate service answered something that is not a plist (${(err as Error).message.split('\n')[0]})`, {
      code: 'service',
      cause: err,
    });
  }
  const response = asRecord(asRecord(root)?.Response);
  const status = asRecord(response?.Status);
  if (!response || !status) throw new CertificateError('the certificate service answer has no Response.Status', { code: 'service' });
  const text = (v: unknown) => (typeof v === 'string' ? v : v === undefined || v === null ? '' : String(v));
  const code = Number(status.ErrorCode ?? 0);
  const certificates = (Array.isArray(response.Certificates) ? response.Certificates : []).map((c) => {
    const pem = asRecord(c)?.Certificate;
    if (typeof pem === 'string') return pem;
    if (pem instanceof Uint8Array) return Buffer.from(pem).toString('utf8');
    return '';
  });
  return {
    status: {
      errorCode: Number.isFinite(code) ? code : -1,
      errorMessage: text(status.ErrorMessage),
      errorDescription: text(status.ErrorDescription),
    },
    certificates,
  };
}

// ---------------------------------------------------------------------------------------------
// The whole exchange

export interface PushCertExchangeOptions {
  mode: 'new' | 'renew';
  /** The …/caservice/new URL (renewals go to …/renew). Default Apple's. */
  serviceUrl?: string;
  /** PEM CA(s) for the service (default: system trust store). */
  ca?: string;
  timeoutMs?: number;
  appleId: string;
  /** Hex SHA-256 of the password (passwordHash()). */
  passwordHash: string;
  vendor: VendorMaterial;
  /** Keys (and serials, for renewal) to reuse, by service; missing ones are generated. */
  keys?: Partial<Record<PushServiceName, ServiceKey>>;
  description?: string;
}

export interface IssuedService {
  service: PushServiceName;
  keyPem: string;
  /** The certificate issued for this key (PEM), when the answer held one. */
  certPem: string | undefined;
}

export interface PushCertIssue {
  services: IssuedService[];
  mail: { certPem: string; keyPem: string };
}

/**
 * Send one PushCertRequest and return the issued certificates with their keys. Never
 * retries. Refusals: PushCertRefusedError; transport/format problems: CertificateError.
 */
export async function requestPushCertificates(opts: PushCertExchangeOptions): Promise<PushCertIssue> {
  const keys: ServiceKey[] = [];
  for (const svc of PUSH_SERVICES) keys.push(opts.keys?.[svc.name] ?? { keyPem: await generateRsaKeyPem(2048) });
  const inner = buildInnerPlist({
    appleId: opts.appleId,
    passwordHash: opts.passwordHash,
    keys,
    ...(opts.description !== undefined ? { description: opts.description } : {}),
  });
  const body = buildSignedRequest(inner, opts.vendor);
  const url = serviceUrlFor(opts.mode, opts.serviceUrl ?? DEFAULT_CERT_SERVICE_URL);
  const answer = await postOnce(url, body, {
    headers: {
      'Content-Type': PUSHCERT_CONTENT_TYPE,
      'User-Agent': PUSHCERT_USER_AGENT,
      Accept: '*/*',
      'Accept-Language': 'en-us',
    },
    ...(opts.ca !== undefined ? { ca: opts.ca } : {}),
    ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}),
  });
  let parsed: PushCertResponse | undefined;
  try {
    parsed = parsePushCertResponse(answer.body);
  } catch (err) {
    if (answer.status === 200) throw err;
  }
  if (parsed && parsed.status.errorCode !== 0) throw new PushCertRefusedError(parsed.status);
  if (answer.status !== 200 || !parsed) {
    throw new CertificateError(`the certificate service ${new URL(url).origin} answered HTTP ${answer.status}`, { code: 'service' });
  }
  const certs = parsed.certificates.map((pem) => {
    try {
      return pem ? new X509Certificate(pem) : undefined;
    } catch {
      return undefined;
    }
  });
  const present = certs.filter((c): c is X509Certificate => c !== undefined);
  const services: IssuedService[] = PUSH_SERVICES.map((svc, i) => {
    const key = createPrivateKey(keys[i]!.keyPem);
    // Apple's order (index 2 = Mail), but only if the certificate is for our key.
    const atIndex = certs[i];
    const cert = atIndex && safeCheck(atIndex, key) ? atIndex : certificateForKey(present, key);
    return { service: svc.name, keyPem: keys[i]!.keyPem, certPem: cert?.toString() };
  });
  const mail = services[MAIL_INDEX]!;
  if (!mail.certPem) {
    throw new CertificateError(
      `the certificate service answered without a certificate for the Mail key (${parsed.certificates.length} certificate(s) in the answer)`,
      { code: 'service' },
    );
  }
  return { services, mail: { certPem: mail.certPem, keyPem: mail.keyPem } };
}

function safeCheck(cert: X509Certificate, key: KeyObject): boolean {
  try {
    return cert.checkPrivateKey(key);
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Files of a certificate set: DIR/mail.pem + DIR/mail.key (what the proxy uses), and the
// four other services' certificates and keys next to them (kept for renewal, which sends
// all five with their old serials).

export function serviceFiles(dir: string, service: PushServiceName): { certPath: string; keyPath: string } {
  const file = PUSH_SERVICES.find((s) => s.name === service)!.file;
  return { certPath: join(dir, `${file}.pem`), keyPath: join(dir, `${file}.key`) };
}

/** Keys and serials of the non-Mail services stored in `dir` (for a renewal). */
export async function readCompanionKeys(dir: string): Promise<Partial<Record<PushServiceName, ServiceKey>>> {
  const out: Partial<Record<PushServiceName, ServiceKey>> = {};
  for (const svc of PUSH_SERVICES) {
    if (svc.name === 'Mail') continue;
    const { certPath, keyPath } = serviceFiles(dir, svc.name);
    if (!(await fileExists(keyPath))) continue;
    try {
      const keyPem = await readFile(keyPath, 'utf8');
      createPrivateKey(keyPem);
      let serial: string | undefined;
      if (await fileExists(certPath)) {
        const cert = new X509Certificate(await readFile(certPath));
        if (cert.checkPrivateKey(createPrivateKey(keyPem))) serial = cert.serialNumber.toUpperCase();
      }
      out[svc.name] = serial ? { keyPem, serial } : { keyPem };
    } catch {
      // unreadable companion: a fresh key is generated for that service
    }
  }
  return out;
}

/** Store the non-Mail services' certificates and keys in `dir` (the Mail one is written by the caller). */
export async function writeCompanionFiles(dir: string, issue: PushCertIssue): Promise<string[]> {
  const written: string[] = [];
  for (const s of issue.services) {
    if (s.service === 'Mail' || !s.certPem) continue;
    const { certPath, keyPath } = serviceFiles(dir, s.service);
    await writeFileAtomic(keyPath, s.keyPem, KEY_FILE_MODE);
    await writeFileAtomic(certPath, s.certPem, CERT_FILE_MODE);
    written.push(keyPath, certPath);
  }
  return written;
}

