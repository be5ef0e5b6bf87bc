/** `xaps-proxy cert show|csr` through the real entry point. */
import { X509Certificate } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import forge from 'node-forge';
import { describe, expect, it } from 'vitest';
import { runCli } from '../cli/helpers.js';
import { DAY, mailCert, tempDir } from './helpers.js';

describe('xaps-proxy cert show', () => {
  it('shows subject, topic, issuer, serial, validity, days left and the key match', async () => {
    const c = mailCert();
    const dir = tempDir({ 'mail.pem': c.certPem, 'mail.key': c.keyPem });
    const r = await runCli(['cert', 'show', 'mail.pem', 'mail.key'], { cwd: dir });
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const serial = new X509Certificate(c.certPem).serialNumber.toUpperCase();
    expect(r.stdout).toContain(`file:       ${join(dir, 'mail.pem')}\n`);
    expect(r.stdout).toContain(`subject:    UID=${c.topic}, CN=APSP:`);
    expect(r.stdout).toContain(`topic:      ${c.topic}\n`);
    expect(r.stdout).toContain('issuer:     CN=xaps-proxy Test Root CA, O=xaps-proxy tests\n');
    expect(r.stdout).toContain(`serial:     ${serial}\n`);
    expect(r.stdout).toMatch(/not after: {2}\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n/);
    expect(r.stdout).toMatch(/status: {5}valid, 36\d days left\n/);
    expect(r.stdout).toContain(`key:        matches (${join(dir, 'mail.key')})\n`);
    expect(r.stdout).not.toContain('PRIVATE KEY');
  });

  it('reads PKCS#12 with --passphrase and prints JSON', async () => {
    const c = mailCert({ p12Passphrase: 'open sesame', extensionTopics: ['com.apple.mobilemail.push.org.example'] });
    const dir = tempDir({ 'push.p12': c.p12 });
    const r = await runCli(['cert', 'show', join(dir, 'push.p12'), '--passphrase', 'open sesame', '--json']);
    expect(r.code).toBe(0);
    const [shown] = JSON.parse(r.stdout) as Array<Record<string, any>>;
    expect(shown).toMatchObject({
      file: join(dir, 'push.p12'),
      topic: c.topic,
      topics: [c.topic, 'com.apple.mobilemail.push.org.example'],
      status: 'valid',
      key: { given: true, matches: true, file: join(dir, 'push.p12') },
      usable: true,
      problems: [],
    });
    expect(shown!.daysLeft).toBeGreaterThan(360);
  });

  it('fails (exit 1) with one line on a wrong passphrase', async () => {
    const c = mailCert({ p12Passphrase: 'right' });
    const dir = tempDir({ 'push.p12': c.p12 });
    const r = await runCli(['cert', 'show', 'push.p12', '--apns-p12-passphrase', 'wrong'], { cwd: dir });
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toBe(`xaps-proxy: ${join(dir, 'push.p12')}: wrong passphrase for the PKCS#12 file (--apns-p12-passphrase)\n`);
  });

  it('reports a key mismatch and an expired certificate (exit 1)', async () => {
    const c = mailCert();
    const other = mailCert();
    const old = mailCert({ notBefore: new Date(Date.now() - 400 * DAY), notAfter: new Date(Date.now() - 3 * DAY) });
    const dir = tempDir({ 'mail.pem': c.certPem, 'other.key': other.keyPem, 'old.pem': old.certPem + old.keyPem });
    const mismatch = await runCli(['cert', 'show', 'mail.pem', 'other.key'], { cwd: dir });
    expect(mismatch.code).toBe(1);
    expect(mismatch.stdout).toContain('key:        DOES NOT MATCH\n');
    expect(mismatch.stdout).toContain(`problems:   the private key given (${join(dir, 'other.key')}) does not match\n`);

    const expired = await runCli(['cert', 'show', 'old.pem', '--json'], { cwd: dir });
    expect(expired.code).toBe(1);
    const [shown] = JSON.parse(expired.stdout) as Array<Record<string, any>>;
    expect(shown).toMatchObject({ status: 'expired', usable: false, key: { matches: true } });
    expect(shown!.problems[0]).toMatch(/^expired on /);
  });

  it('shows the configured certificate when no FILE is given', async () => {
    const c = mailCert();
    const dir = tempDir({ 'mail.pem': c.certPem, 'mail.key': c.keyPem });
    const r = await runCli(['cert', 'show'], { cwd: dir, env: { XAPS_APNS_CERT: 'mail.pem', XAPS_APNS_KEY: 'mail.key' } });
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(`topic:      ${c.topic}\n`);
    expect(r.stdout).toContain('key:        matches');

    const none = await runCli(['cert', 'show'], { cwd: dir });
    expect(none.code).toBe(2);
    expect(none.stderr).toMatch(/^xaps-proxy: cert show: give FILE\(s\)/);
  });
});

