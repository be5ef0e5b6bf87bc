/**
 * A stand-in for Apple's historical PushCertRequest service (identity.apple.com/pushcert/
 * caservice/{new,renew}) on loopback, for tests of `xaps-proxy cert request|renew` and the
 * auto-renewer. It checks requests the way the real one had to be fed (see
 * src/cert/pushcert.ts): outer plist, SHA-1 signature by the vendor certificate of the
 * chain, inner plist, five SHA1withRSA CSRs with the expected subjects, and answers with
 * five certificates issued by a test CA for the CSRs' keys — the Mail one with
 * `UID=com.apple.mail.XServer.<uuid>` — or, when told to, with an error Status such as
 * Apple's -80010 refusal. Renewals keep the topic of the certificate being renewed.
 *
 * Error codes other than -80010 are this mock's own (Apple's others are not documented).
 * No test-framework imports: this compiles into dist/ with the rest of src/.
 */
import { createPublicKey, generateKeyPairSync, randomBytes, randomUUID, verify, X509Certificate } from 'node:crypto';
import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import forge from 'node-forge';
import * as plist from 'plist';
import { splitDer } from '../cert/x509.js';
import { createTestCa, issueServerCert, UID_OID, type TestCa } from './apns-certs.js';

/** Apple's answer since 2024-10-29 (freswa/dovecot-xaps-daemon#43). */
export const APPLE_REFUSAL = { errorCode: -80010, errorMessage: 'ServiceType is Invalid', errorDescription: 'ServiceType is Invalid' } as const;

export interface MockStatus {
  errorCode: number;
  errorMessage: string;
  errorDescription?: string;
}

const SERVICES = [
  { type: 'Service_Calendar', cn: 'com.apple.servermgrd.apns.calendar', topic: 'com.apple.calendar.XServer' },
  { type: 'Service_Contact', cn: 'com.apple.servermgrd.apns.contact', topic: 'com.apple.contact.XServer' },
  { type: 'Service_Mail', cn: 'com.apple.servermgrd.apns.mail', topic: 'com.apple.mail.XServer' },
  { type: 'Service_Mgmt', cn: 'com.apple.servermgrd.apns.mgmt', topic: 'com.apple.mgmt.XServer' },
  { type: 'Service_Alerts', cn: 'com.apple.server.apns.alerts', topic: 'com.apple.alerts.XServer' },
] as const;

const SHA1_WITH_RSA = '1.2.840.113549.1.1.5';
/** Apple marks production push certificates with this extension (Forward Email checks it). */
const APNS_PRODUCTION_OID = '1.2.840.113635.100.6.3.2';

// ---------------------------------------------------------------------------------------------
// Vendor material for tests (stands in for macOS Server's vendor certificates; never Apple's)

export interface TestVendorMaterial {
  /** The vendor signing certificate (PEM). */
  certPem: string;
  /** Its private key (PKCS#8 PEM). */
  keyPem: string;
  /** Vendor certificate followed by the CA certificate (PEM), as --cert-vendor-cert takes it. */
  chainPem: string;
  /** The same chain as concatenated DER (like macOS Server's `chain` files). */
  chainDer: Buffer;
  /** The CA that issued the vendor certificate (give it to the mock as `vendorCa`). */
  ca: TestCa;
}

