/**
 * deploy/cyrus/xaps-notify on its own (Perl, core modules only), run the way notifyd runs it:
 * `xaps-notify -c EVENT -p "" -u "" -m "" -f ""` with the event JSON on stdin. It forwards only
 * new-mail events with the secret and Cyrus' altnamespace, exits 0 whatever happens, and by
 * default leaves the HTTP request to a background child so notifyd never waits for it.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import type { AddressInfo } from 'node:net';
import { waitFor } from '../../../src/testbed/index.js';
import { PUSH_LUA_PATH } from '../../../src/testbed/push-lua.js';
import { EventsListener } from '../../../src/watch/events.js';
import type { MailboxChange } from '../../../src/watch/types.js';

const ROOT = path.resolve(path.dirname(PUSH_LUA_PATH), '..', '..');
const SHIM = path.join(ROOT, 'deploy', 'cyrus', 'xaps-notify');
const SECRET = 'shim-secret';

function runShim(stdin: string, env: Record<string, string>): Promise<{ code: number | null; ms: number }> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const p = spawn(SHIM, ['-c', 'EVENT', '-p', '', '-u', '', '-m', '', '-f', ''], {
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...env },
      stdio: ['pipe', 'ignore', 'ignore'],
    });
    p.on('error', reject);
    p.on('exit', (code) => resolve({ code, ms: performance.now() - t0 }));
    p.stdin.end(`${stdin}\n`);
  });
}

const newMail = (uri: string, event = 'MessageNew') =>
  JSON.stringify({ event, timestamp: '2026-11-23T14:39:01.778Z', uri, pid: 1, user: 'alice', serverFQDN: 'localhost' });

describe('xaps-notify (Cyrus notify_external shim)', () => {
  let dir: string;
  let listener: EventsListener;
  const changes: MailboxChange[] = [];
  let hang: http.Server;
  const hung: string[] = [];

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'xaps-shim-'));
    listener = new EventsListener({ listen: { host: '127.0.0.1', port: 0 }, secret: SECRET, onChange: (c) => changes.push(c) });
    await listener.start();
    await fs.writeFile(path.join(dir, 'secret'), `${SECRET}\n`);
    await fs.writeFile(path.join(dir, 'imapd-alt-no.conf'), 'configdirectory: /x\naltnamespace: no\n');
    hang = http.createServer((req) => req.on('data', (c: Buffer) => hung.push(c.toString())));
    await new Promise<void>((r) => hang.listen(0, '127.0.0.1', () => r()));
  });
  afterAll(async () => {
    await listener.stop();
    hang.closeAllConnections();
    await new Promise<void>((r) => hang.close(() => r()));
    await fs.rm(dir, { recursive: true, force: true });
  });

  async function conf(name: string, lines: string[]): Promise<string> {
    const file = path.join(dir, name);
    await fs.writeFile(file, `# test\n${lines.join('\n')}\n`);
    return file;
  }

  it('is a Perl script with only core modules', async () => {
    const text = await fs.readFile(SHIM, 'utf8');
    expect(text.startsWith('#!/usr/bin/perl')).toBe(true);
    expect((await fs.stat(SHIM)).mode & 0o111).not.toBe(0);
    const modules = [...text.matchAll(/^use ([\w:]+)/gm)].map((m) => m[1]);
    expect(modules.sort()).toEqual(['HTTP::Tiny', 'JSON::PP', 'POSIX', 'strict', 'warnings']);
  });

  it('forwards a new-mail event with the secret; xaps-proxy makes the change', async () => {
    const c = await conf('fg.conf', [`url = ${listener.url}`, `secret_file = ${dir}/secret`, 'background = no', 'imapd_conf = /nonexistent']);
    const before = changes.length;
    const r = await runShim(newMail('imap://localhost/user/alice/Work;UIDVALIDITY=77/;UID=5'), { XAPS_NOTIFY_CONF: c });
    expect(r.code).toBe(0);
    await waitFor(() => changes.length > before, { timeoutMs: 5000, what: 'the change' });
    expect(changes[before]).toMatchObject({ user: 'alice', mailbox: 'Work', changeId: 'Work:77:5', source: 'events' });
  });

  it('sends Cyrus\' altnamespace from imapd.conf (X-Xaps-Cyrus-Altnamespace)', async () => {
    const c = await conf('alt.conf', [`url = ${listener.url}`, `secret = ${SECRET}`, 'background = no', `imapd_conf = ${dir}/imapd-alt-no.conf`]);
    const before = changes.length;
    expect((await runShim(newMail('imap://localhost/user/alice/Work;UIDVALIDITY=77/;UID=6'), { XAPS_NOTIFY_CONF: c })).code).toBe(0);
    await waitFor(() => changes.length > before, { timeoutMs: 5000, what: 'the change' });
    expect(changes[before]).toMatchObject({ mailbox: 'INBOX/Work' });
  });

  it('does not forward other events, and exits 0 on bad input', async () => {
    const c = await conf('fg2.conf', [`url = ${listener.url}`, `secret = ${SECRET}`, 'background = no']);
    const before = listener.counters.requests;
    for (const input of [
      newMail('imap://localhost/user/alice;UIDVALIDITY=1', 'MailboxModseq'),
      newMail('imap://localhost/user/alice;UIDVALIDITY=1/;UID=1', 'MessageExpunge'),
      'not json',
      '',
      '[1,2]',
    ]) {
      expect((await runShim(input, { XAPS_NOTIFY_CONF: c })).code).toBe(0);
    }
    expect(listener.counters.requests).toBe(before);
  });

  it('exits 0 when xaps-proxy is down or refuses the secret', async () => {
    const down = await conf('down.conf', ['url = http://127.0.0.1:1/events', 'background = no', 'timeout = 1']);
    expect((await runShim(newMail('imap://localhost/user/alice;UIDVALIDITY=1/;UID=1'), { XAPS_NOTIFY_CONF: down })).code).toBe(0);
    const wrong = await conf('wrong.conf', [`url = ${listener.url}`, 'secret = nope', 'background = no']);
    const rejected = listener.counters.rejected;
    expect((await runShim(newMail('imap://localhost/user/alice;UIDVALIDITY=1/;UID=1'), { XAPS_NOTIFY_CONF: wrong })).code).toBe(0);
    expect(listener.counters.rejected).toBe(rejected + 1);
  });

  it('by default returns at once and posts from a background child (a hung xaps-proxy never holds notifyd)', async () => {
    const url = `http://127.0.0.1:${(hang.address() as AddressInfo).port}/events`;
    const c = await conf('bg.conf', [`url = ${url}`, 'timeout = 2']);
    const r = await runShim(newMail('imap://localhost/user/alice;UIDVALIDITY=1/;UID=9'), { XAPS_NOTIFY_CONF: c });
    expect(r.code).toBe(0);
    expect(r.ms).toBeLessThan(1500);
    await waitFor(() => hung.join('').includes('UID=9'), { timeoutMs: 5000, what: 'the background POST' });
    console.log(`[events] xaps-notify returned in ${r.ms.toFixed(0)} ms while the POST hung in the background`);
  });

  it('finds <script>.conf beside itself', async () => {
    const copy = path.join(dir, 'xaps-notify');
    await fs.copyFile(SHIM, copy);
    await fs.chmod(copy, 0o755);
    await fs.writeFile(`${copy}.conf`, `url = ${listener.url}\nsecret = ${SECRET}\nbackground = no\n`);
    const before = changes.length;
    await new Promise<void>((resolve, reject) => {
      const p = spawn(copy, ['-c', 'EVENT'], { stdio: ['pipe', 'ignore', 'ignore'], env: { PATH: process.env.PATH ?? '' } });
      p.on('error', reject);
      p.on('exit', () => resolve());
      p.stdin.end(newMail('imap://localhost/user/bob;UIDVALIDITY=3/;UID=1'));
    });
    await waitFor(() => changes.length > before, { timeoutMs: 5000, what: 'the change' });
    expect(changes[before]).toMatchObject({ user: 'bob', mailbox: 'INBOX' });
  });
});
