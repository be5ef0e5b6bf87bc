/**
 * Opening the upstream leg of a session: TCP (with a PROXY v2 header first when
 * configured), TLS or STARTTLS, the greeting, and the proxy's own first `ID`
 * carrying the client's address. Everything the proxy sends here uses its own
 * tags and its replies are swallowed; the client never sees them.
 */
import net from 'node:net';
import tls from 'node:tls';
import { Framer } from '../imap/framer.js';
import { classifyResponse } from '../imap/response.js';
import { PROXY_ID_TAG, proxyIdCommand, type ForwardedAddress } from '../imap/id.js';
import { proxyV2Header } from './proxy-protocol.js';

export type UpstreamTls = 'none' | 'starttls' | 'tls';
export type ClientIpMode = 'id' | 'proxy-v2' | 'none';

export interface UpstreamSettings {
  host: string;
  port: number;
  tls: UpstreamTls;
  ca?: Buffer;
  servername?: string;
  insecure?: boolean;
  connectTimeoutMs: number;
  clientIp: ClientIpMode;
}

export interface ClientEndpoint extends ForwardedAddress {
  /** TLS version of the client leg, or null when it is plaintext. */
  tlsVersion: string | null;
}

const READ_SIZE = 256 * 1024;
const POOL_MAX = 64;
const pool: Buffer[] = [];
/** A read shorter than this (a page) means the connection is interactive or idle, not streaming. */
const SMALL_READ = 4096;
/**
 * The one buffer that every quiet connection reads into. Node keeps the buffer it was last given
 * attached to a socket until that socket's next read, so a pooled buffer handed to an idle
 * connection would stay with it: 256 KiB of address space and some resident pages per idle
 * session. Reads run one at a time on the event loop and what lands here is copied out before the
 * read callback returns, so one buffer serves them all.
 */
let shared: Buffer | null = null;
const noRelease = (): void => undefined;

/** Sink of a ReadPump: returns true when done with the view, or false and calls `release` later. */
export type ReadSink = (view: Buffer, release: () => void) => boolean;

/**
 * Reads of plaintext upstream connections land in large recycled buffers instead
 * of a fresh allocation per read, the relay's largest cost after the system
 * calls. Node asks for the next buffer right after each read and keeps it until
 * the following one, so a connection is given a buffer from the process-wide pool
 * only while it streams (its last read was at least SMALL_READ); a quiet one gets
 * the shared buffer, whose reads are handed on as copies, so idle connections hold
 * no buffer of their own. A receiver gets a view that is valid until it is done
 * with it: it returns true at once, or false (reading stops until
 * `socket.resume()`) and calls `release` when nothing points into the view anymore.
 */
export class ReadPump {
  private sink: ReadSink | null = null;
  private held: Buffer[] = [];
  private lastRead = 0;

  readonly buffer = (): Buffer =>
    this.lastRead < SMALL_READ ? (shared ??= Buffer.allocUnsafe(READ_SIZE)) : (pool.pop() ?? Buffer.allocUnsafe(READ_SIZE));

  readonly onread = (n: number, buf: Buffer): boolean => {
    this.lastRead = n;
    const fromShared = buf === shared;
    // nothing may point into the shared buffer once this call returns: pass on a copy
    const view = fromShared ? Buffer.from(buf.subarray(0, n)) : buf.subarray(0, n);
    const release = fromShared
      ? noRelease
      : () => {
          if (pool.length < POOL_MAX) pool.push(buf);
        };
    if (!this.sink) {
      this.held.push(fromShared ? view : Buffer.from(view)); // nobody reads yet: keep a copy
      release();
      return true;
    }
    if (this.sink(view, release)) {
      release();
      return true;
    }
    return false;
  }

  /** Hands later reads (and those held meanwhile) to `sink`; null holds them. */
  setSink(sink: ReadSink | null): void {
    this.sink = sink;
    if (!sink) return;
    const held = this.held;
    this.held = [];
    for (const chunk of held) sink(chunk, () => undefined);
  }
}

export interface UpstreamConnection {
  socket: net.Socket;
  /** Set for plaintext upstream connections: reads arrive through it, not as 'data' events. */
  pump: ReadPump | null;
  /** The greeting line to relay (its capability list refreshed after STARTTLS). */
  greeting: Buffer;
  greetingStatus: 'OK' | 'PREAUTH' | 'BYE';
  /** Bytes already received after the setup exchange; they belong to the relay. */
  leftover: Buffer;
}

