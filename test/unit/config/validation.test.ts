import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { configWarnings, loadConfig } from '../../../src/config/index.js';
import { BASE, configError, tempDir } from './helpers.js';

const load = (argv: readonly string[], env: Record<string, string> = {}, cwd = '/') => loadConfig({ argv, env, cwd });

describe('validation errors name the option and where the value came from', () => {
  it('matches the documented format for a bad enum from the environment', () => {
    const err = configError(() => load(BASE, { XAPS_UPSTREAM_TLS: 'ssl' }));
    expect(err.message).toBe('--upstream-tls: expected one of none|starttls|tls, got "ssl" (from XAPS_UPSTREAM_TLS)');
    expect(err.option).toBe('upstream-tls');
    expect(err.origin).toBe('XAPS_UPSTREAM_TLS');
  });

  it('says "the command line" for flags and FILE line N for the config file', () => {
    expect(configError(() => load([...BASE, '--client-ip', 'x-forwarded'])).message).toBe(
      '--client-ip: expected one of id|proxy-v2|none, got "x-forwarded" (from the command line)',
    );
    const dir = tempDir({ 'x.yaml': '# comment\nupstream: imap:143\nlog-level: loud\n' });
    expect(configError(() => load(['--listen', '0.0.0.0:143', '--config', 'x.yaml'], {}, dir)).message).toBe(
      `--log-level: expected one of fatal|error|warn|info|debug|trace|silent, got "loud" (from ${join(dir, 'x.yaml')} line 3)`,
    );
  });

  it('checks HOST:PORT', () => {
    const cases: Array<[string, RegExp]> = [
      ['imap.example.net', /^--upstream: expected HOST:PORT \(the port is missing\), got "imap.example.net" \(from the command line\)$/],
      ['imap:0', /^--upstream: the port must be between 1 and 65535, got "imap:0"/],
      ['imap:65536', /port must be between 1 and 65535/],
      ['imap:imap', /numeric port/],
      [':143', /the host is missing/],
      ['::1:143', /IPv6 addresses must be in brackets/],
      ['[1.2.3.4]:143', /"1\.2\.3\.4" is not an IPv6 address/],
      ['300.1.1.1:143', /"300\.1\.1\.1" is not a valid IPv4 address/],
      ['bad_host!:143', /is not a valid host name/],
    ];
    for (const [value, pattern] of cases) {
      expect(configError(() => load(['--listen', '0.0.0.0:143', '--upstream', value])).message).toMatch(pattern);
    }
    expect(load(['--listen', '[::1]:143', '--upstream', '192.0.2.1:143']).listen).toEqual({ host: '::1', port: 143 });
    expect(load(['--listen', 'localhost:143', '--upstream', 'imap-1.internal.:993']).upstream).toEqual({ host: 'imap-1.internal.', port: 993 });
  });

  it('requires --upstream and at least one listener, saying how to set them', () => {
    expect(configError(() => load(['--listen', '0.0.0.0:143'])).message).toBe(
      '--upstream: required (use --upstream HOST:PORT, XAPS_UPSTREAM or "upstream:" in the config file)',
    );
    expect(configError(() => load(['--upstream', 'imap:143'])).message).toMatch(/^--listen: at least one of --listen and --listen-tls is required/);
  });

  it('requires readable TLS files with --listen-tls, naming the option and the path', () => {
    const dir = tempDir({ 'cert.pem': 'c', 'key.pem': 'k' });
    const tls = ['--listen-tls', '0.0.0.0:993', '--upstream', 'imap:143'];
    expect(configError(() => load(tls, { XAPS_LISTEN_TLS: 'x' }, dir)).message).toBe(
      '--tls-cert: required when --listen-tls is set (--listen-tls from the command line)',
    );
    expect(configError(() => load([...tls, '--tls-cert', 'cert.pem'], {}, dir)).message).toBe(
      '--tls-key: required when --listen-tls is set (--listen-tls from the command line)',
    );
    expect(configError(() => load([...tls, '--tls-cert', 'missing.pem', '--tls-key', 'key.pem'], {}, dir)).message).toBe(
      `--tls-cert: cannot read file "${join(dir, 'missing.pem')}": no such file (from the command line)`,
    );
    expect(configError(() => load([...tls, '--tls-cert', 'cert.pem'], { XAPS_TLS_KEY: dir }, dir)).message).toBe(
      `--tls-key: cannot read file "${dir}": is a directory (from XAPS_TLS_KEY)`,
    );
    const ok = load([...tls, '--tls-cert', 'cert.pem', '--tls-key', 'key.pem'], {}, dir);
    expect(ok.tlsCert).toBe(join(dir, 'cert.pem'));
    // With only --listen, TLS files are optional but must come in pairs.
    expect(load(['--listen', '0.0.0.0:143', '--upstream', 'imap:143']).tlsCert).toBeUndefined();
    expect(configError(() => load(['--listen', '0.0.0.0:143', '--upstream', 'imap:143', '--tls-cert', 'cert.pem'], {}, dir)).message).toBe(
      '--tls-key: required together with --tls-cert (--tls-cert from the command line)',
    );
  });

  it('rejects the same address for both listeners', () => {
    const dir = tempDir({ 'c.pem': 'c' });
    const argv = ['--listen', '0.0.0.0:993', '--listen-tls', '0.0.0.0:993', '--upstream', 'i:1', '--tls-cert', 'c.pem', '--tls-key', 'c.pem'];
    expect(configError(() => load(argv, {}, dir)).message).toMatch(/^--listen-tls: must not be the same address as --listen/);
  });

  it('enforces idle-timeout >= 30m with the reason', () => {
    const err = configError(() => load(BASE, { XAPS_IDLE_TIMEOUT: '29m' }));
    expect(err.message).toBe(
      '--idle-timeout: must be at least 30m (IMAP clients re-IDLE every 29 minutes and RFC 3501 autologout is at least 30 minutes), got "29m" (from XAPS_IDLE_TIMEOUT)',
    );
    expect(load(BASE, { XAPS_IDLE_TIMEOUT: '30m' }).idleTimeout).toBe(30 * 60_000);
    expect(load(BASE, { XAPS_IDLE_TIMEOUT: '1h' }).idleTimeout).toBe(3_600_000);
  });

  it('checks the APNs topic prefix', () => {
    expect(configError(() => load([...BASE, '--apns-topic', 'com.example.push'])).message).toBe(
      '--apns-topic: must start with "com.apple.mobilemail.push." or "com.apple.mail." (the topic of the Mail push certificate), got "com.example.push" (from the command line)',
    );
    expect(load([...BASE, '--apns-topic', 'com.apple.mail.XServer.0b6a1b2c']).apnsTopic).toBe('com.apple.mail.XServer.0b6a1b2c');
    expect(load(BASE, { XAPS_APNS_TOPIC: 'com.apple.mobilemail.push.abc' }).apnsTopic).toBe('com.apple.mobilemail.push.abc');
  });

  it('checks booleans, durations and the redis URL without echoing its password', () => {
    expect(configError(() => load(BASE, { XAPS_UPSTREAM_INSECURE: 'maybe' })).message).toBe(
      '--upstream-insecure: expected true|false|1|0|yes|no, got "maybe" (from XAPS_UPSTREAM_INSECURE)',
    );
    expect(configError(() => load([...BASE, '--connect-timeout', 'soon'])).message).toMatch(
      /^--connect-timeout: expected a duration .*, got "soon" \(from the command line\)$/,
    );
    expect(configError(() => load([...BASE, '--connect-timeout', '0'])).message).toMatch(/^--connect-timeout: must be greater than 0/);
    const err = configError(() => load(BASE, { XAPS_REDIS_URL: 'http://:hunter2@redis:6379' }));
    expect(err.message).toMatch(/^--redis-url: .*\(from XAPS_REDIS_URL\)$/);
    expect(err.message).not.toContain('hunter2');
    expect(load(BASE, { XAPS_REDIS_URL: 'redis://:hunter2@redis:6379/1' }).redisUrl).toBe('redis://:hunter2@redis:6379/1');
  });

  it('reports a missing flag value and positional arguments', () => {
    expect(configError(() => load(['--upstream'])).message).toBe('--upstream: missing value (expected HOST:PORT)');
    expect(configError(() => load(['--upstream', '--listen', 'a:1'])).message).toBe('--upstream: missing value (expected HOST:PORT)');
    expect(configError(() => load([...BASE, 'extra'])).message).toBe('unexpected argument "extra"');
  });

  it('messages are always one line', () => {
    const err = configError(() => load(BASE, { XAPS_APNS_TOPIC: 'a\nb' }));
    expect(err.message).not.toMatch(/\n/);
  });
});