export function createVendorMaterial(opts: { ca?: TestCa; commonName?: string } = {}): TestVendorMaterial {
  const ca = opts.ca ?? createTestCa('xaps-proxy Test Vendor CA');
  const keyPem = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
  const key = forge.pki.privateKeyFromPem(keyPem) as forge.pki.rsa.PrivateKey;
  const cert = forge.pki.createCertificate();
  cert.publicKey = forge.pki.setRsaPublicKey(key.n, key.e);
  cert.serialNumber = `01${randomBytes(8).toString('hex')}`;
  cert.validity.notBefore = new Date(Date.now() - 86_400_000);
  cert.validity.notAfter = new Date(Date.now() + 3650 * 86_400_000);
  cert.setSubject([
    { name: 'commonName', value: opts.commonName ?? 'xaps-proxy Test Vendor: servermgrd' },
    { name: 'organizationName', value: 'xaps-proxy tests' },
  ]);
  cert.setIssuer(forge.pki.certificateFromPem(ca.certPem).subject.attributes);
  cert.setExtensions([{ name: 'basicConstraints', cA: false }, { name: 'keyUsage', digitalSignature: true }]);
  cert.sign(forge.pki.privateKeyFromPem(ca.keyPem), forge.md.sha256.create());
  const certPem = forge.pki.certificateToPem(cert);
  const chainPem = `${certPem.trimEnd()}\n${ca.certPem.trimEnd()}\n`;
  const chainDer = Buffer.concat([new X509Certificate(certPem).raw, new X509Certificate(ca.certPem).raw]);
  return { certPem, keyPem, chainPem, chainDer, ca };
}

// ---------------------------------------------------------------------------------------------
// The service

export interface MockCertServiceOptions {
  /** Serve HTTPS with a certificate from a test CA (its PEM is `ca`). Default false (HTTP). */
  tls?: boolean;
  /** CA issuing the push certificates (default: a new test CA). */
  issuer?: TestCa;
  /** When set, the vendor certificate must be issued by this CA. */
  vendorCa?: TestCa;
  /** Answer every valid request with this error Status (e.g. APPLE_REFUSAL). */
  refusal?: MockStatus | null;
  /** Validity of issued certificates (default 365 days). */
  validityDays?: number;
  /** Send the answer with malformed header lines (as Apple's service did). */
  malformedHeaders?: boolean;
}

export interface RecordedCsr {
  certRequestNo: number;
  serviceType: string;
  commonName: string | undefined;
  country: string | undefined;
  signatureOid: string;
  signatureValid: boolean;
  keyBits: number;
  serial: string | undefined;
  description: string | undefined;
}

export interface RecordedPushCertRequest {
  path: string;
  contentType: string | undefined;
  userAgent: string | undefined;
  signatureValid: boolean;
  vendorSubject: string | undefined;
  accountName: string | undefined;
  passwordHash: string | undefined;
  csrs: RecordedCsr[];
  status: { errorCode: number; errorMessage: string; errorDescription: string };
  /** Issued certificates in answer order (empty on errors). */
  issued: Array<{ serviceType: string; certPem: string; topic: string; serial: string }>;
}

export interface MockCertService {
  /** …/pushcert/caservice/new (what --cert-service-url takes). */
  readonly url: string;
  readonly renewUrl: string;
  readonly port: number;
  /** PEM of the CA of the HTTPS certificate (tls only). */
  readonly ca: string | undefined;
  /** CA that issues the push certificates. */
  readonly issuer: TestCa;
  readonly requests: RecordedPushCertRequest[];
  setRefusal(refusal: MockStatus | null): void;
  /** Validity of certificates issued from now on. */
  setValidityDays(days: number): void;
  close(): Promise<void>;
}

class Reject extends Error {
  constructor(
    readonly errorCode: number,
    message: string,
    readonly description = message,
  ) {
    super(message);
  }
}

function record(v: unknown): Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof Uint8Array) ? (v as Record<string, unknown>) : {};
}

function bytes(v: unknown): Buffer | undefined {
  return v instanceof Uint8Array ? Buffer.from(v) : undefined;
}

function normSerial(s: string): string {
  return s.trim().toUpperCase().replace(/^0+/, '');
}

