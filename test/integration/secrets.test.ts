/** Passwords, SASL payloads and full device tokens never reach the logs, even at trace level. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { startDovecot, type DovecotInstance } from '../../src/testbed/dovecot.js';
import { createLogger } from '../../src/ops/log.js';
import { RawImap } from '../helpers/raw-imap.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';
import { spawnServe, type ServeProcess } from '../helpers/serve-process.js';
import { apnsFixture, type ApnsFixture } from '../helpers/apns-fixture.js';
import { lmtpDeliver } from '../helpers/lmtp.js';

const PASSWORD = 'S3cret-Passw0rd';
const TOKEN = 'fe'.repeat(32);

describe('secrets stay out of logs', () => {
  let dovecot: DovecotInstance;
  let proxy: TestProxy;
  let logs = '';
  beforeAll(async () => {
    dovecot = await startDovecot({ users: { alice: PASSWORD, bob: PASSWORD, carol: PASSWORD } });
    const sink = new Writable({
      write(chunk, _enc, cb) {
        logs += chunk.toString();
        cb();
      },
    });
    proxy = await startTestProxy({
      upstreamPort: dovecot.imapPort,
      flags: ['--apns-topic', 'com.apple.mobilemail.push.org.example', '--log-level', 'trace'],
      log: createLogger({ level: 'trace', pretty: false, destination: sink }),
    });
  });
  afterAll(async () => {
    await proxy?.stop();
    await dovecot?.stop();
  });

  it('logs logins and registrations without the secrets in them', async () => {
    const plainIr = Buffer.from(`\0bob\0${PASSWORD}`).toString('base64');
    const b64 = (s: string) => Buffer.from(s).toString('base64');

    const a = await RawImap.connect({ port: proxy.plainPort });
    await a.greeting();
    expect(await a.command('l', `LOGIN alice "${PASSWORD}"`)).toMatch(/^l OK/m);
    expect(
      await a.command(
        'x',
        `XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "0715A26B-1C2D-4E3F-8A9B-0C1D2E3F4A5B" "aps-device-token" "${TOKEN}" "aps-subtopic" "com.apple.mobilemail" "mailboxes" ("INBOX")`,
      ),
    ).toMatch(/^x OK/m);
    a.close();

    const b = await RawImap.connect({ port: proxy.plainPort });
    await b.greeting();
    expect(await b.command('s', `AUTHENTICATE PLAIN ${plainIr}`)).toMatch(/^s OK/m);
    b.close();

    const c = await RawImap.connect({ port: proxy.plainPort });
    await c.greeting();
    c.send('t AUTHENTICATE LOGIN\r\n');
    await c.until((t) => t.startsWith('+'));
    c.send(`${b64('carol')}\r\n`);
    await c.until((t) => t.startsWith('+'));
    c.send(`${b64(PASSWORD)}\r\n`);
    expect(await c.tagged('t')).toMatch(/^t OK/m);
    c.close();

    await new Promise((r) => setTimeout(r, 200));
    for (const user of ['alice', 'bob', 'carol']) expect(logs).toMatch(new RegExp(`"user":"${user}"[^\\n]*"msg":"login"`));
    expect(logs).toMatch(/push registration stored/);
    expect(logs).not.toContain(PASSWORD);
    expect(logs).not.toContain(plainIr);
    expect(logs).not.toContain(b64(PASSWORD));
    expect(logs).not.toContain(TOKEN);
    expect(logs).toContain(TOKEN.slice(0, 8));
  });
});

describe('secrets stay out of the output of a whole serve process at trace level', () => {
  const MASTER_PASSWORD = 'Mast3r-Secr3t-Pw';
  const DEVICE = 'c0ffee42'.repeat(8);
  const b64 = (s: string) => Buffer.from(s).toString('base64');
  let dovecot: DovecotInstance;
  let apns: ApnsFixture;
  let dataDir: string;
  let proc: ServeProcess;
  beforeAll(async () => {
    dovecot = await startDovecot({ users: { alice: PASSWORD, bob: PASSWORD }, masterPassword: MASTER_PASSWORD });
    apns = await apnsFixture(['--push-coalesce-window', '300ms']);
    const masterFile = path.join(apns.dir, 'master.pw');
    await fs.writeFile(masterFile, `${MASTER_PASSWORD}\n`, { mode: 0o600 });
    dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'xaps-secrets-'));
    proc = await spawnServe([
      '--upstream', `127.0.0.1:${dovecot.imapPort}`,
      '--log-level', 'trace',
      '--data-dir', dataDir,
      ...apns.flags,
      '--master-user', dovecot.masterUser,
      '--master-password-file', masterFile,
    ]);
  });
  afterAll(async () => {
    await proc?.stop();
    await apns?.mock.close();
    await dovecot?.stop();
    if (dataDir) await fs.rm(dataDir, { recursive: true, force: true });
    if (apns) await fs.rm(apns.dir, { recursive: true, force: true });
  });

  /** Everything the process wrote so far, stdout (the log) and stderr. */
  const output = () => proc.stdout() + proc.stderr();

  async function until(pred: () => boolean, what: string, timeoutMs = 20_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!pred()) {
      if (Date.now() > deadline) throw new Error(`timeout waiting for ${what}; output:\n${output().slice(-3000)}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  it('logins, SASL, registration, the master login of the watcher and a push: no password, payload or full token in the output', async () => {
    const a = await RawImap.connect({ port: proc.port });
    await a.greeting();
    expect(await a.command('l', `LOGIN alice "${PASSWORD}"`)).toMatch(/^l OK/m);
    expect(
      await a.command(
        'x',
        `XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "0715A26B-1C2D-4E3F-8A9B-0C1D2E3F4A5B" "aps-device-token" "${DEVICE}" "aps-subtopic" "com.apple.mobilemail" "mailboxes" ("INBOX")`,
      ),
    ).toMatch(/^x OK/m);
    a.close();

    const plainIr = b64(`\0bob\0${PASSWORD}`);
    const b = await RawImap.connect({ port: proc.port });
    await b.greeting();
    expect(await b.command('s', `AUTHENTICATE PLAIN ${plainIr}`)).toMatch(/^s OK/m);
    b.close();

    // the watcher logs in upstream as the master user on alice's behalf; mail delivered before
    // its first look at INBOX is its baseline, so deliver until a push comes
    await until(() => /"msg":"watching user"/.test(proc.stdout()), 'the watcher of alice');
    const pushed = () => apns.mock.requests.some((r) => r.deviceToken === DEVICE);
    for (let attempt = 0; !pushed(); attempt++) {
      if (attempt === 8) throw new Error(`no push after ${attempt} deliveries; output:\n${output().slice(-3000)}`);
      await lmtpDeliver(dovecot.lmtpPort, 'alice', `From: a@example.org\r\nSubject: ${attempt}\r\n\r\nhi\r\n`);
      await until(pushed, 'a push', 3_000).catch(() => undefined);
    }

    await proc.stop(20_000);
    const out = output();
    // the output is the real log: it has the users and the short token
    expect(out).toMatch(/"user":"alice"[^\n]*"msg":"login"/);
    expect(out).toMatch(/"user":"bob"[^\n]*"msg":"login"/);
    expect(out).toMatch(/push registration stored/);
    expect(out).toContain(DEVICE.slice(0, 8));
    expect(out.split('\n').filter((l) => l.includes('"level":10') || l.includes('"level":20')).length).toBeGreaterThan(0);
    // and none of the secrets
    for (const secret of [PASSWORD, b64(PASSWORD), plainIr, MASTER_PASSWORD, b64(MASTER_PASSWORD), b64(`alice\0${dovecot.masterUser}\0${MASTER_PASSWORD}`)]) {
      expect(out).not.toContain(secret);
    }
    expect(out.toLowerCase()).not.toContain(DEVICE);
  });
});