describe('unknown options', () => {
  it('rejects an unknown flag, suggesting the closest option', () => {
    const err = configError(() => load(['--lsiten-tls', '0.0.0.0:993']));
    expect(err.message).toBe('--lsiten-tls: unknown option (did you mean --listen-tls?)');
    expect(configError(() => load(['--frobnicate'])).message).toBe('--frobnicate: unknown option');
    expect(configError(() => load(['-x'])).message).toBe('-x: unknown option');
  });

  it('rejects an unknown YAML key, naming it with file and line and suggesting the option', () => {
    const dir = tempDir({ 'x.yaml': 'upstream: imap:143\nlisten_tls: 0.0.0.0:993\n', 'y.yaml': 'upstreem-tls: tls\n', 'z.yaml': 'banana: 1\n' });
    expect(configError(() => load(['--config', 'x.yaml'], {}, dir)).message).toBe(
      `unknown key "listen_tls" in ${join(dir, 'x.yaml')} line 2 (did you mean "listen-tls"?)`,
    );
    const e = configError(() => load(['--config', 'y.yaml'], {}, dir));
    expect(e.message).toBe(`unknown key "upstreem-tls" in ${join(dir, 'y.yaml')} line 1 (did you mean "upstream-tls"?)`);
    expect(e.option).toBe('upstreem-tls');
    expect(configError(() => load(['--config', 'z.yaml'], {}, dir)).message).toBe(`unknown key "banana" in ${join(dir, 'z.yaml')} line 1`);
  });

  it('rejects "config" inside the config file, bad YAML and non-mappings', () => {
    const dir = tempDir({ 'a.yaml': 'config: other.yaml\n', 'b.yaml': 'upstream: [a\n', 'c.yaml': '- listen\n', 'd.yaml': 'upstream: a:1\nupstream: b:1\n' });
    const file = (n: string) => join(dir, n);
    expect(configError(() => load(['--config', 'a.yaml'], {}, dir)).message).toBe(`"config" cannot be set in the config file (${file('a.yaml')} line 1)`);
    expect(configError(() => load(['--config', 'b.yaml'], {}, dir)).message).toMatch(new RegExp(`^--config: invalid YAML in ${file('b.yaml')}`));
    expect(configError(() => load(['--config', 'c.yaml'], {}, dir)).message).toMatch(/^--config: .* must be a mapping of option names to values/);
    expect(configError(() => load(['--config', 'd.yaml'], {}, dir)).message).toMatch(/^--config: invalid YAML .*line 2/);
    expect(configError(() => load(['--config', 'nope.yaml'], {}, dir)).message).toBe(
      `--config: cannot read file "${file('nope.yaml')}": no such file (from the command line)`,
    );
  });

  it('rejects non-scalar values with the option name', () => {
    const dir = tempDir({ 'x.yaml': 'upstream:\n  host: imap\n  port: 143\nlisten: 0.0.0.0:143\n' });
    expect(configError(() => load(['--config', 'x.yaml'], {}, dir)).message).toBe(
      `--upstream: expected HOST:PORT, got a mapping (from ${join(dir, 'x.yaml')} line 1)`,
    );
  });
});

