/**
 * The events endpoint (src/watch/events.ts) under generated input, in-process on loopback.
 * Oracles:
 * - generated new-mail events in the three formats (Dovecot Lua, Dovecot OX, Cyrus URIs with
 *   percent-encoded or modified UTF-7 names, both separators, altnamespace either way) and other
 *   events are interpreted as exactly the changes they describe; over HTTP they are answered 202
 *   with those counts and exactly those changes reach the sink;
 * - arbitrary bodies, headers, methods and paths get the status their request calls for (404,
 *   405, 401, 413, 400 with the parser's reason, 202 with its counts), never a 5xx or a crash;
 * - arbitrary bytes on a socket get a 4xx or a close, and the listener goes on serving;
 * - the pure parser returns events or throws EventFormatError, nothing else.
 */
import fc from 'fast-check';
import http from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodeMailboxName } from '../../src/push/mutf7.js';
import { EventFormatError, interpretBody, MAX_EVENTS_PER_BODY, parseCyrusSwitch, type InterpretedEvent } from '../../src/watch/events.js';
import type { MailboxChange } from '../../src/watch/types.js';
import { luaBody, RawHttp, request, startListener, type Started } from '../unit/watch/events-helpers.js';
import { fuzzAssert, fuzzRuns } from '../helpers/fuzz.js';

const SECRET = 'fuzz-secret';

// ------------------------------------------------------------------------------------------
// A model of valid events

interface ChangeModel {
  kind: 'change';
  user: string;
  mailbox: string;
  uidValidity: number;
  uid: number;
}
interface EventCase {
  /** The JSON object sent. */
  object: Record<string, unknown>;
  expected: ChangeModel | { kind: 'ignored' };
}

const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;
/** The user's own name for INBOX is INBOX in any case. */
const inboxed = (name: string) => (name.toUpperCase() === 'INBOX' ? 'INBOX' : name);

const userName = fc
  .oneof(
    fc.constantFrom('alice', 'bob@example.org', 'Zoë', 'a.b-c_d', 'user', 'x'.repeat(256)),
    fc.string({ unit: 'grapheme', minLength: 1, maxLength: 30 }),
  )
  .filter((u) => u.length > 0 && u.length <= 256 && !CONTROL.test(u));

const mailboxName = fc
  .oneof(
    fc.constantFrom('INBOX', 'inbox', 'Sent Messages', 'Entwürfe', 'A&B', '日本語', 'INBOX/Sub', 'a;b', '100%', '&AOk-'),
    fc.string({ unit: 'grapheme', minLength: 1, maxLength: 30 }),
  )
  .filter((m) => m.length > 0 && m.length <= 1024 && !CONTROL.test(m));

const uint32 = fc.oneof(fc.integer({ min: 1, max: 0xffffffff }), fc.constantFrom(1, 0xffffffff));
/** A UID as senders write it: a JSON number, or a decimal string ("7", " 7 ", "7.0" from a careless Lua %s). */
const uidWritten = (n: number) => fc.constantFrom<unknown>(n, String(n), ` ${n} `, `${n}.0`, `${n}.000`);

const newMailEvent = fc.constantFrom('MessageNew', 'MessageAppend', 'messageNew', 'messageappend', 'MESSAGENEW');
const otherEvent = fc.oneof(
  fc.constantFrom('FlagsSet', 'FlagsClear', 'MessageRead', 'MessageTrash', 'MessageExpunge', 'MailboxCreate', 'vnd.cmu.MessageCopy', 'MessageNewX'),
  fc.string({ minLength: 1, maxLength: 64 }),
).filter((e) => !CONTROL.test(e) && !['messagenew', 'messageappend'].includes(e.toLowerCase()));

/** Fields senders add that mean nothing here. */
const extras = fc.dictionary(fc.constantFrom('from', 'subject', 'snippet', 'pid', 'serverFQDN', 'messages', 'vnd.cmu.mbtype'), fc.jsonValue(), { maxKeys: 3 });

