/**
 * The historical PushCertRequest flow end to end against the loopback mock of Apple's
 * service: `cert request`, `cert renew` (old serials, same keys), Apple's refusal, HTTPS with
 * malformed response headers, and the auto-renewer with a watching CertificateSource.
 */
import { createHash, X509Certificate } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pushCertAccountFromSettings } from '../../../src/cert/account.js';
import { writeMailCredentials } from '../../../src/cert/files.js';
import { loadMailPushCredentials } from '../../../src/cert/load.js';
import { CertificateRenewer, requestNewMailPushCertificate } from '../../../src/cert/renew.js';
import { CertificateSource } from '../../../src/cert/watch.js';
import {
  APPLE_REFUSAL,
  createVendorMaterial,
  startMockCertService,
  type MockCertService,
  type TestVendorMaterial,
} from '../../../src/testbed/mock-cert-service.js';
import { runCli } from '../../unit/cli/helpers.js';

const PASSWORD = 'correct horse battery staple';
const APPLE_ID = 'postmaster@example.org';
const TOPIC_RE = /^com\.apple\.mail\.XServer\.[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$/;

let root: string;
let vendor: TestVendorMaterial;
let mock: MockCertService;

function account(url: string): string[] {
  return [
    '--cert-apple-id', APPLE_ID,
    '--cert-password-file', join(root, 'password'),
    '--cert-vendor-cert', join(root, 'vendor-chain.pem'),
    '--cert-vendor-key', join(root, 'vendor.key'),
    '--cert-service-url', url,
  ];
}

function dir(name: string): string {
  return join(root, name);
}

beforeAll(async () => {
  root = mkdtempSync(join(tmpdir(), 'xaps-pushcert-'));
  vendor = createVendorMaterial();
  writeFileSync(join(root, 'vendor-chain.pem'), vendor.chainPem);
  writeFileSync(join(root, 'vendor-chain.der'), vendor.chainDer);
  writeFileSync(join(root, 'vendor.key'), vendor.keyPem, { mode: 0o600 });
  writeFileSync(join(root, 'password'), `${PASSWORD}\n`, { mode: 0o600 });
  mock = await startMockCertService({ vendorCa: vendor.ca });
});

afterAll(async () => {
  await mock?.close();
  if (root) rmSync(root, { recursive: true, force: true });
});

describe('cert request / cert renew against the mock service', () => {
  it('requests the five certificates and stores the Mail one with its key', async () => {
    const out = dir('set1');
    const r = await runCli(['cert', 'request', '--out', out, ...account(mock.url)]);
    expect(r.stderr).toContain('requesting push certificates from http://127.0.0.1:');
    expect(r.code).toBe(0);

    const req = mock.requests.at(-1)!;
    expect(req.path).toBe('/pushcert/caservice/new');
    expect(req.contentType).toBe('text/x-xml-plist');
    expect(req.signatureValid).toBe(true);
    expect(req.vendorSubject).toContain('xaps-proxy Test Vendor');
    expect(req.accountName).toBe(APPLE_ID);
    expect(req.passwordHash).toBe(createHash('sha256').update(PASSWORD).digest('hex'));
    expect(req.csrs.map((c) => [c.serviceType, c.commonName, c.country, c.keyBits, c.signatureValid])).toEqual([
      ['Service_Calendar', 'com.apple.servermgrd.apns.calendar', 'US', 2048, true],
      ['Service_Contact', 'com.apple.servermgrd.apns.contact', 'US', 2048, true],
      ['Service_Mail', 'com.apple.servermgrd.apns.mail', 'US', 2048, true],
      ['Service_Mgmt', 'com.apple.servermgrd.apns.mgmt', 'US', 2048, true],
      ['Service_Alerts', 'com.apple.server.apns.alerts', 'US', 2048, true],
    ]);
    expect(req.csrs.every((c) => c.serial === undefined)).toBe(true);
    expect(req.status.errorCode).toBe(0);

    const cert = await loadMailPushCredentials({ certPath: join(out, 'mail.pem'), keyPath: join(out, 'mail.key') });
    expect(cert.topic).toMatch(TOPIC_RE);
    expect(cert.topic).toBe(req.issued[2]!.topic);
    expect(cert.issuer).toContain('Test Apple Application Integration CA');
    expect(statSync(join(out, 'mail.key')).mode & 0o777).toBe(0o600);
    for (const svc of ['calendar', 'contact', 'mgmt', 'alerts']) {
      expect(existsSync(join(out, `${svc}.pem`))).toBe(true);
      expect(statSync(join(out, `${svc}.key`)).mode & 0o777).toBe(0o600);
    }
    expect(r.stdout).toContain(`Mail push certificate issued: topic ${cert.topic}`);
    expect(r.stdout).toContain(`--apns-cert ${join(out, 'mail.pem')} --apns-key ${join(out, 'mail.key')}`);
    expect(r.stdout + r.stderr).not.toContain('PRIVATE KEY');
    expect(r.stdout + r.stderr).not.toContain(PASSWORD);

    // A second request into the same directory is refused (each one makes Apple issue certificates).
    const again = await runCli(['cert', 'request', '--out', out, ...account(mock.url)]);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/mail\.pem exists; not requesting another certificate/);
  });

  it('renews only within 30 days of expiry (unless --force), with the same keys and the old serials', async () => {
    const out = dir('set1');
    const before = await loadMailPushCredentials({ certPath: join(out, 'mail.pem'), keyPath: join(out, 'mail.key') });
    const keyBefore = readFileSync(join(out, 'mail.key'), 'utf8');
    const companionSerial = new X509Certificate(readFileSync(join(out, 'calendar.pem'))).serialNumber.toUpperCase();
    const requests = mock.requests.length;
    const flags = ['--apns-cert', join(out, 'mail.pem'), '--apns-key', join(out, 'mail.key'), ...account(mock.url)];

    const notDue = await runCli(['cert', 'renew', ...flags]);
    expect(notDue.code).toBe(0);
    expect(notDue.stdout).toMatch(/expires on \S+ \(36\d days left\); renewal is due from \S+ \(30 days before\)\. Nothing to do/);
    expect(mock.requests.length).toBe(requests);

    const forced = await runCli(['cert', 'renew', '--force', ...flags]);
    expect(forced.stderr).toContain(`renewing ${before.source} (topic ${before.topic}, serial ${before.serial}`);
    expect(forced.code).toBe(0);
    const req = mock.requests.at(-1)!;
    expect(req.path).toBe('/pushcert/caservice/renew');
    expect(req.csrs[2]!.serial).toBe(before.serial);
    expect(req.csrs[0]!.serial).toBe(companionSerial);
    expect(req.csrs.every((c) => c.serial !== undefined)).toBe(true);

    const after = await loadMailPushCredentials({ certPath: join(out, 'mail.pem'), keyPath: join(out, 'mail.key') });
    expect(after.serial).not.toBe(before.serial);
    expect(after.topic).toBe(before.topic);
    expect(readFileSync(join(out, 'mail.key'), 'utf8')).toBe(keyBefore);
    expect(forced.stdout).toContain(`Mail push certificate renewed: topic ${before.topic}, serial ${after.serial}`);
  });

  it('renews a certificate that expires within 30 days without --force (vendor chain as DER)', async () => {
    const out = dir('set2');
    mock.setValidityDays(20);
    try {
      expect((await runCli(['cert', 'request', '--out', out, ...account(mock.url)])).code).toBe(0);
    } finally {
      mock.setValidityDays(365);
    }
    const soon = await loadMailPushCredentials({ certPath: join(out, 'mail.pem'), keyPath: join(out, 'mail.key') });
    expect(soon.warnings[0]).toMatch(/\((19|20) days left\); renew it$/);
    const flags = account(mock.url).map((f) => (f.endsWith('vendor-chain.pem') ? join(root, 'vendor-chain.der') : f));
    const r = await runCli(['cert', 'renew', '--out', out, ...flags]);
    expect(r.code).toBe(0);
    const renewed = await loadMailPushCredentials({ certPath: join(out, 'mail.pem'), keyPath: join(out, 'mail.key') });
    expect(renewed.daysLeft).toBeGreaterThan(360);
    expect(renewed.topic).toBe(soon.topic);
    expect(mock.requests.at(-1)!.csrs[2]!.serial).toBe(soon.serial);
  });

  it("explains Apple's refusal and points to the developer portal", async () => {
    const out = dir('refused');
    mock.setRefusal(APPLE_REFUSAL);
    try {
      const r = await runCli(['cert', 'request', '--out', out, ...account(mock.url)]);
      expect(r.code).toBe(1);
      const last = r.stderr.trimEnd().split('\n').at(-1)!;
      expect(last).toMatch(/^xaps-proxy: the certificate service refused the request: ErrorCode -80010 \(ServiceType is Invalid\)\./);
      expect(last).toContain('Apple has refused these requests since 2024-10-29');
      expect(last).toContain('"xaps-proxy cert csr"');
      expect(last).toContain('docs/certificates.md');
      expect(existsSync(join(out, 'mail.pem'))).toBe(false);
      expect(existsSync(join(out, 'mail.key'))).toBe(false);
      expect(mock.requests.at(-1)!.status.errorCode).toBe(-80010);

      const set1 = dir('set1');
      const pemBefore = readFileSync(join(set1, 'mail.pem'), 'utf8');
      const renew = await runCli(['cert', 'renew', '--force', '--apns-cert', join(set1, 'mail.pem'), '--apns-key', join(set1, 'mail.key'), ...account(mock.url)]);
      expect(renew.code).toBe(1);
      expect(renew.stderr).toContain('ErrorCode -80010');
      expect(readFileSync(join(set1, 'mail.pem'), 'utf8')).toBe(pemBefore);
    } finally {
      mock.setRefusal(null);
    }
  });

  it('works over HTTPS with malformed response headers (--cert-service-ca)', async () => {
    const tlsMock = await startMockCertService({ tls: true, malformedHeaders: true, vendorCa: vendor.ca });
    try {
      writeFileSync(join(root, 'service-ca.pem'), tlsMock.ca!);
      const out = dir('tls');
      const r = await runCli(['cert', 'request', '--out', out, ...account(tlsMock.url), '--cert-service-ca', join(root, 'service-ca.pem')]);
      expect(r.stderr).not.toMatch(/HPE_|Parse Error/);
      expect(r.code).toBe(0);
      expect(tlsMock.requests).toHaveLength(1);
      const cert = await loadMailPushCredentials({ certPath: join(out, 'mail.pem'), keyPath: join(out, 'mail.key') });
      expect(cert.topic).toBe(tlsMock.requests[0]!.issued[2]!.topic);

      // Without the CA the TLS handshake fails (verification is on), with one clear line.
      const untrusted = await runCli(['cert', 'request', '--out', dir('tls2'), ...account(tlsMock.url)]);
      expect(untrusted.code).toBe(1);
      expect(untrusted.stderr.trimEnd().split('\n').at(-1)).toMatch(/^xaps-proxy: certificate service https:\/\/127\.0\.0\.1:\d+: .*(certificate|self.signed)/i);
      expect(tlsMock.requests).toHaveLength(1);
    } finally {
      await tlsMock.close();
    }
  });
});

