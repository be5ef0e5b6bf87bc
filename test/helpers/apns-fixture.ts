/**
 * A mock APNs with a Mail push certificate from a test CA, and the `--apns-*`
 * flags that point a proxy at it: the setup every push test shares.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { startMockApns, type MockApns } from '../../src/testbed/mock-apns.js';
import { createTestCa, issueMailPushCert, type IssuedCert, type TestCa } from '../../src/testbed/apns-certs.js';

export interface ApnsFixture {
  dir: string;
  ca: TestCa;
  cert: IssuedCert;
  /** The certificate's topic (UID=com.apple.mail.XServer.<uuid>). */
  topic: string;
  certPath: string;
  keyPath: string;
  mockCaPath: string;
  mock: MockApns;
  /** --apns-cert/--apns-key/--apns-endpoint/--apns-ca, then `extraFlags`. */
  flags: string[];
}

export async function apnsFixture(extraFlags: string[] = []): Promise<ApnsFixture> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'xaps-apns-'));
  const ca = createTestCa();
  const cert = issueMailPushCert(ca);
  const mock = await startMockApns({ clientCa: ca.certPem });
  const certPath = path.join(dir, 'mail.pem');
  const keyPath = path.join(dir, 'mail.key');
  const mockCaPath = path.join(dir, 'mock-ca.pem');
  await fs.writeFile(certPath, cert.certPem);
  await fs.writeFile(keyPath, cert.keyPem, { mode: 0o600 });
  await fs.writeFile(mockCaPath, mock.caPem);
  const flags = ['--apns-cert', certPath, '--apns-key', keyPath, '--apns-endpoint', mock.url, '--apns-ca', mockCaPath, ...extraFlags];
  return { dir, ca, cert, topic: cert.topic, certPath, keyPath, mockCaPath, mock, flags };
}
