/**
 * `xaps-proxy demo`: a throwaway Dovecot on loopback with test users, xaps-proxy in
 * front of it with a fresh self-signed certificate and push registrations kept in
 * an embedded store; then a short walkthrough of what an iPhone would do, and the
 * commands to try it by hand. Stays up while attached to a terminal (Ctrl-C
 * stops everything it started); `--exit` leaves right after the walkthrough.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { randomBytes, randomUUID } from 'node:crypto';
import { loadConfig } from '../config/index.js';
import { startApp, type App } from '../app.js';
import { createLogger } from '../ops/log.js';
import { selfSignedCertificate } from '../cert/selfsigned.js';
import { startDovecot, type DovecotInstance } from '../testbed/dovecot.js';
import { freePort } from '../testbed/ports.js';
import { createTestCa, issueMailPushCert } from '../testbed/apns-certs.js';
import { startMockApns, type MockApns } from '../testbed/mock-apns.js';
import { demoWalkthrough, demoPush } from './demo-walkthrough.js';

function say(line = ''): void {
  process.stdout.write(`${line}\n`);
}

export async function runDemo(argv: string[]): Promise<void> {
  const exitAfter = argv.includes('--exit') || (!argv.includes('--stay') && !process.stdout.isTTY);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'xaps-demo-'));
  let dovecot: DovecotInstance | null = null;
  let app: App | null = null;
  let apns: MockApns | null = null;
  const cleanup = async () => {
    await app?.stop().catch(() => undefined);
    await apns?.close().catch(() => undefined);
    await dovecot?.stop().catch(() => undefined);
    await fs.rm(dir, { recursive: true, force: true }).catch(() => undefined);
  };
  try {
    say('xaps-proxy demo: starting a throwaway Dovecot on loopback …');
    dovecot = await startDovecot({ users: { alice: 'alicepw', bob: 'bobpw' } });
    const { certPem, keyPem } = selfSignedCertificate();
    const certPath = path.join(dir, 'tls-cert.pem');
    const keyPath = path.join(dir, 'tls-key.pem');
    await fs.writeFile(certPath, certPem);
    await fs.writeFile(keyPath, keyPem, { mode: 0o600 });
    // Apple cannot be reached from here: a local APNs stand-in that checks the client
    // certificate, and a Mail push certificate from a local test CA shaped like Apple's.
    const ca = createTestCa('xaps-proxy demo CA (not Apple)');
    const mail = issueMailPushCert(ca);
    apns = await startMockApns({ clientCa: ca.certPem });
    const apnsCert = path.join(dir, 'mail-push.pem');
    const apnsKey = path.join(dir, 'mail-push.key');
    const apnsCa = path.join(dir, 'mock-apns-ca.pem');
    await fs.writeFile(apnsCert, mail.certPem);
    await fs.writeFile(apnsKey, mail.keyPem, { mode: 0o600 });
    await fs.writeFile(apnsCa, apns.caPem);
    const masterPasswordFile = path.join(dir, 'master.pw');
    await fs.writeFile(masterPasswordFile, `${dovecot.masterPassword}\n`, { mode: 0o600 });
    const [plainPort, tlsPort] = [await freePort(), await freePort()];
    const config = loadConfig({
      argv: [
        '--listen', `127.0.0.1:${plainPort}`,
        '--metrics-listen', `127.0.0.1:${await freePort()}`,
        '--listen-tls', `127.0.0.1:${tlsPort}`,
        '--tls-cert', certPath,
        '--tls-key', keyPath,
        '--upstream', `127.0.0.1:${dovecot.imapPort}`,
        '--apns-cert', apnsCert,
        '--apns-key', apnsKey,
        '--apns-endpoint', apns.url,
        '--apns-ca', apnsCa,
        '--master-user', dovecot.masterUser,
        '--master-password-file', masterPasswordFile,
        '--data-dir', path.join(dir, 'data'),
        '--log-level', 'warn',
      ],
      env: {},
    });
    app = await startApp(config, createLogger({ level: 'warn', pretty: false, destination: process.stderr }));
    say(`Dovecot ${dovecot.host}:${dovecot.imapPort} (users alice/alicepw, bob/bobpw), untouched.`);
    say(`xaps-proxy in front of it: 127.0.0.1:${tlsPort} (TLS) and 127.0.0.1:${plainPort} (STARTTLS).`);
    say(`APNs stand-in: ${apns.url}; Mail push certificate topic ${mail.topic} (from a local test CA, not Apple).`);
    say();
    const deviceToken = randomBytes(32).toString('hex');
    await demoWalkthrough({
      port: tlsPort,
      ca: certPem,
      deviceToken,
      accountId: randomUUID().toUpperCase(),
      store: app.store!,
      say,
    });
    say();
    const upstream = dovecot;
    const message = (subject: string) => `From: bob@example.org\r\nTo: alice@example.org\r\nSubject: ${subject}\r\n\r\nHello from the demo.\r\n`;
    const running = app;
    await demoPush({ apns, watching: () => running.watch?.isWatching('alice') ?? false, deliver: (mailbox) => upstream.deliver('alice', message(mailbox ?? 'INBOX'), mailbox), say });
    say();
    say('Try it yourself:');
    say(`  openssl s_client -quiet -connect 127.0.0.1:${tlsPort} -CAfile ${certPath}`);
    say('    a LOGIN alice alicepw');
    say(`    b XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "${randomUUID().toUpperCase()}" "aps-device-token" "${'ab'.repeat(32)}" "aps-subtopic" "com.apple.mobilemail" "mailboxes" ("INBOX" "Sent")`);
    say('    c LOGOUT');
    if (exitAfter) {
      say();
      say('Done (not attached to a terminal; run `npm run demo -- --stay` to keep it running).');
      await cleanup();
      return;
    }
    say();
    say('Running. Press Ctrl-C to stop Dovecot and the proxy.');
    await new Promise<void>((resolve) => {
      process.once('SIGINT', resolve);
      process.once('SIGTERM', resolve);
    });
    say('\nStopping …');
    await cleanup();
  } catch (err) {
    await cleanup();
    throw err;
  }
}
