/**
 * Events listener over HTTP: 202 at once then the sink, the shared secret, Expect: 100-continue
 * (checked before the body is read), and the bounds (body size, rate, concurrency, slow clients).
 */
import { afterEach, describe, expect, it } from 'vitest';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Registry } from 'prom-client';
import { readEventsSecret, eventsListenerOptionsFromConfig, EventsListener } from '../../../src/watch/events.js';
import { luaBody, RawHttp, request, sleep, startListener, type Started } from './events-helpers.js';

const open: Started[] = [];
const raws: RawHttp[] = [];
afterEach(async () => {
  for (const r of raws.splice(0)) r.close();
  for (const s of open.splice(0)) await s.listener.stop(200);
});
async function listen(opts: Parameters<typeof startListener>[0] = {}): Promise<Started> {
  const s = await startListener(opts);
  open.push(s);
  return s;
}
async function raw(port: number): Promise<RawHttp> {
  const r = await RawHttp.connect(port);
  raws.push(r);
  return r;
}
const waitFor = async (pred: () => boolean, ms = 2000) => {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error('condition not met');
    await sleep(5);
  }
};

describe('accepting events', () => {
  it('answers 202 and hands the change to the sink afterwards', async () => {
    let answeredBeforeSink: boolean | undefined;
    let listener: EventsListener | undefined;
    const s = await listen({
      onChange: (c) => {
        answeredBeforeSink = listener!.counters.accepted === 1;
        s.changes.push(c);
      },
    });
    listener = s.listener;
    const r = await request(s.port, { body: luaBody({ mailbox: 'Work', uid: 9 }) });
    expect(r.status).toBe(202);
    expect(r.json).toEqual({ ok: true, changes: 1, ignored: 0 });
    await waitFor(() => s.changes.length === 1);
    expect(answeredBeforeSink).toBe(true);
    expect(s.changes[0]).toMatchObject({ user: 'alice', mailbox: 'Work', changeId: 'Work:42:9', source: 'events' });
    expect(s.changes[0]!.detectedAt).toBeGreaterThan(0);
  });

  it('takes PUT (OX driver), ignores other events with 202, tolerates a trailing slash and a query', async () => {
    const s = await listen();
    const ox = JSON.stringify({ user: 'bob', event: 'messageNew', folder: 'INBOX', 'imap-uid': 3, 'imap-uidvalidity': 7 });
    expect((await request(s.port, { method: 'PUT', path: '/events/?src=ox', body: ox })).status).toBe(202);
    const r = await request(s.port, { body: luaBody({ event: 'FlagsSet' }) });
    expect(r.status).toBe(202);
    expect(r.json).toEqual({ ok: true, changes: 0, ignored: 1 });
    await waitFor(() => s.changes.length === 1);
    await sleep(20);
    expect(s.changes).toHaveLength(1);
    expect(s.listener.counters).toMatchObject({ accepted: 2, changes: 1, ignored: 1 });
  });

  it('a sink that throws is logged and counted; the listener goes on', async () => {
    let calls = 0;
    const registry = new Registry();
    const s = await listen({
      registry,
      onChange: () => {
        calls++;
        throw new Error('sink down');
      },
    });
    expect((await request(s.port, { body: luaBody() })).status).toBe(202);
    expect((await request(s.port, { body: luaBody({ uid: 2 }) })).status).toBe(202);
    await waitFor(() => calls === 2);
    const text = await registry.metrics();
    expect(text).toMatch(/xaps_events_ignored_total\{reason="sink_error"\} 2/);
    expect(text).toMatch(/xaps_events_requests_total\{outcome="accepted"\} 2/);
    expect(text).toMatch(/xaps_events_changes_total\{format="dovecot_lua"\} 2/);
  });

  it('400 with a reason for bodies that are not events; 404 other paths; 405 other methods', async () => {
    const s = await listen();
    const bad = await request(s.port, { body: '{"event": "MessageNew", ' });
    expect(bad.status).toBe(400);
    expect(String(bad.json?.error)).toMatch(/^malformed JSON/);
    const noUser = await request(s.port, { body: JSON.stringify({ event: 'MessageNew', mailbox: 'INBOX', uid: 1, uidvalidity: 1 }) });
    expect(noUser.status).toBe(400);
    expect(noUser.json?.error).toBe('MessageNew: missing "user"');
    expect((await request(s.port, { path: '/other', body: luaBody() })).status).toBe(404);
    expect((await request(s.port, { path: '/eventsX', body: luaBody() })).status).toBe(404);
    const get = await request(s.port, { method: 'GET' });
    expect(get.status).toBe(405);
    expect(get.headers.allow).toBe('POST, PUT');
    expect(s.changes).toHaveLength(0);
  });

  it('a Cyrus body honours X-Xaps-Cyrus-Altnamespace', async () => {
    const s = await listen();
    const body = JSON.stringify({ event: 'MessageNew', uri: 'imap://localhost/user.alice.Work;UIDVALIDITY=3/;UID=2', user: 'alice' });
    await request(s.port, { body });
    await request(s.port, { body, headers: { 'X-Xaps-Cyrus-Altnamespace': 'yes' } });
    await waitFor(() => s.changes.length === 2);
    expect(s.changes.map((c) => c.mailbox)).toEqual(['INBOX.Work', 'Work']);
  });
});

