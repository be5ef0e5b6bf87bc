/**
 * Hostile input never crashes the events listener: for arbitrary bodies, headers, methods and
 * paths it answers 2xx or 4xx (never 5xx, never a thrown error), and for arbitrary bytes on the
 * socket it answers 4xx or closes; afterwards it still serves a valid event. The pure parser only
 * ever throws EventFormatError.
 */
import fc from 'fast-check';
import http from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EventFormatError, interpretBody } from '../../../src/watch/events.js';
import { luaBody, RawHttp, request, startListener, type Started } from './events-helpers.js';

const SECRET = 'fuzz-secret';

/** Values that look like parts of events, mixed with anything. */
const anyValue = fc.oneof(
  fc.jsonValue(),
  fc.string(),
  fc.integer(),
  fc.double(),
  fc.constantFrom('MessageNew', 'messageNew', 'MessageAppend', 'FlagsSet', 'INBOX', 'inbox', '&AOk-', '%C3%BC', ''),
  fc.constantFrom(
    'imap://localhost/user/alice;UIDVALIDITY=1/;UID=1',
    'imap://localhost/user/alice/%ZZ;UIDVALIDITY=1/;UID=1',
    'imap://x@y/INBOX;UIDVALIDITY=0/;UID=-1',
    'imap://localhost/user.;UIDVALIDITY=4294967296',
    'imap://localhost/shared/x;UIDVALIDITY=1/;UID=1',
    'imap:///;;;/;UID=',
  ),
);
const eventish = fc.dictionary(
  fc.constantFrom('user', 'event', 'mailbox', 'uid', 'uidvalidity', 'uid_validity', 'folder', 'imap-uid', 'imap-uidvalidity', 'uri', 'uidnext', '__proto__', 'constructor'),
  anyValue,
  { maxKeys: 8 },
);
const bodyArb = fc.oneof(
  eventish.map((o) => JSON.stringify(o)),
  fc.array(eventish, { maxLength: 5 }).map((a) => JSON.stringify(a)),
  fc.json(),
  fc.string({ maxLength: 300 }),
  fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a).toString('latin1')),
  fc.constant(''),
);
/** Header values Node's client accepts (printable, no CR/LF). */
const headerValue = fc.stringMatching(/^[\x20-\x7e]{0,60}$/);

describe('interpretBody on arbitrary input', () => {
  it('returns events or throws EventFormatError, nothing else', () => {
    fc.assert(
      fc.property(bodyArb, (body) => {
        try {
          const events = interpretBody(body);
          for (const e of events) {
            if (e.kind === 'change') {
              expect(e.user.length).toBeGreaterThan(0);
              expect(e.mailbox.length).toBeGreaterThan(0);
              expect(Number.isInteger(e.uid) && e.uid >= 1 && e.uid <= 0xffffffff).toBe(true);
              expect(Number.isInteger(e.uidValidity) && e.uidValidity >= 1).toBe(true);
            }
          }
        } catch (err) {
          if (!(err instanceof EventFormatError)) throw err;
        }
      }),
      { numRuns: 2000 },
    );
  });
});

describe('listener on arbitrary requests', () => {
  let s: Started;
  const agent = new http.Agent({ keepAlive: true, maxSockets: 4 });
  beforeAll(async () => {
    s = await startListener({ secret: SECRET, ratePerSecond: 1e6, rateBurst: 1e6 });
  });
  afterAll(async () => {
    agent.destroy();
    await s.listener.stop(200);
  });

  it('answers 2xx/4xx to arbitrary bodies, headers, methods and paths', async () => {
    await fc.assert(
      fc.asyncProperty(
        bodyArb,
        fc.constantFrom('POST', 'PUT', 'GET', 'DELETE', 'PATCH', 'OPTIONS'),
        fc.constantFrom('/events', '/events/', '/events?x=1', '/', '/nope', '/events/../events', '/%00'),
        fc.record(
          {
            auth: fc.oneof(
              fc.constant({ 'X-Xaps-Secret': SECRET }),
              fc.constant({ Authorization: `Bearer ${SECRET}` }),
              headerValue.map((v) => ({ 'X-Xaps-Secret': v })),
              headerValue.map((v) => ({ Authorization: v })),
              fc.constant({}),
            ),
            expect: fc.boolean(),
            contentType: fc.option(headerValue, { nil: undefined }),
            alt: fc.option(headerValue, { nil: undefined }),
          },
          { requiredKeys: ['auth', 'expect'] },
        ),
        async (body, method, path, h) => {
          const headers: Record<string, string> = { ...h.auth };
          if (h.expect) headers.Expect = '100-continue';
          if (h.contentType !== undefined) headers['Content-Type'] = h.contentType;
          if (h.alt !== undefined) headers['X-Xaps-Cyrus-Altnamespace'] = h.alt;
          const r = await request(s.port, { method, path, headers, body, agent });
          expect(r.status).toBeGreaterThanOrEqual(200);
          expect(r.status).toBeLessThan(500);
          if (r.status === 202) expect(r.json?.ok).toBe(true);
        },
      ),
      { numRuns: 300 },
    );
    expect((await request(s.port, { body: luaBody(), headers: { 'X-Xaps-Secret': SECRET } })).status).toBe(202);
  });

  it('answers 4xx or closes on arbitrary bytes, and keeps serving', async () => {
    const prefix = fc.constantFrom(
      '',
      'POST /events HTTP/1.1\r\n',
      'POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n',
      'POST /events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n',
      `POST /events HTTP/1.1\r\nHost: x\r\nX-Xaps-Secret: ${SECRET}\r\nExpect: 100-continue\r\nContent-Length: 20\r\n\r\n`,
    );
    await fc.assert(
      fc.asyncProperty(prefix, fc.uint8Array({ maxLength: 200 }), async (p, bytes) => {
        const c = await RawHttp.connect(s.port);
        try {
          c.write(Buffer.concat([Buffer.from(p, 'latin1'), Buffer.from(bytes)]));
          c.socket.end();
          await c.waitClosed(8000).catch(() => undefined);
          for (const m of c.data.matchAll(/HTTP\/1\.1 (\d{3})/g)) {
            const status = Number(m[1]);
            expect(status === 100 || (status >= 200 && status < 500)).toBe(true);
          }
        } finally {
          c.close();
        }
      }),
      { numRuns: 60 },
    );
    expect((await request(s.port, { body: luaBody({ uid: 2 }), headers: { 'X-Xaps-Secret': SECRET } })).status).toBe(202);
  }, 120_000);
});
