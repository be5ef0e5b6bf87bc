import { describe, expect, it } from 'vitest';
import { configSchema, envVarName, optionNames, optionsHelp, OPTIONS, type OptionName } from '../../../src/config/index.js';

describe('option table', () => {
  it('derives env var names as XAPS_ + upper snake case', () => {
    expect(envVarName('listen-tls')).toBe('XAPS_LISTEN_TLS');
    expect(envVarName('upstream-servername')).toBe('XAPS_UPSTREAM_SERVERNAME');
    expect(envVarName('config')).toBe('XAPS_CONFIG');
  });

  it('has the documented options', () => {
    expect(optionNames()).toEqual(
      expect.arrayContaining([
        'listen', 'listen-tls', 'tls-cert', 'tls-key', 'upstream', 'upstream-tls', 'upstream-ca', 'upstream-servername',
        'upstream-insecure', 'client-ip', 'apns-topic', 'redis-url', 'data-dir', 'registration-ttl', 'idle-timeout',
        'log-level', 'connect-timeout', 'config',
      ]),
    );
    expect(optionNames('devices').sort()).toEqual(['config', 'data-dir', 'log-level', 'redis-url', 'registration-ttl']);
  });

  it('parses every default with the option\'s own schema', () => {
    for (const name of optionNames() as OptionName[]) {
      const spec = OPTIONS[name] as { default?: string; type: { schema: { safeParse(v: unknown): { success: boolean } } } };
      if (spec.default !== undefined) expect(spec.type.schema.safeParse(spec.default).success, name).toBe(true);
    }
  });

  it('builds one zod object schema per command from the table', () => {
    const result = configSchema('devices').safeParse({ dataDir: '/x', registrationTtl: '1d', logLevel: 'warn' });
    expect(result.success).toBe(true);
    expect(result.data).toEqual({ dataDir: '/x', registrationTtl: 86_400_000, logLevel: 'warn', config: undefined, redisUrl: undefined });
  });
});

describe('help text', () => {
  it('lists every option with its flag, env var and default', () => {
    const help = optionsHelp();
    for (const name of optionNames() as OptionName[]) {
      expect(help, name).toContain(`--${name}`);
      expect(help, name).toContain(envVarName(name));
      const def = (OPTIONS[name] as { default?: string }).default;
      if (def !== undefined) expect(help, name).toMatch(new RegExp(`--${name}\\b[^\\n]*\\n[^\\n]*default ${def.replace(/[/.*+?^${}()|[\]\\]/g, '\\$&')}`));
    }
    expect(help).toContain('--upstream-tls none|starttls|tls');
    expect(help).toContain('--upstream-insecure[=true|false]');
    expect(help).toMatch(/--upstream HOST:PORT\n\s+env XAPS_UPSTREAM, required/);
  });

  it('lists only the options of a command when asked', () => {
    const help = optionsHelp('devices');
    expect(help).toContain('--redis-url');
    expect(help).toContain('XAPS_DATA_DIR');
    expect(help).not.toContain('--upstream');
    expect(help).not.toContain('--listen');
  });
});
