/**
 * Connection limits of the client-facing listeners: at most `maxTotal` connections open at once,
 * and at most `maxPerAddress` from one source. A source is the TCP peer address as the socket
 * reports it (the proxy takes no PROXY protocol header from clients, so nobody can claim another
 * address): an IPv4 address (IPv4-mapped IPv6 included), or for IPv6 its /64, because one
 * IPv6 host or LAN is normally given a whole /64 and can pick any address in it.
 *
 * Counting starts at TCP accept, before any TLS handshake, so connections that never finish
 * their handshake count too.
 */
import { isIPv4, isIPv6 } from 'node:net';

export type LimitReason = 'total_limit' | 'per_address_limit';

export type Admission = { admitted: true; release: () => void } | { admitted: false; reason: LimitReason };

/**
 * The key a peer address is counted under: `a.b.c.d` for IPv4 and IPv4-mapped IPv6
 * (`::ffff:a.b.c.d`), `x:x:x:x::/64` for other IPv6 addresses, the input itself otherwise.
 */
export function addressGroup(address: string): string {
  const ip = address.replace(/%.*$/, ''); // zone index (fe80::1%eth0)
  if (isIPv4(ip)) return ip;
  if (!isIPv6(ip)) return address;
  const groups = expandIPv6(ip);
  if (groups[0] === 0 && groups[1] === 0 && groups[2] === 0 && groups[3] === 0 && groups[4] === 0 && groups[5] === 0xffff) {
    return `${groups[6]! >> 8}.${groups[6]! & 0xff}.${groups[7]! >> 8}.${groups[7]! & 0xff}`;
  }
  return `${groups.slice(0, 4).map((g) => g.toString(16)).join(':')}::/64`;
}

/** The eight 16-bit groups of a valid IPv6 address (`::` and a trailing dotted quad expanded). */
function expandIPv6(ip: string): number[] {
  const toGroups = (part: string): number[] => {
    if (part === '') return [];
    const out: number[] = [];
    for (const piece of part.split(':')) {
      if (piece.includes('.')) {
        const [a, b, c, d] = piece.split('.').map(Number) as [number, number, number, number];
        out.push((a << 8) | b, (c << 8) | d);
      } else {
        out.push(parseInt(piece, 16));
      }
    }
    return out;
  };
  const gap = ip.indexOf('::');
  if (gap < 0) return toGroups(ip);
  const head = toGroups(ip.slice(0, gap));
  const tail = toGroups(ip.slice(gap + 2));
  return [...head, ...new Array<number>(8 - head.length - tail.length).fill(0), ...tail];
}

export class ConnectionLimits {
  private readonly bySource = new Map<string, number>();
  private total = 0;

  /** 0 means unlimited, for either limit. */
  constructor(
    readonly maxTotal: number,
    readonly maxPerAddress: number,
  ) {}

  /**
   * Counts a new connection from `address`, or says which limit it would exceed. The total limit
   * is checked first. `release` (idempotent) must be called when the connection has closed.
   */
  admit(address: string): Admission {
    if (this.maxTotal > 0 && this.total >= this.maxTotal) return { admitted: false, reason: 'total_limit' };
    const key = addressGroup(address);
    const count = this.bySource.get(key) ?? 0;
    if (this.maxPerAddress > 0 && count >= this.maxPerAddress) return { admitted: false, reason: 'per_address_limit' };
    this.bySource.set(key, count + 1);
    this.total++;
    let released = false;
    return {
      admitted: true,
      release: () => {
        if (released) return;
        released = true;
        this.total--;
        const left = (this.bySource.get(key) ?? 1) - 1;
        if (left > 0) this.bySource.set(key, left);
        else this.bySource.delete(key);
      },
    };
  }

  /** Connections counted now: all of them, or those of `address`'s group. */
  count(address?: string): number {
    return address === undefined ? this.total : (this.bySource.get(addressGroup(address)) ?? 0);
  }

  /** Number of distinct sources with a connection open. */
  get sources(): number {
    return this.bySource.size;
  }
}
