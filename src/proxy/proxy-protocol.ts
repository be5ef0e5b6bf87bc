/**
 * PROXY protocol v2 header (haproxy's proxy-protocol.txt §2.2), sent as the first
 * bytes of an upstream connection. With the PP2_TYPE_SSL TLV Dovecot counts the
 * connection as secure; without it, plaintext logins are refused.
 */
import net from 'node:net';

const SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);
const VERSION_PROXY = 0x21; // version 2, PROXY command
const AF_INET_STREAM = 0x11;
const AF_INET6_STREAM = 0x21;
const PP2_TYPE_SSL = 0x20;
const PP2_CLIENT_SSL = 0x01;
const PP2_SUBTYPE_SSL_VERSION = 0x21;

export interface ProxyHeaderInput {
  sourceIp: string;
  sourcePort: number;
  destIp: string;
  destPort: number;
  /** TLS version string (e.g. "TLSv1.3") when the client leg is TLS. */
  tlsVersion?: string | null;
}

function ipv4Bytes(ip: string): Buffer {
  return Buffer.from(ip.split('.').map((n) => Number(n)));
}

function ipv6Bytes(ip: string): Buffer {
  const v4mapped = /^(.*:)(\d+\.\d+\.\d+\.\d+)$/.exec(ip);
  let text = ip;
  if (v4mapped) {
    const b = ipv4Bytes(v4mapped[2]);
    text = `${v4mapped[1]}${b.readUInt16BE(0).toString(16)}:${b.readUInt16BE(2).toString(16)}`;
  }
  const [head, tail] = text.includes('::') ? text.split('::') : [text, null];
  const headParts = head ? head.split(':') : [];
  const tailParts = tail ? tail.split(':') : [];
  const missing = 8 - headParts.length - tailParts.length;
  const groups = [...headParts, ...Array(tail === null ? 0 : missing).fill('0'), ...tailParts];
  const out = Buffer.alloc(16);
  groups.forEach((g, i) => out.writeUInt16BE(parseInt(g || '0', 16), i * 2));
  return out;
}

function unmapV4(ip: string): string {
  const m = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(ip);
  return m ? m[1] : ip;
}

function sslTlv(tlsVersion: string): Buffer {
  const version = Buffer.from(tlsVersion, 'latin1');
  const sub = Buffer.alloc(3 + version.length);
  sub[0] = PP2_SUBTYPE_SSL_VERSION;
  sub.writeUInt16BE(version.length, 1);
  version.copy(sub, 3);
  const value = Buffer.alloc(5);
  value[0] = PP2_CLIENT_SSL;
  value.writeUInt32BE(0, 1); // verify: 0 = client certificate verified or not required
  const body = Buffer.concat([value, sub]);
  const head = Buffer.alloc(3);
  head[0] = PP2_TYPE_SSL;
  head.writeUInt16BE(body.length, 1);
  return Buffer.concat([head, body]);
}

export function proxyV2Header(input: ProxyHeaderInput): Buffer {
  const src = unmapV4(input.sourceIp);
  const dst = unmapV4(input.destIp);
  const bothV4 = net.isIPv4(src) && net.isIPv4(dst);
  const addresses = Buffer.alloc(bothV4 ? 12 : 36);
  if (bothV4) {
    ipv4Bytes(src).copy(addresses, 0);
    ipv4Bytes(dst).copy(addresses, 4);
    addresses.writeUInt16BE(input.sourcePort, 8);
    addresses.writeUInt16BE(input.destPort, 10);
  } else {
    ipv6Bytes(net.isIPv4(src) ? `::ffff:${src}` : src).copy(addresses, 0);
    ipv6Bytes(net.isIPv4(dst) ? `::ffff:${dst}` : dst).copy(addresses, 16);
    addresses.writeUInt16BE(input.sourcePort, 32);
    addresses.writeUInt16BE(input.destPort, 34);
  }
  const tlv = input.tlsVersion ? sslTlv(input.tlsVersion) : Buffer.alloc(0);
  const head = Buffer.alloc(16);
  SIGNATURE.copy(head, 0);
  head[12] = VERSION_PROXY;
  head[13] = bothV4 ? AF_INET_STREAM : AF_INET6_STREAM;
  head.writeUInt16BE(addresses.length + tlv.length, 14);
  return Buffer.concat([head, addresses, tlv]);
}