/** Why an upstream leg could not be opened: a fixed set, so that it can label metrics. */
export const UPSTREAM_FAILURE_REASONS = ['refused', 'timeout', 'tls', 'greeting', 'closed', 'other'] as const;
export type UpstreamFailureReason = (typeof UPSTREAM_FAILURE_REASONS)[number];

export class UpstreamUnavailableError extends Error {
  constructor(
    message: string,
    readonly reason: UpstreamFailureReason = 'other',
  ) {
    super(message);
  }
}

/** A socket error's reason: the errno code says whether the server refused, vanished or timed out. */
function socketFailureReason(err: Error): UpstreamFailureReason {
  const code = (err as NodeJS.ErrnoException).code ?? '';
  if (code === 'ECONNREFUSED') return 'refused';
  if (code === 'ETIMEDOUT') return 'timeout';
  if (code === 'ECONNRESET' || code === 'EPIPE') return 'closed';
  if (code.startsWith('ERR_SSL') || code.startsWith('ERR_TLS')) return 'tls';
  return 'other';
}

const MAX_SETUP_RESPONSE = 256 * 1024;

/** Reads whole responses (lines and literals joined) from a socket during setup. */
class SetupReader {
  private framer = new Framer({ side: 'server', maxLine: MAX_SETUP_RESPONSE });
  private current: Buffer[] = [];
  private ready: Buffer[] = [];
  private waiter: { resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;
  private readonly onData = (chunk: Buffer) => this.feed(chunk);
  private readonly onEnd = () => this.fail(new UpstreamUnavailableError('upstream closed the connection during setup', 'closed'));
  private readonly onError = (err: Error) => this.fail(new UpstreamUnavailableError(err.message, socketFailureReason(err)));

  constructor(
    private readonly socket: net.Socket,
    private readonly pump: ReadPump | null = null,
  ) {
    if (pump) pump.setSink((view) => (this.feed(Buffer.from(view)), true));
    else socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('error', this.onError);
  }

  private feed(chunk: Buffer): void {
    this.framer.push(chunk);
    for (let seg = this.framer.next(); seg; seg = this.framer.next()) {
      this.current.push(seg.data);
      if (seg.type === 'line' && !seg.complete) {
        return this.fail(new UpstreamUnavailableError('upstream sent an over-long line during setup', 'greeting'));
      }
      if (seg.type === 'line' && seg.literal === null) {
        this.ready.push(Buffer.concat(this.current));
        this.current = [];
      }
    }
    this.deliver();
  }

  private fail(err: Error): void {
    if (!this.failure) this.failure = err;
    this.deliver();
  }

  private deliver(): void {
    if (!this.waiter) return;
    const w = this.waiter;
    if (this.ready.length > 0) {
      this.waiter = null;
      w.resolve(this.ready.shift()!);
    } else if (this.failure) {
      this.waiter = null;
      w.reject(this.failure);
    }
  }

  response(): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
      this.deliver();
    });
  }

  /** Reads responses until the tagged one with `tag`, returning that one. */
  async until(tag: string): Promise<{ tagged: Buffer; untagged: Buffer[] }> {
    const untagged: Buffer[] = [];
    for (;;) {
      const r = await this.response();
      const head = classifyResponse(r);
      if (head.kind === 'tagged' && head.tag === tag) return { tagged: r, untagged };
      if (head.kind === 'status' && head.status === 'BYE') {
        throw new UpstreamUnavailableError(`upstream said ${r.toString('latin1').trim()}`, 'closed');
      }
      untagged.push(r);
    }
  }

  /** Stops reading; returns what was received beyond the consumed responses. */
  detach(): Buffer {
    this.pump?.setSink(null);
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('error', this.onError);
    return Buffer.concat([...this.ready, ...this.current, this.framer.drain()]);
  }
}

function connectTcp(s: UpstreamSettings, pump: ReadPump | null): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: s.host, port: s.port, ...(pump ? { onread: { buffer: pump.buffer, callback: pump.onread } } : {}) });
    socket.setNoDelay(true);
    const onError = (err: Error) => {
      socket.destroy();
      reject(new UpstreamUnavailableError(`cannot connect to ${s.host}:${s.port}: ${err.message}`, socketFailureReason(err)));
    };
    socket.once('error', onError);
    socket.once('connect', () => {
      socket.off('error', onError);
      resolve(socket);
    });
  });
}

function wrapTls(socket: net.Socket, s: UpstreamSettings): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const servername = s.servername ?? (net.isIP(s.host) ? undefined : s.host);
    const secure = tls.connect({
      socket,
      servername,
      ca: s.ca,
      rejectUnauthorized: !s.insecure,
      checkServerIdentity: (host, cert) => tls.checkServerIdentity(s.servername ?? s.host, cert),
    });
    const onError = (err: Error) => {
      secure.destroy();
      reject(new UpstreamUnavailableError(`TLS to upstream failed: ${err.message}`, 'tls'));
    };
    secure.once('error', onError);
    secure.once('secureConnect', () => {
      secure.off('error', onError);
      resolve(secure);
    });
  });
}

