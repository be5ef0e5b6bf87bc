/**
 * Issue 2 acceptance (property tests): any split of a recorded session into
 * chunks gives the same output through the proxy, in both directions; random
 * bytes from either side never crash the proxy.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { RawImap } from '../helpers/raw-imap.js';
import { startFakeUpstream, writeInPieces, type FakeUpstream } from '../helpers/fake-upstream.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';

const SERVER_SCRIPT = Buffer.from(
  '* CAPABILITY IMAP4rev1 COMPRESS=DEFLATE IDLE\r\n' +
    'a1 OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE NOTIFY] Logged in\r\n' +
    '* 1 FETCH (UID 7 BODY[] {52}\r\n* CAPABILITY IMAP4rev1 COMPRESS=DEFLATE\r\nA1 OK done\r\n)\r\n' +
    '* 2 FETCH (BINARY[] ~{6}\r\n\x00\xff\r\n{3}\r\n)\r\n' +
    '* LIST () "/" {7}\r\nFoo Bar\r\n' +
    '* STATUS {3}\r\nBaz (MESSAGES 1)\r\n' +
    'a2 NO [ALERT] over quota {12}\r\n' +
    '* OK Still here\r\n',
  'latin1',
);

const CLIENT_SCRIPT = Buffer.from(
  'a1 LOGIN "alice" "pw"\r\n' +
    'a2 APPEND INBOX (\\Seen) {11+}\r\nhello\r\nabc\r\n' +
    'a3 SEARCH SUBJECT "x {5}"\r\n' +
    'a4 APPEND INBOX ~{4+}\r\n\x00\x01\x02\x03\r\n' +
    'a5 UID FETCH 1:* (BODY.PEEK[])\r\n' +
    'a6 NOOP\r\n',
  'latin1',
);

describe('session property tests (scripted upstream)', () => {
  let upstream: FakeUpstream;
  let proxy: TestProxy;
  beforeAll(async () => {
    upstream = await startFakeUpstream();
    proxy = await startTestProxy({ upstreamPort: upstream.port, flags: ['--log-level', 'silent'] });
  });
  afterAll(async () => {
    await proxy?.stop();
    await upstream?.close();
  });

  async function serverToClient(cuts: number[]): Promise<Buffer> {
    const c = await RawImap.connect({ port: proxy.plainPort });
    await c.greeting();
    const conn = await upstream.nextConnection();
    c.all(); // mark
    const before = c.all().length;
    await writeInPieces(conn.socket, SERVER_SCRIPT, cuts);
    await c.until((t) => t.includes('* OK Still here\r\n'));
    const out = c.all().subarray(before);
    c.close();
    return out;
  }

  async function clientToServer(cuts: number[]): Promise<Buffer> {
    const c = await RawImap.connect({ port: proxy.plainPort });
    await c.greeting();
    const conn = await upstream.nextConnection();
    await writeInPieces(c.socket, CLIENT_SCRIPT, cuts);
    await conn.waitFor(CLIENT_SCRIPT.length);
    const got = conn.received();
    c.close();
    return got;
  }

  it('server to client: any chunking gives the same bytes', async () => {
    const reference = await serverToClient([]);
    // literals pass untouched; only capability lists are rewritten
    expect(reference.toString('latin1')).toContain('{52}\r\n* CAPABILITY IMAP4rev1 COMPRESS=DEFLATE\r\nA1 OK done\r\n)');
    expect(reference.toString('latin1')).toMatch(/^\* CAPABILITY IMAP4rev1 IDLE\r\n/);
    expect(reference.toString('latin1')).toContain('a1 OK [CAPABILITY IMAP4rev1 NOTIFY] Logged in\r\n');
    await fc.assert(
      fc.asyncProperty(fc.array(fc.integer({ min: 1, max: SERVER_SCRIPT.length - 1 }), { maxLength: 40 }), async (cuts) => {
        const out = await serverToClient(cuts);
        expect(out.equals(reference)).toBe(true);
      }),
      { numRuns: 60 },
    );
  }, 120_000);

  it('client to server: any chunking gives the same bytes', async () => {
    const reference = await clientToServer([]);
    expect(reference.equals(CLIENT_SCRIPT)).toBe(true);
    await fc.assert(
      fc.asyncProperty(fc.array(fc.integer({ min: 1, max: CLIENT_SCRIPT.length - 1 }), { maxLength: 40 }), async (cuts) => {
        const out = await clientToServer(cuts);
        expect(out.equals(CLIENT_SCRIPT)).toBe(true);
      }),
      { numRuns: 60 },
    );
  }, 120_000);

  it('random bytes from either side never crash the proxy', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ minLength: 1, maxLength: 4096 }), fc.uint8Array({ maxLength: 4096 }), async (fromClient, fromServer) => {
        const c = await RawImap.connect({ port: proxy.plainPort });
        await c.greeting();
        const conn = await upstream.nextConnection();
        c.send(Buffer.from(fromClient));
        conn.socket.write(Buffer.from(fromServer));
        await new Promise((r) => setTimeout(r, 5));
        c.close();
        conn.socket.destroy();
      }),
      { numRuns: 150 },
    );
    // still serving: a clean session relays as before
    const c = await RawImap.connect({ port: proxy.plainPort });
    expect(await c.greeting()).toMatch(/^\* OK /);
    const conn = await upstream.nextConnection();
    c.send('z1 NOOP\r\n');
    await conn.waitFor(9);
    expect(conn.received().toString()).toBe('z1 NOOP\r\n');
    c.close();
  }, 120_000);
});