describe('xaps-proxy cert csr', () => {
  it('writes a 0600 RSA-2048 key and a SHA-256 CSR, prints the next steps, and keeps an existing key', async () => {
    const dir = tempDir();
    const out = join(dir, 'apns');
    const r = await runCli(['cert', 'csr', '--out', 'apns', '--subject', '/CN=Example Mail push/O=Example Ltd/C=DE'], { cwd: dir });
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const keyPath = join(out, 'mail-push.key');
    const csrPath = join(out, 'mail-push.csr');
    expect(statSync(keyPath).mode & 0o777).toBe(0o600);
    const keyPem = readFileSync(keyPath, 'utf8');
    const csr = forge.pki.certificationRequestFromPem(readFileSync(csrPath, 'utf8'));
    expect(csr.verify()).toBe(true);
    expect(csr.siginfo.algorithmOid).toBe(forge.pki.oids.sha256WithRSAEncryption);
    expect((csr.publicKey as forge.pki.rsa.PublicKey).n.bitLength()).toBe(2048);
    expect(forge.pki.publicKeyToPem(csr.publicKey!)).toBe(
      forge.pki.publicKeyToPem(forge.pki.setRsaPublicKey((forge.pki.privateKeyFromPem(keyPem) as forge.pki.rsa.PrivateKey).n, (forge.pki.privateKeyFromPem(keyPem) as forge.pki.rsa.PrivateKey).e)),
    );
    expect(csr.subject.getField('CN').value).toBe('Example Mail push');
    expect(csr.subject.getField('C').value).toBe('DE');
    expect(r.stdout).toContain('com.apple.mobilemail.push.');
    expect(r.stdout).toContain('Apple Push Notification service SSL (Sandbox & Production)');
    expect(r.stdout).toContain(`--apns-cert ${join(out, 'mail-push.pem')} --apns-key ${keyPath}`);
    expect(r.stdout).toContain('docs/certificates.md');
    expect(r.stdout).not.toContain('PRIVATE KEY');

    const again = await runCli(['cert', 'csr', '--out', out], { cwd: dir });
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/mail-push\.key exists; not replacing it/);
    expect(readFileSync(keyPath, 'utf8')).toBe(keyPem);

    const forced = await runCli(['cert', 'csr', '--cert-out', out, '--force'], { cwd: dir });
    expect(forced.code).toBe(0);
    expect(readFileSync(keyPath, 'utf8')).not.toBe(keyPem);
  });

  it('needs --out, and rejects a bad --subject', async () => {
    const dir = tempDir();
    const noOut = await runCli(['cert', 'csr'], { cwd: dir });
    expect(noOut.code).toBe(2);
    expect(noOut.stderr).toBe('xaps-proxy: cert csr: --out DIR (or --cert-out) is required\n');
    const bad = await runCli(['cert', 'csr', '--out', dir, '--subject', 'CN=x'], { cwd: dir });
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/^xaps-proxy: --subject: expected \/CN=…\/O=…\/C=…/);
  });
});

describe('xaps-proxy cert (other)', () => {
  it('prints help with the cert options', async () => {
    const r = await runCli(['cert', '--help']);
    expect(r.code).toBe(0);
    for (const s of ['cert show', 'cert csr', 'request --out DIR', 'renew [--out DIR]', '--cert-apple-id', '--cert-vendor-cert', '--apns-p12-passphrase']) {
      expect(r.stdout).toContain(s.replace(/^cert /, ''));
    }
  });

  it('says what is missing for a certificate request, and points to the developer-portal route', async () => {
    const dir = tempDir();
    writeFileSync(join(dir, 'pw'), 'secret\n');
    const r = await runCli(['cert', 'request', '--out', dir, '--cert-password-file', 'pw'], { cwd: dir });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^xaps-proxy: cert request: --cert-apple-id, --cert-vendor-cert, --cert-vendor-key are required/);
    expect(r.stderr).toContain('2024-10-29');
    expect(r.stderr).toContain('cert csr');
    expect(r.stderr.trimEnd().split('\n')).toHaveLength(1);
  });

  it('rejects unknown subcommands', async () => {
    const r = await runCli(['cert', 'frobnicate']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('unknown cert command "frobnicate"');
  });
});
