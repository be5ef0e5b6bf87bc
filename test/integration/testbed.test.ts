/**
 * Proves the test bed (src/testbed) against the real servers: Dovecot (plain, STARTTLS, IMAPS,
 * master user, LDA delivery, PROXY-protocol listener, Lua push driver, stop/restart), Redis
 * (AOF persistence across restart and crash) and haproxy (plain and TLS-terminating relay).
 * Needs `node scripts/bootstrap.mjs test` (Dovecot, Redis, haproxy from Debian).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import tls from 'node:tls';
import type { AddressInfo } from 'node:net';
import {
  dovecotAvailable,
  haproxyAvailable,
  redisAvailable,
  freePort,
  freePorts,
  isPidAlive,
  probeBanner,
  startDovecot,
  startRedis,
  startTcpRelay,
  waitFor,
  type DovecotInstance,
  type RedisInstance,
  type TcpRelayInstance,
} from '../../src/testbed/index.js';

// ------------------------------------------------------------ tiny IMAP client ---

/** Line-oriented raw IMAP client over a net/tls socket (no literals needed here). */
class RawImap {
  private buf = '';
  private lines: string[] = [];
  private waiters: Array<() => void> = [];
  private closed = false;
  private tagN = 0;

  constructor(public sock: net.Socket) {
    this.attach(sock);
  }