const luaEvent: fc.Arbitrary<EventCase> = fc
  .record({ user: userName, mailbox: mailboxName, v: uint32, u: uint32, event: newMailEvent, vKey: fc.constantFrom('uidvalidity', 'uid_validity'), extra: extras })
  .chain((g) =>
    fc.tuple(uidWritten(g.v), uidWritten(g.u)).map(([v, u]) => ({
      object: { ...g.extra, user: g.user, event: g.event, mailbox: g.mailbox, [g.vKey]: v, uid: u },
      expected: { kind: 'change' as const, user: g.user, mailbox: inboxed(g.mailbox), uidValidity: g.v, uid: g.u },
    })),
  );

const oxEvent: fc.Arbitrary<EventCase> = fc
  .record({ user: userName, mailbox: mailboxName, v: uint32, u: uint32, event: newMailEvent, extra: extras })
  .chain((g) =>
    fc.tuple(uidWritten(g.v), uidWritten(g.u)).map(([v, u]) => ({
      object: { ...g.extra, user: g.user, event: g.event, folder: g.mailbox, 'imap-uid': u, 'imap-uidvalidity': v },
      expected: { kind: 'change' as const, user: g.user, mailbox: inboxed(g.mailbox), uidValidity: g.v, uid: g.u },
    })),
  );

/** Percent-encodes every byte but unreserved characters (what Cyrus' MailboxToURL does, more or less). */
const percent = (s: string) => encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);

/** One level of a Cyrus name: no separator, no "@" (virtual domains), no "&" in the percent-encoded form. */
const component = fc
  .oneof(fc.constantFrom('Work', 'Bücher', 'Tom Jerry', 'a;b', '100%', 'x?y#z', '日本語', 'inbox', 'Neu'), fc.string({ unit: 'grapheme', minLength: 1, maxLength: 12 }))
  .filter((c) => c.length > 0 && !/[/.@&]/.test(c) && !CONTROL.test(c));

const ALT_SWITCHES: Array<[string, boolean]> = [['yes', true], ['no', false], ['On', true], ['off', false], ['1', true], ['0', false], [' TRUE ', true], ['f', false]];

/**
 * Cyrus notify_external: `imap://host/user<sep>local[<sep>sub…][@domain];UIDVALIDITY=v/;UID=u`,
 * the name percent-encoded UTF-8 or raw modified UTF-7; the user's own name for it depends on
 * altnamespace: `alt` from the request's X-Xaps-Cyrus-Altnamespace, else "/" means on, "." off.
 */
const cyrusPersonalEvent = (alt: boolean | undefined): fc.Arbitrary<EventCase> => fc
  .record({
    sep: fc.constantFrom('/', '.'),
    local: fc.stringMatching(/^[a-z0-9_-]{1,12}$/),
    domain: fc.option(fc.constantFrom('example.org', 'mail.example.net'), { nil: undefined }),
    subs: fc.array(component, { maxLength: 3 }),
    encoding: fc.constantFrom('percent', 'mutf7'),
    authority: fc.constantFrom('localhost', 'mail.example.org:143', 'admin@localhost', 'x;AUTH=*@h', ''),
    v: uint32,
    u: uint32,
    uidIn: fc.constantFrom('uri', 'uidnext'),
    vIn: fc.constantFrom('uri', 'body'),
    event: newMailEvent,
    extra: extras,
  })
  .filter((g) => !(g.uidIn === 'uidnext' && g.u === 0xffffffff) && !(g.domain && g.sep === '.'))
  .map((g) => {
    const admin = `user${g.sep}${[g.local, ...g.subs].join(g.sep)}${g.domain ? `@${g.domain}` : ''}`;
    // modified UTF-7 only carries "&" unambiguously next to non-ASCII; the component filter has no "&"
    const path = g.encoding === 'percent' ? percent(admin) : encodeMailboxName(admin).replace(/[%;]/g, (c) => percent(c));
    const uri = `imap://${g.authority}/${path}${g.vIn === 'uri' ? `;UIDVALIDITY=${g.v}` : ''}${g.uidIn === 'uri' ? `/;UID=${g.u}` : ''}`;
    const own = alt ?? g.sep === '/';
    const sub = g.subs.join(g.sep);
    const mailbox = sub === '' ? 'INBOX' : own ? sub : `INBOX${g.sep}${sub}`;
    return {
      object: {
        ...g.extra,
        event: g.event,
        uri,
        user: g.local,
        ...(g.vIn === 'body' ? { uidvalidity: g.v } : {}),
        ...(g.uidIn === 'uidnext' ? { uidnext: g.u + 1 } : {}),
      },
      expected: { kind: 'change' as const, user: g.domain ? `${g.local}@${g.domain}` : g.local, mailbox: inboxed(mailbox), uidValidity: g.v, uid: g.u },
    };
  });

