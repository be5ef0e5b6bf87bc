/**
 * What Node's X509Certificate does not decode: the subject UID (the APNs topic of a Mail
 * push certificate), the topics extension 1.2.840.113635.100.6.3.6 and validity dates as
 * Date objects — read from the DER with node-forge's ASN.1 parser. Plus PEM/DER helpers.
 */
import { X509Certificate } from 'node:crypto';
import forge from 'node-forge';

/** Subject UID (userId), where Apple puts the topic of Mail push certificates. */
export const UID_OID = '0.9.2342.19200300.100.1.1';
/** Apple's topics extension: SEQUENCE { UTF8String topic, SEQUENCE {…}, UTF8String topic, … }. */
export const TOPICS_OID = '1.2.840.113635.100.6.3.6';

const asn1 = forge.asn1;
type Asn1 = forge.asn1.Asn1;
/** forge's fromDer takes an options object too (the typings only know `strict`). */
const fromDer = asn1.fromDer as unknown as (
  bytes: string | forge.util.ByteBuffer,
  options: { strict?: boolean; decodeBitStrings?: boolean; parseAllBytes?: boolean },
) => Asn1;

export interface CertificateInfo {
  /** `UID=…, CN=…, C=US` (Node's rendering, one line). */
  subject: string;
  issuer: string;
  /** Hex, as Node prints it (upper case). */
  serial: string;
  notBefore: Date;
  notAfter: Date;
  /** `AB:CD:…` (SHA-256 of the DER). */
  fingerprint256: string;
  /** Subject UID, when present. */
  uid: string | undefined;
  /** Entries of the topics extension (empty when absent). */
  extensionTopics: string[];
  /** The APNs topic: the UID, else the first topics-extension entry. */
  topic: string | undefined;
  /** UID first (when present), then the extension topics, without duplicates. */
  topics: string[];
}

function children(node: Asn1 | undefined): Asn1[] {
  return node && Array.isArray(node.value) ? (node.value as Asn1[]) : [];
}

function bytesOf(node: Asn1 | undefined): string {
  return node && typeof node.value === 'string' ? node.value : '';
}

/** The text of a DirectoryString / IA5String / … node. */
function stringValue(node: Asn1): string {
  const raw = bytesOf(node);
  switch (node.type) {
    case asn1.Type.UTF8:
      return forge.util.decodeUtf8(raw);
    case asn1.Type.BMPSTRING: {
      let out = '';
      for (let i = 0; i + 1 < raw.length; i += 2) out += String.fromCharCode((raw.charCodeAt(i) << 8) | raw.charCodeAt(i + 1));
      return out;
    }
    default:
      return raw;
  }
}

function timeValue(node: Asn1 | undefined): Date {
  if (!node) throw new Error('missing validity');
  if (node.type === asn1.Type.UTCTIME) return asn1.utcTimeToDate(bytesOf(node));
  if (node.type === asn1.Type.GENERALIZEDTIME) return asn1.generalizedTimeToDate(bytesOf(node));
  throw new Error('unexpected validity time type');
}

function isContext(node: Asn1 | undefined, tag: number): boolean {
  return node !== undefined && node.tagClass === asn1.Class.CONTEXT_SPECIFIC && node.type === tag;
}

/** Topics in the DER value of the 1.2.840.113635.100.6.3.6 extension. */
export function decodeTopicsExtension(value: string): string[] {
  const root = fromDer(value, { strict: false, decodeBitStrings: false });
  const topics: string[] = [];
  for (const item of children(root)) {
    // Topics are UTF8Strings; the SEQUENCEs between them (e.g. { "app" }) are skipped.
    if (item.tagClass !== asn1.Class.UNIVERSAL || item.constructed) continue;
    if (item.type === asn1.Type.UTF8 || item.type === asn1.Type.IA5STRING || item.type === asn1.Type.PRINTABLESTRING) {
      const t = stringValue(item).trim();
      if (t) topics.push(t);
    }
  }
  return topics;
}

interface TbsFacts {
  notBefore: Date;
  notAfter: Date;
  uid: string | undefined;
  extensionTopics: string[];
}