describe('auto-renewal with a watching CertificateSource', () => {
  it('renews a certificate due within 30 days; the source switches to it, keeping the topic', async () => {
    const out = dir('auto');
    const acct = await pushCertAccountFromSettings({
      certAppleId: APPLE_ID,
      certPasswordFile: join(root, 'password'),
      certVendorCert: join(root, 'vendor-chain.pem'),
      certVendorKey: join(root, 'vendor.key'),
      certServiceUrl: mock.url,
    });
    mock.setValidityDays(10);
    try {
      await requestNewMailPushCertificate(acct, out);
    } finally {
      mock.setValidityDays(365);
    }
    const source = await CertificateSource.open({ certPath: join(out, 'mail.pem'), keyPath: join(out, 'mail.key'), debounceMs: 50 });
    const renewer = new CertificateRenewer({
      source,
      account: acct,
      target: { kind: 'pem', certPath: join(out, 'mail.pem'), keyPath: join(out, 'mail.key') },
    });
    try {
      const old = source.current();
      const changes: string[] = [];
      source.on('change', (c) => changes.push(c.serial));
      expect(await renewer.checkNow()).toBe('renewed');
      expect(source.current().serial).not.toBe(old.serial);
      expect(source.current().topic).toBe(old.topic);
      expect(source.current().daysLeft).toBeGreaterThan(360);
      expect(changes).toContain(source.current().serial);
      expect(mock.requests.at(-1)!.path).toBe('/pushcert/caservice/renew');
      // Just renewed: no second request, whatever happens next.
      expect(await renewer.checkNow()).toBe('backoff');
    } finally {
      renewer.stop();
      source.close();
    }
  });

  it('renews a PKCS#12 in place, with the same passphrase', async () => {
    const out = dir('p12');
    const acct = await pushCertAccountFromSettings({
      certAppleId: APPLE_ID,
      certPasswordFile: join(root, 'password'),
      certVendorCert: join(root, 'vendor-chain.pem'),
      certVendorKey: join(root, 'vendor.key'),
      certServiceUrl: mock.url,
    });
    mock.setValidityDays(5);
    let issued;
    try {
      issued = await requestNewMailPushCertificate(acct, out);
    } finally {
      mock.setValidityDays(365);
    }
    const p12Path = join(out, 'push.p12');
    await writeMailCredentials({ kind: 'pkcs12', p12Path, passphrase: 'pfx pass' }, issued.certPem, issued.keyPem);
    expect(statSync(p12Path).mode & 0o777).toBe(0o600);
    const source = await CertificateSource.open({ p12Path, p12Passphrase: 'pfx pass', watch: false });
    const renewer = new CertificateRenewer({ source, account: acct, target: { kind: 'pkcs12', p12Path, passphrase: 'pfx pass' } });
    try {
      expect(await renewer.checkNow()).toBe('renewed');
      const reread = await loadMailPushCredentials({ p12Path, p12Passphrase: 'pfx pass' });
      expect(reread.serial).toBe(source.current().serial);
      expect(reread.serial).not.toBe(issued.serial);
      expect(reread.topic).toBe(issued.topic);
    } finally {
      renewer.stop();
      source.close();
    }
  });
});
