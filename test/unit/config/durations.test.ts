import { describe, expect, it } from 'vitest';
import { formatDuration, loadConfig, parseDuration } from '../../../src/config/index.js';
import { BASE, tempDir } from './helpers.js';

describe('durations', () => {
  it('parses units and bare seconds into milliseconds', () => {
    expect(parseDuration('500ms')).toBe(500);
    expect(parseDuration('30s')).toBe(30_000);
    expect(parseDuration('35m')).toBe(2_100_000);
    expect(parseDuration('2h')).toBe(7_200_000);
    expect(parseDuration('30d')).toBe(2_592_000_000);
    expect(parseDuration('90')).toBe(90_000);
    expect(parseDuration('1.5')).toBe(1_500);
    expect(parseDuration('1.5h')).toBe(5_400_000);
    expect(parseDuration('1h30m')).toBe(5_400_000);
    expect(parseDuration(45)).toBe(45_000);
    expect(parseDuration(' 10s ')).toBe(10_000);
  });

  it('rejects malformed durations', () => {
    for (const bad of ['', 'm', '10 m', '10x', '-5s', '5s-', 'ten', '1h 30m', '1e3']) expect(parseDuration(bad), bad).toBeUndefined();
    expect(parseDuration(-1)).toBeUndefined();
    expect(parseDuration(Number.NaN)).toBeUndefined();
  });

  it('formats in the shortest exact unit', () => {
    expect(formatDuration(2_592_000_000)).toBe('30d');
    expect(formatDuration(2_100_000)).toBe('35m');
    expect(formatDuration(5_400_000)).toBe('90m');
    expect(formatDuration(10_000)).toBe('10s');
    expect(formatDuration(1_500)).toBe('1500ms');
    for (const ms of [500, 30_000, 2_100_000, 7_200_000, 2_592_000_000, 1_234]) expect(parseDuration(formatDuration(ms))).toBe(ms);
  });

  it('reads durations from flags, env and YAML (numbers are seconds)', () => {
    const dir = tempDir({ 'x.yaml': 'connect-timeout: 3\nregistration-ttl: 7d\n' });
    const config = loadConfig({ argv: [...BASE, '--config', 'x.yaml', '--idle-timeout', '2h'], env: { XAPS_REGISTRATION_TTL: '12h' }, cwd: dir });
    expect(config.connectTimeout).toBe(3_000);
    expect(config.registrationTtl).toBe(12 * 3_600_000);
    expect(config.idleTimeout).toBe(7_200_000);
    expect(loadConfig({ argv: [...BASE, '--connect-timeout=500ms'], env: {}, cwd: '/' }).connectTimeout).toBe(500);
  });
});
