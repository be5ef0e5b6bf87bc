/**
 * Issue 2 acceptance: capability surfaces, STARTTLS, the client's address at
 * Dovecot, upstream TLS modes, limits and failure handling, against real Dovecot.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDovecot, type DovecotInstance } from '../../src/testbed/dovecot.js';
import { freePort } from '../../src/testbed/ports.js';
import { RawImap } from '../helpers/raw-imap.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';

const TOPIC = 'com.apple.mobilemail.push.org.example';

function capabilityTokens(text: string, prefix: RegExp): string[] {
  const line = text.split('\r\n').find((l) => prefix.test(l));
  if (!line) throw new Error(`no capability line matching ${prefix} in ${text}`);
  const list = /\[CAPABILITY ([^\]]*)\]/i.exec(line)?.[1] ?? line.replace(/^\* CAPABILITY /i, '');
  return list.split(' ');
}

function expectPushCapabilities(tokens: string[]): void {
  expect(tokens).toContain('XAPPLEPUSHSERVICE');
  expect(tokens.filter((t) => t.toUpperCase() === 'XAPPLEPUSHSERVICE')).toHaveLength(1);
  expect(tokens.some((t) => /^COMPRESS=/i.test(t))).toBe(false);
  expect(tokens).toContain('IMAP4rev1');
}

describe('capability surfaces with push configured', () => {
  let dovecot: DovecotInstance;
  let proxy: TestProxy;
  beforeAll(async () => {
    dovecot = await startDovecot();
    proxy = await startTestProxy({
      upstreamPort: dovecot.imapPort,
      flags: ['--apns-topic', TOPIC],
      tlsCert: dovecot.caCertPath,
      tlsKey: dovecot.tlsKeyPath,
    });
  });
  afterAll(async () => {
    await proxy?.stop();
    await dovecot?.stop();
  });

  it('greeting, pre-login CAPABILITY, untagged list before the LOGIN OK, and post-login CAPABILITY', async () => {
    const direct = await RawImap.connect({ port: dovecot.imapPort });
    await direct.greeting();
    await direct.command('c0', 'CAPABILITY');
    const directLogin = await direct.command('c1', 'LOGIN alice alicepw');
    // Dovecot offers COMPRESS=DEFLATE after login, untagged because CAPABILITY came first
    expect(capabilityTokens(directLogin, /^\* CAPABILITY/)).toContain('COMPRESS=DEFLATE');
    direct.close();

    const c = await RawImap.connect({ port: proxy.plainPort });
    expectPushCapabilities(capabilityTokens(await c.greeting(), /^\* OK \[CAPABILITY/));
    expectPushCapabilities(capabilityTokens(await c.command('c0', 'CAPABILITY'), /^\* CAPABILITY/));
    const login = await c.command('c1', 'LOGIN alice alicepw');
    const postLogin = capabilityTokens(login, /^\* CAPABILITY/);
    expectPushCapabilities(postLogin);
    expect(postLogin).toContain('NOTIFY');
    expect(postLogin).not.toContain('STARTTLS');
    expectPushCapabilities(capabilityTokens(await c.command('c2', 'CAPABILITY'), /^\* CAPABILITY/));
    await c.command('z', 'LOGOUT');
  });

  it('tagged OK [CAPABILITY …] after LOGIN and after AUTHENTICATE', async () => {
    const c = await RawImap.connect({ port: proxy.plainPort });
    await c.greeting();
    expectPushCapabilities(capabilityTokens(await c.command('t1', 'LOGIN bob bobpw'), /^t1 OK \[CAPABILITY/));
    c.close();
    const d = await RawImap.connect({ port: proxy.tlsPort, tls: true, ca: await readCa(dovecot) });
    await d.greeting();
    const ir = Buffer.from('\0carol\0carolpw').toString('base64');
    expectPushCapabilities(capabilityTokens(await d.command('t2', `AUTHENTICATE PLAIN ${ir}`), /^t2 OK \[CAPABILITY/));
    d.close();
  });

  it('offers STARTTLS only on the plaintext leg, and discards commands pipelined after STARTTLS', async () => {
    const ca = await readCa(dovecot);
    const tlsLeg = await RawImap.connect({ port: proxy.tlsPort, tls: true, ca });
    expect(capabilityTokens(await tlsLeg.greeting(), /^\* OK \[CAPABILITY/)).not.toContain('STARTTLS');
    tlsLeg.close();

    const c = await RawImap.connect({ port: proxy.plainPort });
    expect(capabilityTokens(await c.greeting(), /^\* OK \[CAPABILITY/)).toContain('STARTTLS');
    c.send('s1 STARTTLS\r\ns2 CAPABILITY\r\n');
    const ok = await c.tagged('s1');
    expect(ok).toMatch(/^s1 OK/m);
    await c.starttls(ca);
    const after = await c.command('s3', 'NOOP');
    const caps = await c.command('s4', 'CAPABILITY');
    await c.command('s5', 'LOGIN alice alicepw');
    c.close();
    const everything = c.all().toString('latin1');
    expect(everything).not.toMatch(/^s2 /m);
    expect(after).toBe('s3 OK NOOP completed.\r\n');
    const tokens = capabilityTokens(caps, /^\* CAPABILITY/);
    expect(tokens).not.toContain('STARTTLS');
    expectPushCapabilities(tokens);
  });

  it('answers a second STARTTLS and COMPRESS itself', async () => {
    const c = await RawImap.connect({ port: proxy.tlsPort, tls: true, ca: await readCa(dovecot) });
    await c.greeting();
    expect(await c.command('a', 'STARTTLS')).toMatch(/^a BAD /m);
    await c.command('b', 'LOGIN alice alicepw');
    expect(await c.command('c', 'COMPRESS DEFLATE')).toMatch(/^c NO /m);
    expect(await c.command('d', 'NOOP')).toMatch(/^d OK/m);
    c.close();
  });
});

async function readCa(d: DovecotInstance): Promise<Buffer> {
  const { readFile } = await import('node:fs/promises');
  return readFile(d.caCertPath);
}

describe('the client address reaches Dovecot', () => {
  let dovecot: DovecotInstance;
  beforeAll(async () => {
    dovecot = await startDovecot({ haproxyListener: true });
  });
  afterAll(async () => {
    await dovecot?.stop();
  });

  it('by ID: the log shows the real client address and session id; client x-* keys are stripped', async () => {
    const proxy = await startTestProxy({ upstreamPort: dovecot.imapPort });
    try {
      const c = await RawImap.connect({ port: proxy.plainPort, localAddress: '127.0.0.2' });
      await c.greeting();
      const id = await c.command('i1', 'ID ("name" "Mail" "x-originating-ip" "198.51.100.9" "event" NIL)');
      expect(id).toMatch(/^i1 OK/m);
      await c.command('l1', 'LOGIN alice alicepw');
      await c.command('z', 'LOGOUT');
      const log = await dovecot.readLog();
      expect(log).toMatch(/Login: user=<alice>.*rip=127\.0\.0\.2/);
      expect(log).not.toMatch(/198\.51\.100\.9/);
    } finally {
      await proxy.stop();
    }
  });

  it('a wrong password from one client address does not slow a login from another', async () => {
    // Dovecot delays the next login from an address after a failure from it (~4 s).
    // Through the proxy that address must be the client's, not the proxy's.
    const timeLogin = async (port: number, from: string, user: string, pass: string) => {
      const c = await RawImap.connect({ port, localAddress: from });
      await c.greeting();
      const t0 = performance.now();
      const reply = await c.command('l', `LOGIN ${user} ${pass}`, 30_000);
      const ms = performance.now() - t0;
      c.close();
      return { reply, ms };
    };
    const forwarded = await startTestProxy({ upstreamPort: dovecot.imapPort });
    const blind = await startTestProxy({ upstreamPort: dovecot.imapPort, flags: ['--client-ip', 'none'] });
    try {
      const failA = await timeLogin(forwarded.plainPort, '127.0.0.4', 'alice', 'wrong');
      expect(failA.reply).toMatch(/^l NO /m);
      const other = await timeLogin(forwarded.plainPort, '127.0.0.5', 'bob', 'bobpw');
      expect(other.reply).toMatch(/^l OK/m);

      // control: without forwarding every client shares the proxy's address and its penalty
      const failB = await timeLogin(blind.plainPort, '127.0.0.6', 'alice', 'wrong');
      expect(failB.reply).toMatch(/^l NO /m);
      const penalised = await timeLogin(blind.plainPort, '127.0.0.7', 'bob', 'bobpw');
      expect(penalised.reply).toMatch(/^l OK/m);

      expect(penalised.ms).toBeGreaterThan(1000); // the penalty exists on this Dovecot
      expect(other.ms * 4).toBeLessThan(penalised.ms); // and the proxy keeps other clients out of it
      const log = await dovecot.readLog();
      expect(log).toMatch(/rip=127\.0\.0\.4/);
    } finally {
      await forwarded.stop();
      await blind.stop();
    }
  }, 60_000);

  it('by PROXY protocol v2 with the SSL TLV on a TLS client leg', async () => {
    const proxy = await startTestProxy({
      upstreamPort: dovecot.haproxyPort!,
      flags: ['--client-ip', 'proxy-v2'],
      tlsCert: dovecot.caCertPath,
      tlsKey: dovecot.tlsKeyPath,
    });
    try {
      const c = await RawImap.connect({ port: proxy.tlsPort, tls: true, ca: await readCa(dovecot), localAddress: '127.0.0.8' });
      await c.greeting();
      expect(await c.command('l', 'LOGIN carol carolpw')).toMatch(/^l OK/m);
      await c.command('z', 'LOGOUT');
      expect(await dovecot.readLog()).toMatch(/Login: user=<carol>.*rip=127\.0\.0\.8.*(TLS|secured)/);
    } finally {
      await proxy.stop();
    }
  });
});

describe('PROXY v2 TLS state decides plaintext logins at Dovecot', () => {
  let dovecot: DovecotInstance;
  beforeAll(async () => {
    dovecot = await startDovecot({ haproxyListener: true, disablePlaintextAuth: true, trustedNetworks: '' });
  });
  afterAll(async () => {
    await dovecot?.stop();
  });

  it('plaintext client leg: Dovecot refuses; after STARTTLS at the proxy: Dovecot accepts', async () => {
    const proxy = await startTestProxy({
      upstreamPort: dovecot.haproxyPort!,
      flags: ['--client-ip', 'proxy-v2', '--allow-plaintext-auth'],
      tlsCert: dovecot.caCertPath,
      tlsKey: dovecot.tlsKeyPath,
    });
    try {
      const plain = await RawImap.connect({ port: proxy.plainPort, localAddress: '127.0.0.9' });
      await plain.greeting();
      expect(await plain.command('l', 'LOGIN alice alicepw')).toMatch(/^l NO /m);
      plain.close();

      const c = await RawImap.connect({ port: proxy.plainPort, localAddress: '127.0.0.9' });
      await c.greeting();
      await c.command('s', 'STARTTLS');
      await c.starttls(await readCa(dovecot));
      expect(await c.command('l', 'LOGIN alice alicepw')).toMatch(/^l OK/m);
      c.close();
    } finally {
      await proxy.stop();
    }
  });
});

describe('upstream TLS, failures and limits', () => {
  let dovecot: DovecotInstance;
  beforeAll(async () => {
    dovecot = await startDovecot();
  });
  afterAll(async () => {
    await dovecot?.stop();
  });

  it.each([
    ['tls', 'imapsPort'],
    ['starttls', 'imapPort'],
  ] as const)('--upstream-tls %s verifies the upstream certificate and relays', async (mode, portKey) => {
    const proxy = await startTestProxy({
      upstreamPort: dovecot[portKey],
      flags: ['--upstream-tls', mode, '--upstream-ca', dovecot.caCertPath, '--upstream-servername', 'localhost'],
    });
    try {
      const c = await RawImap.connect({ port: proxy.plainPort });
      const greeting = await c.greeting();
      expect(greeting).toMatch(/^\* OK /);
      expect(await c.command('l', 'LOGIN alice alicepw')).toMatch(/^l OK/m);
      expect(await c.command('n', 'NOOP')).toMatch(/^n OK/m);
      c.close();
      expect(await dovecot.readLog()).toMatch(/Login: user=<alice>.*TLS/);
    } finally {
      await proxy.stop();
    }
  });

  it('refuses an upstream whose certificate it cannot verify', async () => {
    const proxy = await startTestProxy({ upstreamPort: dovecot.imapsPort, flags: ['--upstream-tls', 'tls'] });
    try {
      const c = await RawImap.connect({ port: proxy.plainPort });
      expect(await c.greeting()).toMatch(/^\* BYE \[UNAVAILABLE\]/);
      await c.waitClosed();
    } finally {
      await proxy.stop();
    }
  });

  it('answers * BYE [UNAVAILABLE] and closes when the upstream is unreachable', async () => {
    const closedPort = await freePort();
    const proxy = await startTestProxy({ upstreamPort: closedPort });
    try {
      const c = await RawImap.connect({ port: proxy.plainPort });
      expect(await c.greeting()).toMatch(/^\* BYE \[UNAVAILABLE\] /);
      await c.waitClosed();
    } finally {
      await proxy.stop();
    }
  });

  it('closes the client when the upstream closes, and the upstream when the client closes', async () => {
    const proxy = await startTestProxy({ upstreamPort: dovecot.imapPort });
    try {
      const c = await RawImap.connect({ port: proxy.plainPort });
      await c.greeting();
      await c.command('l', 'LOGIN bob bobpw');
      await dovecot.doveadm(['kick', 'bob']);
      await c.waitClosed();
      expect(proxy.app.proxy.sessions.size).toBe(0);

      const d = await RawImap.connect({ port: proxy.plainPort });
      await d.greeting();
      await d.command('l', 'LOGIN carol carolpw');
      const before = (await dovecot.readLog()).split('\n').filter((l) => /carol.*Disconnected/.test(l)).length;
      d.close();
      await waitUntil(async () => (await dovecot.readLog()).split('\n').filter((l) => /carol.*Disconnected/.test(l)).length > before);
      await waitUntil(async () => proxy.app.proxy.sessions.size === 0);
    } finally {
      await proxy.stop();
    }
  });

  it('cuts off an over-long line before login but relays long lines after it', async () => {
    const proxy = await startTestProxy({ upstreamPort: dovecot.imapPort });
    try {
      const c = await RawImap.connect({ port: proxy.plainPort });
      await c.greeting();
      c.send(`a LOGIN ${'x'.repeat(70 * 1024)}`);
      expect(await c.until((t) => /\* BYE /.test(t))).toMatch(/\* BYE .*too long/i);
      await c.waitClosed();

      // after login: a 60 KB command line is Dovecot's to judge; it gets the same answer as directly
      const longSet = Array.from({ length: 9000 }, (_, i) => String(i * 2 + 1)).join(',');
      const answer = async (port: number) => {
        const s = await RawImap.connect({ port });
        await s.greeting();
        await s.command('l', 'LOGIN alice alicepw');
        await s.command('s', 'SELECT INBOX');
        const r = await s.command('f', `UID FETCH ${longSet} (FLAGS)`);
        s.close();
        return r.replace(/\(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)/g, '');
      };
      expect(longSet.length).toBeGreaterThan(40_000);
      expect(await answer(proxy.plainPort)).toBe(await answer(dovecot.imapPort));
    } finally {
      await proxy.stop();
    }
  });

  it('refuses plaintext logins from non-loopback-like clients only when configured to', async () => {
    // loopback clients may log in without TLS, as with Dovecot's own disable_plaintext_auth
    const proxy = await startTestProxy({ upstreamPort: dovecot.imapPort });
    try {
      const c = await RawImap.connect({ port: proxy.plainPort });
      await c.greeting();
      expect(await c.command('l', 'LOGIN alice alicepw')).toMatch(/^l OK/m);
      c.close();
    } finally {
      await proxy.stop();
    }
  });
});

async function waitUntil(pred: () => Promise<boolean> | boolean, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error('condition not reached');
    await new Promise((r) => setTimeout(r, 50));
  }
}
