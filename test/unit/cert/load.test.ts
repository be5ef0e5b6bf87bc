import { X509Certificate } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createSecureContext } from 'node:tls';
import { describe, expect, it } from 'vitest';
import { loadMailPushCredentials } from '../../../src/cert/load.js';
import { isoDate } from '../../../src/cert/x509.js';
import { certError, DAY, mailCert, tempDir } from './helpers.js';

describe('loadMailPushCredentials: PEM', () => {
  it('loads a certificate and a separate key, with the topic from the subject UID', async () => {
    const c = mailCert();
    const dir = tempDir({ 'mail.pem': c.certPem, 'mail.key': c.keyPem });
    const cert = await loadMailPushCredentials({ certPath: join(dir, 'mail.pem'), keyPath: join(dir, 'mail.key') });
    expect(cert.topic).toBe(c.topic);
    expect(cert.topic).toMatch(/^com\.apple\.mail\.XServer\.[0-9A-F-]{36}$/);
    expect(cert.topics).toEqual([c.topic]);
    expect(cert.subject).toContain(`UID=${c.topic}`);
    expect(cert.issuer).toContain('CN=xaps-proxy Test Root CA');
    const x509 = new X509Certificate(c.certPem);
    expect(cert.serial).toBe(x509.serialNumber.toUpperCase());
    expect(cert.fingerprint256).toBe(x509.fingerprint256);
    expect(cert.notAfter.getTime()).toBe(new Date(x509.validTo).getTime());
    expect(cert.daysLeft).toBeGreaterThan(360);
    expect(cert.warnings).toEqual([]);
    expect(cert.source).toBe(`${join(dir, 'mail.pem')} + ${join(dir, 'mail.key')}`);
    expect(cert.keyPem).toMatch(/^-----BEGIN PRIVATE KEY-----/);
    // Usable by node:tls as is.
    expect(() => createSecureContext({ cert: cert.certPem, key: cert.keyPem })).not.toThrow();
  });

  it('loads certificate and key from one file (either order)', async () => {
    const c = mailCert();
    const dir = tempDir({ 'a.pem': c.certPem + c.keyPem, 'b.pem': c.keyPem + c.certPem });
    for (const f of ['a.pem', 'b.pem']) {
      const cert = await loadMailPushCredentials({ certPath: join(dir, f) });
      expect(cert.topic).toBe(c.topic);
      expect(cert.source).toBe(join(dir, f));
    }
  });

  it('reads a DER certificate (aps.cer from the developer portal)', async () => {
    const c = mailCert();
    const dir = tempDir({ 'aps.cer': new X509Certificate(c.certPem).raw, 'mail.key': c.keyPem });
    const cert = await loadMailPushCredentials({ certPath: join(dir, 'aps.cer'), keyPath: join(dir, 'mail.key') });
    expect(cert.topic).toBe(c.topic);
    expect(cert.certPem).toMatch(/^-----BEGIN CERTIFICATE-----/);
  });

  it('refuses a key that does not match, naming both files', async () => {
    const c = mailCert();
    const other = mailCert();
    const dir = tempDir({ 'mail.pem': c.certPem, 'other.key': other.keyPem });
    const err = await certError(loadMailPushCredentials({ certPath: join(dir, 'mail.pem'), keyPath: join(dir, 'other.key') }));
    expect(err.code).toBe('key-mismatch');
    expect(err.message).toBe(`${join(dir, 'other.key')}: the private key does not match the certificate in ${join(dir, 'mail.pem')}`);
    expect(err.file).toBe(join(dir, 'other.key'));
  });

  it('explains a missing key, a missing file, a key given as certificate and junk', async () => {
    const c = mailCert();
    const dir = tempDir({ 'mail.pem': c.certPem, 'mail.key': c.keyPem, 'junk.pem': 'hello\n', 'empty.key': '' });
    const noKey = await certError(loadMailPushCredentials({ certPath: join(dir, 'mail.pem') }));
    expect(noKey.code).toBe('no-key');
    expect(noKey.message).toContain(`${join(dir, 'mail.pem')}: no private key`);

    const missing = await certError(loadMailPushCredentials({ certPath: join(dir, 'nope.pem') }));
    expect(missing.code).toBe('unreadable');
    expect(missing.message).toBe(`cannot read ${join(dir, 'nope.pem')}: no such file`);

    const swapped = await certError(loadMailPushCredentials({ certPath: join(dir, 'mail.key'), keyPath: join(dir, 'mail.pem') }));
    expect(swapped.code).toBe('not-a-certificate');
    expect(swapped.message).toContain('holds a private key but no certificate');

    const junk = await certError(loadMailPushCredentials({ certPath: join(dir, 'junk.pem'), keyPath: join(dir, 'mail.key') }));
    expect(junk.code).toBe('not-a-certificate');
    expect(junk.message).toContain(join(dir, 'junk.pem'));

    const emptyKey = await certError(loadMailPushCredentials({ certPath: join(dir, 'mail.pem'), keyPath: join(dir, 'empty.key') }));
    expect(emptyKey.code).toBe('no-key');
  });
});