/** RFC 5423 style: `imap://alice@host/INBOX;…`, the name is already the user's own. */
const cyrusUrlUserEvent: fc.Arbitrary<EventCase> = fc
  .record({ user: userName, mailbox: mailboxName, v: uint32, u: uint32, event: newMailEvent })
  // not an admin name ("user/…"), and no 7-bit name with "&" (read as modified UTF-7 when it decodes)
  .filter((g) => !/^user[./]/.test(g.mailbox) && !(/^[\x20-\x7e]*$/.test(g.mailbox) && g.mailbox.includes('&')))
  .map((g) => ({
    object: { event: g.event, uri: `imap://${percent(g.user)}@example.org/${percent(g.mailbox)};UIDVALIDITY=${g.v}/;UID=${g.u}` },
    expected: { kind: 'change' as const, user: g.user, mailbox: inboxed(g.mailbox), uidValidity: g.v, uid: g.u },
  }));

/** Not new mail: acknowledged and dropped, whatever else the object holds. */
const ignoredEvent: fc.Arbitrary<EventCase> = fc
  .record({
    event: otherEvent,
    rest: fc.dictionary(fc.constantFrom('user', 'mailbox', 'folder', 'uri', 'uid', 'imap-uid', 'uidvalidity'), fc.jsonValue(), { maxKeys: 4 }),
  })
  .map((g) => ({ object: { ...g.rest, event: g.event }, expected: { kind: 'ignored' as const } }));

/** Any event, for a request whose altnamespace header says `alt` (built once per setting: building arbitraries is dear). */
const EVENT_CASES = new Map(
  [undefined, true, false].map((alt) => [alt, fc.oneof(luaEvent, oxEvent, cyrusPersonalEvent(alt), cyrusUrlUserEvent, ignoredEvent, ignoredEvent)]),
);
const eventCase = (alt: boolean | undefined) => EVENT_CASES.get(alt)!;

interface BodyCase {
  body: string;
  expected: EventCase['expected'][];
  /** X-Xaps-Cyrus-Altnamespace to send, and what it means. */
  alt: [string, boolean] | undefined;
}

/** One event or an array of them, pretty-printed or not, for a request with or without the altnamespace header. */
const validBody: fc.Arbitrary<BodyCase> = fc.option(fc.constantFrom(...ALT_SWITCHES), { nil: undefined }).chain((alt) =>
  fc.tuple(fc.array(eventCase(alt?.[1]), { minLength: 1, maxLength: 6 }), fc.boolean(), fc.constantFrom(undefined, 0, 2, '\t')).map(([events, asArray, indent]) => {
    const used = asArray ? events : events.slice(0, 1);
    const value = asArray ? used.map((e) => e.object) : used[0]!.object;
    return { body: JSON.stringify(value, null, indent), expected: used.map((e) => e.expected), alt };
  }),
);

function asModel(events: InterpretedEvent[]): Array<EventCase['expected']> {
  return events.map((e) => (e.kind === 'change' ? { kind: 'change', user: e.user, mailbox: e.mailbox, uidValidity: e.uidValidity, uid: e.uid } : { kind: 'ignored' }));
}

function changesOf(expected: EventCase['expected'][]): Array<Pick<MailboxChange, 'user' | 'mailbox' | 'changeId' | 'source'>> {
  return expected
    .filter((e): e is ChangeModel => e.kind === 'change')
    .map((e) => ({ user: e.user, mailbox: e.mailbox, changeId: `${e.mailbox}:${e.uidValidity}:${e.uid}`, source: 'events' }));
}

// ------------------------------------------------------------------------------------------
// Arbitrary input

