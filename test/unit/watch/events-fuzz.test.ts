/**
 * Counterexamples the events fuzz properties found, kept as plain tests. The properties
 * themselves (generated events, arbitrary requests and bytes) are in test/fuzz/events.test.ts.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EventFormatError, interpretEvent } from '../../../src/watch/events.js';
import { luaBody, RawHttp, request, startListener, type Started } from './events-helpers.js';

const SECRET = 'fuzz-secret';

describe('a connection answered with Connection: close', () => {
  let s: Started;
  beforeAll(async () => {
    s = await startListener({ secret: SECRET });
  });
  afterAll(async () => {
    await s.listener.stop(200);
  });

  async function exchange(bytes: string): Promise<string> {
    const c = await RawHttp.connect(s.port);
    try {
      c.write(bytes);
      await c.waitClosed(3000);
      return c.data;
    } finally {
      c.close();
    }
  }

  it('gets no second answer for the bytes after it (a body the request did not declare)', async () => {
    // Node's client sends a DELETE body without framing; the 405 was followed by a 400 for those bytes
    const data = await exchange('DELETE /events HTTP/1.1\r\nHost: x\r\n\r\n{"user":"alice"}\r\n\r\n');
    expect(data).toMatch(/^HTTP\/1\.1 405 /);
    expect(data.match(/HTTP\/1\.1 \d{3}/g)).toHaveLength(1);
  });

  it('does not process a request pipelined behind it', async () => {
    const body = luaBody();
    const second = `POST /events HTTP/1.1\r\nHost: x\r\nX-Xaps-Secret: ${SECRET}\r\nContent-Length: ${body.length}\r\n\r\n${body}`;
    const data = await exchange(`POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: ${body.length}\r\n\r\n${body}${second}`);
    expect(data).toMatch(/^HTTP\/1\.1 401 /);
    expect(data.match(/HTTP\/1\.1 \d{3}/g)).toHaveLength(1);
    await new Promise((r) => setTimeout(r, 50));
    expect(s.changes).toHaveLength(0);
    expect(s.listener.counters.accepted).toBe(0);
  });
});

describe('a URI whose user is not UTF-8', () => {
  const body = JSON.stringify({ event: 'MessageNew', uri: 'imap://%FF@h/x;UIDVALIDITY=1/;UID=1' });

  it('is a format error, not a TypeError', () => {
    expect(() => interpretEvent(JSON.parse(body))).toThrow(EventFormatError);
  });

  it('is answered 400 and the listener goes on (the TypeError escaped the request handler)', async () => {
    const s = await startListener();
    try {
      const r = await request(s.port, { body });
      expect(r.status).toBe(400);
      expect(r.json).toEqual({ ok: false, error: 'MessageNew: the user in the URI is not UTF-8' });
      expect((await request(s.port, { body: luaBody() })).status).toBe(202);
    } finally {
      await s.listener.stop(200);
    }
  });
});

describe('Cyrus mailbox names', () => {
  it('may hold U+2028 and U+2029 (a "." in a regular expression does not match them)', () => {
    const uri = 'imap://localhost/user/alice/a%E2%80%A8b%E2%80%A9c;UIDVALIDITY=3/;UID=2';
    expect(interpretEvent({ event: 'MessageNew', uri })).toMatchObject({ kind: 'change', user: 'alice', mailbox: 'a\u2028b\u2029c' });
  });
});