describe('shared secret', () => {
  it('401 without it or with a wrong one; X-Xaps-Secret, Bearer and Basic carry it', async () => {
    const s = await listen({ secret: 'correct horse' });
    const none = await request(s.port, { body: luaBody() });
    expect(none.status).toBe(401);
    expect(none.headers['www-authenticate']).toMatch(/^Bearer/);
    expect((await request(s.port, { body: luaBody(), headers: { 'X-Xaps-Secret': 'correct hors' } })).status).toBe(401);
    expect((await request(s.port, { body: luaBody(), headers: { Authorization: 'Bearer wrong' } })).status).toBe(401);
    expect((await request(s.port, { body: luaBody(), headers: { 'X-Xaps-Secret': 'correct horse' } })).status).toBe(202);
    expect((await request(s.port, { body: luaBody({ uid: 2 }), headers: { Authorization: 'Bearer correct horse' } })).status).toBe(401); // a token has no spaces
    const s2 = await listen({ secret: 's3cret' });
    expect((await request(s2.port, { body: luaBody(), headers: { Authorization: 'Bearer s3cret' } })).status).toBe(202);
    const basic = `Basic ${Buffer.from('dovecot:s3cret').toString('base64')}`;
    expect((await request(s2.port, { method: 'PUT', body: luaBody({ uid: 3 }), headers: { Authorization: basic } })).status).toBe(202);
    await waitFor(() => s.changes.length === 1 && s2.changes.length === 2);
  });

  it('reads the secret file (first line, trimmed) and builds options from the serve config', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'xaps-events-'));
    try {
      const file = path.join(dir, 'secret');
      await fs.writeFile(file, '  s3cret  \nsecond line\n');
      expect(await readEventsSecret(file)).toBe('s3cret');
      await fs.writeFile(file, '\n');
      await expect(readEventsSecret(file)).rejects.toThrow(/empty/);
      await fs.writeFile(file, 'abc\n');
      const opts = await eventsListenerOptionsFromConfig(
        { eventsListen: { host: '127.0.0.1', port: 0 }, eventsSecretFile: file },
        { onChange: () => undefined },
      );
      expect(opts.secret).toBe('abc');
      expect(opts.listen).toEqual({ host: '127.0.0.1', port: 0 });
      expect(() => new EventsListener({ onChange: () => undefined, secret: ' ' })).toThrow(/empty/);
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});

describe('Expect: 100-continue', () => {
  const head = (len: number, extra = '') =>
    `POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: ${len}\r\n${extra}\r\n`;

  it('writes 100 Continue at once (before the body), then 202', async () => {
    const s = await listen({ secret: 'k' });
    const body = luaBody();
    const c = await raw(s.port);
    const t0 = Date.now();
    c.write(head(Buffer.byteLength(body), 'X-Xaps-Secret: k\r\n'));
    await c.until((d) => d.includes('\r\n\r\n'), 2000, '100 Continue');
    expect(Date.now() - t0).toBeLessThan(500);
    expect(c.data).toMatch(/^HTTP\/1\.1 100 Continue\r\n\r\n$/);
    c.write(body);
    await c.until((d) => /HTTP\/1\.1 202/.test(d) && d.endsWith('}'), 2000, '202');
    expect(s.listener.counters.continues).toBe(1);
    await waitFor(() => s.changes.length === 1);
  });

  it('refuses before the body when the secret is wrong or the body too large (no 100)', async () => {
    const s = await listen({ secret: 'k', maxBodyBytes: 1000 });
    const c = await raw(s.port);
    c.write(head(10, 'X-Xaps-Secret: nope\r\n'));
    await c.until((d) => d.includes('\r\n\r\n'));
    expect(c.data).toMatch(/^HTTP\/1\.1 401 /);
    expect(c.data).not.toMatch(/100 Continue/);
    await c.waitClosed();
    const c2 = await raw(s.port);
    c2.write(head(1001, 'X-Xaps-Secret: k\r\n'));
    await c2.until((d) => d.includes('\r\n\r\n'));
    expect(c2.data).toMatch(/^HTTP\/1\.1 413 /);
    await c2.waitClosed();
    expect(s.listener.counters.continues).toBe(0);
  });

  it('Node\'s own client (Expect header) gets the continue event and a 202', async () => {
    const s = await listen();
    const r = await request(s.port, { body: luaBody(), headers: { Expect: '100-continue' } });
    expect(r.status).toBe(202);
    expect(s.listener.counters.continues).toBe(1);
  });
});

