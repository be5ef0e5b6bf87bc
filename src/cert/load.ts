/**
 * Loading the Mail push certificate: PEM certificate + key (the key may sit in the
 * certificate file), or PKCS#12 + passphrase (node-forge). The key must match the
 * certificate, the certificate must be valid now and carry an APNs topic (subject UID,
 * else the first entry of the topics extension). Every failure is a CertificateError
 * whose one-line message names the file and the problem; key material never appears in
 * messages or in anything returned besides `keyPem`.
 */
import { createPrivateKey, X509Certificate, type KeyObject } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import forge from 'node-forge';
import { CertificateError, describeFsError } from './errors.js';
import { certificateInfo, isoDate, KEY_LABELS, looksLikePem, pemBlocks, splitDer, type CertificateInfo } from './x509.js';

export const DAY_MS = 86_400_000;
/** Warn this long before expiry (Forward Email and xapsd use 30 days too). */
export const EXPIRY_WARNING_DAYS = 30;

export interface CredentialFiles {
  /** PEM certificate (chain) file; may also hold the key. */
  certPath?: string;
  /** PEM private key of certPath (default: the key in certPath). */
  keyPath?: string;
  /** PKCS#12 file with certificate and key (instead of certPath/keyPath). */
  p12Path?: string;
  /** Passphrase of p12Path (default empty); also used for an encrypted PEM key. */
  p12Passphrase?: string;
}

export interface LoadOptions {
  /** "Now" for the validity check (tests). */
  now?: Date;
  /** Load an expired / not-yet-valid certificate anyway (cert show, cert renew); a warning is added instead. */
  allowExpired?: boolean;
  /** Warn when fewer days than this are left (default 30). */
  warnDays?: number;
}

export interface LoadedCertificate {
  /** The leaf certificate first, then any other certificates of the file (PEM). */
  certPem: string;
  /** PKCS#8 PEM private key, usable by node:tls / node:http2. Never log it. */
  keyPem: string;
  /** The APNs topic: subject UID, else the first topics-extension entry. */
  topic: string;
  /** All topics: UID first, then the topics extension. */
  topics: string[];
  subject: string;
  issuer: string;
  serial: string;
  notBefore: Date;
  notAfter: Date;
  fingerprint256: string;
  /** Whole days until notAfter (negative once expired). */
  daysLeft: number;
  /** Human-readable warnings (expiry within 30 days, …), one line each. */
  warnings: string[];
  /** Where it came from, for messages: "mail.pem + mail.key" or "push.p12". */
  source: string;
  /** The files it was read from. */
  files: { certPath?: string; keyPath?: string; p12Path?: string };
}

async function readOrThrow(path: string): Promise<Buffer> {
  try {
    return await readFile(path);
  } catch (err) {
    throw new CertificateError(`cannot read ${path}: ${describeFsError(err)}`, { code: 'unreadable', file: path, cause: err });
  }
}

/** What one file holds: certificates (leaf candidates first) and private keys. */
export interface FileContents {
  path: string;
  kind: 'pem' | 'der' | 'pkcs12';
  certs: X509Certificate[];
  keys: KeyObject[];
}

/**
 * Read a PEM or PKCS#12 file. PKCS#12 is recognised by not being PEM text; `passphrase`
 * opens it (and an encrypted PEM key).
 */
export async function readCredentialFile(path: string, passphrase?: string): Promise<FileContents> {
  const buf = await readOrThrow(path);
  if (looksLikePem(buf)) return parsePemFile(path, buf.toString('utf8'), passphrase);
  // A DER certificate, as Apple's developer portal hands it out (aps.cer)?
  const der = derCertificate(buf);
  if (der) return { path, kind: 'der', certs: [der], keys: [] };
  return parsePkcs12(path, buf, passphrase ?? '');
}

