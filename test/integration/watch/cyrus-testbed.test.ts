/**
 * The Cyrus 3.6 test bed (src/testbed/cyrus.ts) against itself: greeting, the master user's
 * SASL PLAIN proxy login (and the refused "user*master" form), mailboxes and deliveries,
 * restart with the same mail, and a stop that leaves no process of its group behind.
 * Needs root and `node scripts/bootstrap.mjs test` (Cyrus from Debian, imapd unpacked).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import { startCyrus, type CyrusInstance } from '../../../src/testbed/cyrus.js';
import { isPidAlive, probeBanner } from '../../../src/testbed/index.js';
import { ImapConnection } from '../../../src/watch/imap-connection.js';
import { LoginError, masterLogin, MasterCredentials } from '../../../src/watch/login.js';

function message(subject: string): string {
  return `From: a@example.org\r\nTo: alice@example.org\r\nSubject: ${subject}\r\n\r\nbody\r\n`;
}

/** Pids of processes whose command line mentions `dir` (the instance's config paths). */
function processesOf(dir: string): number[] {
  const out: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmd = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      if (cmd.includes(dir) && isPidAlive(Number(entry))) out.push(Number(entry));
    } catch {
      /* gone */
    }
  }
  return out;
}

describe('Cyrus test bed', () => {
  let cy: CyrusInstance;

  beforeAll(async () => {
    cy = await startCyrus({ users: { alice: 'alicepw', bob: 'bobpw' } });
  });
  afterAll(async () => {
    await cy?.destroy();
  });

  async function connect(): Promise<ImapConnection> {
    return ImapConnection.connect({
      upstream: { host: cy.host, port: cy.imapPort, tls: 'none', connectTimeoutMs: 5000, clientIp: 'none' },
    });
  }

  async function statusOf(conn: ImapConnection, mailbox: string): Promise<string> {
    const r = await conn.ok(`STATUS "${mailbox}" (MESSAGES UIDNEXT)`);
    return r.untagged.map((u) => u.line).join('\n');
  }

  it('greets on loopback as Cyrus 3.6, with SASL-IR and AUTH=PLAIN', async () => {
    const banner = await probeBanner(cy.host, cy.imapPort, { expect: '\r\n' });
    expect(banner).toMatch(/^\* OK \[CAPABILITY [^\]]*SASL-IR[^\]]*\] .*Cyrus IMAP 3\.6/);
    expect(banner).toContain('AUTH=PLAIN');
    expect(fs.existsSync(cy.caCertPath)).toBe(true);
    expect(isPidAlive(cy.pid)).toBe(true);
  });

  it('lets the master user in for a user with PLAIN authzid, and refuses "user*master"', async () => {
    const conn = await connect();
    await masterLogin(conn, 'alice', new MasterCredentials({ user: cy.masterUser, password: cy.masterPassword }));
    expect(conn.hasCapability('IDLE')).toBe(true);
    expect(conn.hasCapability('NOTIFY')).toBe(false); // Cyrus 3.6 has none
    await conn.logout();

    const sep = await connect();
    const err = await masterLogin(
      sep,
      'alice',
      new MasterCredentials({ user: cy.masterUser, password: cy.masterPassword, mode: 'separator' }),
    ).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(LoginError);
    expect((err as LoginError).reason).toBe('authorization'); // "NO Invalid user"
    sep.close();
  });

  it('creates mailboxes and delivers to INBOX, a folder and a UTF-8 folder', async () => {
    await cy.createMailbox('alice', 'Work/Projects');
    await cy.createMailbox('alice', 'Entwürfe');
    await cy.deliver('alice', message('one'));
    await cy.deliver('alice', message('two'), 'Work/Projects');
    await cy.deliver('alice', message('three'), 'Entwürfe');
    const conn = await connect();
    await masterLogin(conn, 'alice', new MasterCredentials({ user: cy.masterUser, password: cy.masterPassword }));
    expect(await statusOf(conn, 'INBOX')).toMatch(/MESSAGES 1 UIDNEXT 2/);
    expect(await statusOf(conn, 'Work/Projects')).toMatch(/MESSAGES 1 UIDNEXT 2/);
    expect(await statusOf(conn, 'Entw&APw-rfe')).toMatch(/MESSAGES 1 UIDNEXT 2/);
    await conn.logout();
  });

  it('restarts with the same ports and mail, and stops without leftovers', async () => {
    const oldPid = cy.pid;
    await cy.restart();
    expect(cy.pid).not.toBe(oldPid);
    expect(isPidAlive(oldPid)).toBe(false);
    const conn = await connect();
    await masterLogin(conn, 'alice', new MasterCredentials({ user: cy.masterUser, password: cy.masterPassword }));
    expect(await statusOf(conn, 'INBOX')).toMatch(/MESSAGES 1 UIDNEXT 2/);
    await conn.logout();

    expect(processesOf(cy.dir).length).toBeGreaterThan(1); // master, idled, imapd, …
    await cy.stop();
    expect(processesOf(cy.dir)).toEqual([]);
    await cy.stop(); // idempotent
  });
});
