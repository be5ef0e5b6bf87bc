/** Passwords, SASL payloads and full device tokens never reach the logs, even at trace level. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Writable } from 'node:stream';
import { startDovecot, type DovecotInstance } from '../../src/testbed/dovecot.js';
import { createLogger } from '../../src/ops/log.js';
import { RawImap } from '../helpers/raw-imap.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';

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
