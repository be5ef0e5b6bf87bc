/**
 * Certificates for tests, the demo and benchmarks, shaped like Apple's: a test CA
 * standing in for Apple's, Mail push client certificates with the topic in the
 * subject UID (`UID=com.apple.mail.XServer.<uuid>, CN=APSP:<uuid>`) and/or in the
 * topics extension 1.2.840.113635.100.6.3.6, and a server certificate for a mock
 * APNs. Never used to talk to Apple.
 */
import { generateKeyPairSync, randomBytes, randomUUID } from 'node:crypto';
import forge from 'node-forge';

export const UID_OID = '0.9.2342.19200300.100.1.1';
export const TOPICS_OID = '1.2.840.113635.100.6.3.6';

export interface TestCa {
  certPem: string;
  keyPem: string;
}

export interface IssuedCert {
  certPem: string;
  keyPem: string;
  /** The topic the certificate carries (UID, else the first topics-extension entry). */
  topic: string;
  /** PKCS#12 (DER) holding certificate and key, protected by `p12Passphrase`. */
  p12: Buffer;
  p12Passphrase: string;
}

function rsaKeyPem(): string {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
}

function baseCert(keyPem: string, days: { notBefore: Date; notAfter: Date }): forge.pki.Certificate {
  const key = forge.pki.privateKeyFromPem(keyPem) as forge.pki.rsa.PrivateKey;
  const cert = forge.pki.createCertificate();
  cert.publicKey = forge.pki.setRsaPublicKey(key.n, key.e);
  cert.serialNumber = `01${randomBytes(8).toString('hex')}`;
  cert.validity.notBefore = days.notBefore;
  cert.validity.notAfter = days.notAfter;
  return cert;
}

export function createTestCa(commonName = 'xaps-proxy Test Root CA'): TestCa {
  const keyPem = rsaKeyPem();
  const cert = baseCert(keyPem, { notBefore: new Date(Date.now() - 86_400_000), notAfter: new Date(Date.now() + 3650 * 86_400_000) });
  const subject = [{ name: 'commonName', value: commonName }, { name: 'organizationName', value: 'xaps-proxy tests' }];
  cert.setSubject(subject);
  cert.setIssuer(subject);
  cert.setExtensions([
    { name: 'basicConstraints', cA: true },
    { name: 'keyUsage', keyCertSign: true, cRLSign: true },
  ]);
  cert.sign(forge.pki.privateKeyFromPem(keyPem), forge.md.sha256.create());
  return { certPem: forge.pki.certificateToPem(cert), keyPem };
}

/** DER of the topics extension: SEQUENCE { UTF8String topic, SEQUENCE { UTF8String "app" }, … }. */
function topicsExtensionValue(topics: string[]): string {
  const asn1 = forge.asn1;
  const items = topics.flatMap((t) => [
    asn1.create(asn1.Class.UNIVERSAL, asn1.Type.UTF8, false, forge.util.encodeUtf8(t)),
    asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SEQUENCE, true, [
      asn1.create(asn1.Class.UNIVERSAL, asn1.Type.UTF8, false, 'app'),
    ]),
  ]);
  return asn1.toDer(asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SEQUENCE, true, items)).getBytes();
}

export interface MailPushCertOptions {
  /** Topic in the subject UID; default `com.apple.mail.XServer.<uuid>`; null: no UID. */
  uidTopic?: string | null;
  /** Topics in the 1.2.840.113635.100.6.3.6 extension (default none). */
  extensionTopics?: string[];
  notBefore?: Date;
  notAfter?: Date;
  p12Passphrase?: string;
}

/** A Mail push client certificate issued by `ca`, as Apple's would look. */
export function issueMailPushCert(ca: TestCa, opts: MailPushCertOptions = {}): IssuedCert {
  const uuid = randomUUID().toUpperCase();
  const uidTopic = opts.uidTopic === undefined ? `com.apple.mail.XServer.${uuid}` : opts.uidTopic;
  const keyPem = rsaKeyPem();
  const cert = baseCert(keyPem, {
    notBefore: opts.notBefore ?? new Date(Date.now() - 86_400_000),
    notAfter: opts.notAfter ?? new Date(Date.now() + 365 * 86_400_000),
  });
  const subject: forge.pki.CertificateField[] = [];
  if (uidTopic) subject.push({ type: UID_OID, value: uidTopic, valueTagClass: forge.asn1.Type.UTF8 as unknown as forge.asn1.Class });
  subject.push({ name: 'commonName', value: `APSP:${uuid}` }, { name: 'countryName', value: 'US' });
  cert.setSubject(subject);
  const caCert = forge.pki.certificateFromPem(ca.certPem);
  cert.setIssuer(caCert.subject.attributes);
  const extensions: object[] = [
    { name: 'basicConstraints', cA: false },
    { name: 'keyUsage', digitalSignature: true, keyEncipherment: true },
    { name: 'extKeyUsage', clientAuth: true },
  ];
  if (opts.extensionTopics?.length) {
    extensions.push({ id: TOPICS_OID, critical: false, value: topicsExtensionValue(opts.extensionTopics) });
  }
  cert.setExtensions(extensions);
  cert.sign(forge.pki.privateKeyFromPem(ca.keyPem), forge.md.sha256.create());
  const certPem = forge.pki.certificateToPem(cert);
  const p12Passphrase = opts.p12Passphrase ?? 'test-passphrase';
  const p12Asn1 = forge.pkcs12.toPkcs12Asn1(forge.pki.privateKeyFromPem(keyPem), [cert], p12Passphrase, { algorithm: '3des' });
  const p12 = Buffer.from(forge.asn1.toDer(p12Asn1).getBytes(), 'binary');
  return { certPem, keyPem, topic: uidTopic ?? opts.extensionTopics?.[0] ?? '', p12, p12Passphrase };
}

/** A TLS server certificate for a mock APNs on loopback, issued by `ca`. */
export function issueServerCert(ca: TestCa, hosts: string[] = ['localhost', '127.0.0.1']): { certPem: string; keyPem: string } {
  const keyPem = rsaKeyPem();
  const cert = baseCert(keyPem, { notBefore: new Date(Date.now() - 86_400_000), notAfter: new Date(Date.now() + 365 * 86_400_000) });
  cert.setSubject([{ name: 'commonName', value: hosts[0] ?? 'localhost' }]);
  cert.setIssuer(forge.pki.certificateFromPem(ca.certPem).subject.attributes);
  cert.setExtensions([
    { name: 'basicConstraints', cA: false },
    { name: 'keyUsage', digitalSignature: true, keyEncipherment: true },
    { name: 'extKeyUsage', serverAuth: true },
    { name: 'subjectAltName', altNames: hosts.map((h) => (/^[\d.]+$|:/.test(h) ? { type: 7, ip: h } : { type: 2, value: h })) },
  ]);
  cert.sign(forge.pki.privateKeyFromPem(ca.keyPem), forge.md.sha256.create());
  return { certPem: forge.pki.certificateToPem(cert), keyPem };
}