/** A key file: PEM, or a DER private key (PKCS#8 or PKCS#1). */
export async function readKeyFile(path: string, passphrase?: string): Promise<FileContents> {
  const buf = await readOrThrow(path);
  if (looksLikePem(buf)) return parsePemFile(path, buf.toString('utf8'), passphrase);
  for (const type of ['pkcs8', 'pkcs1'] as const) {
    try {
      return { path, kind: 'der', certs: [], keys: [createPrivateKey({ key: buf, format: 'der', type })] };
    } catch {
      /* next */
    }
  }
  return { path, kind: 'der', certs: [], keys: [] };
}

function derCertificate(buf: Buffer): X509Certificate | undefined {
  try {
    const parts = splitDer(buf);
    return parts.length === 1 ? new X509Certificate(buf) : undefined;
  } catch {
    return undefined;
  }
}

export function parsePemFile(path: string, text: string, passphrase?: string): FileContents {
  const certs: X509Certificate[] = [];
  const keys: KeyObject[] = [];
  for (const block of pemBlocks(text)) {
    if (block.label === 'CERTIFICATE' || block.label === 'TRUSTED CERTIFICATE') {
      try {
        certs.push(new X509Certificate(block.text));
      } catch (err) {
        throw new CertificateError(`${path}: not a valid certificate (${(err as Error).message})`, {
          code: 'not-a-certificate',
          file: path,
          cause: err,
        });
      }
    } else if (KEY_LABELS.has(block.label)) {
      keys.push(parsePemKey(path, block.text, block.label, passphrase));
    }
  }
  return { path, kind: 'pem', certs, keys };
}

function parsePemKey(path: string, pem: string, label: string, passphrase?: string): KeyObject {
  const encrypted = label === 'ENCRYPTED PRIVATE KEY' || /Proc-Type:\s*4,ENCRYPTED/.test(pem);
  if (encrypted && !passphrase) {
    throw new CertificateError(
      `${path}: the private key is encrypted and no passphrase was given (--apns-p12-passphrase), or decrypt it: openssl pkey -in KEY -out KEY.pem`,
      { code: 'bad-key', file: path },
    );
  }
  try {
    return createPrivateKey(encrypted ? { key: pem, format: 'pem', passphrase: passphrase! } : { key: pem, format: 'pem' });
  } catch (err) {
    throw new CertificateError(
      encrypted ? `${path}: cannot decrypt the private key (wrong passphrase?)` : `${path}: not a valid private key`,
      { code: encrypted ? 'bad-passphrase' : 'bad-key', file: path, cause: err },
    );
  }
}

function parsePkcs12(path: string, buf: Buffer, passphrase: string): FileContents {
  let p12: forge.pkcs12.Pkcs12Pfx;
  let p12Asn1: forge.asn1.Asn1;
  try {
    p12Asn1 = forge.asn1.fromDer(forge.util.createBuffer(buf.toString('binary')));
  } catch (err) {
    throw new CertificateError(
      `${path}: not a certificate (neither PEM with "BEGIN CERTIFICATE", nor a DER certificate, nor a PKCS#12 file)`,
      { code: 'not-a-certificate', file: path, cause: err },
    );
  }
  try {
    p12 = forge.pkcs12.pkcs12FromAsn1(p12Asn1, false, passphrase);
  } catch (err) {
    const msg = (err as Error).message ?? '';
    if (/MAC could not be verified|Invalid password|wrong password/i.test(msg)) {
      throw new CertificateError(`${path}: wrong passphrase for the PKCS#12 file (--apns-p12-passphrase)`, {
        code: 'bad-passphrase',
        file: path,
      });
    }
    throw new CertificateError(`${path}: not a readable PKCS#12 file (${msg.split('\n')[0]})`, {
      code: 'not-a-certificate',
      file: path,
      cause: err,
    });
  }
  const certs: X509Certificate[] = [];
  const keys: KeyObject[] = [];
  const oids = forge.pki.oids;
  for (const type of [oids.certBag!, oids.keyBag!, oids.pkcs8ShroudedKeyBag!]) {
    for (const bag of p12.getBags({ bagType: type })[type] ?? []) {
      const anyBag = bag as forge.pkcs12.Bag & { asn1?: forge.asn1.Asn1 };
      if (type === oids.certBag) {
        const asn = anyBag.cert ? forge.pki.certificateToAsn1(anyBag.cert) : anyBag.asn1;
        if (!asn) continue;
        certs.push(new X509Certificate(Buffer.from(forge.asn1.toDer(asn).getBytes(), 'binary')));
      } else if (anyBag.key) {
        keys.push(createPrivateKey(forge.pki.privateKeyToPem(anyBag.key)));
      } else if (anyBag.asn1) {
        keys.push(createPrivateKey({ key: Buffer.from(forge.asn1.toDer(anyBag.asn1).getBytes(), 'binary'), format: 'der', type: 'pkcs8' }));
      }
    }
  }
  return { path, kind: 'pkcs12', certs, keys };
}

