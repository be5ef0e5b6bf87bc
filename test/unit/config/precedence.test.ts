import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, expectTypeOf, it } from 'vitest';
import {
  configOrigins,
  loadConfig,
  type Config,
  type DevicesConfig,
  type HostPort,
} from '../../../src/config/index.js';
import { BASE, tempDir } from './helpers.js';

const THIS_FILE = fileURLToPath(import.meta.url);

describe('precedence: flag > env > file > default', () => {
  const yaml = ['upstream-tls: tls', 'connect-timeout: 20s', 'client-ip: proxy-v2', 'log-level: debug', 'listen: 10.0.0.1:143', 'upstream: file.example:143'].join('\n');

  it('takes each option from the highest-precedence source that sets it', () => {
    const dir = tempDir({ 'xaps.yaml': yaml });
    const config = loadConfig({
      argv: ['--config', 'xaps.yaml', '--upstream-tls', 'starttls', '--listen', '127.0.0.1:1143'],
      env: { XAPS_UPSTREAM_TLS: 'none', XAPS_CONNECT_TIMEOUT: '5s', XAPS_LISTEN: '10.9.9.9:143' },
      cwd: dir,
    });
    expect(config.upstreamTls).toBe('starttls'); // flag beats env and file
    expect(config.connectTimeout).toBe(5_000); // env beats file
    expect(config.clientIp).toBe('proxy-v2'); // file beats default
    expect(config.logLevel).toBe('debug');
    expect(config.listen).toEqual({ host: '127.0.0.1', port: 1143 }); // flag beats env and file
    expect(config.upstream).toEqual({ host: 'file.example', port: 143 });
    expect(config.idleTimeout).toBe(35 * 60_000); // default
    expect(config.registrationTtl).toBe(30 * 86_400_000);
    expect(config.dataDir).toBe('/var/lib/xaps-proxy');
    expect(config.upstreamInsecure).toBe(false);

    const origins = configOrigins(config);
    expect(origins.get('upstream-tls')).toEqual({ kind: 'flag', label: '--upstream-tls' });
    expect(origins.get('connect-timeout')).toEqual({ kind: 'env', label: 'XAPS_CONNECT_TIMEOUT' });
    expect(origins.get('client-ip')).toEqual({ kind: 'file', label: `${join(dir, 'xaps.yaml')} line 3` });
    expect(origins.get('idle-timeout')).toEqual({ kind: 'default', label: 'default' });
  });

  it('finds the config file through XAPS_CONFIG, and --config beats it', () => {
    const dir = tempDir({ 'a.yaml': 'client-ip: none\n', 'b.yaml': 'client-ip: proxy-v2\n' });
    expect(loadConfig({ argv: [...BASE], env: { XAPS_CONFIG: 'a.yaml' }, cwd: dir }).clientIp).toBe('none');
    expect(loadConfig({ argv: [...BASE, '--config', 'b.yaml'], env: { XAPS_CONFIG: 'a.yaml' }, cwd: dir }).clientIp).toBe('proxy-v2');
  });

  it('accepts --flag=value and --flag value, the last repetition winning', () => {
    const config = loadConfig({ argv: [...BASE, '--client-ip=none', '--client-ip', 'proxy-v2'], env: {}, cwd: '/' });
    expect(config.clientIp).toBe('proxy-v2');
  });

  it('treats empty environment variables and empty YAML values as unset', () => {
    const dir = tempDir({ 'x.yaml': 'client-ip:\nupstream-tls: tls\n' });
    const config = loadConfig({ argv: [...BASE, '--config', 'x.yaml'], env: { XAPS_UPSTREAM_TLS: '' }, cwd: dir });
    expect(config.upstreamTls).toBe('tls');
    expect(config.clientIp).toBe('id');
  });

  it('resolves relative paths against cwd for flags/env and against the file directory for the file', () => {
    const dir = tempDir({ 'cert.pem': 'x', 'key.pem': 'y' });
    const confDir = tempDir({ 'x.yaml': 'data-dir: state\ntls-cert: ../' + dir.split('/').pop() + '/cert.pem\n' });
    const config = loadConfig({
      argv: [...BASE, '--config', join(confDir, 'x.yaml'), '--tls-key', 'key.pem'],
      env: {},
      cwd: dir,
    });
    expect(config.dataDir).toBe(join(confDir, 'state'));
    expect(config.tlsCert).toBe(join(dir, 'cert.pem'));
    expect(config.tlsKey).toBe(join(dir, 'key.pem'));
  });

  it('reads booleans as a bare switch, --x=false and true/false/1/0/yes/no elsewhere', () => {
    const args = [...BASE, '--upstream-tls', 'tls'];
    expect(loadConfig({ argv: [...args, '--upstream-insecure'], env: {}, cwd: '/' }).upstreamInsecure).toBe(true);
    expect(loadConfig({ argv: [...args, '--upstream-insecure=false'], env: {}, cwd: '/' }).upstreamInsecure).toBe(false);
    for (const [text, value] of [['yes', true], ['1', true], ['TRUE', true], ['no', false], ['0', false], ['false', false]] as const) {
      expect(loadConfig({ argv: args, env: { XAPS_UPSTREAM_INSECURE: text }, cwd: '/' }).upstreamInsecure).toBe(value);
    }
    const dir = tempDir({ 'a.yaml': 'upstream-insecure: true\n', 'b.yaml': 'upstream-insecure: yes\n', 'c.yaml': 'upstream-insecure: 0\n' });
    expect(loadConfig({ argv: [...args, '--config', 'a.yaml'], env: {}, cwd: dir }).upstreamInsecure).toBe(true);
    expect(loadConfig({ argv: [...args, '--config', 'b.yaml'], env: {}, cwd: dir }).upstreamInsecure).toBe(true);
    expect(loadConfig({ argv: [...args, '--config', 'c.yaml'], env: {}, cwd: dir }).upstreamInsecure).toBe(false);
    // A bare switch does not swallow the next argument.
    const c = loadConfig({ argv: ['--upstream-insecure', '--listen', '127.0.0.1:1143', '--upstream', 'u:1'], env: {}, cwd: '/' });
    expect(c.upstreamInsecure).toBe(true);
    expect(c.listen?.port).toBe(1143);
  });

  it('returns a deeply frozen object with camelCase keys', () => {
    const config = loadConfig({ argv: [...BASE, '--listen-tls', '[::]:993', '--tls-cert', THIS_FILE, '--tls-key', THIS_FILE], env: {}, cwd: '/' });
    expect(Object.isFrozen(config)).toBe(true);
    expect(Object.isFrozen(config.upstream)).toBe(true);
    expect(config.listenTls).toEqual({ host: '::', port: 993 });
    expect(Object.keys(config)).toEqual(expect.arrayContaining(['listen', 'listenTls', 'tlsCert', 'upstreamTls', 'idleTimeout', 'redisUrl', 'dataDir']));
    expect(() => {
      (config as { upstreamTls: string }).upstreamTls = 'tls';
    }).toThrow(TypeError);
  });

  it('types the configuration from the option table', () => {
    const config = loadConfig({ argv: [...BASE], env: {}, cwd: '/' });
    expectTypeOf(config).toEqualTypeOf<Config>();
    expectTypeOf(config.upstream).toEqualTypeOf<HostPort>();
    expectTypeOf(config.listen).toEqualTypeOf<HostPort | undefined>();
    expectTypeOf(config.upstreamTls).toEqualTypeOf<'none' | 'starttls' | 'tls'>();
    expectTypeOf(config.idleTimeout).toEqualTypeOf<number>();
    expectTypeOf(config.redisUrl).toEqualTypeOf<string | undefined>();
    const devices = loadConfig({ argv: [], env: {}, cwd: '/', command: 'devices' });
    expectTypeOf(devices).toEqualTypeOf<import('../../../src/config/index.js').ConfigFor<'devices'>>();
    expectTypeOf<DevicesConfig>().not.toHaveProperty('upstream');
    expectTypeOf<DevicesConfig>().toHaveProperty('registrationTtl').toEqualTypeOf<number>();
    expect(devices.registrationTtl).toBe(30 * 86_400_000);
    expect(Object.keys(devices).sort()).toEqual(['config', 'dataDir', 'logLevel', 'redisUrl', 'registrationTtl']);
  });
});
