/**
 * Issue 7 (hostile input, TLS settings): what the client side refuses and how much a client can
 * make the proxy hold.
 *
 * - TLS: --tls-min-version and --tls-ciphers on --listen-tls and STARTTLS, kept across a reload;
 *   the default refuses ciphers without forward secrecy.
 * - Slow clients: --login-timeout cuts off a client that trickles bytes without logging in, one that
 *   never finishes its TLS handshake and one that stalls in STARTTLS, while a normal client works on.
 * - Oversized input before login: a line or a literal over 64 KiB is answered with BYE and closed,
 *   and none of it reaches the server.
 * - Backpressure: a client that does not read stops the proxy reading the server, and a server that
 *   does not read stops the proxy reading the client; the session holds little meanwhile, and every
 *   byte arrives once the reader reads. Each over plaintext legs, a TLS client leg and a TLS upstream leg.
 * - Connection limits: --max-connections-per-ip and --max-connections answer BYE and count it.
 *
 * Sizes and counts are asserted, never durations: deadlines here are only generous upper bounds.
 */
import { createHash, randomBytes, type Hash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import tls from 'node:tls';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { PREAUTH_MAX_LINE } from '../../src/app.js';
import { MAX_REFUSAL_HANDSHAKES } from '../../src/proxy/server.js';
import type { Session } from '../../src/proxy/session.js';
import { selfSignedCertificate } from '../../src/cert/selfsigned.js';
import { createTestCa, issueServerCert } from '../../src/testbed/apns-certs.js';
import { startDovecot, type DovecotInstance } from '../../src/testbed/dovecot.js';
import { startFakeUpstream, type FakeUpstream } from '../helpers/fake-upstream.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';
import { RawImap } from '../helpers/raw-imap.js';

const KiB = 1024;
const MiB = 1024 * KiB;

async function waitFor(pred: () => boolean | Promise<boolean>, what: string, timeoutMs = 30_000): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!(await pred())) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** xaps_client_connections_rejected_total{reason} (that metric alone: a full scrape would also probe the upstream). */
async function rejectedCount(proxy: TestProxy, reason: string): Promise<number> {
  const metric = proxy.app.registry.getSingleMetric('xaps_client_connections_rejected_total');
  const values = (await metric!.get()).values;
  return values.find((v) => v.labels.reason === reason)?.value ?? NaN;
}

/** The proxy's one open session (tests that look into a session open exactly one). */
async function onlySession(proxy: TestProxy): Promise<Session> {
  await waitFor(() => proxy.app.proxy.sessions.size === 1, 'one session');
  return [...proxy.app.proxy.sessions][0]!;
}

// ------------------------------------------------------------------------------------ TLS

interface TlsOutcome {
  ok: boolean;
  protocol?: string | null;
  cipher?: string;
  error?: string;
}

/** Waits for a TLS handshake on `socket` to succeed or fail. */
function settle(socket: tls.TLSSocket): Promise<TlsOutcome> {
  return new Promise((resolve) => {
    socket.once('secureConnect', () => {
      const outcome = { ok: true, protocol: socket.getProtocol(), cipher: socket.getCipher().name };
      socket.destroy();
      resolve(outcome);
    });
    socket.once('error', (err: NodeJS.ErrnoException) => {
      socket.destroy();
      resolve({ ok: false, error: err.code ?? err.message });
    });
    socket.once('close', () => resolve({ ok: false, error: 'closed' }));
  });
}

/** An implicit-TLS handshake with the client options `opts`. */
function implicitTls(port: number, ca: string, opts: tls.ConnectionOptions): Promise<TlsOutcome> {
  return settle(tls.connect({ host: '127.0.0.1', port, ca, servername: 'localhost', ...opts }));
}

/** Greeting, STARTTLS, then a handshake with the client options `opts`. */
async function starttls(port: number, ca: string, opts: tls.ConnectionOptions): Promise<TlsOutcome> {
  const c = await RawImap.connect({ port });
  await c.greeting();
  expect(await c.command('s', 'STARTTLS')).toMatch(/^s OK/m);
  c.socket.removeAllListeners('data');
  return settle(tls.connect({ socket: c.socket, ca, servername: 'localhost', ...opts }));
}

