import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { describeConfig, loadConfig, optionNames, OPTIONS, type OptionName } from '../../../src/config/index.js';
import { BASE, tempDir } from './helpers.js';

describe('describeConfig', () => {
  it('masks the redis password and secret query parameters', () => {
    const config = loadConfig({ argv: [...BASE], env: { XAPS_REDIS_URL: 'redis://admin:hunter2@redis.internal:6380/2' }, cwd: '/' });
    const text = describeConfig(config);
    expect(text).not.toContain('hunter2');
    expect(text).toMatch(/^redis-url: redis:\/\/admin:\*\*\*@redis\.internal:6380\/2 +# from XAPS_REDIS_URL$/m);
    const sentinel = loadConfig({
      argv: [...BASE, '--redis-url', 'redis+sentinel://:pw1@s1:26379,s2/mymaster?sentinelPassword=pw2'],
      env: {},
      cwd: '/',
    });
    const t2 = describeConfig(sentinel);
    expect(t2).not.toContain('pw1');
    expect(t2).not.toContain('pw2');
    expect(t2).toContain('redis-url: redis+sentinel://:***@s1:26379,s2/mymaster?sentinelPassword=***');
  });

  it('prints every option of the command, unset ones commented out, with origins', () => {
    const config = loadConfig({ argv: [...BASE, '--upstream-tls', 'starttls'], env: { XAPS_LOG_LEVEL: 'debug' }, cwd: '/' });
    const text = describeConfig(config);
    expect(text).toMatch(/^upstream-tls: starttls +# from --upstream-tls$/m);
    expect(text).toMatch(/^log-level: debug +# from XAPS_LOG_LEVEL$/m);
    expect(text).toMatch(/^idle-timeout: 35m +# default$/m);
    expect(text).toMatch(/^registration-ttl: 30d +# default$/m);
    expect(text).toMatch(/^# apns-topic: +\(not set: push disabled/m);
    expect(text).toMatch(/^# listen-tls: +\(not set\)$/m);
    for (const name of optionNames('serve')) {
      if (name === 'config') continue;
      expect(text, name).toMatch(new RegExp(`^(# )?${name}:`, 'm'));
    }
    expect(text).not.toMatch(/^(# )?config:/m);
  });

  it('prints YAML that loads back as the same configuration (when no secret is involved)', () => {
    const dir = tempDir({ 'c.pem': 'c' });
    const original = loadConfig({
      argv: ['--listen', '[::]:143', '--listen-tls', '0.0.0.0:993', '--tls-cert', 'c.pem', '--tls-key', 'c.pem', '--upstream', 'imap:143',
        '--upstream-tls', 'starttls', '--upstream-insecure', '--idle-timeout', '1h30m', '--apns-topic', 'com.apple.mail.XServer.1', '--client-ip', 'proxy-v2'],
      env: {},
      cwd: dir,
    });
    const text = describeConfig(original);
    const parsed = parse(text) as Record<string, unknown>;
    expect(Object.keys(parsed).every((k) => (optionNames() as string[]).includes(k))).toBe(true);
    writeFileSync(join(dir, 'round.yaml'), text);
    const again = loadConfig({ argv: ['--config', 'round.yaml'], env: {}, cwd: dir });
    const { config: _a, ...a } = original;
    const { config: _b, ...b } = again;
    expect(b).toEqual(a);
  });

  it('masks any option marked secret', () => {
    const secrets = (Object.keys(OPTIONS) as OptionName[]).filter((n) => (OPTIONS[n] as { secret?: boolean }).secret);
    expect(secrets).toContain('redis-url');
  });
});
