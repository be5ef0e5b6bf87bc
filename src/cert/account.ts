/**
 * The operator's PushCertRequest inputs, from configuration values: Apple ID, password file
 * (only its SHA-256 leaves this module), vendor signing material, service URL and CA.
 */
import { readFile } from 'node:fs/promises';
import { CertificateError, describeFsError } from './errors.js';
import { DEFAULT_CERT_SERVICE_URL, loadVendorMaterial, passwordHash } from './pushcert.js';
import type { PushCertAccount } from './renew.js';

export interface PushCertSettings {
  certAppleId?: string | undefined;
  certPasswordFile?: string | undefined;
  certVendorCert?: string | undefined;
  certVendorKey?: string | undefined;
  certServiceUrl?: string | undefined;
  certServiceCa?: string | undefined;
}

/** The option names (without --) missing for a request. */
export function missingPushCertSettings(s: PushCertSettings): string[] {
  const missing: string[] = [];
  if (!s.certAppleId) missing.push('cert-apple-id');
  if (!s.certPasswordFile) missing.push('cert-password-file');
  if (!s.certVendorCert) missing.push('cert-vendor-cert');
  if (!s.certVendorKey) missing.push('cert-vendor-key');
  return missing;
}

/** The password: the first line of the file (line ending removed, nothing else trimmed). */
export async function readPasswordFile(path: string): Promise<string> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new CertificateError(`cannot read ${path}: ${describeFsError(err)}`, { code: 'unreadable', file: path, cause: err });
  }
  const password = text.split(/\r?\n/)[0] ?? '';
  if (password === '') throw new CertificateError(`${path}: the password file is empty`, { code: 'bad-input', file: path });
  return password;
}

export async function pushCertAccountFromSettings(s: PushCertSettings): Promise<PushCertAccount> {
  const missing = missingPushCertSettings(s);
  if (missing.length > 0) {
    throw new CertificateError(`missing ${missing.map((m) => `--${m}`).join(', ')} (needed to request certificates)`, { code: 'bad-input' });
  }
  const vendor = await loadVendorMaterial(s.certVendorCert!, s.certVendorKey!);
  const hash = passwordHash(await readPasswordFile(s.certPasswordFile!));
  let ca: string | undefined;
  if (s.certServiceCa) {
    try {
      ca = await readFile(s.certServiceCa, 'utf8');
    } catch (err) {
      throw new CertificateError(`cannot read ${s.certServiceCa}: ${describeFsError(err)}`, { code: 'unreadable', file: s.certServiceCa });
    }
  }
  return {
    appleId: s.certAppleId!,
    passwordHash: hash,
    vendor,
    serviceUrl: s.certServiceUrl ?? DEFAULT_CERT_SERVICE_URL,
    ...(ca !== undefined ? { ca } : {}),
  };
}