function isTagged(r: Buffer, status: string): boolean {
  const head = classifyResponse(r);
  return head.kind === 'tagged' && head.status === status;
}

async function establish(s: UpstreamSettings, client: ClientEndpoint, connected: (tcp: net.Socket) => void): Promise<UpstreamConnection> {
  // TLS needs a socket that emits its reads; only plaintext legs use the pump
  const pump = s.tls === 'none' ? new ReadPump() : null;
  let socket = await connectTcp(s, pump);
  connected(socket);
  try {
    if (s.clientIp === 'proxy-v2') {
      socket.write(
        proxyV2Header({
          sourceIp: client.clientIp,
          sourcePort: client.clientPort,
          destIp: client.localIp,
          destPort: client.localPort,
          tlsVersion: client.tlsVersion,
        }),
      );
    }
    if (s.tls === 'tls') socket = await wrapTls(socket, s);
    let reader = new SetupReader(socket, pump);
    let greeting = await reader.response();
    const head = classifyResponse(greeting);
    if (head.kind !== 'status' || !['OK', 'PREAUTH', 'BYE'].includes(head.status)) {
      throw new UpstreamUnavailableError(`unexpected upstream greeting: ${greeting.toString('latin1', 0, 80).trim()}`, 'greeting');
    }
    const greetingStatus = head.status as UpstreamConnection['greetingStatus'];
    if (greetingStatus === 'BYE') return { socket, pump, greeting, greetingStatus, leftover: reader.detach() };

    if (s.tls === 'starttls') {
      socket.write('S STARTTLS\r\n');
      const { tagged } = await reader.until('S');
      if (!isTagged(tagged, 'OK')) {
        throw new UpstreamUnavailableError(`upstream refused STARTTLS: ${tagged.toString('latin1').trim()}`, 'tls');
      }
      reader.detach(); // anything sent before the handshake is discarded
      socket = await wrapTls(socket, s);
      reader = new SetupReader(socket);
      // capabilities from before TLS are void (RFC 3501 §6.2.1): ask again
      socket.write('C CAPABILITY\r\n');
      const caps = await reader.until('C');
      const list = caps.untagged.find((r) => /^\* CAPABILITY /i.test(r.toString('latin1', 0, 13)));
      if (list) greeting = withCapabilityCode(greeting, list);
    }
    if (s.clientIp === 'id' && greetingStatus === 'OK') {
      socket.write(proxyIdCommand(client));
      await reader.until(PROXY_ID_TAG); // a NO here only means the server ignores ID
    }
    return { socket, pump, greeting, greetingStatus, leftover: reader.detach() };
  } catch (err) {
    socket.destroy();
    throw err;
  }
}

/** `* OK [CAPABILITY <list>] text` from a greeting and a `* CAPABILITY <list>` line. */
function withCapabilityCode(greeting: Buffer, capabilityLine: Buffer): Buffer {
  const list = capabilityLine.toString('latin1').replace(/^\* CAPABILITY /i, '').replace(/\r?\n$/, '');
  const text = greeting.toString('latin1').replace(/\r?\n$/, '');
  const m = /^\* (OK|PREAUTH) (?:\[[^\]]*\] ?)?(.*)$/i.exec(text);
  if (!m) return greeting;
  return Buffer.from(`* ${m[1]} [CAPABILITY ${list}] ${m[2]}\r\n`, 'latin1');
}

export async function openUpstream(s: UpstreamSettings, client: ClientEndpoint): Promise<UpstreamConnection> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new UpstreamUnavailableError(`upstream ${s.host}:${s.port} did not answer within ${s.connectTimeoutMs} ms`, 'timeout')),
      s.connectTimeoutMs,
    );
  });
  // a server that accepts but never greets would hold the attempt, and its socket, forever
  const leg: { tcp: net.Socket | null; abandoned: boolean } = { tcp: null, abandoned: false };
  const attempt = establish(s, client, (tcp) => {
    if (leg.abandoned) tcp.destroy();
    else leg.tcp = tcp;
  });
  try {
    return await Promise.race([attempt, timeout]);
  } catch (err) {
    leg.abandoned = true;
    leg.tcp?.destroy();
    attempt.then((c) => c.socket.destroy(), () => undefined);
    throw err;
  } finally {
    clearTimeout(timer);
  }
}
