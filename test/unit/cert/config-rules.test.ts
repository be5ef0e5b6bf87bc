/** The cross-option rules about the Mail push certificate files and the certificate request options. */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, configWarnings, loadConfig } from '../../../src/config/index.js';
import { tempDir } from './helpers.js';

const SERVE = ['--listen', '127.0.0.1:1143', '--upstream', 'imap.example.net:143'];

function files() {
  const dir = tempDir();
  for (const f of ['c.pem', 'k.pem', 'p.p12', 'v.pem', 'vk.pem', 'pw']) writeFileSync(join(dir, f), 'x\n');
  return dir;
}

function error(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    if (err instanceof ConfigError) return err.message;
    throw err;
  }
  throw new Error('expected a ConfigError');
}

describe('certificate option rules', () => {
  it('refuses --apns-cert together with --apns-p12, for every command that reads the certificate', () => {
    const cwd = files();
    for (const [command, base] of [['serve', SERVE], ['test-push', []], ['cert', []]] as const) {
      const msg = error(() => loadConfig({ argv: [...base, '--apns-cert', 'c.pem', '--apns-p12', 'p.p12'], cwd, env: {}, command }));
      expect(msg).toMatch(/^--apns-p12: cannot be combined with --apns-cert/);
    }
  });

  it('refuses --apns-key without --apns-cert', () => {
    const cwd = files();
    expect(error(() => loadConfig({ argv: [...SERVE, '--apns-key', 'k.pem'], cwd, env: {}, command: 'serve' }))).toBe(
      '--apns-key: requires --apns-cert (from the command line)',
    );
    expect(error(() => loadConfig({ argv: ['--apns-key', 'k.pem', '--apns-p12', 'p.p12'], cwd, env: {}, command: 'test-push' }))).toMatch(
      /^--apns-key: cannot be combined with --apns-p12/,
    );
    const ok = loadConfig({ argv: [...SERVE, '--apns-cert', 'c.pem', '--apns-key', 'k.pem'], cwd, env: {}, command: 'serve' });
    expect(ok.apnsCert).toBe(join(cwd, 'c.pem'));
  });

  it('warns about a passphrase without --apns-p12 (serve), not for cert (show takes .p12 FILEs)', () => {
    const cwd = files();
    const serve = loadConfig({ argv: [...SERVE, '--apns-cert', 'c.pem', '--apns-p12-passphrase', 'x'], cwd, env: {}, command: 'serve' });
    expect(configWarnings(serve)).toContain('--apns-p12-passphrase: has no effect without --apns-p12 (from the command line)');
    const cert = loadConfig({ argv: ['--apns-p12-passphrase', 'x'], cwd, env: {}, command: 'cert' });
    expect(configWarnings(cert)).toEqual([]);
  });

  it('needs both halves of the vendor material', () => {
    const cwd = files();
    for (const command of ['serve', 'cert'] as const) {
      const base = command === 'serve' ? SERVE : [];
      expect(error(() => loadConfig({ argv: [...base, '--cert-vendor-cert', 'v.pem'], cwd, env: {}, command }))).toMatch(
        /^--cert-vendor-key: required together with --cert-vendor-cert/,
      );
    }
  });

  it('serve: auto-renewal needs the account and a certificate, and warns that Apple refuses', () => {
    const cwd = files();
    const vendor = ['--cert-vendor-cert', 'v.pem', '--cert-vendor-key', 'vk.pem'];
    expect(error(() => loadConfig({ argv: [...SERVE, ...vendor, '--apns-cert', 'c.pem'], cwd, env: {}, command: 'serve' }))).toMatch(
      /^--cert-apple-id: required for automatic renewal/,
    );
    expect(
      error(() =>
        loadConfig({ argv: [...SERVE, ...vendor, '--cert-apple-id', 'a@example.org', '--cert-password-file', 'pw'], cwd, env: {}, command: 'serve' }),
      ),
    ).toMatch(/^--apns-cert: required for automatic renewal .*the certificate to renew/);
    const ok = loadConfig({
      argv: [...SERVE, ...vendor, '--cert-apple-id', 'a@example.org', '--cert-password-file', 'pw', '--apns-cert', 'c.pem'],
      cwd,
      env: {},
      command: 'serve',
    });
    expect(configWarnings(ok).some((w) => w.startsWith('--cert-vendor-cert: automatic renewal') && w.includes('2024-10-29'))).toBe(true);
    expect(ok.certServiceUrl).toBeUndefined();

    const idle = loadConfig({ argv: [...SERVE, '--cert-apple-id', 'a@example.org'], cwd, env: {}, command: 'serve' });
    expect(configWarnings(idle)).toContain(
      '--cert-apple-id: has no effect without --cert-vendor-cert and --cert-vendor-key (no automatic renewal) (from the command line)',
    );
  });

  it('checks --cert-service-url', () => {
    const cwd = files();
    expect(error(() => loadConfig({ argv: ['--cert-service-url', 'ftp://x/new'], cwd, env: {}, command: 'cert' }))).toMatch(
      /^--cert-service-url: expected an http\(s\):\/\/ URL/,
    );
    const c = loadConfig({ argv: ['--cert-service-url', 'http://127.0.0.1:8080/pushcert/caservice/new'], cwd, env: {}, command: 'cert' });
    expect(c.certServiceUrl).toBe('http://127.0.0.1:8080/pushcert/caservice/new');
  });
});