const TLS12_ONLY: tls.ConnectionOptions = { maxVersion: 'TLSv1.2' };
/** RSA key exchange: no forward secrecy. */
const NO_FORWARD_SECRECY: tls.ConnectionOptions = { maxVersion: 'TLSv1.2', ciphers: 'AES128-GCM-SHA256' };
const TLS11: tls.ConnectionOptions = { minVersion: 'TLSv1', maxVersion: 'TLSv1.1', ciphers: 'DEFAULT@SECLEVEL=0' };

describe('client TLS versions and ciphers (--tls-min-version, --tls-ciphers)', () => {
  let upstream: FakeUpstream;
  let dir: string;
  let ca: string;
  let certPath: string;
  let keyPath: string;
  const proxies: TestProxy[] = [];
  const start = async (flags: string[] = [], extra: { upstreamPort?: number } = {}) => {
    const p = await startTestProxy({ upstreamPort: extra.upstreamPort ?? upstream.port, tlsCert: certPath, tlsKey: keyPath, flags });
    proxies.push(p);
    return p;
  };
  beforeAll(async () => {
    upstream = await startFakeUpstream();
    dir = mkdtempSync(path.join(tmpdir(), 'xaps-hostile-tls-'));
    // an RSA certificate, so that RSA key exchange (no forward secrecy) is possible at all
    const testCa = createTestCa();
    const server = issueServerCert(testCa, ['localhost', '127.0.0.1']);
    ca = testCa.certPem;
    certPath = path.join(dir, 'cert.pem');
    keyPath = path.join(dir, 'key.pem');
    writeFileSync(certPath, server.certPem);
    writeFileSync(keyPath, server.keyPem, { mode: 0o600 });
  });
  afterAll(async () => {
    for (const p of proxies) await p.stop();
    await upstream?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const both = (p: TestProxy, opts: tls.ConnectionOptions) =>
    Promise.all([implicitTls(p.tlsPort, ca, opts), starttls(p.plainPort, ca, opts)]);

  it('by default: TLS 1.3 and 1.2 with forward secrecy; no TLS 1.1, no RSA key exchange; the same after a reload', async () => {
    const proxy = await start();
    const check = async () => {
      for (const o of await both(proxy, {})) expect(o).toMatchObject({ ok: true, protocol: 'TLSv1.3' });
      for (const o of await both(proxy, TLS12_ONLY)) {
        expect(o).toMatchObject({ ok: true, protocol: 'TLSv1.2' });
        expect(o.cipher).toMatch(/^ECDHE-(RSA|ECDSA)-(AES\d+-GCM-SHA\d+|CHACHA20-POLY1305)$/);
      }
      for (const o of await both(proxy, TLS11)) expect(o.ok).toBe(false);
      for (const o of await both(proxy, NO_FORWARD_SECRECY)) expect(o.ok).toBe(false);
    };
    await check();
    await proxy.app.reload(); // SIGHUP: a new certificate context, the same policy
    await check();
  });

  it('--tls-min-version TLSv1.3 refuses TLS 1.2 clients on both listeners, also after a reload', async () => {
    const proxy = await start(['--tls-min-version', 'TLSv1.3']);
    for (const round of [1, 2]) {
      for (const o of await both(proxy, TLS12_ONLY)) expect(o.ok, `round ${round}`).toBe(false);
      for (const o of await both(proxy, {})) expect(o).toMatchObject({ ok: true, protocol: 'TLSv1.3' });
      if (round === 1) await proxy.app.reload();
    }
  });

  it('--tls-ciphers can allow a cipher the default refuses', async () => {
    const proxy = await start(['--tls-ciphers', 'ECDHE-RSA-AES128-GCM-SHA256:AES128-GCM-SHA256']);
    for (const o of await both(proxy, NO_FORWARD_SECRECY)) expect(o).toMatchObject({ ok: true, protocol: 'TLSv1.2', cipher: 'AES128-GCM-SHA256' });
    for (const o of await both(proxy, TLS12_ONLY)) expect(o).toMatchObject({ ok: true, cipher: 'ECDHE-RSA-AES128-GCM-SHA256' });
  });

  it(`over a limit on --listen-tls: BYE after the handshake, but no handshake beyond ${MAX_REFUSAL_HANDSHAKES} refusals at once`, async () => {
    const proxy = await start(['--max-connections-per-ip', '1']);
    const first = await RawImap.connect({ port: proxy.tlsPort, tls: true, ca });
    expect(await first.greeting()).toMatch(/^\* OK /);

    const refused = await RawImap.connect({ port: proxy.tlsPort, tls: true, ca });
    expect(await refused.greeting()).toMatch(/^\* BYE \[UNAVAILABLE\] Too many connections from your address/);
    await refused.waitClosed();

    // refused connections that never send a ClientHello each hold a refusal handshake for a while
    // (one more than the cap, in case the proxy has not yet seen the refused client above go)
    const silent: net.Socket[] = [];
    for (let i = 0; i < MAX_REFUSAL_HANDSHAKES + 1; i++) {
      const s = net.connect({ host: '127.0.0.1', port: proxy.tlsPort });
      s.on('error', () => undefined);
      silent.push(s);
    }
    await waitFor(async () => (await rejectedCount(proxy, 'per_address_limit')) === 2 + MAX_REFUSAL_HANDSHAKES, 'the refusals counted');
    expect(await implicitTls(proxy.tlsPort, ca, {})).toMatchObject({ ok: false });
    expect(await rejectedCount(proxy, 'per_address_limit')).toBe(3 + MAX_REFUSAL_HANDSHAKES);
    for (const s of silent) s.destroy();
    first.close();
  });
});

// ------------------------------------------------------------------ slow clients, limits

describe('against a real Dovecot', () => {
  let dovecot: DovecotInstance;
  let ca: Buffer;
  beforeAll(async () => {
    dovecot = await startDovecot();
    ca = readFileSync(dovecot.caCertPath);
  });
  afterAll(async () => {
    await dovecot?.stop();
  });
  const startProxy = (flags: string[]) =>
    startTestProxy({ upstreamPort: dovecot.imapPort, tlsCert: dovecot.caCertPath, tlsKey: dovecot.tlsKeyPath, flags });

  it('--login-timeout cuts off a trickling client, a stalled TLS handshake and a stalled STARTTLS; a normal client works on', async () => {
    const LOGIN_TIMEOUT_MS = 4_000;
    const proxy = await startProxy(['--login-timeout', `${LOGIN_TIMEOUT_MS / 1000}s`]);
    const server = proxy.app.proxy;
    let trickle: NodeJS.Timeout | undefined;
    try {
      expect(server.sessions.size).toBe(0);
      expect(server.openConnections()).toBe(0);

      // one byte a second, forever: the command never completes, but the connection is never idle
      const trickler = await RawImap.connect({ port: proxy.plainPort });
      await trickler.greeting();
      const bytes = Buffer.from('a LOGIN alice ' + 'x'.repeat(1000));
      let sent = 0;
      trickle = setInterval(() => {
        if (!trickler.closed) trickler.send(bytes.subarray(sent, ++sent));
      }, 1000);

      // a TCP connection to the TLS listener that never sends a ClientHello
      const silentTls = net.connect({ host: '127.0.0.1', port: proxy.tlsPort });
      silentTls.on('error', () => undefined);
      const silentTlsClosed = new Promise<void>((r) => silentTls.once('close', () => r()));

      // STARTTLS accepted, then no handshake
      const stalled = await RawImap.connect({ port: proxy.plainPort });
      await stalled.greeting();
      expect(await stalled.command('s', 'STARTTLS')).toMatch(/^s OK/m);

      const normal = await RawImap.connect({ port: proxy.tlsPort, tls: true, ca });
      const normalAccepted = performance.now();
      await normal.greeting();
      expect(await normal.command('l', 'LOGIN alice alicepw')).toMatch(/^l OK/m);
      expect(await normal.command('s', 'SELECT INBOX')).toMatch(/^s OK/m);

      await trickler.waitClosed(30_000);
      expect(trickler.all().toString('latin1')).toMatch(/\r\n\* BYE [^\r\n]*login[^\r\n]*\r\n$/i);
      await stalled.waitClosed(30_000);
      await Promise.race([silentTlsClosed, sleep(30_000).then(() => Promise.reject(new Error('the silent TLS connection is still open')))]);

      // the logged-in client outlives its own login deadline
      const left = normalAccepted + LOGIN_TIMEOUT_MS + 1_000 - performance.now();
      if (left > 0) await sleep(left);
      expect(await normal.command('n', 'NOOP')).toMatch(/^n OK/m);
      await waitFor(() => server.sessions.size === 1 && server.openConnections() === 1, 'only the normal session left');

      await normal.command('z', 'LOGOUT');
      await waitFor(() => server.sessions.size === 0 && server.openConnections() === 0, 'no connections left');
    } finally {
      clearInterval(trickle);
      await proxy.stop();
    }
  });

  it('--max-connections-per-ip: the next connection from that address gets BYE and is counted; other addresses are not affected', async () => {
    const proxy = await startProxy(['--max-connections-per-ip', '3']);
    const server = proxy.app.proxy;
    try {
      expect(await rejectedCount(proxy, 'per_address_limit')).toBe(0);
      const held: RawImap[] = [];
      for (let i = 0; i < 3; i++) {
        const c = await RawImap.connect({ port: proxy.plainPort, localAddress: '127.0.0.1' });
        expect(await c.greeting()).toMatch(/^\* OK /);
        held.push(c);
      }
      const fourth = await RawImap.connect({ port: proxy.plainPort, localAddress: '127.0.0.1' });
      expect(await fourth.greeting()).toBe('* BYE [UNAVAILABLE] Too many connections from your address, try again later\r\n');
      await fourth.waitClosed();
      const fourthTls = await RawImap.connect({ port: proxy.tlsPort, tls: true, ca, localAddress: '127.0.0.1' });
      expect(await fourthTls.greeting()).toMatch(/^\* BYE \[UNAVAILABLE\] Too many connections from your address/);
      await fourthTls.waitClosed();
      expect(await rejectedCount(proxy, 'per_address_limit')).toBe(2);
      expect(await rejectedCount(proxy, 'total_limit')).toBe(0);
      expect(server.openConnections('127.0.0.1')).toBe(3);

      const other = await RawImap.connect({ port: proxy.tlsPort, tls: true, ca, localAddress: '127.0.0.2' });
      expect(await other.greeting()).toMatch(/^\* OK /);
      expect(await other.command('l', 'LOGIN bob bobpw')).toMatch(/^l OK/m);

      held.shift()!.close();
      await waitFor(() => server.openConnections('127.0.0.1') === 2, 'the closed connection released');
      const again = await RawImap.connect({ port: proxy.plainPort, localAddress: '127.0.0.1' });
      expect(await again.greeting()).toMatch(/^\* OK /);
      expect(await again.command('l', 'LOGIN alice alicepw')).toMatch(/^l OK/m);
      expect(await rejectedCount(proxy, 'per_address_limit')).toBe(2);
      for (const c of [...held, other, again]) c.close();
    } finally {
      await proxy.stop();
    }
  });

  it('--max-connections: the next connection from any address gets BYE and is counted', async () => {
    const proxy = await startProxy(['--max-connections', '3']);
    const server = proxy.app.proxy;
    try {
      const held: RawImap[] = [];
      for (const from of ['127.0.0.1', '127.0.0.2', '127.0.0.3']) {
        const c = await RawImap.connect({ port: proxy.plainPort, localAddress: from });
        expect(await c.greeting()).toMatch(/^\* OK /);
        held.push(c);
      }
      const over = await RawImap.connect({ port: proxy.plainPort, localAddress: '127.0.0.4' });
      expect(await over.greeting()).toBe('* BYE [UNAVAILABLE] Too many connections to this server, try again later\r\n');
      await over.waitClosed();
      expect(await rejectedCount(proxy, 'total_limit')).toBe(1);
      expect(await rejectedCount(proxy, 'per_address_limit')).toBe(0);

      held.shift()!.close();
      await waitFor(() => server.openConnections() === 2, 'the closed connection released');
      const again = await RawImap.connect({ port: proxy.tlsPort, tls: true, ca, localAddress: '127.0.0.4' });
      expect(await again.greeting()).toMatch(/^\* OK /);
      expect(await again.command('l', 'LOGIN carol carolpw')).toMatch(/^l OK/m);
      expect(await rejectedCount(proxy, 'total_limit')).toBe(1);
      for (const c of [...held, again]) c.close();
    } finally {
      await proxy.stop();
    }
  });
});

// ------------------------------------------------------------------- a scripted upstream

/** One upstream connection after the proxy's ID exchange: counts and hashes what arrives. */
class UpstreamLeg {
  count = 0;
  private head = '';
  private hash: Hash | null = null;
  constructor(readonly socket: net.Socket) {}

  take(d: Buffer): void {
    this.count += d.length;
    if (this.head.length < 64 * KiB) this.head += d.toString('latin1', 0, Math.min(d.length, 64 * KiB));
    this.hash?.update(d);
  }

  /** The first 64 KiB received, as text. */
  text(): string {
    return this.head;
  }

  /** Hash what arrives from now on. */
  startHash(): void {
    this.hash = createHash('sha256');
  }

  digest(): string {
    return this.hash!.digest('hex');
  }
}

/** A certificate and key as PEM, for a TLS server in a test. */
interface TlsMaterial {
  certPem: string;
  keyPem: string;
}

type ScriptedUpstream = { port: number; next(): Promise<UpstreamLeg>; close(): Promise<void> };

/**
 * An upstream that greets, answers the proxy's ID and then does only what the test tells it, without keeping what it
 * receives (so that hundreds of MiB can go through). With `tls`, it speaks implicit TLS (the proxy's --upstream-tls tls).
 */
async function startScriptedUpstream(opts: { tls?: TlsMaterial } = {}): Promise<ScriptedUpstream> {
  const ready: UpstreamLeg[] = [];
  const waiting: Array<(leg: UpstreamLeg) => void> = [];
  const sockets = new Set<net.Socket>();
  const onConnection = (socket: net.Socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    socket.write('* OK [CAPABILITY IMAP4rev1 LITERAL+ ID IDLE] scripted ready\r\n');
    let setup = Buffer.alloc(0);
    let leg: UpstreamLeg | null = null;
    socket.on('data', (d: Buffer) => {
      if (leg) return leg.take(d);
      setup = Buffer.concat([setup, d]);
      const eol = setup.indexOf('\r\n');
      if (eol < 0) return;
      socket.write('* ID NIL\r\nI OK ID completed.\r\n');
      leg = new UpstreamLeg(socket);
      const rest = setup.subarray(eol + 2);
      if (rest.length > 0) leg.take(rest);
      const w = waiting.shift();
      if (w) w(leg);
      else ready.push(leg);
    });
  };
  const server = opts.tls ? tls.createServer({ cert: opts.tls.certPem, key: opts.tls.keyPem }, onConnection) : net.createServer(onConnection);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: (server.address() as net.AddressInfo).port,
    next: () => new Promise((resolve) => (ready.length > 0 ? resolve(ready.shift()!) : waiting.push(resolve))),
    close: () =>
      new Promise((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/** Writes `size` pseudo-random bytes (then `trailer`) to `socket` as fast as it takes them, hashing what it writes. */
class Streamer {
  written = 0;
  waitingForDrain = false;
  finished = false;
  readonly hash = createHash('sha256');
  readonly done: Promise<void>;

  constructor(socket: net.Socket, header: Buffer, size: number, trailer: Buffer) {
    this.done = this.run(socket, header, size, trailer);
    this.done.catch(() => undefined); // awaited by a test that gets that far; after a failed one, cleanup closes the socket
  }

  private async run(socket: net.Socket, header: Buffer, size: number, trailer: Buffer): Promise<void> {
    const block = randomBytes(MiB);
    const write = async (chunk: Buffer) => {
      this.hash.update(chunk);
      this.written += chunk.length;
      if (socket.write(chunk)) return;
      this.waitingForDrain = true;
      await new Promise<void>((resolve, reject) => {
        const onDrain = () => {
          socket.off('close', onClose);
          resolve();
        };
        const onClose = () => {
          socket.off('drain', onDrain);
          reject(new Error('closed while writing'));
        };
        socket.once('drain', onDrain);
        socket.once('close', onClose);
      });
      this.waitingForDrain = false;
    };
    await write(header);
    for (let i = 0, left = size; left > 0; i++) {
      const chunk = Buffer.from(block.subarray(0, Math.min(MiB, left)));
      chunk.writeUInt32BE(i, 0); // every block differs: a dropped or repeated block changes the hash
      left -= chunk.length;
      await write(chunk);
    }
    await write(trailer);
    this.finished = true;
  }
}

/**
 * Waits until the writer is stuck: waiting for 'drain' and no byte written for `quietMs` (a
 * quiescence check, so a slow machine only makes it wait longer). Samples `probe` meanwhile and
 * returns its largest value. Ends early when the writer finishes.
 */
async function untilStalled(streamer: Streamer, probe: () => number, quietMs = 2_000, timeoutMs = 120_000): Promise<number> {
  let peak = 0;
  let last = -1;
  let since = performance.now();
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    peak = Math.max(peak, probe());
    if (streamer.finished) return peak;
    if (streamer.written !== last) {
      last = streamer.written;
      since = performance.now();
    } else if (streamer.waitingForDrain && performance.now() - since >= quietMs) {
      return peak;
    }
    if (performance.now() > deadline) throw new Error(`the writer neither stalled nor finished (${streamer.written} bytes written)`);
    await sleep(20);
  }
}

/** A client socket that hashes what it receives from a mark on, and can stop reading. */
class ByteClient {
  count = 0;
  private text = '';
  private hash: Hash | null = null;
  closed = false;
  private constructor(readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.count += d.length;
      if (this.hash) this.hash.update(d);
      else this.text += d.toString('latin1');
      this.tail = Buffer.concat([this.tail, d]).subarray(-256);
    });
    socket.on('close', () => (this.closed = true));
    socket.on('error', () => undefined);
  }
  tail = Buffer.alloc(0);

  /** A plaintext connection, or with `tls` an implicit-TLS one trusting `tls.ca` (the proxy's --listen-tls). */
  static connect(port: number, opts: { tls?: { ca: string } } = {}): Promise<ByteClient> {
    return new Promise((resolve, reject) => {
      const s = opts.tls
        ? tls.connect({ host: '127.0.0.1', port, ca: opts.tls.ca, servername: 'localhost' })
        : net.connect({ host: '127.0.0.1', port });
      s.once('error', reject);
      s.once(opts.tls ? 'secureConnect' : 'connect', () => {
        s.off('error', reject);
        resolve(new ByteClient(s));
      });
    });
  }

  /** Text received before startHash(). */
  async untilText(re: RegExp): Promise<void> {
    await waitFor(() => re.test(this.text), `${re}`);
  }

  startHash(): void {
    this.count = 0;
    this.hash = createHash('sha256');
  }

  digest(): string {
    return this.hash!.digest('hex');
  }
}

/** Greeting, then LOGIN answered OK by the scripted upstream; `ca` set: over the proxy's --listen-tls port. */
async function loggedIn(proxy: TestProxy, upstream: ScriptedUpstream, ca?: string): Promise<{ client: ByteClient; leg: UpstreamLeg }> {
  const client = ca === undefined ? await ByteClient.connect(proxy.plainPort) : await ByteClient.connect(proxy.tlsPort, { tls: { ca } });
  await client.untilText(/^\* OK .*\r\n/);
  const leg = await upstream.next();
  client.socket.write('a LOGIN user pw\r\n');
  await waitFor(() => leg.text().includes('a LOGIN user pw\r\n'), 'LOGIN upstream');
  leg.socket.write('a OK Logged in\r\n');
  await client.untilText(/\r\na OK Logged in\r\n$/);
  return { client, leg };
}

describe('with a scripted upstream', () => {
  let upstream: ScriptedUpstream;
  let proxy: TestProxy;
  beforeAll(async () => {
    upstream = await startScriptedUpstream();
    proxy = await startTestProxy({ upstreamPort: upstream.port });
  });
  afterAll(async () => {
    await proxy?.stop();
    await upstream?.close();
  });

  describe('oversized input before login', () => {
    it('a line over 64 KiB without CRLF: BYE, closed, nothing of it upstream, at most the limit and one read held', async () => {
      const c = await RawImap.connect({ port: proxy.plainPort });
      await c.greeting();
      const leg = await upstream.next();
      const session = await onlySession(proxy);
      c.send(Buffer.concat([Buffer.from('a LOGIN '), Buffer.alloc(10 * MiB, 'x')]));
      expect(await c.until((t) => /\* BYE /.test(t))).toMatch(/^\* BYE [^\r\n]*too long/im);
      await c.waitClosed();
      expect(leg.count).toBe(0);
      expect(session.isClosed).toBe(true);
      expect(session.clientBacklogPeak).toBeLessThanOrEqual(PREAUTH_MAX_LINE + 64 * KiB);
      await waitFor(() => proxy.app.proxy.openConnections() === 0, 'the connection gone');
    });

    it.each([
      ['synchronizing', '{100000}'],
      ['non-synchronizing', '{100000+}'],
    ])('a %s literal announcing more than 64 KiB: BYE, closed, nothing of it upstream', async (_kind, literal) => {
      const c = await RawImap.connect({ port: proxy.plainPort });
      await c.greeting();
      const leg = await upstream.next();
      const session = await onlySession(proxy);
      // the client does not wait for "+": it sends the literal right away
      c.send(Buffer.concat([Buffer.from(`a LOGIN ${literal}\r\n`), Buffer.alloc(100_000, 'u'), Buffer.from(' pw\r\n')]));
      expect(await c.until((t) => /\* BYE /.test(t))).toMatch(/^\* BYE [^\r\n]*too large/im);
      await c.waitClosed();
      expect(leg.count).toBe(0);
      expect(session.clientBacklogPeak).toBeLessThanOrEqual(PREAUTH_MAX_LINE + 64 * KiB);
      await waitFor(() => proxy.app.proxy.openConnections() === 0, 'the connection gone');
    });
  });

  /**
   * Each case over each kind of leg: plaintext upstream legs are read through the ReadPump (onread into pooled
   * buffers, paused by readStop), while a TLS upstream leg (--upstream-tls tls) and a TLS client leg (--listen-tls)
   * are tls.TLSSockets, read through 'data' events and paused as streams.
   */
  describe('backpressure', () => {
    const TOTAL = 200 * MiB;
    /**
     * What a session may hold while one side does not read: a few of the relay's 256 KiB steps. On a TLS leg,
     * bufferedBytes() counts the cleartext (socket write queue, read buffer); OpenSSL holds besides only the
     * ciphertext of the write in flight, a copy of cleartext still counted in writableLength, and at most one
     * partial record (16 KiB) of what it reads: decrypted bytes go to the socket's read buffer at once.
     */
    const SESSION_BOUND = 2 * MiB;
    const VARIANTS = [
      { name: 'plain client, plain upstream', clientTls: false, upstreamTls: false },
      { name: 'TLS client (--listen-tls), plain upstream', clientTls: true, upstreamTls: false },
      { name: 'plain client, TLS upstream (--upstream-tls tls)', clientTls: false, upstreamTls: true },
    ];
    let dir: string;
    let cert: TlsMaterial & { certPath: string; keyPath: string };
    beforeAll(() => {
      dir = mkdtempSync(path.join(tmpdir(), 'xaps-hostile-backpressure-'));
      const material = selfSignedCertificate({ hosts: ['localhost', '127.0.0.1'] });
      cert = { ...material, certPath: path.join(dir, 'cert.pem'), keyPath: path.join(dir, 'key.pem') };
      writeFileSync(cert.certPath, cert.certPem);
      writeFileSync(cert.keyPath, cert.keyPem, { mode: 0o600 });
    });
    afterAll(() => {
      rmSync(dir, { recursive: true, force: true });
    });

    for (const { name, clientTls, upstreamTls } of VARIANTS) describe(name, () => {
      let upstream: ScriptedUpstream;
      let proxy: TestProxy;
      beforeAll(async () => {
        upstream = await startScriptedUpstream(upstreamTls ? { tls: cert } : {});
        proxy = await startTestProxy({
          upstreamPort: upstream.port,
          ...(clientTls ? { tlsCert: cert.certPath, tlsKey: cert.keyPath } : {}),
          flags: upstreamTls ? ['--upstream-tls', 'tls', '--upstream-ca', cert.certPath] : [],
        });
      });
      afterAll(async () => {
        await proxy?.stop();
        await upstream?.close();
      });
      // a failed test leaves its client and session open (a paused socket does not see its peer go): end both, so
      // that the next test starts with no session
      const clients: ByteClient[] = [];
      afterEach(async () => {
        for (const c of clients.splice(0)) c.socket.destroy();
        for (const s of [...proxy.app.proxy.sessions]) s.close('test cleanup');
        await waitFor(() => proxy.app.proxy.sessions.size === 0, 'no session left');
      });

      /** A logged-in client over this variant's legs, and its session (checked to run over those legs). */
      const login = async (): Promise<{ client: ByteClient; leg: UpstreamLeg; session: Session }> => {
        const { client, leg } = await loggedIn(proxy, upstream, clientTls ? cert.certPem : undefined);
        clients.push(client);
        const session = await onlySession(proxy);
        expect(session.clientTls).toBe(clientTls);
        expect(leg.socket instanceof tls.TLSSocket).toBe(upstreamTls);
        return { client, leg, session };
      };

      it('a client that does not read: the proxy stops reading the upstream, holds little, and relays every byte later', async () => {
        const { client, leg, session } = await login();
        client.socket.pause();
        client.startHash();
        client.socket.write('f FETCH 1 BODY[]\r\n');
        await waitFor(() => leg.text().includes('f FETCH 1 BODY[]\r\n'), 'FETCH upstream');

        const header = Buffer.from(`* 1 FETCH (BODY[] {${TOTAL}}\r\n`);
        const trailer = Buffer.from(')\r\nf OK Fetch completed.\r\n');
        const streamer = new Streamer(leg.socket, header, TOTAL, trailer);
        const peak = await untilStalled(streamer, () => session.bufferedBytes());
        expect(streamer.finished, 'the upstream could write everything: the proxy kept reading').toBe(false);
        expect(streamer.written).toBeLessThan(TOTAL / 2);
        expect(leg.socket.writableLength).toBeGreaterThan(0);
        expect(peak).toBeLessThan(SESSION_BOUND);

        client.socket.resume();
        await streamer.done;
        const expected = header.length + TOTAL + trailer.length;
        await waitFor(() => client.count >= expected, 'every byte at the client', 120_000);
        expect(client.count).toBe(expected);
        expect(client.digest()).toBe(streamer.hash.digest('hex'));
        client.socket.destroy();
        await waitFor(() => proxy.app.proxy.sessions.size === 0, 'the session closed');
      }, 180_000);

      it('an upstream that does not read: the proxy stops reading the client, holds little, and relays every byte later', async () => {
        const { client, leg, session } = await login();
        leg.socket.pause();
        leg.startHash();
        const header = Buffer.from(`a APPEND INBOX {${TOTAL}+}\r\n`);
        const trailer = Buffer.from('\r\n');
        const streamer = new Streamer(client.socket, header, TOTAL, trailer);
        const peak = await untilStalled(streamer, () => session.bufferedBytes());
        expect(streamer.finished, 'the client could write everything: the proxy kept reading').toBe(false);
        expect(streamer.written).toBeLessThan(TOTAL / 2);
        expect(peak).toBeLessThan(SESSION_BOUND);

        leg.socket.resume();
        await streamer.done;
        const expected = header.length + TOTAL + trailer.length;
        await waitFor(() => leg.count >= expected + 'a LOGIN user pw\r\n'.length, 'every byte upstream', 120_000);
        expect(leg.digest()).toBe(streamer.hash.digest('hex'));
        leg.socket.write('a OK Append completed.\r\n');
        await client.untilText(/\r\na OK Append completed\.\r\n$/);
        client.socket.destroy();
        await waitFor(() => proxy.app.proxy.sessions.size === 0, 'the session closed');
      }, 180_000);

      it('a client that sends a literal without waiting for "+": the proxy reads no further until the server answers', async () => {
        const { client, leg, session } = await login();
        leg.startHash();
        const size = 64 * MiB;
        const header = Buffer.from(`a APPEND INBOX {${size}}\r\n`);
        const streamer = new Streamer(client.socket, header, size, Buffer.from('\r\n'));
        await waitFor(() => leg.count >= 'a LOGIN user pw\r\n'.length + header.length, 'the APPEND line upstream');
        const peak = await untilStalled(streamer, () => session.bufferedBytes());
        expect(streamer.finished, 'the client could write everything: the proxy kept reading').toBe(false);
        expect(peak).toBeLessThan(SESSION_BOUND);
        expect(leg.count).toBe('a LOGIN user pw\r\n'.length + header.length); // nothing of the literal before "+"

        leg.socket.write('+ Ready for literal data\r\n');
        await streamer.done;
        await waitFor(() => leg.count >= 'a LOGIN user pw\r\n'.length + header.length + size + 2, 'every byte upstream', 120_000);
        expect(leg.digest()).toBe(streamer.hash.digest('hex'));
        client.socket.destroy();
        await waitFor(() => proxy.app.proxy.sessions.size === 0, 'the session closed');
      }, 180_000);
    });
  });
});
