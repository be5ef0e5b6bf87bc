import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { main } from '../../../src/cli/main.js';
import { envVarName, optionNames } from '../../../src/config/index.js';
import { memoryIO, runCli } from './helpers.js';

const dir = mkdtempSync(join(tmpdir(), 'xaps-cli-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('xaps-proxy (spawned)', () => {
  it('config check: prints the masked configuration and "configuration OK", exit 0', async () => {
    writeFileSync(join(dir, 'ok.yaml'), 'listen: 127.0.0.1:1143\nupstream: imap.example.net:143\n');
    const r = await runCli(['config', 'check', '--config', 'ok.yaml', '--client-ip', 'none'], {
      cwd: dir,
      env: { XAPS_REDIS_URL: 'redis://:s3cret@redis:6379/0' },
    });
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/configuration OK\n$/);
    expect(r.stdout).toMatch(/^listen: 127\.0\.0\.1:1143 +# from .*ok\.yaml line 1$/m);
    expect(r.stdout).toMatch(/^client-ip: none +# from --client-ip$/m);
    expect(r.stdout).toContain('redis-url: redis://:***@redis:6379/0');
    expect(r.stdout + r.stderr).not.toContain('s3cret');
    expect(r.stderr).toContain('xaps-proxy: warning: --listen: no --tls-cert/--tls-key');
  });

  it('config check: one error line on stderr, exit 2', async () => {
    const r = await runCli(['config', 'check', '--listen', '127.0.0.1:1143', '--upstream', 'imap:143'], { env: { XAPS_UPSTREAM_TLS: 'ssl' } });
    expect(r.code).toBe(2);
    expect(r.stdout).toBe('');
    expect(r.stderr).toBe('xaps-proxy: --upstream-tls: expected one of none|starttls|tls, got "ssl" (from XAPS_UPSTREAM_TLS)\n');
  });

  it('config check: unknown YAML key, exit 2', async () => {
    writeFileSync(join(dir, 'typo.yaml'), 'upstream: imap:143\nlisten-tsl: 0.0.0.0:993\n');
    const r = await runCli(['config', 'check', '--config', join(dir, 'typo.yaml')]);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(`xaps-proxy: unknown key "listen-tsl" in ${join(dir, 'typo.yaml')} line 2 (did you mean "listen-tls"?)\n`);
  });

  it('unknown subcommand: usage on stderr, exit 2', async () => {
    const r = await runCli(['frobnicate']);
    expect(r.code).toBe(2);
    expect(r.stdout).toBe('');
    expect(r.stderr).toContain('xaps-proxy: unknown command "frobnicate"');
    expect(r.stderr).toContain('Usage: xaps-proxy <command>');
  });
});

describe('main()', () => {
  it('prints the version', async () => {
    const io = memoryIO();
    expect(await main(['version'], io)).toBe(0);
    expect(io.out()).toMatch(/^xaps-proxy \d+\.\d+\.\d+/);
  });

  it('help lists commands and every option with its env var', async () => {
    const io = memoryIO();
    expect(await main(['--help'], io)).toBe(0);
    for (const cmd of ['serve', 'config check', 'devices list', 'devices remove', 'devices purge-expired', 'demo', 'version']) {
      expect(io.out()).toContain(cmd);
    }
    for (const name of optionNames()) {
      expect(io.out()).toContain(`--${name}`);
      expect(io.out()).toContain(envVarName(name));
    }
  });

  it('serve --help and devices --help show the options of that command', async () => {
    const serve = memoryIO();
    expect(await main(['serve', '--help'], serve)).toBe(0);
    expect(serve.out()).toContain('--upstream HOST:PORT');
    const devices = memoryIO();
    expect(await main(['devices', '--help'], devices)).toBe(0);
    expect(devices.out()).toContain('--redis-url');
    expect(devices.out()).not.toContain('--upstream');
  });

  it('no arguments: usage on stderr, exit 2', async () => {
    const io = memoryIO();
    expect(await main([], io)).toBe(2);
    expect(io.err()).toContain('Usage:');
  });

  it('serve with a bad configuration exits 2 before starting anything', async () => {
    const io = memoryIO({ env: { XAPS_UPSTREAM: 'imap:143' } });
    expect(await main(['serve', '--listen', '0.0.0.0:143', '--idle-timeout', '5m'], io)).toBe(2);
    expect(io.err()).toMatch(/^xaps-proxy: --idle-timeout: must be at least 30m .*\(from the command line\)\n$/);
  });

  it('config without "check" and unknown config subcommands exit 2', async () => {
    const a = memoryIO();
    expect(await main(['config'], a)).toBe(2);
    const b = memoryIO();
    expect(await main(['config', 'show'], b)).toBe(2);
    expect(b.err()).toBe('xaps-proxy: unknown config command "show" (expected: config check)\n');
  });

  it('unknown flags are configuration errors (exit 2)', async () => {
    const io = memoryIO();
    expect(await main(['config', 'check', '--upstrem', 'x:1'], io)).toBe(2);
    expect(io.err()).toBe('xaps-proxy: --upstrem: unknown option (did you mean --upstream?)\n');
  });
});
