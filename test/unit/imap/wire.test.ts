import { describe, expect, it } from 'vitest';
import { classifyResponse, rewriteCapabilityLine, rewriteCapabilities, capabilitiesOf } from '../../../src/imap/response.js';
import { saslUsername } from '../../../src/imap/sasl.js';
import { stripForwardingKeys, proxyIdCommand } from '../../../src/imap/id.js';
import { loginUsername } from '../../../src/imap/login.js';
import { ArgReader, commandHead, type CommandPart } from '../../../src/imap/tokens.js';
import { proxyV2Header } from '../../../src/proxy/proxy-protocol.js';

const push = { push: true, starttls: false, loginDisabled: false };
const b = (s: string) => Buffer.from(s, 'latin1');
const text = (s: string): CommandPart[] => [{ kind: 'text', data: b(s) }];

describe('capability rewriting', () => {
  it('rewrites the greeting code and keeps the text after it', () => {
    const out = rewriteCapabilityLine(
      b('* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ STARTTLS AUTH=PLAIN AUTH=SCRAM-SHA-256-PLUS] Dovecot ready [x].\r\n'),
      push,
    );
    expect(out.toString()).toBe('* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN XAPPLEPUSHSERVICE] Dovecot ready [x].\r\n');
  });

  it('rewrites untagged lists and tagged OK codes, case-insensitively and without duplicates', () => {
    expect(rewriteCapabilityLine(b('* capability IMAP4rev1 compress=deflate xapplepushservice IDLE\r\n'), push).toString()).toBe(
      '* capability IMAP4rev1 IDLE XAPPLEPUSHSERVICE\r\n',
    );
    expect(rewriteCapabilityLine(b('a1 OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE NOTIFY] Logged in\r\n'), push).toString()).toBe(
      'a1 OK [CAPABILITY IMAP4rev1 NOTIFY XAPPLEPUSHSERVICE] Logged in\r\n',
    );
  });

  it('leaves other lines alone, byte for byte', () => {
    for (const line of ['* 1 FETCH (BODY[] "* CAPABILITY COMPRESS=DEFLATE")\r\n', 'A1 OK done\r\n', '* OK [ALERT] CAPABILITY\r\n']) {
      const buf = b(line);
      expect(rewriteCapabilityLine(buf, push)).toBe(buf);
    }
  });

  it('does not prefix-match and applies the client-leg policy', () => {
    expect(rewriteCapabilities(['IMAP4rev1', 'STARTTLSX', 'AUTH=PLAIN', 'LOGINDISABLED'], { push: false, starttls: true, loginDisabled: true })).toEqual([
      'IMAP4rev1',
      'STARTTLSX',
      'STARTTLS',
      'LOGINDISABLED',
    ]);
    expect(capabilitiesOf(b('* OK [CAPABILITY A B] hi\r\n'))).toEqual(['A', 'B']);
  });
});

describe('response classification', () => {
  it('knows tagged, untagged status, data and continuations', () => {
    expect(classifyResponse(b('A1 OK done\r\n'))).toEqual({ kind: 'tagged', tag: 'A1', status: 'OK' });
    expect(classifyResponse(b('* BYE bye\r\n'))).toEqual({ kind: 'status', status: 'BYE' });
    expect(classifyResponse(b('* 3 EXISTS\r\n'))).toEqual({ kind: 'data', name: 'EXISTS' });
    expect(classifyResponse(b('* CAPABILITY IMAP4rev1\r\n'))).toEqual({ kind: 'data', name: 'CAPABILITY' });
    expect(classifyResponse(b('+ idling\r\n'))).toEqual({ kind: 'continuation' });
  });
});

