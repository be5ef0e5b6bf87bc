import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach } from 'vitest';
import { CertificateError } from '../../../src/cert/errors.js';
import { createTestCa, issueMailPushCert, type MailPushCertOptions, type TestCa } from '../../../src/testbed/apns-certs.js';

export const DAY = 86_400_000;

const dirs: string[] = [];

/** A temporary directory with the given files; removed after each test. */
export function tempDir(files: Record<string, string | Buffer> = {}): string {
  const dir = mkdtempSync(join(tmpdir(), 'xaps-cert-'));
  dirs.push(dir);
  for (const [name, content] of Object.entries(files)) writeFileSync(join(dir, name), content);
  return dir;
}

afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

let ca: TestCa | undefined;
/** One test CA per test file (RSA key generation is the slow part). */
export function testCa(): TestCa {
  ca ??= createTestCa();
  return ca;
}

export function mailCert(opts: MailPushCertOptions = {}) {
  return issueMailPushCert(testCa(), opts);
}

/** The CertificateError a promise rejects with (fails when it resolves or throws something else). */
export async function certError(p: Promise<unknown>): Promise<CertificateError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof CertificateError) return err;
    throw err;
  }
  throw new Error('expected a CertificateError, the promise resolved');
}
