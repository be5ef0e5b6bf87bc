/**
 * Events mode against a real Dovecot 2.3 with the shipped Lua driver (deploy/dovecot/xaps-push.lua,
 * installed by the testbed through src/testbed/push-lua.ts) and the shipped conf.d snippet:
 * an LDA delivery makes exactly one MessageNew change, an IMAP APPEND exactly one MessageAppend
 * change, with the right user and mailbox (INBOX, a folder, UTF-8 names); a wrong secret costs
 * the event but never the delivery; `Expect: 100-continue` is answered so a delivery does not
 * wait Dovecot's 2 s continue timeout (the time ratio is printed, not asserted). Dovecot's
 * built-in OX driver (format b) is exercised too.
 * Needs `node scripts/bootstrap.mjs test` (Dovecot from Debian).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import type { AddressInfo } from 'node:net';
import { createLogger } from '../../../src/ops/log.js';
import { startDovecot, waitFor, sleep, type DovecotInstance } from '../../../src/testbed/index.js';
import { PUSH_LUA_PATH, PUSH_LUA_SCRIPT } from '../../../src/testbed/push-lua.js';
import { EventsListener } from '../../../src/watch/events.js';
import type { MailboxChange } from '../../../src/watch/types.js';
import { RawImap } from '../../helpers/raw-imap.js';

const SECRET = 'lua-test-secret';
const ROOT = path.resolve(path.dirname(PUSH_LUA_PATH), '..', '..');

function message(subject: string): string {
  return `From: Sender <sender@example.org>\r\nTo: alice@example.org\r\nSubject: ${subject}\r\nMessage-ID: <${Math.random()}@x>\r\n\r\nbody\r\n`;
}

/** A listener whose debug log lines are kept (they name the event: MessageNew / MessageAppend). */
async function startRecordingListener(secret?: string) {
  const changes: MailboxChange[] = [];
  const logLines: Array<Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString('utf8').split('\n')) if (line.trim()) logLines.push(JSON.parse(line) as Record<string, unknown>);
      cb();
    },
  });
  const listener = new EventsListener({
    listen: { host: '127.0.0.1', port: 0 },
    ...(secret !== undefined ? { secret } : {}),
    onChange: (c) => changes.push(c),
    log: createLogger({ level: 'debug', pretty: false, destination: sink }),
  });
  await listener.start();
  const events = () => logLines.filter((l) => l.msg === 'events: new mail').map((l) => ({ event: l.event, user: l.user, mailbox: l.mailbox }));
  return { listener, changes, events };
}

async function uidValidity(d: DovecotInstance, user: string, mailbox: string): Promise<number> {
  const out = await d.doveadm(['-f', 'flow', 'mailbox', 'status', '-u', user, 'uidvalidity', mailbox]);
  return Number(/uidvalidity=(\d+)/.exec(out)![1]);
}

/** Waits for exactly one more change (and makes sure no second one follows). */
async function oneMoreChange(changes: MailboxChange[], before: number): Promise<MailboxChange> {
  await waitFor(() => changes.length > before, { timeoutMs: 10_000, what: 'a change from Dovecot' });
  await sleep(300);
  expect(changes.length).toBe(before + 1);
  return changes[before]!;
}