export async function startMockCertService(opts: MockCertServiceOptions = {}): Promise<MockCertService> {
  const issuer = opts.issuer ?? createTestCa('xaps-proxy Test Apple Application Integration CA');
  const issuerCert = forge.pki.certificateFromPem(issuer.certPem);
  const issuerKey = forge.pki.privateKeyFromPem(issuer.keyPem);
  let validityDays = opts.validityDays ?? 365;
  let refusal: MockStatus | null = opts.refusal ?? null;
  const requests: RecordedPushCertRequest[] = [];
  /** serial → uuid of certificates issued here (renewals keep the topic). */
  const issuedUuids = new Map<string, string>();

  let tlsCa: TestCa | undefined;
  let server: Server;
  const handler = (req: IncomingMessage, res: ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const path = (req.url ?? '/').split('?')[0]!;
      if (req.method !== 'POST' || !/\/caservice\/(new|renew)$/.test(path)) {
        res.writeHead(404, { 'Content-Type': 'text/plain' }).end('not found\n');
        return;
      }
      const rec: RecordedPushCertRequest = {
        path,
        contentType: req.headers['content-type'],
        userAgent: req.headers['user-agent'],
        signatureValid: false,
        vendorSubject: undefined,
        accountName: undefined,
        passwordHash: undefined,
        csrs: [],
        status: { errorCode: 0, errorMessage: '', errorDescription: '' },
        issued: [],
      };
      requests.push(rec);
      let certificates: Array<{ Certificate: string }> = [];
      try {
        certificates = handle(rec, body, path.endsWith('/renew'));
      } catch (err) {
        const e = err instanceof Reject ? err : new Reject(-80099, 'Internal error', (err as Error).message);
        rec.status = { errorCode: e.errorCode, errorMessage: e.message, errorDescription: e.description };
        rec.issued = [];
      }
      const answer = plist.build({
        Header: {
          ClientApplicationCredential: '1',
          ClientApplicationName: 'XServer',
          ClientIPAddress: '1',
          ClientOSName: 'MAC OSX',
          ClientOSVersion: '2.1',
          LanguagePreference: '1',
          TransactionId: '1',
        },
        Response: {
          Status: { ErrorDescription: rec.status.errorDescription, ErrorMessage: rec.status.errorMessage, ErrorCode: rec.status.errorCode },
          ...(certificates.length ? { Certificates: certificates } : {}),
        },
      });
      const payload = Buffer.from(answer, 'utf8');
      if (opts.malformedHeaders) {
        // What strict HTTP parsers choke on: a header name with a space, a line without a
        // colon, a control character in a value.
        const head =
          'HTTP/1.1 200 OK\r\n' +
          'Content-Type: text/x-xml-plist\r\n' +
          'X Apple Broken Header: yes\r\n' +
          'this line has no colon\r\n' +
          'X-Apple-Odd: a\x01b\r\n' +
          `Content-Length: ${payload.length}\r\n` +
          'Connection: close\r\n\r\n';
        req.socket.end(Buffer.concat([Buffer.from(head, 'latin1'), payload]));
        return;
      }
      res.writeHead(200, { 'Content-Type': 'text/x-xml-plist', 'Content-Length': payload.length, Connection: 'close' }).end(payload);
    });
  };

  function handle(rec: RecordedPushCertRequest, body: Buffer, renewal: boolean): Array<{ Certificate: string }> {
    let outer: Record<string, unknown>;
    try {
      outer = record(plist.parse(body.toString('utf8')));
    } catch {
      throw new Reject(-80000, 'Malformed request', 'the body is not an XML plist');
    }
    const chain = bytes(outer.PushCertCertificateChain);
    const innerBytes = bytes(outer.PushCertRequestPlist);
    const signature = bytes(outer.PushCertSignature);
    if (!chain || !innerBytes || !signature || outer.PushCertSignedRequest !== true) {
      throw new Reject(-80001, 'Malformed request', 'PushCertCertificateChain, PushCertRequestPlist, PushCertSignature (data) and PushCertSignedRequest (true) are required');
    }
    let vendor: X509Certificate;
    try {
      vendor = new X509Certificate(splitDer(chain)[0]!);
    } catch {
      throw new Reject(-80002, 'Invalid certificate chain');
    }
    rec.vendorSubject = vendor.subject.split('\n').join(', ');
    rec.signatureValid = verify('sha1', innerBytes, vendor.publicKey, signature);
    if (!rec.signatureValid) throw new Reject(-80003, 'Signature is invalid', 'PushCertSignature does not verify with the vendor certificate (RSA SHA-1)');
    if (opts.vendorCa && !vendor.verify(createPublicKey(opts.vendorCa.certPem))) {
      throw new Reject(-80004, 'Vendor certificate is not trusted');
    }
    let inner: Record<string, unknown>;
    try {
      inner = record(plist.parse(innerBytes.toString('utf8')));
    } catch {
      throw new Reject(-80005, 'Malformed request', 'PushCertRequestPlist is not an XML plist');
    }
    const header = record(inner.Header);
    const request = record(inner.Request);
    const user = record(request.User);
    rec.accountName = typeof user.AccountName === 'string' ? user.AccountName : undefined;
    rec.passwordHash = typeof user.PasswordHash === 'string' ? user.PasswordHash : undefined;
    if (header.ClientApplicationName !== 'XServer') throw new Reject(-80006, 'Invalid header', 'ClientApplicationName must be XServer');
    if (request.ProfileType !== 'Production' || request.RequesterType !== 'XServer') {
      throw new Reject(-80006, 'Invalid request', 'ProfileType Production and RequesterType XServer are required');
    }
    if (!rec.accountName || !rec.passwordHash || !/^[0-9a-f]{64}$/i.test(rec.passwordHash)) {
      throw new Reject(-80007, 'Invalid user', 'User.AccountName and User.PasswordHash (hex SHA-256) are required');
    }
    const list = Array.isArray(request.CertRequestList) ? request.CertRequestList.map(record) : [];
    if (list.length !== SERVICES.length) throw new Reject(-80008, 'Invalid CertRequestList', `expected ${SERVICES.length} entries, got ${list.length}`);
    const csrs: forge.pki.CertificateSigningRequest[] = [];
    list.forEach((entry, i) => {
      const svc = SERVICES[i]!;
      let csr: forge.pki.CertificateSigningRequest;
      try {
        const text = String(entry.CSR ?? '');
        csr = text.includes('-----BEGIN')
          ? forge.pki.certificationRequestFromPem(text)
          : (forge.pki.certificationRequestFromAsn1(forge.asn1.fromDer(Buffer.from(text, 'base64').toString('binary'))) as forge.pki.CertificateSigningRequest);
      } catch {
        throw new Reject(-80009, 'Invalid CSR', `entry ${i}: the CSR cannot be parsed`);
      }
      const cn = csr.subject.getField('CN')?.value as string | undefined;
      const c = csr.subject.getField('C')?.value as string | undefined;
      const info: RecordedCsr = {
        certRequestNo: Number(entry.CertRequestNo),
        serviceType: String(entry.ServiceType ?? ''),
        commonName: cn,
        country: c,
        signatureOid: String(csr.siginfo.algorithmOid ?? (csr as unknown as { signatureOid?: string }).signatureOid ?? ''),
        signatureValid: (() => {
          try {
            return csr.verify();
          } catch {
            return false;
          }
        })(),
        keyBits: (csr.publicKey as forge.pki.rsa.PublicKey).n.bitLength(),
        serial: typeof entry.CertificateSerialNumber === 'string' ? entry.CertificateSerialNumber : undefined,
        description: typeof entry.Description === 'string' ? entry.Description : undefined,
      };
      rec.csrs.push(info);
      if (info.serviceType !== svc.type) {
        // What Apple has answered since 2024-10-29 for every ServiceType; here only for wrong ones.
        throw new Reject(APPLE_REFUSAL.errorCode, APPLE_REFUSAL.errorMessage, `entry ${i}: expected ${svc.type}, got ${info.serviceType}`);
      }
      if (info.certRequestNo !== i) throw new Reject(-80008, 'Invalid CertRequestList', `entry ${i}: CertRequestNo is ${info.certRequestNo}`);
      if (cn !== svc.cn || c !== 'US') throw new Reject(-80009, 'Invalid CSR', `entry ${i}: subject must be CN=${svc.cn}, C=US`);
      if (!info.signatureValid || info.signatureOid !== SHA1_WITH_RSA) throw new Reject(-80009, 'Invalid CSR', `entry ${i}: expected a valid SHA1withRSA signature`);
      if (info.keyBits !== 2048) throw new Reject(-80009, 'Invalid CSR', `entry ${i}: expected an RSA-2048 key`);
      if (renewal && svc.type === 'Service_Mail' && !info.serial) {
        throw new Reject(-80011, 'Invalid renewal', 'the Mail entry needs CertificateSerialNumber');
      }
      if (renewal && info.serial && !issuedUuids.has(normSerial(info.serial))) {
        throw new Reject(-80012, 'Unknown certificate', `entry ${i}: no certificate with serial ${info.serial}`);
      }
      csrs.push(csr);
    });
    if (refusal) {
      throw new Reject(refusal.errorCode, refusal.errorMessage, refusal.errorDescription ?? refusal.errorMessage);
    }
    const batchUuid = randomUUID().toUpperCase();
    return csrs.map((csr, i) => {
      const svc = SERVICES[i]!;
      const old = rec.csrs[i]!.serial;
      const uuid = (old && issuedUuids.get(normSerial(old))) || batchUuid;
      const topic = `${svc.topic}.${uuid}`;
      const cert = forge.pki.createCertificate();
      cert.publicKey = csr.publicKey!;
      cert.serialNumber = `01${randomBytes(8).toString('hex')}`;
      cert.validity.notBefore = new Date(Date.now() - 3_600_000);
      cert.validity.notAfter = new Date(Date.now() + validityDays * 86_400_000);
      cert.setSubject([
        { type: UID_OID, value: topic, valueTagClass: forge.asn1.Type.UTF8 as unknown as forge.asn1.Class },
        { name: 'commonName', value: `APSP:${uuid}` },
        { name: 'countryName', value: 'US' },
      ]);
      cert.setIssuer(issuerCert.subject.attributes);
      cert.setExtensions([
        { name: 'basicConstraints', cA: false },
        { name: 'keyUsage', digitalSignature: true, keyEncipherment: true },
        { name: 'extKeyUsage', clientAuth: true },
        { id: APNS_PRODUCTION_OID, critical: false, value: forge.asn1.toDer(forge.asn1.create(forge.asn1.Class.UNIVERSAL, forge.asn1.Type.NULL, false, '')).getBytes() },
      ]);
      cert.sign(issuerKey, forge.md.sha256.create());
      const certPem = forge.pki.certificateToPem(cert);
      const serial = normSerial(new X509Certificate(certPem).serialNumber);
      issuedUuids.set(serial, uuid);
      rec.issued.push({ serviceType: svc.type, certPem, topic, serial });
      return { Certificate: certPem };
    });
  }

  if (opts.tls) {
    tlsCa = createTestCa('xaps-proxy Test Cert Service CA');
    const serverCert = issueServerCert(tlsCa, ['localhost', '127.0.0.1']);
    server = createHttpsServer({ cert: serverCert.certPem, key: serverCert.keyPem }, handler);
  } else {
    server = createHttpServer(handler);
  }
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as AddressInfo).port;
  const base = `${opts.tls ? 'https' : 'http'}://127.0.0.1:${port}/pushcert/caservice`;
  return {
    url: `${base}/new`,
    renewUrl: `${base}/renew`,
    port,
    ca: tlsCa?.certPem,
    issuer,
    requests,
    setRefusal(r) {
      refusal = r;
    },
    setValidityDays(days) {
      validityDays = days;
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
