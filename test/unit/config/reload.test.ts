import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, configOrigins, loadConfig } from '../../../src/config/index.js';
import { reloadConfig } from '../../../src/config/load.js';
import { expirationSeconds } from '../../../src/apns/payload.js';
import { BASE, configError, tempDir } from './helpers.js';

describe('reloadConfig (SIGHUP)', () => {
  it('re-reads the config file with the same flags and environment, precedence unchanged', () => {
    const dir = tempDir({ 'x.yaml': 'log-level: info\nidle-timeout: 40m\n' });
    const env = { XAPS_IDLE_TIMEOUT: '45m' };
    const first = loadConfig({ argv: [...BASE, '--config', 'x.yaml', '--upstream-tls', 'starttls'], env, cwd: dir });
    expect(first.logLevel).toBe('info');

    writeFileSync(join(dir, 'x.yaml'), 'log-level: debug\nidle-timeout: 50m\nupstream-tls: tls\n');
    const second = reloadConfig(first);
    expect(second.logLevel).toBe('debug');
    expect(configOrigins(second).get('log-level')?.label).toBe(`${join(dir, 'x.yaml')} line 1`);
    expect(second.idleTimeout).toBe(45 * 60_000); // the environment still wins over the file
    expect(second.upstreamTls).toBe('starttls'); // and the flag over both
    expect(first.logLevel).toBe('info');
    // reloading a reloaded configuration works the same way
    writeFileSync(join(dir, 'x.yaml'), 'log-level: warn\n');
    expect(reloadConfig(second).logLevel).toBe('warn');
  });

  it('throws the ConfigError naming the option when the file became invalid', () => {
    const dir = tempDir({ 'x.yaml': 'log-level: info\n' });
    const config = loadConfig({ argv: [...BASE, '--config', 'x.yaml'], env: {}, cwd: dir });
    writeFileSync(join(dir, 'x.yaml'), 'log-level: loud\n');
    const err = configError(() => reloadConfig(config));
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.option).toBe('log-level');
    expect(err.message).toBe(
      `--log-level: expected one of fatal|error|warn|info|debug|trace|silent, got "loud" (from ${join(dir, 'x.yaml')} line 1)`,
    );
    expect(config.logLevel).toBe('info');
  });

  it('refuses objects that were not loaded', () => {
    expect(() => reloadConfig({ logLevel: 'info' })).toThrow(/not a configuration returned by loadConfig/);
  });
});

describe('--drain-timeout', () => {
  it('defaults to 30s, accepts 0 (close at once) and refuses what is not a duration', () => {
    expect(loadConfig({ argv: [...BASE], env: {}, cwd: '/' }).drainTimeout).toBe(30_000);
    expect(loadConfig({ argv: [...BASE, '--drain-timeout', '0'], env: {}, cwd: '/' }).drainTimeout).toBe(0);
    expect(loadConfig({ argv: [...BASE], env: { XAPS_DRAIN_TIMEOUT: '2m' }, cwd: '/' }).drainTimeout).toBe(120_000);
    expect(configError(() => loadConfig({ argv: [...BASE, '--drain-timeout', 'never'], env: {}, cwd: '/' })).message).toMatch(
      /^--drain-timeout: expected a duration .*, got "never" \(from the command line\)$/,
    );
  });
});

describe('--apns-expiration 0', () => {
  it('is accepted and means "deliver now or never" (apns-expiration: 0)', () => {
    const config = loadConfig({ argv: ['--apns-expiration', '0'], env: {}, cwd: '/', command: 'test-push' });
    expect(config.apnsExpiration).toBe(0);
    expect(expirationSeconds(1_700_000_000_000, config.apnsExpiration)).toBe(0);
  });
});
