/**
 * Issue 2 acceptance: the same scenarios directly against a real Dovecot and
 * through xaps-proxy give the same results apart from capability tokens.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash } from 'node:crypto';
import { ImapFlow } from 'imapflow';
import { startDovecot, type DovecotInstance } from '../../src/testbed/dovecot.js';
import { RawImap } from '../helpers/raw-imap.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';

const TRICKY_BODY =
  'From: a@example.org\r\nTo: b@example.org\r\nSubject: tricky\r\n\r\n' +
  '* CAPABILITY IMAP4rev1 COMPRESS=DEFLATE\r\nA1 OK done\r\n+ go ahead\r\nx {5}\r\n* BYE fake\r\n';

function bigMessage(bytes: number): Buffer {
  const lines: string[] = ['From: big@example.org', 'Subject: five megabytes', ''];
  let size = lines.join('\r\n').length;
  for (let i = 0; size < bytes; i++) {
    const line = `line ${i} ${createHash('sha256').update(String(i)).digest('hex')}`;
    lines.push(line);
    size += line.length + 2;
  }
  return Buffer.from(lines.join('\r\n') + '\r\n');
}

const BIG = bigMessage(5 * 1024 * 1024);

/** Dovecot's timings and UIDVALIDITY values differ between runs; capability lines are compared elsewhere. */
function normalize(step: string): string {
  return step
    .replace(/\(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)/g, '(T secs)')
    .replace(/UIDVALIDITY \d+/g, 'UIDVALIDITY N')
    .replace(/APPENDUID \d+/g, 'APPENDUID N')
    .replace(/^(\* OK \[CAPABILITY|\* CAPABILITY|\S+ OK \[CAPABILITY)[^\r\n]*/gm, '$1 …');
}

interface Target {
  port: number;
  user: string;
  pass: string;
}

/** A raw-socket session covering the acceptance scenario; returns one transcript per step. */
async function rawScenario(t: Target, deliver: (user: string) => Promise<void>): Promise<Record<string, string>> {
  const c = await RawImap.connect({ port: t.port });
  const out: Record<string, string> = {};
  out.greeting = await c.greeting();
  out.capability = await c.command('a1', 'CAPABILITY');
  const plain = Buffer.from(`\0${t.user}\0${t.pass}`).toString('base64');
  out.auth = await c.command('a2', `AUTHENTICATE PLAIN ${plain}`);
  out.select = await c.command('a3', 'SELECT INBOX');

  c.send(`a4 APPEND INBOX {${Buffer.byteLength(TRICKY_BODY)}}\r\n`);
  out.appendSyncContinuation = await c.until((s) => s.startsWith('+'), 20_000, 'continuation');
  c.send(`${TRICKY_BODY}\r\n`);
  out.appendSync = await c.tagged('a4');

  c.send(`a5 APPEND INBOX (\\Seen) {${BIG.length}+}\r\n`);
  c.send(BIG);
  c.send('\r\n');
  out.appendBigNonSync = await c.tagged('a5', 60_000);

  c.send(`a6 APPEND INBOX {${BIG.length}}\r\n`);
  await c.until((s) => s.startsWith('+'), 20_000, 'continuation');
  c.send(Buffer.concat([BIG, Buffer.from('\r\n')]));
  out.appendBigSync = await c.tagged('a6', 60_000);

  out.fetchTricky = await c.command('a7', 'UID FETCH 1 (BODY.PEEK[])');
  out.fetchBig = await c.command('a8', 'UID FETCH 2:3 (BODY.PEEK[])', 60_000);

  c.send('p1 NOOP\r\np2 STATUS INBOX (MESSAGES UIDNEXT)\r\np3 LIST "" "*"\r\np4 UID FETCH 1 (FLAGS)\r\n');
  out.pipelined = await c.tagged('p4');
  if (!/p1 OK/.test(out.pipelined)) out.pipelined += await c.tagged('p1');

  c.send('i1 IDLE\r\n');
  out.idleStart = await c.until((s) => s.startsWith('+'), 20_000, 'idle continuation');
  await deliver(t.user);
  out.idleWake = await c.until((s) => /\* \d+ EXISTS/.test(s), 30_000, 'EXISTS while idling');
  c.send('DONE\r\n');
  out.idleDone = await c.tagged('i1');

  out.logout = await c.command('z1', 'LOGOUT');
  await c.waitClosed();
  return out;
}

async function imapflowScenario(t: Target, deliver: (user: string) => Promise<void>) {
  const client = new ImapFlow({
    host: '127.0.0.1',
    port: t.port,
    secure: false,
    doSTARTTLS: false,
    auth: { user: t.user, pass: t.pass },
    logger: false,
  });
  await client.connect();
  const capabilities = [...client.capabilities.keys()];
  const lock = await client.getMailboxLock('INBOX');
  const results: Record<string, unknown> = {};
  try {
    await client.append('INBOX', TRICKY_BODY, ['\\Flagged']);
    await client.append('INBOX', BIG);
    const fetched: Array<{ uid: number; sha: string; flags: string[] }> = [];
    for await (const msg of client.fetch('1:*', { uid: true, source: true, flags: true })) {
      fetched.push({ uid: msg.uid, sha: createHash('sha256').update(msg.source!).digest('hex'), flags: [...(msg.flags ?? [])].sort() });
    }
    results.fetched = fetched;
    await client.messageFlagsAdd('1', ['\\Seen']);
    const woke = new Promise<number>((resolve) => client.once('exists', (e: { count: number }) => resolve(e.count)));
    const idling = client.idle();
    await new Promise((r) => setTimeout(r, 300));
    await deliver(t.user);
    results.existsAfterDelivery = await woke;
    // the next command ends IDLE (imapflow sends DONE itself)
    const status = (await client.status('INBOX', { messages: true, unseen: true })) as { messages?: number; unseen?: number };
    await idling;
    results.status = { messages: status.messages, unseen: status.unseen };
  } finally {
    lock.release();
  }
  await client.logout();
  return { results, capabilities };
}

describe('transparency against a real Dovecot', () => {
  let dovecot: DovecotInstance;
  let proxy: TestProxy;
  const deliver = (user: string) =>
    dovecot.deliver(user, 'From: lda@example.org\r\nTo: x@example.org\r\nSubject: delivered\r\n\r\nhello\r\n');

  beforeAll(async () => {
    dovecot = await startDovecot({
      users: { rawdirect: 'pw1', rawproxy: 'pw2', flowdirect: 'pw3', flowproxy: 'pw4' },
    });
    proxy = await startTestProxy({ upstreamPort: dovecot.imapPort });
  });
  afterAll(async () => {
    await proxy?.stop();
    await dovecot?.stop();
  });

  it('raw socket: every step gives the same response directly and through the proxy', async () => {
    const direct = await rawScenario({ port: dovecot.imapPort, user: 'rawdirect', pass: 'pw1' }, deliver);
    const proxied = await rawScenario({ port: proxy.plainPort, user: 'rawproxy', pass: 'pw2' }, deliver);
    expect(Object.keys(proxied)).toEqual(Object.keys(direct));
    for (const step of Object.keys(direct)) {
      expect({ step, text: normalize(proxied[step]) }).toEqual({ step, text: normalize(direct[step]) });
    }
    // message bodies are byte-identical, including lines that look like responses
    // (only the tagged completion differs: Dovecot reports timings there)
    const data = (step: string) => step.slice(0, step.lastIndexOf('\r\na') + 2);
    expect(data(proxied.fetchTricky)).toBe(data(direct.fetchTricky));
    expect(proxied.fetchTricky).toContain('* CAPABILITY IMAP4rev1 COMPRESS=DEFLATE\r\nA1 OK done\r\n');
    expect(data(proxied.fetchBig)).toBe(data(direct.fetchBig));
    expect(data(proxied.fetchBig).length).toBeGreaterThan(2 * BIG.length);
  }, 180_000);

  it('imapflow: the same results directly and through the proxy', async () => {
    const direct = await imapflowScenario({ port: dovecot.imapPort, user: 'flowdirect', pass: 'pw3' }, deliver);
    const proxied = await imapflowScenario({ port: proxy.plainPort, user: 'flowproxy', pass: 'pw4' }, deliver);
    expect(proxied.results).toEqual(direct.results);
    expect((proxied.results.fetched as unknown[]).length).toBe(2);
    expect(direct.capabilities).toContain('COMPRESS=DEFLATE');
    expect(proxied.capabilities).not.toContain('COMPRESS=DEFLATE');
    const withoutCompress = direct.capabilities.filter((c) => !c.startsWith('COMPRESS='));
    expect(proxied.capabilities.sort()).toEqual(withoutCompress.sort());
  }, 180_000);

  it('never forwards XAPPLEPUSHSERVICE when push is not configured', async () => {
    const c = await RawImap.connect({ port: proxy.plainPort });
    await c.greeting();
    await c.command('l', 'LOGIN rawproxy pw2');
    const reply = await c.command('x1', 'XAPPLEPUSHSERVICE "aps-version" "2"');
    expect(reply).toMatch(/^x1 NO .*not configured/m);
    expect(await c.command('n1', 'NOOP')).toMatch(/^n1 OK/m);
    await c.command('z', 'LOGOUT');
    expect(await dovecot.readLog()).not.toMatch(/XAPPLEPUSHSERVICE/);
  });
});
