/**
 * Events mode against a real Cyrus 3.6 (src/testbed/cyrus.ts) with the shipped notify_external
 * shim (deploy/cyrus/xaps-notify) and the shipped imapd.conf lines (deploy/cyrus/imapd.conf.snippet,
 * paths substituted): lmtpd deliveries make MessageNew changes, an IMAP APPEND a MessageAppend
 * change, with Cyrus' admin-namespace URIs mapped to the user's own names (INBOX, Work, UTF-8).
 *
 * The testbed's cyrus.conf runs no notifyd; this test adds the notify service to the generated
 * cyrus.conf and restarts (see the report: startCyrus could take an option for it).
 * Needs root and `node scripts/bootstrap.mjs test` (Cyrus from Debian, imapd unpacked).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { startCyrus, type CyrusInstance } from '../../../src/testbed/cyrus.js';
import { runCommand, sleep, waitFor } from '../../../src/testbed/index.js';
import { PUSH_LUA_PATH } from '../../../src/testbed/push-lua.js';
import { EventsListener } from '../../../src/watch/events.js';
import type { MailboxChange } from '../../../src/watch/types.js';
import { RawImap } from '../../helpers/raw-imap.js';

const ROOT = path.resolve(path.dirname(PUSH_LUA_PATH), '..', '..');
const SECRET = 'cyrus-test-secret';

function message(subject: string): string {
  return `From: Sender <sender@example.org>\r\nTo: alice@example.org\r\nSubject: ${subject}\r\n\r\nbody\r\n`;
}

async function oneMoreChange(changes: MailboxChange[], before: number): Promise<MailboxChange> {
  await waitFor(() => changes.length > before, { timeoutMs: 10_000, what: 'a change from Cyrus' });
  await sleep(300);
  expect(changes.length).toBe(before + 1);
  return changes[before]!;
}

describe('events mode: Cyrus notify_external via xaps-notify', () => {
  let listener: EventsListener;
  let cy: CyrusInstance;
  const changes: MailboxChange[] = [];

  beforeAll(async () => {
    listener = new EventsListener({ listen: { host: '127.0.0.1', port: 0 }, secret: SECRET, onChange: (c) => changes.push(c) });
    await listener.start();
    cy = await startCyrus();
    // The shim and its settings, where the cyrus user (notifyd) can read them.
    const shim = path.join(cy.dir, 'xaps-notify');
    await fs.copyFile(path.join(ROOT, 'deploy/cyrus/xaps-notify'), shim);
    await fs.chmod(shim, 0o755);
    const secretFile = path.join(cy.dir, 'events.secret');
    await fs.writeFile(secretFile, `${SECRET}\n`, { mode: 0o600 });
    await fs.writeFile(`${shim}.conf`, `url = ${listener.url}\nsecret_file = ${secretFile}\nimapd_conf = ${cy.configPath}\n`);
    await runCommand('chown', ['cyrus:mail', secretFile, `${shim}.conf`]);
    // imapd.conf: the shipped snippet's settings, with the shim's path.
    const snippet = readFileSync(path.join(ROOT, 'deploy/cyrus/imapd.conf.snippet'), 'utf8')
      .split('\n')
      .filter((l) => /^[a-z_]+:/.test(l))
      .map((l) => l.replace('/usr/local/lib/xaps-proxy/xaps-notify', shim));
    expect(snippet).toEqual(['event_notifier: external', `notify_external: ${shim}`, 'event_groups: message']);
    await fs.appendFile(cy.configPath, `# xaps-proxy deploy/cyrus/imapd.conf.snippet\n${snippet.join('\n')}\n`);
    // cyrus.conf: notifyd, listening on imapd.conf's notifysocket.
    const cyrusConf = path.join(cy.dir, 'cyrus.conf');
    const conf = await fs.readFile(cyrusConf, 'utf8');
    await fs.writeFile(
      cyrusConf,
      conf.replace('SERVICES {\n', `SERVICES {\n  notify cmd="notifyd -C ${cy.configPath}" listen="${cy.dir}/socket/notify" proto="udp" prefork=1\n`),
    );
    await cy.restart();
    await cy.createMailbox('alice', 'Work');
    await cy.createMailbox('alice', 'Bücher');
  });
  afterAll(async () => {
    await cy?.destroy();
    await listener?.stop();
  });

  it('an lmtpd delivery makes exactly one change (INBOX, then a folder)', async () => {
    let before = changes.length;
    await cy.deliver('alice', message('to INBOX'));
    const inbox = await oneMoreChange(changes, before);
    expect(inbox).toMatchObject({ user: 'alice', mailbox: 'INBOX', source: 'events' });
    expect(inbox.changeId).toMatch(/^INBOX:\d+:1$/);

    before = changes.length;
    await cy.deliver('alice', message('to Work'), 'Work');
    const work = await oneMoreChange(changes, before);
    expect(work).toMatchObject({ user: 'alice', mailbox: 'Work', source: 'events' });
    expect(work.changeId).toMatch(/^Work:\d+:1$/);
  });

  it('an IMAP APPEND into a UTF-8 mailbox makes exactly one change with its UTF-8 name', async () => {
    const before = changes.length;
    const c = await RawImap.connect({ port: cy.imapPort });
    try {
      await c.greeting();
      await c.command('a1', 'LOGIN alice alicepw');
      const msg = message('appended');
      c.send(`a2 APPEND "B&APw-cher" {${Buffer.byteLength(msg)}+}\r\n${msg}\r\n`);
      const done = await c.tagged('a2');
      expect(done).toMatch(/a2 OK \[APPENDUID (\d+) 1\]/);
      const uidValidity = /APPENDUID (\d+) 1/.exec(done)![1];
      const change = await oneMoreChange(changes, before);
      expect(change).toEqual(expect.objectContaining({ user: 'alice', mailbox: 'Bücher', changeId: `Bücher:${uidValidity}:1` }));
    } finally {
      c.close();
    }
  });

  it('mailbox events (CREATE) are not forwarded; nothing was refused', async () => {
    const requests = listener.counters.requests;
    await cy.createMailbox('bob', 'Neu');
    await sleep(500);
    expect(listener.counters.requests).toBe(requests);
    expect(listener.counters.rejected).toBe(0);
  });
});