function tbsFacts(der: Buffer): TbsFacts {
  const root = fromDer(forge.util.createBuffer(der.toString('binary')), { strict: false, decodeBitStrings: false });
  const tbs = children(root)[0];
  const fields = children(tbs);
  const off = isContext(fields[0], 0) ? 1 : 0;
  const validity = children(fields[off + 3]);
  const subject = fields[off + 4];
  let uid: string | undefined;
  for (const rdn of children(subject)) {
    for (const atv of children(rdn)) {
      const [oid, value] = children(atv);
      if (oid && value && asn1.derToOid(bytesOf(oid)) === UID_OID && uid === undefined) uid = stringValue(value).trim() || undefined;
    }
  }
  let extensionTopics: string[] = [];
  const extWrapper = fields.slice(off + 6).find((f) => isContext(f, 3));
  for (const ext of children(children(extWrapper)[0])) {
    const parts = children(ext);
    const oid = parts[0];
    if (!oid || asn1.derToOid(bytesOf(oid)) !== TOPICS_OID) continue;
    const octets = parts[parts.length - 1];
    extensionTopics = decodeTopicsExtension(bytesOf(octets));
  }
  return { notBefore: timeValue(validity[0]), notAfter: timeValue(validity[1]), uid, extensionTopics };
}

/** Decode a certificate (DER or PEM); throws on anything that is not an X.509 certificate. */
export function certificateInfo(cert: Buffer | string | X509Certificate): CertificateInfo {
  const x509 = cert instanceof X509Certificate ? cert : new X509Certificate(cert);
  const facts = tbsFacts(x509.raw);
  const topics = [...new Set([...(facts.uid ? [facts.uid] : []), ...facts.extensionTopics])];
  return {
    subject: oneLineName(x509.subject),
    issuer: oneLineName(x509.issuer),
    serial: x509.serialNumber.toUpperCase(),
    notBefore: facts.notBefore,
    notAfter: facts.notAfter,
    fingerprint256: x509.fingerprint256,
    uid: facts.uid,
    extensionTopics: facts.extensionTopics,
    topic: facts.uid ?? facts.extensionTopics[0],
    topics,
  };
}

function oneLineName(name: string): string {
  return name.split('\n').filter(Boolean).join(', ');
}

// ---------------------------------------------------------------------------------------------
// PEM / DER

export interface PemBlock {
  label: string;
  text: string;
}

const PEM_RE = /-----BEGIN ([A-Z0-9 ]+)-----[\s\S]*?-----END \1-----/g;

export function pemBlocks(text: string): PemBlock[] {
  return [...text.matchAll(PEM_RE)].map((m) => ({ label: m[1]!, text: `${m[0]}\n` }));
}

export const KEY_LABELS = new Set(['PRIVATE KEY', 'RSA PRIVATE KEY', 'EC PRIVATE KEY', 'ENCRYPTED PRIVATE KEY']);

export function derToPem(der: Buffer, label = 'CERTIFICATE'): string {
  const b64 = der.toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n$/, '');
  return `-----BEGIN ${label}-----\n${b64}\n-----END ${label}-----\n`;
}

/** Split concatenated DER structures (e.g. a certificate chain file) into their parts. */
export function splitDer(buf: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let i = 0;
  while (i < buf.length) {
    if (buf[i] !== 0x30) throw new Error('not DER (expected a SEQUENCE)');
    let len = buf[i + 1];
    if (len === undefined) throw new Error('truncated DER');
    let header = 2;
    if (len & 0x80) {
      const n = len & 0x7f;
      if (n === 0 || n > 4 || i + 2 + n > buf.length) throw new Error('bad DER length');
      len = 0;
      for (let k = 0; k < n; k++) len = len * 256 + buf[i + 2 + k]!;
      header += n;
    }
    const end = i + header + len;
    if (end > buf.length) throw new Error('truncated DER');
    out.push(buf.subarray(i, end));
    i = end;
  }
  return out;
}

/** Does the buffer look like PEM text (rather than binary DER / PKCS#12)? */
export function looksLikePem(buf: Buffer): boolean {
  return buf.includes('-----BEGIN ');
}

/** ISO date without milliseconds: 2026-03-01T12:00:00Z. */
export function isoDate(d: Date): string {
  return d.toISOString().replace(/\.\d{3}Z$/, 'Z');
}