describe('bounds', () => {
  it('413 for a declared or a chunked body over the limit', async () => {
    const s = await listen({ maxBodyBytes: 64 * 1024 });
    const big = luaBody({ subject: 'x'.repeat(70 * 1024) });
    expect((await request(s.port, { body: big })).status).toBe(413);
    const c = await raw(s.port);
    c.write('POST /events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n');
    const chunk = 'y'.repeat(16 * 1024);
    for (let i = 0; i < 5 && !c.closed && !c.data; i++) {
      c.write(`${chunk.length.toString(16)}\r\n${chunk}\r\n`);
      await sleep(10);
    }
    await c.until((d) => d.includes('\r\n\r\n'));
    expect(c.data).toMatch(/^HTTP\/1\.1 413 /);
    await c.waitClosed();
  });

  it('411 without a length, 400 for an empty or invalid one', async () => {
    const s = await listen();
    const c = await raw(s.port);
    c.write('POST /events HTTP/1.1\r\nHost: x\r\n\r\n');
    await c.until((d) => d.includes('\r\n\r\n'));
    expect(c.data).toMatch(/^HTTP\/1\.1 411 /);
    expect((await request(s.port, { body: '' })).status).toBe(400);
  });

  it('429 over the request rate', async () => {
    let now = 1_000_000;
    const s = await listen({ ratePerSecond: 1, rateBurst: 2, clock: () => now });
    const statuses = [];
    for (let i = 0; i < 4; i++) statuses.push((await request(s.port, { body: luaBody({ uid: i + 1 }) })).status);
    expect(statuses).toEqual([202, 202, 429, 429]);
    now += 1000;
    expect((await request(s.port, { body: luaBody({ uid: 9 }) })).status).toBe(202);
  });

  it('503 over the concurrency bound', async () => {
    const s = await listen({ maxConcurrent: 1 });
    const c = await raw(s.port);
    c.write('POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"us'); // held open
    await waitFor(() => s.listener.counters.requests === 1);
    const r = await request(s.port, { body: luaBody() });
    expect(r.status).toBe(503);
    expect(r.headers['retry-after']).toBe('1');
    c.close();
    await sleep(50);
    expect((await request(s.port, { body: luaBody() })).status).toBe(202);
  });

  it('408 and a closed connection when the body stalls; slow headers are cut off too', async () => {
    const s = await listen({ bodyTimeoutMs: 300, headersTimeoutMs: 400 });
    const c = await raw(s.port);
    c.write('POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"us');
    await c.until((d) => d.includes('\r\n\r\n'), 3000);
    expect(c.data).toMatch(/^HTTP\/1\.1 408 /);
    await c.waitClosed(3000);
    const h = await raw(s.port);
    h.write('POST /events HTTP/1.1\r\nHost: x\r\n');
    await h.waitClosed(4000);
    expect(h.data === '' || /^HTTP\/1\.1 408 /.test(h.data)).toBe(true);
  });

  it('answers garbage with 400 and keeps serving', async () => {
    const s = await listen();
    const c = await raw(s.port);
    c.write('\x00\x01 NOT HTTP\r\n\r\n');
    await c.waitClosed();
    expect(c.data === '' || /^HTTP\/1\.1 400 /.test(c.data)).toBe(true);
    expect((await request(s.port, { body: luaBody() })).status).toBe(202);
  });
});

describe('lifecycle', () => {
  it('stop() delivers what was accepted, closes, and start() reports the address', async () => {
    const s = await startListener();
    expect(s.listener.url).toBe(`http://127.0.0.1:${s.port}/events`);
    expect((await request(s.port, { body: luaBody() })).status).toBe(202);
    await s.listener.stop();
    expect(s.changes).toHaveLength(1);
    expect(s.listener.url).toBeUndefined();
    await expect(request(s.port, { body: luaBody() })).rejects.toThrow();
    await s.listener.stop();
  });

  it('start() fails on a busy port', async () => {
    const s = await listen();
    const other = new EventsListener({ listen: { host: '127.0.0.1', port: s.port }, onChange: () => undefined });
    await expect(other.start()).rejects.toThrow(/EADDRINUSE/);
  });
});
