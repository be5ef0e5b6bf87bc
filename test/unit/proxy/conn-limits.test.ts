/**
 * Connection limits: which addresses count as one source (IPv4, IPv4-mapped IPv6, an IPv6 /64),
 * the total and per-source limits, and releasing.
 */
import { describe, expect, it } from 'vitest';
import { addressGroup, ConnectionLimits, type Admission } from '../../../src/proxy/conn-limits.js';

function admitted(a: Admission): () => void {
  if (!a.admitted) throw new Error(`refused: ${a.reason}`);
  return a.release;
}

describe('addressGroup', () => {
  it('keeps IPv4 addresses and unwraps IPv4-mapped IPv6 ones', () => {
    expect(addressGroup('127.0.0.1')).toBe('127.0.0.1');
    expect(addressGroup('203.0.113.7')).toBe('203.0.113.7');
    expect(addressGroup('::ffff:203.0.113.7')).toBe('203.0.113.7');
    expect(addressGroup('::FFFF:cb00:7107')).toBe('203.0.113.7');
  });

  it('counts IPv6 per /64, whatever the spelling', () => {
    const group = '2001:db8:0:1::/64';
    for (const ip of ['2001:db8:0:1::1', '2001:0db8:0000:0001:ffff:ffff:ffff:ffff', '2001:DB8:0:1:0:0:0:2', '2001:db8::1:0:0:0:9']) {
      expect(addressGroup(ip), ip).toBe(group);
    }
    expect(addressGroup('2001:db8:0:2::1')).toBe('2001:db8:0:2::/64');
    expect(addressGroup('::1')).toBe('0:0:0:0::/64');
    expect(addressGroup('fe80::1%eth0')).toBe('fe80:0:0:0::/64');
    expect(addressGroup('64:ff9b::192.0.2.1')).toBe('64:ff9b:0:0::/64');
  });

  it('leaves anything that is no address as it is', () => {
    expect(addressGroup('')).toBe('');
    expect(addressGroup('not-an-ip')).toBe('not-an-ip');
  });
});

describe('ConnectionLimits', () => {
  it('refuses beyond the per-source limit, per source, and admits again after a release', () => {
    const limits = new ConnectionLimits(0, 2);
    const a1 = admitted(limits.admit('198.51.100.1'));
    admitted(limits.admit('::ffff:198.51.100.1'));
    expect(limits.admit('198.51.100.1')).toEqual({ admitted: false, reason: 'per_address_limit' });
    admitted(limits.admit('198.51.100.2'));
    expect(limits.count('198.51.100.1')).toBe(2);
    expect(limits.count()).toBe(3);
    a1();
    a1(); // releasing twice counts once
    expect(limits.count('198.51.100.1')).toBe(1);
    admitted(limits.admit('198.51.100.1'));
    expect(limits.count()).toBe(3);
  });

  it('treats a whole IPv6 /64 as one source', () => {
    const limits = new ConnectionLimits(0, 2);
    admitted(limits.admit('2001:db8::1'));
    admitted(limits.admit('2001:db8::2'));
    expect(limits.admit('2001:db8::ffff:3')).toEqual({ admitted: false, reason: 'per_address_limit' });
    admitted(limits.admit('2001:db8:0:1::1'));
  });

  it('refuses beyond the total limit first, and forgets sources that have gone', () => {
    const limits = new ConnectionLimits(2, 1);
    const a = admitted(limits.admit('192.0.2.1'));
    const b = admitted(limits.admit('192.0.2.2'));
    expect(limits.admit('192.0.2.3')).toEqual({ admitted: false, reason: 'total_limit' });
    expect(limits.admit('192.0.2.1')).toEqual({ admitted: false, reason: 'total_limit' });
    a();
    expect(limits.admit('192.0.2.2')).toEqual({ admitted: false, reason: 'per_address_limit' });
    b();
    expect(limits.count()).toBe(0);
    expect(limits.sources).toBe(0);
  });

  it('0 means unlimited', () => {
    const limits = new ConnectionLimits(0, 0);
    for (let i = 0; i < 1000; i++) admitted(limits.admit('192.0.2.1'));
    expect(limits.count('192.0.2.1')).toBe(1000);
  });
});