  private attach(sock: net.Socket): void {
    sock.setEncoding('latin1');
    sock.on('data', (d: string) => {
      this.buf += d;
      let i: number;
      while ((i = this.buf.indexOf('\r\n')) >= 0) {
        this.lines.push(this.buf.slice(0, i));
        this.buf = this.buf.slice(i + 2);
      }
      this.wake();
    });
    sock.on('close', () => {
      this.closed = true;
      this.wake();
    });
    sock.on('error', () => undefined);
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  static connect(port: number, opts: { host?: string; localAddress?: string } = {}): Promise<RawImap> {
    return new Promise((resolve, reject) => {
      const sock = net.connect({ host: opts.host ?? '127.0.0.1', port, localAddress: opts.localAddress });
      sock.once('connect', () => resolve(new RawImap(sock)));
      sock.once('error', reject);
    });
  }

  static connectTls(port: number, ca: string | Buffer): Promise<RawImap> {
    return new Promise((resolve, reject) => {
      const sock = tls.connect({ host: '127.0.0.1', port, ca });
      sock.once('secureConnect', () => resolve(new RawImap(sock)));
      sock.once('error', reject);
    });
  }

  /** Next line, or undefined when the connection closed first. */
  async readLine(timeoutMs = 30_000): Promise<string | undefined> {
    const deadline = Date.now() + timeoutMs;
    while (this.lines.length === 0) {
      if (this.closed) return undefined;
      if (Date.now() > deadline) throw new Error('timeout waiting for a line');
      await new Promise<void>((r) => {
        const t = setTimeout(r, Math.max(1, deadline - Date.now()));
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    return this.lines.shift();
  }

  async greeting(): Promise<string> {
    const line = await this.readLine();
    if (line === undefined) throw new Error('closed before greeting');
    return line;
  }

  write(data: string | Buffer): void {
    this.sock.write(data);
  }

  /** Send a command; resolve with the untagged lines and the tagged completion. */
  async command(cmd: string): Promise<{ untagged: string[]; tagged: string }> {
    const tag = `t${++this.tagN}`;
    this.sock.write(`${tag} ${cmd}\r\n`);
    const untagged: string[] = [];
    for (;;) {
      const line = await this.readLine();
      if (line === undefined) throw new Error(`closed during ${cmd}: ${untagged.join(' | ')}`);
      if (line.startsWith(`${tag} `)) return { untagged, tagged: line.slice(tag.length + 1) };
      untagged.push(line);
    }
  }

  /** STARTTLS on this connection; returns a new client on the TLS socket. */
  async startTls(ca: string | Buffer): Promise<RawImap> {
    const r = await this.command('STARTTLS');
    if (!r.tagged.startsWith('OK')) throw new Error(`STARTTLS: ${r.tagged}`);
    this.sock.removeAllListeners('data');
    return new Promise((resolve, reject) => {
      const s = tls.connect({ socket: this.sock, ca, servername: 'localhost' });
      s.once('secureConnect', () => resolve(new RawImap(s)));
      s.once('error', reject);
    });
  }

  async waitClosed(timeoutMs = 30_000): Promise<void> {
    await waitFor(() => this.closed, { timeoutMs, what: 'connection close' });
  }

  get isClosed(): boolean {
    return this.closed;
  }

  close(): void {
    this.sock.destroy();
  }
}

const q = (s: string) => `"${s.replace(/["\\]/g, (c) => `\\${c}`)}"`;

function message(subject: string): string {
  return [
    'From: Sender <sender@example.org>',
    'To: alice@example.org',
    `Subject: ${subject}`,
    `Message-ID: <${subject.replace(/\W/g, '')}.${Date.now()}@example.org>`,
    'Date: Mon, 23 Nov 2026 12:00:00 +0000',
    '',
    `Body of ${subject}.`,
    '',
  ].join('\n');
}

/** PROXY protocol v2 header: PROXY TCP4 (or LOCAL when src is undefined). */
function proxyV2Header(src?: { ip: string; port: number }, dst?: { ip: string; port: number }): Buffer {
  const sig = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);
  if (!src || !dst) return Buffer.concat([sig, Buffer.from([0x20, 0x00, 0x00, 0x00])]); // v2 LOCAL, UNSPEC
  const addr = Buffer.alloc(12);
  src.ip.split('.').forEach((o, i) => addr.writeUInt8(Number(o), i));
  dst.ip.split('.').forEach((o, i) => addr.writeUInt8(Number(o), 4 + i));
  addr.writeUInt16BE(src.port, 8);
  addr.writeUInt16BE(dst.port, 10);
  // 0x21 = version 2, PROXY command; 0x11 = AF_INET, STREAM; then the address length.
  return Buffer.concat([sig, Buffer.from([0x21, 0x11, 0x00, addr.length]), addr]);
}

async function mailboxMessages(d: DovecotInstance, user: string, mailbox: string): Promise<number> {
  const out = await d.doveadm(['mailbox', 'status', '-u', user, 'messages', mailbox]);
  const m = /messages=(\d+)/.exec(out);
  if (!m) throw new Error(`unexpected doveadm output: ${out}`);
  return Number(m[1]);
}

// ------------------------------------------------------------------- ports ---

describe('installed by scripts/bootstrap.mjs', () => {
  it('has Dovecot, redis-server and haproxy', () => {
    expect(dovecotAvailable()).toBe(true);
    expect(redisAvailable()).toBe(true);
    expect(haproxyAvailable()).toBe(true);
  });
});

describe('ports', () => {
  it('freePort returns a bindable port; freePorts returns distinct ones', async () => {
    const p = await freePort();
    expect(p).toBeGreaterThan(0);
    const srv = net.createServer();
    await new Promise<void>((r) => srv.listen(p, '127.0.0.1', () => r()));
    await new Promise<void>((r) => srv.close(() => r()));
    const ps = await freePorts(5);
    expect(new Set(ps).size).toBe(5);
  });
});

// ----------------------------------------------------------------- dovecot ---

describe('Dovecot test bed', () => {
  let d: DovecotInstance;
  let ca: Buffer;
  const open: RawImap[] = [];
  const track = (c: RawImap) => (open.push(c), c);

  beforeAll(async () => {
    d = await startDovecot({ haproxyListener: true });
    ca = fs.readFileSync(d.caCertPath);
  });
  afterAll(async () => {
    for (const c of open) c.close();
    await d?.destroy();
  });

  it('listens on free loopback ports, not on 143/993, and wrote its files', () => {
    const ports = [d.imapPort, d.imapsPort, d.lmtpPort, d.haproxyPort];
    for (const p of ports) expect(p).toBeGreaterThan(1024);
    expect(new Set(ports).size).toBe(4);
    expect(d.host).toBe('127.0.0.1');
    const conf = fs.readFileSync(d.configPath, 'utf8');
    expect(conf).not.toMatch(/port = (143|993)$/m);
    expect(conf).toMatch(/haproxy = yes/);
    expect(isPidAlive(d.pid)).toBe(true);
    expect(d.users).toMatchObject({ alice: 'alicepw', bob: 'bobpw', carol: 'carolpw' });
    expect(d.masterUser).toBe('master');
    expect(fs.statSync(d.dir).mode & 0o777).toBe(0o755);
  });

  it('LMTP answers on its port', async () => {
    expect(await probeBanner(d.host, d.lmtpPort, { expect: '220 ', timeoutMs: 10_000 })).toMatch(/^220 .*Dovecot/);
  });

  it('greets on the plain port, offers STARTTLS, and LOGIN alice works', async () => {
    const c = track(await RawImap.connect(d.imapPort));
    const g = await c.greeting();
    expect(g).toMatch(/^\* OK /);
    expect(g).toContain('STARTTLS');
    const r = await c.command(`LOGIN ${q('alice')} ${q('alicepw')}`);
    expect(r.tagged).toMatch(/^OK/);
    expect((await c.command('LOGOUT')).tagged).toMatch(/^OK/);
  });

  it('STARTTLS upgrades with the self-signed cert, then LOGIN works', async () => {
    const c = track(await RawImap.connect(d.imapPort));
    await c.greeting();
    const t = track(await c.startTls(ca));
    expect((await t.command(`LOGIN ${q('bob')} ${q('bobpw')}`)).tagged).toMatch(/^OK/);
    await t.command('LOGOUT');
  });

  it('IMAPS: the cert verifies for 127.0.0.1 and LOGIN alice works', async () => {
    const c = track(await RawImap.connectTls(d.imapsPort, ca));
    expect(await c.greeting()).toMatch(/^\* OK /);
    expect((await c.command(`LOGIN ${q('alice')} ${q('alicepw')}`)).tagged).toMatch(/^OK/);
    await c.command('LOGOUT');
  });

  it('rejects a wrong password (from 127.0.0.4, so the anvil penalty hits no other test)', async () => {
    const c = track(await RawImap.connect(d.imapPort, { localAddress: '127.0.0.4' }));
    await c.greeting();
    expect((await c.command(`LOGIN ${q('alice')} ${q('nope')}`)).tagged).toMatch(/^NO/);
    c.close();
  });

  it('deliver() puts a message in INBOX and in a new mailbox (created on the fly)', async () => {
    const before = await mailboxMessages(d, 'alice', 'INBOX');
    await d.deliver('alice', message('testbed inbox'));
    await d.deliver('alice', Buffer.from(message('testbed folder')), 'Lists/xaps');
    expect(await mailboxMessages(d, 'alice', 'INBOX')).toBe(before + 1);
    expect(await mailboxMessages(d, 'alice', 'Lists/xaps')).toBe(1);

    // and IMAP sees it too
    const c = track(await RawImap.connect(d.imapPort));
    await c.greeting();
    await c.command(`LOGIN ${q('alice')} ${q('alicepw')}`);
    const st = await c.command(`STATUS ${q('Lists/xaps')} (MESSAGES)`);
    expect(st.tagged).toMatch(/^OK/);
    expect(st.untagged.join('\n')).toMatch(/MESSAGES 1\)/);
    const sel = await c.command('EXAMINE INBOX');
    expect(sel.untagged).toContain(`* ${before + 1} EXISTS`);
    await c.command('LOGOUT');
  });

  it('the master user logs in as alice ("alice*master")', async () => {
    await d.deliver('alice', message('for master'));
    const n = await mailboxMessages(d, 'alice', 'INBOX');
    const c = track(await RawImap.connect(d.imapPort));
    await c.greeting();
    const r = await c.command(`LOGIN ${q(`alice*${d.masterUser}`)} ${q(d.masterPassword)}`);
    expect(r.tagged).toMatch(/^OK/);
    const sel = await c.command('EXAMINE INBOX');
    expect(sel.untagged).toContain(`* ${n} EXISTS`);
    await c.command('LOGOUT');
    expect(await d.readLog()).toMatch(/Login: user=<alice>/);
  });

  it('the haproxy listener drops a connection that sends no PROXY header', async () => {
    const c = track(await RawImap.connect(d.haproxyPort!));
    const first = await c.readLine(30_000);
    // Dovecot waits haproxy_timeout (3 s) for the header, then disconnects without a greeting.
    expect(first).toBeUndefined();
    expect(c.isClosed).toBe(true);
  });

  it('the haproxy listener accepts PROXY v2 (PROXY TCP4) and logs the forwarded address', async () => {
    const c = track(await RawImap.connect(d.haproxyPort!));
    c.write(proxyV2Header({ ip: '203.0.113.7', port: 51234 }, { ip: '127.0.0.1', port: 993 }));
    expect(await c.greeting()).toMatch(/^\* OK /);
    expect((await c.command(`LOGIN ${q('carol')} ${q('carolpw')}`)).tagged).toMatch(/^OK/);
    await c.command('LOGOUT');
    await waitFor(async () => /user=<carol>.*rip=203\.0\.113\.7/.test(await d.readLog()), {
      timeoutMs: 10_000,
      what: 'login log line with rip=203.0.113.7',
    });
  });

  it('the haproxy listener accepts PROXY v2 LOCAL', async () => {
    const c = track(await RawImap.connect(d.haproxyPort!));
    c.write(proxyV2Header());
    expect(await c.greeting()).toMatch(/^\* OK /);
    await c.command('LOGOUT');
  });

  it('restart() keeps dir, ports and mail, with a new master pid', async () => {
    const oldPid = d.pid;
    const n = await mailboxMessages(d, 'alice', 'INBOX');
    await d.restart();
    expect(d.pid).not.toBe(oldPid);
    expect(isPidAlive(oldPid)).toBe(false);
    expect(isPidAlive(d.pid)).toBe(true);
    expect(await mailboxMessages(d, 'alice', 'INBOX')).toBe(n);
    const c = track(await RawImap.connect(d.imapPort));
    expect(await c.greeting()).toMatch(/^\* OK /);
    c.close();
  });

  it('stop() ends the master process and is idempotent', async () => {
    const pid = d.pid;
    await d.stop();
    expect(isPidAlive(pid)).toBe(false);
    await d.stop();
    await expect(RawImap.connect(d.imapPort)).rejects.toThrow();
  });
});

describe('Dovecot test bed options', () => {
  let d: DovecotInstance | undefined;
  afterAll(async () => {
    await d?.destroy();
  });

  it('custom users, generated users, no trusted networks, plaintext auth disabled', async () => {
    d = await startDovecot({
      users: { dave: 'davepw' },
      genUsers: 3,
      trustedNetworks: '',
      disablePlaintextAuth: true,
      masterUser: 'admin',
      masterPassword: 'adminpw',
      maxConnections: 50,
    });
    expect(Object.keys(d.users)).toEqual(['dave', 'user0001', 'user0002', 'user0003']);
    const conf = fs.readFileSync(d.configPath, 'utf8');
    expect(conf).toMatch(/^login_trusted_networks = $/m);
    expect(conf).toMatch(/^\s*process_limit = 50$/m);

    // Dovecot counts a connection as secured when it comes from a trusted network or when the
    // client address equals the local one (127.0.0.1 -> 127.0.0.1): no LOGINDISABLED there.
    const local = await RawImap.connect(d.imapPort);
    expect(await local.greeting()).not.toContain('LOGINDISABLED');
    local.close();
    // From another loopback address (and no trusted networks): LOGINDISABLED until STARTTLS.
    const c = await RawImap.connect(d.imapPort, { localAddress: '127.0.0.5' });
    const g = await c.greeting();
    expect(g).toContain('LOGINDISABLED');
    expect((await c.command(`LOGIN ${q('dave')} ${q('davepw')}`)).tagged).toMatch(/^NO/);
    const t = await c.startTls(fs.readFileSync(d.caCertPath));
    expect((await t.command(`LOGIN ${q('user0002')} ${q('password')}`)).tagged).toMatch(/^OK/);
    await t.command('LOGOUT');
    t.close();

    const s = await RawImap.connectTls(d.imapsPort, fs.readFileSync(d.caCertPath));
    await s.greeting();
    expect((await s.command(`LOGIN ${q('dave*admin')} ${q('adminpw')}`)).tagged).toMatch(/^OK/);
    s.close();
  });
});

describe('Dovecot Lua push driver', () => {
  let d: DovecotInstance | undefined;
  let server: http.Server | undefined;
  afterAll(async () => {
    await d?.destroy();
    await new Promise<void>((r) => (server ? server.close(() => r()) : r()));
  });

  it('POSTs a JSON event per delivered message (MessageNew) and per APPEND (MessageAppend)', async () => {
    const events: Array<{ auth?: string; body: Record<string, unknown> }> = [];
    server = http.createServer((req, res) => {
      let body = '';
      req.on('data', (c: Buffer) => (body += c.toString('utf8')));
      req.on('end', () => {
        events.push({ auth: req.headers.authorization, body: JSON.parse(body) as Record<string, unknown> });
        res.writeHead(204).end();
      });
    });
    await new Promise<void>((r) => server!.listen(0, '127.0.0.1', () => r()));
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/events`;

    d = await startDovecot({ pushLuaUrl: url, pushLuaToken: 's3cret' });
    expect(fs.readFileSync(d.pushLuaPath!, 'utf8')).toContain('dovecot_lua_notify_end_txn');

    await d.deliver('bob', message('pushed "quoted" subject'), 'Work');
    await waitFor(() => events.length >= 1, { timeoutMs: 20_000, what: 'push POST' });
    expect(events[0]!.auth).toBe('Bearer s3cret');
    expect(events[0]!.body).toMatchObject({
      user: 'bob',
      event: 'MessageNew',
      mailbox: 'Work',
      uid: 1,
      subject: 'pushed "quoted" subject',
    });
    expect(events[0]!.body.uidvalidity).toEqual(expect.any(Number));
    expect(String(events[0]!.body.from)).toContain('sender@example.org');

    const c = await RawImap.connect(d.imapPort);
    await c.greeting();
    await c.command(`LOGIN ${q('bob')} ${q('bobpw')}`);
    const msg = message('appended').replace(/\n/g, '\r\n');
    c.write(`a1 APPEND INBOX {${Buffer.byteLength(msg)}+}\r\n${msg}\r\n`);
    let line: string | undefined;
    do line = await c.readLine();
    while (line !== undefined && !line.startsWith('a1 '));
    expect(line).toMatch(/^a1 OK/);
    c.close();
    await waitFor(() => events.some((e) => e.body.event === 'MessageAppend'), {
      timeoutMs: 20_000,
      what: 'MessageAppend POST',
    });
    expect(events.find((e) => e.body.event === 'MessageAppend')!.body).toMatchObject({
      user: 'bob',
      mailbox: 'INBOX',
      subject: 'appended',
    });
    expect(await d.readLog()).not.toMatch(/xaps-push\.lua: HTTP/);
  });
});

// ------------------------------------------------------------------- redis ---

/** Minimal RESP client: send one command, read one reply line (enough for SET/GET of short values). */
async function redisCmd(port: number, ...args: string[]): Promise<string> {
  const sock = net.connect({ host: '127.0.0.1', port });
  const payload = `*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join('')}`;
  return new Promise((resolve, reject) => {
    let buf = '';
    sock.on('connect', () => sock.write(payload));
    sock.on('data', (d: Buffer) => {
      buf += d.toString('utf8');
      const bulk = /^\$(-?\d+)\r\n/.exec(buf);
      if (bulk) {
        const n = Number(bulk[1]);
        if (n < 0) return done('(nil)');
        if (buf.length >= bulk[0].length + n + 2) return done(buf.slice(bulk[0].length, bulk[0].length + n));
      } else if (buf.includes('\r\n')) return done(buf.slice(0, buf.indexOf('\r\n')));
    });
    sock.on('error', reject);
    function done(v: string) {
      sock.destroy();
      resolve(v);
    }
  });
}

describe('Redis test bed', () => {
  let r: RedisInstance | undefined;
  afterAll(async () => {
    await r?.destroy();
  });

  it('starts, persists with AOF across restart and across a SIGKILL, and stops', async () => {
    r = await startRedis({ persistence: 'aof' });
    expect(r.url).toBe(`redis://127.0.0.1:${r.port}`);
    expect(r.port).not.toBe(6379);
    expect(isPidAlive(r.pid)).toBe(true);
    expect(await redisCmd(r.port, 'SET', 'xaps:k', 'v1')).toBe('+OK');

    const pid1 = r.pid;
    await r.restart();
    expect(isPidAlive(pid1)).toBe(false);
    expect(await redisCmd(r.port, 'GET', 'xaps:k')).toBe('v1');

    expect(await redisCmd(r.port, 'SET', 'xaps:k2', 'v2')).toBe('+OK');
    const pid2 = r.pid;
    await r.kill();
    expect(isPidAlive(pid2)).toBe(false);
    await r.restart();
    expect(await redisCmd(r.port, 'GET', 'xaps:k2')).toBe('v2');

    const pid3 = r.pid;
    await r.stop();
    await r.stop();
    expect(isPidAlive(pid3)).toBe(false);
  });

  it('without persistence, data is gone after restart', async () => {
    const n = await startRedis();
    try {
      expect(await redisCmd(n.port, 'SET', 'k', 'v')).toBe('+OK');
      await n.restart();
      expect(await redisCmd(n.port, 'GET', 'k')).toBe('(nil)');
    } finally {
      await n.destroy();
    }
  });
});

// ----------------------------------------------------------------- haproxy ---

describe('haproxy TCP relay', () => {
  let d: DovecotInstance | undefined;
  const relays: TcpRelayInstance[] = [];
  beforeAll(async () => {
    d = await startDovecot();
  });
  afterAll(async () => {
    for (const x of relays) await x.stop();
    await d?.destroy();
  });

  it('relays a Dovecot session blindly', async () => {
    const relay = await startTcpRelay({ target: { host: d!.host, port: d!.imapPort } });
    relays.push(relay);
    expect(isPidAlive(relay.pid)).toBe(true);
    const c = await RawImap.connect(relay.port);
    expect(await c.greeting()).toMatch(/^\* OK .*Dovecot/);
    expect((await c.command(`LOGIN ${q('alice')} ${q('alicepw')}`)).tagged).toMatch(/^OK/);
    await c.command('LOGOUT');
    c.close();
    await relay.stop();
    await relay.stop();
    expect(isPidAlive(relay.pid)).toBe(false);
  });

  it('terminates TLS with a given cert and key', async () => {
    const relay = await startTcpRelay({
      target: { host: d!.host, port: d!.imapPort },
      tls: { certPemPath: d!.caCertPath, keyPemPath: d!.tlsKeyPath },
    });
    relays.push(relay);
    const c = await RawImap.connectTls(relay.port, fs.readFileSync(d!.caCertPath));
    expect(await c.greeting()).toMatch(/^\* OK /);
    c.close();
  });
});