/** Values that look like parts of events, mixed with anything. */
const anyValue = fc.oneof(
  fc.jsonValue(),
  fc.string(),
  fc.integer(),
  fc.double(),
  fc.constantFrom('MessageNew', 'messageNew', 'MessageAppend', 'FlagsSet', 'INBOX', 'inbox', '&AOk-', '%C3%BC', '', '7.0', ' 8 ', '4294967296', '0'),
  fc.constantFrom(
    'imap://localhost/user/alice;UIDVALIDITY=1/;UID=1',
    'imap://localhost/user/alice/%ZZ;UIDVALIDITY=1/;UID=1',
    'imap://x@y/INBOX;UIDVALIDITY=0/;UID=-1',
    'imap://localhost/user.;UIDVALIDITY=4294967296',
    'imap://localhost/shared/x;UIDVALIDITY=1/;UID=1',
    'imap:///;;;/;UID=',
    'imap://%FF@h/x;UIDVALIDITY=1/;UID=1',
    'imap://h/user/%C3;UIDVALIDITY=1/;UID=1',
  ),
);
const eventish = fc.dictionary(
  fc.constantFrom('user', 'event', 'mailbox', 'uid', 'uidvalidity', 'uid_validity', 'folder', 'imap-uid', 'imap-uidvalidity', 'uri', 'uidnext', '__proto__', 'constructor'),
  anyValue,
  { maxKeys: 8 },
);
const arbitraryBody = fc.oneof(
  eventish.map((o) => JSON.stringify(o)),
  fc.array(eventish, { maxLength: 5 }).map((a) => JSON.stringify(a)),
  eventish.map((o) => JSON.stringify(Array.from({ length: MAX_EVENTS_PER_BODY + 1 }, () => o))), // one too many
  validBody.map((c) => c.body),
  fc.json(),
  fc.string({ maxLength: 300 }),
  fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a).toString('latin1')),
  fc.constant(''),
);
/** Header values Node's client accepts (printable, no CR/LF). */
const headerValue = fc.stringMatching(/^[\x20-\x7e]{0,60}$/);