describe('loadMailPushCredentials: PKCS#12', () => {
  it('loads with the right passphrase', async () => {
    const c = mailCert({ p12Passphrase: 's3cret' });
    const dir = tempDir({ 'push.p12': c.p12, 'mail.pem': c.certPem, 'mail.key': c.keyPem });
    const p12 = await loadMailPushCredentials({ p12Path: join(dir, 'push.p12'), p12Passphrase: 's3cret' });
    const pem = await loadMailPushCredentials({ certPath: join(dir, 'mail.pem'), keyPath: join(dir, 'mail.key') });
    expect(p12.topic).toBe(c.topic);
    expect(p12.fingerprint256).toBe(pem.fingerprint256);
    expect(p12.keyPem).toBe(pem.keyPem);
    expect(p12.source).toBe(join(dir, 'push.p12'));
    expect(() => createSecureContext({ cert: p12.certPem, key: p12.keyPem })).not.toThrow();
  });

  it('says "wrong passphrase" for a wrong or missing passphrase, naming the file', async () => {
    const c = mailCert({ p12Passphrase: 's3cret' });
    const dir = tempDir({ 'push.p12': c.p12 });
    for (const pass of ['wrong', undefined]) {
      const err = await certError(
        loadMailPushCredentials({ p12Path: join(dir, 'push.p12'), ...(pass !== undefined ? { p12Passphrase: pass } : {}) }),
      );
      expect(err.code).toBe('bad-passphrase');
      expect(err.message).toBe(`${join(dir, 'push.p12')}: wrong passphrase for the PKCS#12 file (--apns-p12-passphrase)`);
    }
  });

  it('refuses a PKCS#12 together with a PEM certificate', async () => {
    const c = mailCert();
    const dir = tempDir({ 'push.p12': c.p12, 'mail.pem': c.certPem });
    const err = await certError(loadMailPushCredentials({ p12Path: join(dir, 'push.p12'), certPath: join(dir, 'mail.pem') }));
    expect(err.code).toBe('bad-input');
  });
});

