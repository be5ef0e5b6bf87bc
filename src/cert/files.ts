/**
 * Writing certificate and key files atomically: a temporary file in the same directory,
 * fsync'd, then renamed over the target, so a reader (CertificateSource's watcher, a
 * restart) sees the old file or the new one, never half of one. Keys are written 0600.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import forge from 'node-forge';
import { CertificateError, describeFsError } from './errors.js';

export const KEY_FILE_MODE = 0o600;
export const CERT_FILE_MODE = 0o644;

export async function writeFileAtomic(path: string, data: string | Buffer, mode: number): Promise<void> {
  const dir = dirname(path);
  const tmp = join(dir, `.${basename(path)}.${randomBytes(6).toString('hex')}.tmp`);
  try {
    await mkdir(dir, { recursive: true });
    const fh = await open(tmp, 'wx', mode);
    try {
      await fh.writeFile(data);
      await fh.chmod(mode); // the umask may have narrowed or widened the mode given to open
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true }).catch(() => undefined);
    throw new CertificateError(`cannot write ${path}: ${describeFsError(err)}`, { code: 'write-failed', file: path, cause: err });
  }
  // Make the rename durable too (best effort: not every platform can open a directory).
  try {
    const d = await open(dir, 'r');
    try {
      await d.sync();
    } finally {
      await d.close();
    }
  } catch {
    /* ignore */
  }
}

export async function fileExists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}

/** Where a Mail push certificate lives: PEM cert (+ key file, or the key in the same file), or PKCS#12. */
export type CredentialTarget =
  | { kind: 'pem'; certPath: string; keyPath?: string }
  | { kind: 'pkcs12'; p12Path: string; passphrase: string };

/**
 * Write a certificate and its key to `target`, atomically per file: the key first (0600),
 * the certificate last, so a watcher reloading on the certificate sees a matching key.
 * `keyUnchanged`: the key file already holds this key (renewal), do not rewrite it.
 */
export async function writeMailCredentials(
  target: CredentialTarget,
  certPem: string,
  keyPem: string,
  opts: { keyUnchanged?: boolean } = {},
): Promise<string[]> {
  if (target.kind === 'pkcs12') {
    const certs = [...certPem.matchAll(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g)].map((m) =>
      forge.pki.certificateFromPem(m[0]),
    );
    const asn = forge.pkcs12.toPkcs12Asn1(forge.pki.privateKeyFromPem(keyPem), certs, target.passphrase, { algorithm: '3des' });
    await writeFileAtomic(target.p12Path, Buffer.from(forge.asn1.toDer(asn).getBytes(), 'binary'), KEY_FILE_MODE);
    return [target.p12Path];
  }
  if (target.keyPath === undefined || target.keyPath === target.certPath) {
    await writeFileAtomic(target.certPath, `${certPem.trimEnd()}\n${keyPem.trimEnd()}\n`, KEY_FILE_MODE);
    return [target.certPath];
  }
  const written: string[] = [];
  if (!opts.keyUnchanged || !(await fileExists(target.keyPath))) {
    await writeFileAtomic(target.keyPath, keyPem, KEY_FILE_MODE);
    written.push(target.keyPath);
  }
  await writeFileAtomic(target.certPath, certPem, CERT_FILE_MODE);
  written.push(target.certPath);
  return written;
}