describe('login names', () => {
  const b64 = (s: string) => Buffer.from(s, 'utf8').toString('base64');
  it('reads PLAIN, LOGIN, SCRAM, OAUTHBEARER and XOAUTH2', () => {
    expect(saslUsername('PLAIN', b64('\0alice\0pw'))).toBe('alice');
    expect(saslUsername('plain', b64('admin\0alice\0pw'))).toBe('admin');
    expect(saslUsername('LOGIN', b64('bob'))).toBe('bob');
    expect(saslUsername('SCRAM-SHA-256', b64('n,,n=carol=2Cx,r=abc'))).toBe('carol,x');
    expect(saslUsername('OAUTHBEARER', b64('n,a=dave@example.org,\x01auth=Bearer x\x01\x01'))).toBe('dave@example.org');
    expect(saslUsername('XOAUTH2', b64('user=erin@example.org\x01auth=Bearer y\x01\x01'))).toBe('erin@example.org');
    expect(saslUsername('PLAIN', 'not base64!')).toBeNull();
    expect(saslUsername('GSSAPI', b64('whatever'))).toBeNull();
  });
  it('reads LOGIN arguments as atom, quoted string or literal', () => {
    expect(loginUsername(text('a LOGIN alice pw\r\n'))).toBe('alice');
    expect(loginUsername(text('a LOGIN "al\\"ice" "pw"\r\n'))).toBe('al"ice');
    expect(
      loginUsername([
        { kind: 'text', data: b('a LOGIN {5}\r\n') },
        { kind: 'literal', data: b('alice') },
        { kind: 'text', data: b(' pw\r\n') },
      ]),
    ).toBe('alice');
    expect(loginUsername(text('a LOGIN\r\n'))).toBeNull();
  });
});

describe('ID', () => {
  it('strips x-* keys from client IDs and leaves others untouched', () => {
    expect(stripForwardingKeys('a', text('a ID ("name" "Mail" "X-Originating-IP" "1.2.3.4" "event" NIL)\r\n'))?.toString()).toBe(
      'a ID ("name" "Mail" "event" NIL)\r\n',
    );
    expect(stripForwardingKeys('a', text('a ID ("name" "Mail")\r\n'))).toBeNull();
    expect(stripForwardingKeys('a', text('a ID NIL\r\n'))).toBeNull();
    expect(stripForwardingKeys('a', text('a ID ("x-originating-ip" "1.2.3.4")\r\n'))?.toString()).toBe('a ID NIL\r\n');
  });
  it('builds the proxy ID with the client address', () => {
    const cmd = proxyIdCommand({ clientIp: '203.0.113.7', clientPort: 51234, localIp: '10.0.0.1', localPort: 993, sessionId: 's1' });
    expect(cmd.toString()).toContain('"x-originating-ip" "203.0.113.7" "x-originating-port" "51234"');
  });
});

describe('tokens', () => {
  it('parses heads and nested values', () => {
    expect(commandHead(b('A1 uid fetch 1 (FLAGS)\r\n'))).toEqual({ tag: 'A1', name: 'UID' });
    expect(commandHead(b('DONE\r\n'))).toBeNull();
    const r = new ArgReader(text('t X "a" (b "c d" NIL) e\r\n'));
    r.atom();
    r.skipSpace();
    r.atom();
    const v = r.rest();
    expect(v.map((x) => x.kind)).toEqual(['string', 'list', 'atom']);
  });
});

describe('PROXY v2', () => {
  it('encodes IPv4 with and without the SSL TLV', () => {
    const plain = proxyV2Header({ sourceIp: '203.0.113.7', sourcePort: 51234, destIp: '127.0.0.1', destPort: 143 });
    expect(plain.subarray(0, 12).toString('hex')).toBe('0d0a0d0a000d0a515549540a');
    expect(plain[12]).toBe(0x21);
    expect(plain[13]).toBe(0x11);
    expect(plain.readUInt16BE(14)).toBe(12);
    expect([...plain.subarray(16, 20)]).toEqual([203, 0, 113, 7]);
    expect(plain.readUInt16BE(24)).toBe(51234);
    const secure = proxyV2Header({ sourceIp: '::ffff:203.0.113.7', sourcePort: 1, destIp: '127.0.0.1', destPort: 993, tlsVersion: 'TLSv1.3' });
    expect(secure[28]).toBe(0x20); // PP2_TYPE_SSL right after the addresses
    expect(secure[31]).toBe(0x01); // PP2_CLIENT_SSL
  });
  it('encodes IPv6', () => {
    const h = proxyV2Header({ sourceIp: '2001:db8::1', sourcePort: 1, destIp: '::1', destPort: 2 });
    expect(h[13]).toBe(0x21);
    expect(h.subarray(16, 32).toString('hex')).toBe('20010db8000000000000000000000001');
  });
});