describe('per-command options', () => {
  it('devices needs neither --upstream nor a listener and ignores serve options of the file', () => {
    const dir = tempDir({ 'x.yaml': 'upstream-tls: bogus\nregistration-ttl: 7d\nredis-url: redis://:pw@r:6379/0\n' });
    const config = loadConfig({ argv: ['--config', 'x.yaml', '--data-dir', 'state'], env: { XAPS_LISTEN: 'garbage' }, cwd: dir, command: 'devices' });
    expect(config).toEqual({
      config: join(dir, 'x.yaml'),
      logLevel: 'info',
      redisUrl: 'redis://:pw@r:6379/0',
      dataDir: join(dir, 'state'),
      registrationTtl: 7 * 86_400_000,
    });
  });

  it('devices rejects flags it does not use', () => {
    expect(configError(() => loadConfig({ argv: ['--upstream', 'imap:143'], env: {}, cwd: '/', command: 'devices' })).message).toBe(
      '--upstream: not used by the "devices" command',
    );
  });

  it('still validates what devices uses', () => {
    expect(configError(() => loadConfig({ argv: [], env: { XAPS_REGISTRATION_TTL: '30x' }, cwd: '/', command: 'devices' })).message).toMatch(
      /^--registration-ttl: expected a duration.*got "30x" \(from XAPS_REGISTRATION_TTL\)$/,
    );
  });
});

describe('warnings', () => {
  it('warns about upstream-insecure, options without effect, plain-text listeners and unknown XAPS_ variables', () => {
    const config = load([...BASE, '--upstream-insecure', '--upstream-servername', 'imap.example.net'], { XAPS_LISTEN_TSL: '1', PATH: '/bin' });
    const warnings = configWarnings(config);
    expect(warnings).toContain('--upstream-insecure: upstream certificate verification is DISABLED; use this in a lab only (from the command line)');
    expect(warnings).toContain('--upstream-servername: has no effect with --upstream-tls none (from the command line)');
    expect(warnings.some((w) => w.startsWith('--apns-topic: not set'))).toBe(true);
    expect(warnings).toContain('XAPS_LISTEN_TSL: not a configuration variable, ignored (did you mean XAPS_LISTEN_TLS?)');
    expect(warnings.every((w) => !w.includes('\n'))).toBe(true);
  });

  it('explains what a plain listener without TLS means for logins', () => {
    expect(configWarnings(load(BASE))).toContain(
      '--listen: no --tls-cert/--tls-key: STARTTLS is not offered, so only loopback clients can log in on --listen (from the command line)',
    );
    const open = configWarnings(load([...BASE, '--allow-plaintext-auth']));
    expect(open).toContain('--listen: no --tls-cert/--tls-key: STARTTLS is not offered and clients send passwords in clear text (from the command line)');
    expect(open).toContain('--allow-plaintext-auth: passwords may cross the network in clear text; use this in a lab only (from the command line)');
  });

  it('has none for a complete TLS configuration', () => {
    const dir = tempDir({ 'c.pem': 'c' });
    const config = load(
      ['--listen-tls', '[::]:993', '--tls-cert', 'c.pem', '--tls-key', 'c.pem', '--upstream', 'imap:993', '--upstream-tls', 'tls', '--apns-topic', 'com.apple.mail.XServer.x'],
      {},
      dir,
    );
    expect(configWarnings(config)).toEqual([]);
  });
});
