import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import forge from 'node-forge';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runConfigCheck } from '../../../src/cli/config-check.js';
import { memoryIO } from './helpers.js';

const dir = mkdtempSync(join(tmpdir(), 'xaps-check-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function rsaKey(): string {
  return generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ type: 'pkcs1', format: 'pem' }).toString();
}

function selfSigned(keyPem: string): string {
  const key = forge.pki.privateKeyFromPem(keyPem) as forge.pki.rsa.PrivateKey;
  const cert = forge.pki.createCertificate();
  cert.publicKey = forge.pki.setRsaPublicKey(key.n, key.e);
  cert.serialNumber = '01';
  cert.validity.notBefore = new Date(Date.now() - 60_000);
  cert.validity.notAfter = new Date(Date.now() + 86_400_000);
  const name = [{ name: 'commonName', value: 'xaps.test' }];
  cert.setSubject(name);
  cert.setIssuer(name);
  cert.sign(key, forge.md.sha256.create());
  return forge.pki.certificateToPem(cert);
}

beforeAll(() => {
  const key = rsaKey();
  writeFileSync(join(dir, 'key.pem'), key);
  writeFileSync(join(dir, 'cert.pem'), selfSigned(key));
  writeFileSync(join(dir, 'other-key.pem'), rsaKey());
  writeFileSync(join(dir, 'junk.pem'), 'not a certificate\n');
});

const base = ['--listen-tls', '127.0.0.1:1993', '--upstream', 'imap:993', '--upstream-tls', 'tls', '--apns-topic', 'com.apple.mail.XServer.t'];

describe('config check', () => {
  it('accepts a matching certificate and key', () => {
    const io = memoryIO({ cwd: dir });
    expect(runConfigCheck([...base, '--tls-cert', 'cert.pem', '--tls-key', 'key.pem', '--upstream-ca', 'cert.pem'], io)).toBe(0);
    expect(io.out()).toMatch(/^tls-cert: .*cert\.pem +# from --tls-cert$/m);
    expect(io.out().endsWith('configuration OK\n')).toBe(true);
    expect(io.err()).toBe('');
  });

  it('rejects a key that does not belong to the certificate, in one line, exit 2', () => {
    const io = memoryIO({ cwd: dir });
    expect(runConfigCheck([...base, '--tls-cert', 'cert.pem', '--tls-key', 'other-key.pem'], io)).toBe(2);
    expect(io.out()).toBe('');
    expect(io.err()).toMatch(/^xaps-proxy: --tls-key: cannot be used with --tls-cert ".*cert\.pem" \(.*\); expected a PEM certificate chain and its private key\n$/);
  });

  it('rejects a CA file without certificates', () => {
    const io = memoryIO({ cwd: dir });
    expect(runConfigCheck([...base, '--tls-cert', 'cert.pem', '--tls-key', 'key.pem', '--upstream-ca', 'junk.pem'], io)).toBe(2);
    expect(io.err()).toMatch(/^xaps-proxy: --upstream-ca: ".*junk\.pem" is not a usable PEM CA file \(no PEM certificate found\)\n$/);
  });

  it('prints warnings on stderr and still succeeds', () => {
    const io = memoryIO({ cwd: dir });
    expect(runConfigCheck([...base, '--tls-cert', 'cert.pem', '--tls-key', 'key.pem', '--upstream-insecure'], io)).toBe(0);
    expect(io.err()).toBe('xaps-proxy: warning: --upstream-insecure: upstream certificate verification is DISABLED; use this in a lab only (from the command line)\n');
  });
});