/** The certificate among `certs` whose public key matches `key` (undefined when none). */
export function certificateForKey(certs: readonly X509Certificate[], key: KeyObject): X509Certificate | undefined {
  return certs.find((c) => {
    try {
      return c.checkPrivateKey(key);
    } catch {
      return false;
    }
  });
}

/** Validity of `info` at `now`: problems (errors) and warnings. */
export function validityProblems(
  info: Pick<CertificateInfo, 'notBefore' | 'notAfter'>,
  now: Date,
  warnDays = EXPIRY_WARNING_DAYS,
): { expired: boolean; notYetValid: boolean; daysLeft: number; expiresSoon: boolean } {
  const left = info.notAfter.getTime() - now.getTime();
  return {
    expired: left <= 0,
    notYetValid: info.notBefore.getTime() > now.getTime(),
    daysLeft: Math.floor(left / DAY_MS),
    expiresSoon: left > 0 && left <= warnDays * DAY_MS,
  };
}

/**
 * Load and check the Mail push credentials. Either `p12Path` (+ `p12Passphrase`) or
 * `certPath` (+ `keyPath`, default: the key in certPath).
 */
export async function loadMailPushCredentials(files: CredentialFiles, opts: LoadOptions = {}): Promise<LoadedCertificate> {
  const now = opts.now ?? new Date();
  let leaf: X509Certificate;
  let others: X509Certificate[];
  let key: KeyObject;
  let source: string;
  let certFile: string;
  const used: LoadedCertificate['files'] = {};

  if (files.p12Path !== undefined) {
    if (files.certPath !== undefined) {
      throw new CertificateError(`give either a PKCS#12 file (${files.p12Path}) or a PEM certificate (${files.certPath}), not both`, {
        code: 'bad-input',
      });
    }
    const p12 = await readCredentialFile(files.p12Path, files.p12Passphrase ?? '');
    certFile = files.p12Path;
    source = files.p12Path;
    used.p12Path = files.p12Path;
    if (p12.certs.length === 0) {
      throw new CertificateError(`${files.p12Path}: the PKCS#12 file holds no certificate`, { code: 'not-a-certificate', file: files.p12Path });
    }
    if (p12.keys.length === 0) {
      throw new CertificateError(`${files.p12Path}: the PKCS#12 file holds no private key`, { code: 'no-key', file: files.p12Path });
    }
    key = p12.keys[0]!;
    const match = certificateForKey(p12.certs, key);
    if (!match) {
      throw new CertificateError(`${files.p12Path}: the private key does not match the certificate`, {
        code: 'key-mismatch',
        file: files.p12Path,
      });
    }
    leaf = match;
    others = p12.certs.filter((c) => c !== match);
  } else if (files.certPath !== undefined) {
    const certFileContents = await readCredentialFile(files.certPath, files.p12Passphrase);
    certFile = files.certPath;
    used.certPath = files.certPath;
    if (certFileContents.certs.length === 0) {
      throw new CertificateError(
        certFileContents.keys.length > 0
          ? `${files.certPath}: holds a private key but no certificate (is it the key file?)`
          : `${files.certPath}: not a certificate (no "BEGIN CERTIFICATE" block)`,
        { code: 'not-a-certificate', file: files.certPath },
      );
    }
    let keyFile = files.certPath;
    if (files.keyPath !== undefined && files.keyPath !== files.certPath) {
      const keyContents = await readKeyFile(files.keyPath, files.p12Passphrase);
      if (keyContents.keys.length === 0) {
        throw new CertificateError(`${files.keyPath}: no private key found (expected a "BEGIN PRIVATE KEY" block)`, {
          code: 'no-key',
          file: files.keyPath,
        });
      }
      key = keyContents.keys[0]!;
      keyFile = files.keyPath;
      used.keyPath = files.keyPath;
      source = `${files.certPath} + ${files.keyPath}`;
    } else {
      if (certFileContents.keys.length === 0) {
        throw new CertificateError(
          `${files.certPath}: no private key (give it with --apns-key, or append it to the certificate file)`,
          { code: 'no-key', file: files.certPath },
        );
      }
      key = certFileContents.keys[0]!;
      source = files.certPath;
    }
    const match = certificateForKey(certFileContents.certs, key);
    if (!match) {
      throw new CertificateError(
        keyFile === files.certPath
          ? `${files.certPath}: the private key does not match the certificate`
          : `${keyFile}: the private key does not match the certificate in ${files.certPath}`,
        { code: 'key-mismatch', file: keyFile },
      );
    }
    leaf = match;
    others = certFileContents.certs.filter((c) => c !== match);
  } else {
    throw new CertificateError('no Mail push certificate given (--apns-cert [--apns-key] or --apns-p12)', { code: 'bad-input' });
  }

  let info: CertificateInfo;
  try {
    info = certificateInfo(leaf);
  } catch (err) {
    throw new CertificateError(`${certFile}: cannot decode the certificate (${(err as Error).message})`, {
      code: 'not-a-certificate',
      file: certFile,
      cause: err,
    });
  }
  if (!info.topic) {
    throw new CertificateError(
      `${certFile}: the certificate has no APNs topic (no subject UID ${'0.9.2342.19200300.100.1.1'} and no topics extension 1.2.840.113635.100.6.3.6); is it a Mail push certificate?`,
      { code: 'no-topic', file: certFile },
    );
  }
  const v = validityProblems(info, now, opts.warnDays);
  const warnings: string[] = [];
  if (v.expired) {
    const msg = `${certFile}: the certificate expired on ${isoDate(info.notAfter)}`;
    if (!opts.allowExpired) throw new CertificateError(`${msg}; renew it`, { code: 'expired', file: certFile });
    warnings.push(msg);
  } else if (v.notYetValid) {
    const msg = `${certFile}: the certificate is not valid before ${isoDate(info.notBefore)}`;
    if (!opts.allowExpired) throw new CertificateError(msg, { code: 'not-yet-valid', file: certFile });
    warnings.push(msg);
  } else if (v.expiresSoon) {
    warnings.push(
      `${certFile}: the certificate expires on ${isoDate(info.notAfter)} (${v.daysLeft} day${v.daysLeft === 1 ? '' : 's'} left); renew it`,
    );
  }

  return {
    certPem: [leaf, ...others].map((c) => c.toString()).join(''),
    keyPem: key.export({ type: 'pkcs8', format: 'pem' }).toString(),
    topic: info.topic,
    topics: info.topics,
    subject: info.subject,
    issuer: info.issuer,
    serial: info.serial,
    notBefore: info.notBefore,
    notAfter: info.notAfter,
    fingerprint256: info.fingerprint256,
    daysLeft: v.daysLeft,
    warnings,
    source,
    files: used,
  };
}
