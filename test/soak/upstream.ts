/**
 * The soak's IMAP server, Dovecot or Cyrus, behind one small interface so that the runner does not care which:
 * generated users (user0001… with password "password"), a master user for the watchers, every soak mailbox created
 * up front, an LMTP port that takes "user+Mailbox" (delivered into Mailbox), and a TLS certificate for the proxy's
 * client-facing listeners.
 *
 *   Dovecot  src/testbed/dovecot.ts: LMTP detail delivery (recipient_delimiter +, lmtp_save_to_detail_mailbox);
 *            with `events` its push_notification Lua driver (the shipped deploy/dovecot/xaps-push.lua) POSTs each
 *            delivery to the proxy's events listener.
 *   Cyrus    src/testbed/cyrus.ts (3.6, idled: IDLE wakes at once): lmtpd delivers "user+Work" into Work only when
 *            "anyone" may post there, so every soak mailbox gets `SETACL <mailbox> anyone +p` (the usual Cyrus
 *            setup for plus-addressing); otherwise the mail silently lands in INBOX.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { startDovecot } from '../../src/testbed/dovecot.js';
import { startCyrus } from '../../src/testbed/cyrus.js';
import { issueServerCert, type TestCa } from '../../src/testbed/apns-certs.js';
import { RawImap } from '../helpers/raw-imap.js';

export type SoakUpstreamKind = 'dovecot' | 'cyrus';

export interface SoakUpstream {
  kind: SoakUpstreamKind;
  imapPort: number;
  lmtpPort: number;
  masterUser: string;
  masterPassword: string;
  /** Certificate and key for the proxy's --tls-cert/--tls-key, and the CA the soak's clients trust for it. */
  tlsCertPath: string;
  tlsKeyPath: string;
  clientCaPem: Buffer;
  destroy(): Promise<void>;
}

export interface SoakUpstreamOptions {
  kind: SoakUpstreamKind;
  users: string[];
  /** Mailboxes besides INBOX every user gets. */
  mailboxes: readonly string[];
  /** The soak's temp dir (for files the upstream does not make itself). */
  dir: string;
  /** The soak's CA (Cyrus: the proxy's TLS certificate is issued by it). */
  ca: TestCa;
  /** Dovecot only: the push_notification Lua driver posts new mail here (events mode). */
  events?: { url: string; secret: string };
}

async function inPool<T>(items: readonly T[], width: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: width }, async () => {
      while (next < items.length) await work(items[next++]!);
    }),
  );
}

export async function startSoakUpstream(o: SoakUpstreamOptions): Promise<SoakUpstream> {
  if (o.kind === 'dovecot') {
    const dc = await startDovecot({
      users: {},
      genUsers: o.users.length,
      maxConnections: 1000,
      // LMTP "user+Mailbox" delivers into Mailbox (created if missing)
      extraConfig: 'recipient_delimiter = +\nlmtp_save_to_detail_mailbox = yes\nlda_mailbox_autocreate = yes\n',
      ...(o.events ? { pushLuaUrl: o.events.url, pushLuaToken: o.events.secret } : {}),
    });
    try {
      // every user gets every mailbox up front: the watchers see them exist from their first snapshot
      await inPool(o.users, 4, (u) => dc.doveadm(['mailbox', 'create', '-u', u, ...o.mailboxes]).then(() => undefined));
      return {
        kind: 'dovecot',
        imapPort: dc.imapPort,
        lmtpPort: dc.lmtpPort,
        masterUser: dc.masterUser,
        masterPassword: dc.masterPassword,
        tlsCertPath: dc.caCertPath,
        tlsKeyPath: dc.tlsKeyPath,
        clientCaPem: await fs.readFile(dc.caCertPath),
        destroy: () => dc.destroy(),
      };
    } catch (err) {
      await dc.destroy().catch(() => undefined);
      throw err;
    }
  }

  if (o.events) throw new Error('events mode in the soak runs against Dovecot (its Lua push hook) only');
  const cy = await startCyrus({ users: Object.fromEntries(o.users.map((u) => [u, 'password'])) });
  try {
    await inPool(o.users, 4, async (u) => {
      const c = await RawImap.connect({ port: cy.imapPort });
      try {
        await c.greeting();
        const ok = (reply: string, tag: string, what: string) => {
          if (!new RegExp(`(^|\\r\\n)${tag} OK`).test(reply)) throw new Error(`Cyrus: ${what} for ${u} failed: ${reply.trim().split('\r\n').pop()}`);
        };
        ok(await c.command('l', `LOGIN ${u} password`), 'l', 'LOGIN');
        for (const [i, mb] of o.mailboxes.entries()) {
          ok(await c.command(`c${i}`, `CREATE "${mb}"`), `c${i}`, `CREATE ${mb}`);
          ok(await c.command(`a${i}`, `SETACL "${mb}" anyone +p`), `a${i}`, `SETACL ${mb}`);
        }
        await c.command('o', 'LOGOUT').catch(() => undefined);
      } finally {
        c.close();
      }
    });
    const server = issueServerCert(o.ca, ['localhost', '127.0.0.1']);
    const tlsCertPath = path.join(o.dir, 'proxy-tls.pem');
    const tlsKeyPath = path.join(o.dir, 'proxy-tls.key');
    await fs.writeFile(tlsCertPath, server.certPem);
    await fs.writeFile(tlsKeyPath, server.keyPem, { mode: 0o600 });
    return {
      kind: 'cyrus',
      imapPort: cy.imapPort,
      lmtpPort: cy.lmtpPort,
      masterUser: cy.masterUser,
      masterPassword: cy.masterPassword,
      tlsCertPath,
      tlsKeyPath,
      clientCaPem: Buffer.from(o.ca.certPem),
      destroy: () => cy.destroy(),
    };
  } catch (err) {
    await cy.destroy().catch(() => undefined);
    throw err;
  }
}