describe('loadMailPushCredentials: validity', () => {
  it('refuses an expired certificate, saying when it expired', async () => {
    const notAfter = new Date(Date.now() - 2 * DAY);
    const c = mailCert({ notBefore: new Date(Date.now() - 400 * DAY), notAfter });
    const dir = tempDir({ 'mail.pem': c.certPem, 'mail.key': c.keyPem });
    const err = await certError(loadMailPushCredentials({ certPath: join(dir, 'mail.pem'), keyPath: join(dir, 'mail.key') }));
    expect(err.code).toBe('expired');
    // Certificates store whole seconds.
    const when = isoDate(new Date(Math.floor(notAfter.getTime() / 1000) * 1000));
    expect(err.message).toBe(`${join(dir, 'mail.pem')}: the certificate expired on ${when}; renew it`);

    const anyway = await loadMailPushCredentials({ certPath: join(dir, 'mail.pem'), keyPath: join(dir, 'mail.key') }, { allowExpired: true });
    expect(anyway.daysLeft).toBeLessThan(0);
    expect(anyway.warnings[0]).toContain('expired on');
  });

  it('refuses a certificate that is not valid yet', async () => {
    const c = mailCert({ notBefore: new Date(Date.now() + 3 * DAY), notAfter: new Date(Date.now() + 300 * DAY) });
    const dir = tempDir({ 'mail.pem': c.certPem + c.keyPem });
    const err = await certError(loadMailPushCredentials({ certPath: join(dir, 'mail.pem') }));
    expect(err.code).toBe('not-yet-valid');
    expect(err.message).toContain('not valid before');
  });

  it('warns from 30 days before expiry (29 days left), not earlier (31)', async () => {
    const c = mailCert();
    const dir = tempDir({ 'mail.pem': c.certPem + c.keyPem });
    const notAfter = (await loadMailPushCredentials({ certPath: join(dir, 'mail.pem') })).notAfter.getTime();
    const at = (msBefore: number) => loadMailPushCredentials({ certPath: join(dir, 'mail.pem') }, { now: new Date(notAfter - msBefore) });

    const soon = await at(29 * DAY + 3_600_000);
    expect(soon.daysLeft).toBe(29);
    expect(soon.warnings).toHaveLength(1);
    expect(soon.warnings[0]).toMatch(/: the certificate expires on \S+ \(29 days left\); renew it$/);

    const fine = await at(31 * DAY);
    expect(fine.daysLeft).toBe(31);
    expect(fine.warnings).toEqual([]);
  });
});

describe('loadMailPushCredentials: topics', () => {
  it('takes the first topics-extension entry when there is no UID', async () => {
    const c = mailCert({ uidTopic: null, extensionTopics: ['com.apple.mobilemail.push.org.example', 'com.example.other'] });
    const dir = tempDir({ 'mail.pem': c.certPem + c.keyPem });
    const cert = await loadMailPushCredentials({ certPath: join(dir, 'mail.pem') });
    expect(cert.topic).toBe('com.apple.mobilemail.push.org.example');
    expect(cert.topics).toEqual(['com.apple.mobilemail.push.org.example', 'com.example.other']);
    expect(cert.subject).not.toContain('UID=');
  });

  it('prefers the UID when both are present', async () => {
    const c = mailCert({ extensionTopics: ['com.apple.mobilemail.push.org.example'] });
    const dir = tempDir({ 'mail.pem': c.certPem + c.keyPem });
    const cert = await loadMailPushCredentials({ certPath: join(dir, 'mail.pem') });
    expect(cert.topic).toBe(c.topic);
    expect(cert.topics).toEqual([c.topic, 'com.apple.mobilemail.push.org.example']);
  });

  it('refuses a certificate without a topic', async () => {
    const c = mailCert({ uidTopic: null });
    const dir = tempDir({ 'mail.pem': c.certPem + c.keyPem });
    const err = await certError(loadMailPushCredentials({ certPath: join(dir, 'mail.pem') }));
    expect(err.code).toBe('no-topic');
    expect(err.message).toContain(`${join(dir, 'mail.pem')}: the certificate has no APNs topic`);
  });
});

describe('error messages', () => {
  it('are one line and never contain key material', async () => {
    const c = mailCert({ p12Passphrase: 'pw' });
    const other = mailCert();
    const dir = tempDir({ 'mail.pem': c.certPem, 'k.key': other.keyPem, 'p.p12': c.p12 });
    writeFileSync(join(dir, 'bad.key'), '-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n');
    const errors = await Promise.all([
      certError(loadMailPushCredentials({ certPath: join(dir, 'mail.pem'), keyPath: join(dir, 'k.key') })),
      certError(loadMailPushCredentials({ certPath: join(dir, 'mail.pem'), keyPath: join(dir, 'bad.key') })),
      certError(loadMailPushCredentials({ p12Path: join(dir, 'p.p12'), p12Passphrase: 'x' })),
    ]);
    expect(errors[1]!.code).toBe('bad-key');
    for (const e of errors) {
      expect(e.message).not.toMatch(/[\r\n]/);
      expect(e.message).not.toContain('PRIVATE KEY');
      expect(e.message).not.toContain(other.keyPem.split('\n')[1]!);
    }
  });
});