type Auth = { headers: Record<string, string>; ok: boolean };
const basic = (user: string, password: string) => `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;
const authArb: fc.Arbitrary<Auth> = fc.oneof(
  fc.constantFrom<Auth>(
    { headers: { 'X-Xaps-Secret': SECRET }, ok: true },
    { headers: { 'X-Xaps-Secret': `  ${SECRET} ` }, ok: true },
    { headers: { Authorization: `Bearer ${SECRET}` }, ok: true },
    { headers: { Authorization: `bearer   ${SECRET}` }, ok: true },
    { headers: { Authorization: basic('ox', SECRET) }, ok: true },
    { headers: { Authorization: basic('', SECRET) }, ok: true },
    { headers: { 'X-Xaps-Secret': `${SECRET}x` }, ok: false },
    { headers: { Authorization: `Bearer ${SECRET.toUpperCase()}` }, ok: false },
    { headers: { Authorization: basic(SECRET, 'nope') }, ok: false },
    { headers: { Authorization: SECRET }, ok: false },
    { headers: {}, ok: false },
  ),
  headerValue.filter((v) => v.trim() !== SECRET).map((v): Auth => ({ headers: { 'X-Xaps-Secret': v }, ok: false })),
  headerValue.filter((v) => !v.includes(SECRET)).map((v): Auth => ({ headers: { Authorization: v }, ok: false })),
);

const PATHS: Array<[string, boolean]> = [['/events', true], ['/events/', true], ['/events?x=1', true], ['/events//?a#b', true], ['/', false], ['/nope', false], ['/events/../events', false], ['/%00', false], ['/EVENTS', false], ['/events/x', false]];
const METHODS = ['POST', 'PUT', 'GET', 'DELETE', 'PATCH', 'OPTIONS'];

interface Sent {
  status: number;
  json: Record<string, unknown> | undefined;
}

/** One request on a keep-alive agent; the body in one piece with Content-Length, or chunked. */
function send(port: number, agent: http.Agent, o: { method: string; path: string; headers: Record<string, string>; body: Buffer; chunked: boolean }): Promise<Sent> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = { ...o.headers };
    if (!o.chunked) headers['Content-Length'] = String(o.body.length);
    const req = http.request({ host: '127.0.0.1', port, method: o.method, path: o.path, headers, agent }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        let json: Record<string, unknown> | undefined;
        try {
          json = JSON.parse(Buffer.concat(chunks).toString('utf8')) as Record<string, unknown>;
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode ?? 0, json });
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    const write = () => {
      if (o.chunked) {
        const mid = o.body.length >> 1;
        if (mid > 0) req.write(o.body.subarray(0, mid));
        req.end(o.body.subarray(mid));
      } else {
        req.end(o.body);
      }
    };
    if (/100-continue/i.test(headers.Expect ?? '')) req.on('continue', write);
    else write();
  });
}

/** Resolves once `pred` holds, checking after each turn of the event loop (the sink runs from setImmediate). */
async function until(pred: () => boolean, what: string, ms = 2000): Promise<void> {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setImmediate(r));
  }
}

/** Resolves when the server has closed the connection; fails after `ms`. */
function closed(c: RawHttp, ms: number): Promise<void> {
  if (c.closed) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`connection not closed within ${ms} ms; got ${JSON.stringify(c.data)}`)), ms);
    c.socket.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

// ------------------------------------------------------------------------------------------

describe('events parser properties', () => {
  it('interprets generated events as exactly the changes they describe', () => {
    const prop = fc.property(validBody, (c) => {
      expect(asModel(interpretBody(c.body, { cyrusAltNamespace: c.alt?.[1] ?? 'auto' }))).toEqual(c.expected);
    });
    fuzzAssert(prop, fuzzRuns(500));
  });

  it('returns events or throws EventFormatError on arbitrary bodies, nothing else', () => {
    const prop = fc.property(arbitraryBody, (body) => {
      try {
        for (const e of interpretBody(body)) {
          if (e.kind !== 'change') continue;
          expect(e.user.length).toBeGreaterThan(0);
          expect(e.mailbox.length).toBeGreaterThan(0);
          expect(Number.isInteger(e.uid) && e.uid >= 1 && e.uid <= 0xffffffff).toBe(true);
          expect(Number.isInteger(e.uidValidity) && e.uidValidity >= 1 && e.uidValidity <= 0xffffffff).toBe(true);
        }
      } catch (err) {
        if (!(err instanceof EventFormatError)) throw err;
        expect(err.message).not.toBe('');
      }
    });
    fuzzAssert(prop, fuzzRuns(500));
  });
});

describe('events listener properties (HTTP on loopback)', () => {
  let s: Started;
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  beforeAll(async () => {
    s = await startListener({ secret: SECRET, ratePerSecond: 1e9, rateBurst: 1e9, maxQueuedChanges: 1e9 });
  });
  afterAll(async () => {
    agent.destroy();
    await s.listener.stop(200);
  });

  it('answers generated events 202 and hands exactly their changes to the sink', async () => {
    const prop = fc.asyncProperty(
      validBody,
      authArb.filter((a) => a.ok),
      fc.constantFrom('POST', 'PUT'),
      fc.constantFrom(...PATHS.filter(([, ok]) => ok).map(([p]) => p)),
      fc.boolean(),
      fc.boolean(),
      async (c, auth, method, path, expectContinue, chunked) => {
        const headers: Record<string, string> = { ...auth.headers, 'Content-Type': 'application/json' };
        if (c.alt) headers['X-Xaps-Cyrus-Altnamespace'] = c.alt[0];
        if (expectContinue) headers.Expect = '100-continue';
        const before = s.changes.length;
        const r = await send(s.port, agent, { method, path, headers, body: Buffer.from(c.body, 'utf8'), chunked });
        const want = changesOf(c.expected);
        expect(r.status).toBe(202);
        expect(r.json).toEqual({ ok: true, changes: want.length, ignored: c.expected.length - want.length });
        await until(() => s.changes.length >= before + want.length, 'the changes');
        await new Promise((r) => setImmediate(r));
        expect(s.changes.slice(before).map(({ user, mailbox, changeId, source }) => ({ user, mailbox, changeId, source }))).toEqual(want);
      },
    );
    await fuzzAssert(prop, fuzzRuns(200));
  });

  it('answers arbitrary bodies, headers, methods and paths with the status they call for, never 5xx', async () => {
    const prop = fc.asyncProperty(
      fc.oneof({ weight: 9, arbitrary: arbitraryBody.map((t) => Buffer.from(t, 'latin1')) }, { weight: 1, arbitrary: fc.constant(Buffer.alloc(70_000, 0x7b)) }),
      fc.constantFrom(...METHODS),
      fc.constantFrom(...PATHS),
      fc.record({
        auth: authArb,
        expect: fc.boolean(),
        chunked: fc.boolean(),
        contentType: fc.option(headerValue, { nil: undefined }),
        alt: fc.option(headerValue, { nil: undefined }),
        other: fc.dictionary(fc.stringMatching(/^x-[a-z0-9-]{1,10}$/), headerValue, { maxKeys: 3 }),
      }),
      async (body, method, [path, pathOk], h) => {
        const headers: Record<string, string> = { ...h.other, ...h.auth.headers };
        if (h.expect) headers.Expect = '100-continue';
        if (h.contentType !== undefined) headers['Content-Type'] = h.contentType;
        if (h.alt !== undefined) headers['X-Xaps-Cyrus-Altnamespace'] = h.alt;
        const r = await send(s.port, agent, { method, path, headers, body, chunked: h.chunked });
        // what the request calls for, in the order the listener checks
        if (!pathOk) return void expect(r.status).toBe(404);
        if (method !== 'POST' && method !== 'PUT') return void expect(r.status).toBe(405);
        if (!h.auth.ok) return void expect(r.status).toBe(401);
        if (body.length > 64 * 1024) return void expect(r.status).toBe(413);
        if (body.length === 0 && !h.chunked) return void expect(r.status).toBe(400);
        let events: InterpretedEvent[];
        try {
          events = interpretBody(body, { cyrusAltNamespace: (h.alt === undefined ? undefined : parseCyrusSwitch(h.alt)) ?? 'auto' });
        } catch (err) {
          expect(err).toBeInstanceOf(EventFormatError);
          expect(r.status).toBe(400);
          expect(r.json).toEqual({ ok: false, error: (err as Error).message });
          return;
        }
        const changes = events.filter((e) => e.kind === 'change').length;
        expect(r.status).toBe(202);
        expect(r.json).toEqual({ ok: true, changes, ignored: events.length - changes });
      },
    );
    await fuzzAssert(prop, fuzzRuns(300));
    expect((await request(s.port, { body: luaBody(), headers: { 'X-Xaps-Secret': SECRET } })).status).toBe(202);
  });
});

describe('events listener properties (raw bytes)', () => {
  let s: Started;
  beforeAll(async () => {
    // short timeouts: a request that never completes is cut off quickly
    s = await startListener({ secret: SECRET, ratePerSecond: 1e9, rateBurst: 1e9, headersTimeoutMs: 300, bodyTimeoutMs: 300, keepAliveTimeoutMs: 300 });
  });
  afterAll(async () => {
    await s.listener.stop(200);
  });

  it('answers arbitrary bytes with 4xx or a close, and keeps serving', async () => {
    const prefix = fc.constantFrom(
      '',
      'POST /events HTTP/1.1\r\n',
      'POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n',
      'POST /events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n',
      `POST /events HTTP/1.1\r\nHost: x\r\nX-Xaps-Secret: ${SECRET}\r\nExpect: 100-continue\r\nContent-Length: 20\r\n\r\n`,
      `PUT /events HTTP/1.1\r\nHost: x\r\nX-Xaps-Secret: ${SECRET}\r\nContent-Length: 999999999999999999\r\n\r\n`,
      `POST /events HTTP/1.1\r\nHost: x\r\nX-Xaps-Secret: ${SECRET}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n`,
    );
    // mostly the client ends its side; now and then it stays silent and the server's timeouts must end it
    const prop = fc.asyncProperty(prefix, fc.uint8Array({ maxLength: 200 }), fc.oneof({ weight: 30, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }), async (p, bytes, halfClose) => {
      const c = await RawHttp.connect(s.port);
      try {
        c.write(Buffer.concat([Buffer.from(p, 'latin1'), Buffer.from(bytes)]));
        if (halfClose) c.socket.end();
        await closed(c, 5000);
        for (const m of c.data.matchAll(/HTTP\/1\.1 (\d{3})/g)) {
          const status = Number(m[1]);
          expect(status === 100 || (status >= 200 && status < 500)).toBe(true);
        }
      } finally {
        c.close();
      }
    });
    // a TCP connection per case, some waiting for the server's timeouts: a tenth of the fuzz count
    await fuzzAssert(prop, fuzzRuns(60, 0.1));
    expect((await request(s.port, { body: luaBody({ uid: 2 }), headers: { 'X-Xaps-Secret': SECRET } })).status).toBe(202);
  });
});