describe('events mode: Dovecot Lua driver', () => {
  let rec: Awaited<ReturnType<typeof startRecordingListener>>;
  let d: DovecotInstance;
  const cleanup: Array<() => Promise<unknown>> = [];

  beforeAll(async () => {
    rec = await startRecordingListener(SECRET);
    cleanup.push(() => rec.listener.stop());
    d = await startDovecot({ pushLuaUrl: rec.listener.url!, pushLuaToken: SECRET });
    cleanup.push(() => d.destroy());
  });
  afterAll(async () => {
    for (const f of cleanup.reverse()) await f().catch(() => undefined);
  });

  it('runs the shipped deploy/dovecot/xaps-push.lua', () => {
    expect(PUSH_LUA_PATH).toBe(path.join(ROOT, 'deploy', 'dovecot', 'xaps-push.lua'));
    expect(readFileSync(d.pushLuaPath!, 'utf8')).toBe(readFileSync(path.join(ROOT, 'deploy/dovecot/xaps-push.lua'), 'utf8'));
    expect(PUSH_LUA_SCRIPT).toContain('dovecot_lua_notify_end_txn');
  });

  it('an LDA delivery makes exactly one MessageNew change: INBOX, a folder, a UTF-8 folder', async () => {
    const continuesBefore = rec.listener.counters.continues;
    for (const [mailbox, expected] of [
      [undefined, 'INBOX'],
      ['Work', 'Work'],
      ['Bücher/Neu', 'Bücher/Neu'],
    ] as const) {
      const before = rec.changes.length;
      await d.deliver('alice', message(`to ${expected}`), mailbox);
      const c = await oneMoreChange(rec.changes, before);
      const uv = await uidValidity(d, 'alice', expected);
      expect(c).toMatchObject({ user: 'alice', mailbox: expected, changeId: `${expected}:${uv}:1`, source: 'events' });
      expect(rec.events().at(-1)).toEqual({ event: 'MessageNew', user: 'alice', mailbox: expected });
    }
    // Dovecot sent Expect: 100-continue each time and got its 100 from checkContinue.
    expect(rec.listener.counters.continues - continuesBefore).toBe(3);
    expect(await d.readLog()).not.toMatch(/xaps-push\.lua/);
  });

  it('an IMAP APPEND makes exactly one MessageAppend change (INBOX and a UTF-8 mailbox)', async () => {
    const c = await RawImap.connect({ port: d.imapPort });
    try {
      await c.greeting();
      expect(await c.command('a1', 'LOGIN bob bobpw')).toMatch(/a1 OK/);
      expect(await c.command('a2', 'CREATE "&AMQ-rger"')).toMatch(/a2 OK/); // "Ärger"
      for (const [imapName, expected, tag] of [
        ['INBOX', 'INBOX', 'a3'],
        ['"&AMQ-rger"', 'Ärger', 'a4'],
      ] as const) {
        const before = rec.changes.length;
        const msg = message(`appended to ${expected}`);
        c.send(`${tag} APPEND ${imapName} {${Buffer.byteLength(msg)}+}\r\n${msg}\r\n`);
        expect(await c.tagged(tag)).toMatch(new RegExp(`${tag} OK`));
        const change = await oneMoreChange(rec.changes, before);
        const uv = await uidValidity(d, 'bob', expected);
        expect(change).toMatchObject({ user: 'bob', mailbox: expected, changeId: `${expected}:${uv}:1`, source: 'events' });
        expect(rec.events().at(-1)).toEqual({ event: 'MessageAppend', user: 'bob', mailbox: expected });
      }
      await c.command('a9', 'LOGOUT');
    } finally {
      c.close();
    }
  });

  it('a wrong secret loses the event but never the delivery (Dovecot logs the 401)', async () => {
    const wrong = await startDovecot({ pushLuaUrl: rec.listener.url!, pushLuaToken: 'not-the-secret' });
    cleanup.push(() => wrong.destroy());
    const before = rec.changes.length;
    const rejectedBefore = rec.listener.counters.rejected;
    await wrong.deliver('carol', message('lost event'));
    await waitFor(() => rec.listener.counters.rejected > rejectedBefore, { timeoutMs: 10_000, what: 'the 401' });
    expect(rec.changes.length).toBe(before);
    expect(await wrong.doveadm(['-f', 'flow', 'mailbox', 'status', '-u', 'carol', 'messages', 'INBOX'])).toMatch(/messages=1/);
    await waitFor(async () => /xaps-push\.lua: HTTP 401/.test(await wrong.readLog()), { timeoutMs: 5000, what: 'the logged 401' });
  });

  it('answering 100-continue keeps deliveries fast (ratio printed, behaviour asserted)', async () => {
    const N = 3;
    // A listener that withholds 100 Continue: Dovecot sends the body only after its 2 s continue
    // timeout (the request timeout is raised so the event still arrives).
    const withheld: string[] = [];
    const slow = http.createServer((req, res) => res.writeHead(500).end());
    slow.on('checkContinue', (req, res) => {
      let body = '';
      req.on('data', (c: Buffer) => (body += c.toString('utf8')));
      req.on('end', () => {
        withheld.push(body);
        res.writeHead(202).end();
      });
    });
    await new Promise<void>((r) => slow.listen(0, '127.0.0.1', () => r()));
    cleanup.push(() => new Promise<void>((r) => (slow.closeAllConnections(), slow.close(() => r()))));
    const slowUrl = `http://127.0.0.1:${(slow.address() as AddressInfo).port}/events`;
    const ds = await startDovecot({ pushLuaUrl: slowUrl, extraConfig: 'plugin {\n  xaps_push_timeout_msecs = 5000\n}' });
    cleanup.push(() => ds.destroy());

    const time = async (inst: DovecotInstance, user: string): Promise<number[]> => {
      const out: number[] = [];
      for (let i = 0; i < N; i++) {
        const t0 = performance.now();
        await inst.deliver(user, message(`timing ${i}`));
        out.push(performance.now() - t0);
      }
      return out;
    };
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
    const continuesBefore = rec.listener.counters.continues;
    const changesBefore = rec.changes.length;
    const fast = await time(d, 'carol');
    const slowTimes = await time(ds, 'carol');
    await waitFor(() => rec.changes.length >= changesBefore + N, { timeoutMs: 5000, what: 'the fast events' });
    console.log(
      `[events] LDA delivery with xaps-proxy answering 100-continue: median ${median(fast).toFixed(0)} ms ` +
        `(${fast.map((t) => t.toFixed(0)).join(', ')}); with 100 withheld: median ${median(slowTimes).toFixed(0)} ms ` +
        `(${slowTimes.map((t) => t.toFixed(0)).join(', ')}); ratio ${(median(slowTimes) / median(fast)).toFixed(1)}x`,
    );
    expect(rec.listener.counters.continues - continuesBefore).toBe(N);
    expect(rec.changes.length).toBe(changesBefore + N);
    expect(withheld).toHaveLength(N);
    expect(JSON.parse(withheld[0]!)).toMatchObject({ user: 'carol', event: 'MessageNew', mailbox: 'INBOX' });
  });

  it('a hung xaps-proxy costs a delivery at most the 2 s timeout, and an imap process then stops asking for 10 s', async () => {
    const hung = http.createServer(() => undefined); // takes the request, never answers
    hung.on('checkContinue', (_req, res) => res.writeContinue());
    await new Promise<void>((r) => hung.listen(0, '127.0.0.1', () => r()));
    cleanup.push(() => new Promise<void>((r) => (hung.closeAllConnections(), hung.close(() => r()))));
    const dh = await startDovecot({ pushLuaUrl: `http://127.0.0.1:${(hung.address() as AddressInfo).port}/events` });
    cleanup.push(() => dh.destroy());

    let t0 = performance.now();
    await dh.deliver('alice', message('hung'));
    const deliverMs = performance.now() - t0;
    expect(deliverMs).toBeLessThan(10_000); // generous bound: the script's timeout is 2 s
    expect(await dh.doveadm(['-f', 'flow', 'mailbox', 'status', '-u', 'alice', 'messages', 'INBOX'])).toMatch(/messages=1/);
    expect(await dh.readLog()).toMatch(/xaps-push\.lua: HTTP 9\d{3} .*timeout/i);

    const c = await RawImap.connect({ port: dh.imapPort });
    const appendMs: number[] = [];
    try {
      await c.greeting();
      await c.command('h1', 'LOGIN alice alicepw');
      for (const tag of ['h2', 'h3']) {
        const msg = message(`append ${tag}`);
        t0 = performance.now();
        c.send(`${tag} APPEND INBOX {${Buffer.byteLength(msg)}+}\r\n${msg}\r\n`);
        expect(await c.tagged(tag, 15_000)).toMatch(new RegExp(`${tag} OK`));
        appendMs.push(performance.now() - t0);
      }
    } finally {
      c.close();
    }
    console.log(
      `[events] hung listener: LDA delivery ${deliverMs.toFixed(0)} ms; APPENDs in one imap session ${appendMs.map((t) => t.toFixed(0)).join(' ms, ')} ms (the second skipped after the timeout)`,
    );
    // The second APPEND in the same process was not posted (back-off after a timeout).
    expect(((await dh.readLog()).match(/imap\(alice\).*xaps-push\.lua: HTTP 9/g) ?? []).length).toBe(1);
  });

  it('the built-in OX driver (PUT, the secret as the Basic password, per-user opt-in) makes a change too', async () => {
    const port = new URL(rec.listener.url!).port;
    const ox = await startDovecot({
      extraConfig: [
        'imap_metadata = yes',
        'protocol lda {',
        '  mail_plugins = $mail_plugins notify push_notification',
        '}',
        'plugin {',
        `  push_notification_driver = ox:url=http://dovecot:${SECRET}@127.0.0.1:${port}/events user_from_metadata`,
        '}',
      ].join('\n'),
    });
    cleanup.push(() => ox.destroy());
    await ox.doveadm(['mailbox', 'metadata', 'set', '-u', 'alice', '-s', '', '/private/vendor/vendor.dovecot/http-notify', 'user=alice']);
    const before = rec.changes.length;
    await ox.deliver('alice', message('via OX'));
    const c = await oneMoreChange(rec.changes, before);
    const uv = await uidValidity(ox, 'alice', 'INBOX');
    expect(c).toMatchObject({ user: 'alice', mailbox: 'INBOX', changeId: `INBOX:${uv}:1`, source: 'events' });
    expect(rec.events().at(-1)).toEqual({ event: 'messageNew', user: 'alice', mailbox: 'INBOX' });
  });

  it('the shipped 95-xaps-push.conf works as written (paths and URL substituted)', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'xaps-lua-'));
    cleanup.push(() => fs.rm(dir, { recursive: true, force: true }));
    await fs.chmod(dir, 0o755);
    const lua = path.join(dir, 'xaps-push.lua');
    await fs.copyFile(PUSH_LUA_PATH, lua);
    await fs.chmod(lua, 0o644);
    const secretFile = path.join(dir, 'events.secret');
    await fs.writeFile(secretFile, `${SECRET}\n`, { mode: 0o600 });
    const snippet = readFileSync(path.join(ROOT, 'deploy/dovecot/95-xaps-push.conf'), 'utf8')
      .replaceAll('/etc/dovecot/xaps-push.lua', lua)
      .replaceAll('http://127.0.0.1:8425/events', rec.listener.url!)
      .replaceAll('/etc/xaps-proxy/events.secret', secretFile);
    expect(snippet).toContain(`xaps_push_secret = <${secretFile}`);
    const ds = await startDovecot({ extraConfig: snippet });
    cleanup.push(() => ds.destroy());

    let before = rec.changes.length;
    await ds.deliver('alice', message('via the snippet'), 'Projekte/Übersicht');
    expect(await oneMoreChange(rec.changes, before)).toMatchObject({ user: 'alice', mailbox: 'Projekte/Übersicht' });

    before = rec.changes.length;
    const c = await RawImap.connect({ port: ds.imapPort });
    try {
      await c.greeting();
      await c.command('b1', 'LOGIN alice alicepw');
      const msg = message('appended via the snippet');
      c.send(`b2 APPEND Sent {${Buffer.byteLength(msg)}+}\r\n${msg}\r\n`);
      expect(await c.tagged('b2')).toMatch(/b2 OK/);
    } finally {
      c.close();
    }
    expect(await oneMoreChange(rec.changes, before)).toMatchObject({ user: 'alice', mailbox: 'Sent' });
    expect(rec.events().at(-1)).toEqual({ event: 'MessageAppend', user: 'alice', mailbox: 'Sent' });
    expect(await ds.readLog()).not.toMatch(/xaps-push\.lua/);
  });
});
