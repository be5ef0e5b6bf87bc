import { describe, expect, it } from 'vitest';
import { parseRedisUrl, redactRedisUrl } from '../../../src/store/redis-url.js';

describe('parseRedisUrl', () => {
  it('parses single-server URLs', () => {
    expect(parseRedisUrl('redis://localhost')).toEqual({ mode: 'standalone', tls: false, host: 'localhost', port: 6379, db: 0 });
    expect(parseRedisUrl('redis://10.0.0.5:6380/3')).toEqual({ mode: 'standalone', tls: false, host: '10.0.0.5', port: 6380, db: 3 });
    expect(parseRedisUrl('rediss://user:pa%3Ass@redis.example.org:6390')).toEqual({
      mode: 'standalone', tls: true, host: 'redis.example.org', port: 6390, db: 0, username: 'user', password: 'pa:ss',
    });
    expect(parseRedisUrl('redis://:only-pass@h/2')).toMatchObject({ password: 'only-pass', db: 2 });
    expect(parseRedisUrl('redis://:only-pass@h/2')).not.toHaveProperty('username');
    expect(parseRedisUrl('redis://[::1]:7000')).toMatchObject({ host: '::1', port: 7000 });
    expect(parseRedisUrl('redis://h?db=4')).toMatchObject({ db: 4 });
    expect(parseRedisUrl('REDIS://h')).toMatchObject({ mode: 'standalone' });
  });

  it('takes unencoded @ and / in a password', () => {
    expect(parseRedisUrl('redis://u:a@b/c@host:1234/1')).toMatchObject({ username: 'u', password: 'a@b/c', host: 'host', port: 1234, db: 1 });
  });

  it('parses Sentinel URLs', () => {
    expect(parseRedisUrl('redis+sentinel://u:p@s1:26379,s2,[::1]:26380/mymaster?db=2&sentinelPassword=sp')).toEqual({
      mode: 'sentinel', tls: false, username: 'u', password: 'p', masterName: 'mymaster', db: 2,
      sentinels: [{ host: 's1', port: 26379 }, { host: 's2', port: 26379 }, { host: '::1', port: 26380 }],
      sentinelPassword: 'sp',
    });
    expect(parseRedisUrl('rediss+sentinel://s1/m')).toMatchObject({ tls: true, masterName: 'm', db: 0 });
  });

  it('parses Cluster URLs', () => {
    expect(parseRedisUrl('redis+cluster://h1:7000,h2:7001')).toEqual({
      mode: 'cluster', tls: false, nodes: [{ host: 'h1', port: 7000 }, { host: 'h2', port: 7001 }],
    });
    expect(parseRedisUrl('rediss+cluster://:pw@h1')).toEqual({ mode: 'cluster', tls: true, password: 'pw', nodes: [{ host: 'h1', port: 6379 }] });
  });

  const bad: Array<[string, RegExp]> = [
    ['', /empty/],
    ['localhost:6379', /scheme/],
    ['http://h', /unknown scheme/],
    ['redis://', /missing host/],
    ['redis://:secret@h:0', /port "0"/],
    ['redis://:secret@h:abc', /port "abc"/],
    ['redis://:secret@h:70000', /port/],
    ['redis://:secret@h/x', /database "x"/],
    ['redis://:secret@h/1?db=2', /both/],
    ['redis://:secret@h1,h2', /one host/],
    ['redis://:secret@h?foo=1', /unknown query parameter "foo"/],
    ['redis://user@h', /username needs a password/],
    ['redis://:sec%zzret@h', /password has a bad percent-encoding/],
    ['redis://::1:6379', /brackets/],
    ['redis://[::1', /unterminated/],
    ['redis+sentinel://:secret@s1,s2', /missing master name/],
    ['redis+sentinel://:secret@s1,,s2/m', /empty host/],
    ['redis+cluster://:secret@h1/3', /only database 0/],
    ['redis+cluster://:secret@h1?db=1', /not supported/],
    ['redis://:secret@h#frag', /fragments/],
  ];
  for (const [url, re] of bad) {
    it(`rejects ${JSON.stringify(url)}`, () => {
      let err: unknown;
      try {
        parseRedisUrl(url);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(Error);
      expect((err as Error).message).toMatch(/--redis-url/);
      expect((err as Error).message).toMatch(re);
      expect((err as Error).message).not.toContain('secret');
      expect((err as Error).message).not.toContain('sec%zzret');
    });
  }
});

describe('redactRedisUrl', () => {
  it('hides passwords, also in the query', () => {
    expect(redactRedisUrl('redis://u:p@ss@h:1/0')).toBe('redis://u:***@h:1/0');
    expect(redactRedisUrl('redis://:pw@h')).toBe('redis://:***@h');
    expect(redactRedisUrl('redis://h:6379')).toBe('redis://h:6379');
    expect(redactRedisUrl('redis+sentinel://s1,s2/m?db=1&sentinelPassword=x')).toBe('redis+sentinel://s1,s2/m?db=1&sentinelPassword=***');
    expect(redactRedisUrl('user:pw@host')).toBe('user:***@host');
  });
});
