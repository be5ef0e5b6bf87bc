/**
 * One client connection and its upstream leg.
 *
 * Bytes are relayed as they come, framed in both directions so that the proxy
 * knows where commands and responses begin. It steps in at a few places only:
 * capability lists, STARTTLS (the proxy owns the client's TLS), the login name,
 * `x-*` keys in client IDs, COMPRESS (not offered), and commands answered
 * locally (XAPPLEPUSHSERVICE). A locally answered command holds the client's
 * input until every earlier command has completed, and its reply is written at a
 * response boundary, so the client sees the responses in a legal order.
 */
import net from 'node:net';
import tls from 'node:tls';
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { FieldLogger, type Logger } from '../ops/log.js';
import { Framer, type LineSegment, type Segment } from '../imap/framer.js';
import { commandHead, type CommandPart } from '../imap/tokens.js';
import { classifyResponse, isNumberedData, rewriteCapabilityLine, type CapabilityPolicy } from '../imap/response.js';
import { stripForwardingKeys } from '../imap/id.js';
import { loginUsername } from '../imap/login.js';
import { saslUsername } from '../imap/sasl.js';
import { openUpstream, UpstreamUnavailableError, type ReadPump, type UpstreamSettings } from './upstream.js';

/** A command the proxy answers itself, with everything it needs to decide. */
export interface LocalCommand {
  tag: string;
  parts: CommandPart[];
  user: string | null;
  authenticated: boolean;
  utf8: boolean;
  sessionId: string;
}

/** Answers XAPPLEPUSHSERVICE; `advertised` says whether the capability is shown. */
export interface PushCommandHandler {
  readonly advertised: boolean;
  handle(cmd: LocalCommand): Promise<Buffer>;
}

export interface SessionSettings {
  upstream: UpstreamSettings;
  idleTimeoutMs: number;
  /**
   * A connection not logged in this long after `acceptedAt` gets `* BYE` and is closed, whatever it sends meanwhile
   * (--login-timeout). A PREAUTH greeting or a successful login ends the deadline.
   */
  loginTimeoutMs: number;
  /** When the connection was accepted (performance.now(), before any TLS handshake); default: when the session starts. */
  acceptedAt?: number;
  /** Longest command line and literal accepted before authentication. */
  preauthMaxLine: number;
  /** Largest command the proxy parses itself (XAPPLEPUSHSERVICE and the like). */
  localCommandMax: number;
  /** TLS for STARTTLS on a plaintext listener; null: STARTTLS is not offered. */
  starttls: () => tls.SecureContext | null;
  allowPlaintextAuth: boolean;
}

export interface SessionEvents {
  authenticated?(session: Session, user: string | null): void;
  closed?(session: Session): void;
  /**
   * A client command begins (forwarded or answered locally): `name` as commandHead read it, null for a line
   * that is no command; `line` is its first line. Observation only: the session does not wait for it.
   */
  command?(session: Session, name: string | null, line: Buffer): void;
  /** The client's leg switched to TLS (STARTTLS). */
  tlsStarted?(session: Session): void;
  /** The upstream leg could not be opened, or greeted with BYE: the client got a BYE. */
  upstreamFailed?(session: Session, err: unknown): void;
}

type MessageMode = 'forward' | 'capture' | 'collect' | 'discard' | 'exchange';
type LocalKind = 'xapple' | 'starttls' | 'compress' | 'privacy' | 'id' | 'too-long';

interface ClientMessage {
  tag: string | null;
  name: string | null;
  mode: MessageMode;
  local: LocalKind | null;
  parts: CommandPart[];
  size: number;
}

interface Pending {
  tag: string;
  kind: 'login' | 'authenticate' | 'idle' | 'other';
  parts?: CommandPart[];
  mechanism?: string;
  username?: string | null;
  /** Continuation requests the client has yet to answer (SASL). */
  credits?: number;
}

interface Injection {
  bytes: Buffer;
  after?: () => void;
}

function newMessage(tag: string | null, name: string | null, mode: MessageMode, local: LocalKind | null = null): ClientMessage {
  return { tag, name, mode, local, parts: [], size: 0 };
}

const MAX_CAPTURE = 64 * 1024;
/**
 * Output queued on one side before reading from the other stops. Larger than
 * Node's 16 KiB default (TLS sockets' own limit), so a bulk FETCH is not paused
 * and resumed around every chunk; still small enough to bound memory per session.
 */
const WRITE_HIGH_WATER = 256 * 1024;
/**
 * Client bytes held unframed (sent ahead of a synchronizing literal's "+", or while a locally answered command is
 * pending) before reading from the client stops: a client that does not wait cannot make the proxy buffer more.
 */
const MAX_CLIENT_BACKLOG = 256 * 1024;
const CLOSE_GRACE_MS = 5_000;
const EMPTY = Buffer.alloc(0);

function isLoopback(ip: string): boolean {
  return ip === '::1' || ip.startsWith('127.') || ip.startsWith('::ffff:127.');
}

const ID_BYTES = 9;
const IDS_PER_DRAW = 512;
let idPool = Buffer.alloc(0);
let idNext = 0;

/** 72 random bits, base64url: drawn in batches, since one randomBytes call per connection costs more than the rest of the id. */
function newSessionId(): string {
  if (idNext >= idPool.length) {
    idPool = randomBytes(ID_BYTES * IDS_PER_DRAW);
    idNext = 0;
  }
  const id = idPool.toString('base64url', idNext, idNext + ID_BYTES);
  idNext += ID_BYTES;
  return id;
}

export class Session {
  readonly id = newSessionId();
  readonly clientIp: string;
  readonly clientPort: number;
  readonly localIp: string;
  readonly localPort: number;
  user: string | null = null;
  authenticated = false;
  clientTls: boolean;
  private log: FieldLogger;

  private client: net.Socket;
  private upstream: net.Socket | null = null;
  private cf = new Framer({ side: 'client' });
  private sf = new Framer({ side: 'server', batchNumbered: true });
  private message: ClientMessage | null = null;
  private outstanding: Pending[] = [];
  private exchange: Pending | null = null;
  private injections: Injection[] = [];
  private local: { tag: string; reply: Buffer | null; after?: () => void } | null = null;
  private blocked = true; // until the upstream leg is ready
  private upstreamNeedsDrain = false;
  private clientNeedsDrain = false;
  private utf8 = false;
  private closed = false;
  private byeSent = false;
  private upstreamLoginDisabledWarned = false;
  private clientHandshaking = false;
  private awaitingClientFlush = false;
  private loginTimer: NodeJS.Timeout | null = null;
  private backlogPeak = 0;
  /**
   * Server bytes relayed unchanged and not yet written: consecutive segments that lie next to each other in one
   * read are written as one buffer (a FETCH of 400 flags is one write, not 400).
   */
  private runStart: Buffer | null = null;
  private runLength = 0;

  constructor(
    client: net.Socket,
    private readonly settings: SessionSettings,
    private readonly push: PushCommandHandler | null,
    log: Logger,
    private readonly events: SessionEvents = {},
  ) {
    this.client = client;
    this.clientIp = client.remoteAddress ?? '';
    this.clientPort = client.remotePort ?? 0;
    this.localIp = client.localAddress ?? '';
    this.localPort = client.localPort ?? 0;
    this.clientTls = client instanceof tls.TLSSocket;
    this.log = new FieldLogger(log, { sid: this.id, client: `${this.clientIp}:${this.clientPort}` });
    this.cf.setMaxLine(settings.preauthMaxLine);
  }

  async start(): Promise<void> {
    this.attachClient(this.client);
    this.client.pause();
    this.client.setKeepAlive(true, 60_000);
    this.client.setNoDelay(true);
    this.client.setTimeout(this.settings.idleTimeoutMs);
    this.armLoginTimer();
    this.log.debug({ tls: this.clientTls }, 'client connected');
    try {
      const up = await openUpstream(this.settings.upstream, this.endpoint());
      if (this.closed) {
        up.socket.destroy();
        return;
      }
      this.attachUpstream(up.socket, up.pump);
      if (up.greetingStatus === 'PREAUTH') {
        this.authenticated = true;
        this.clearLoginTimer();
      }
      this.writeClient(rewriteCapabilityLine(up.greeting, this.capabilityPolicy()));
      if (up.greetingStatus === 'BYE') {
        this.events.upstreamFailed?.(this, new UpstreamUnavailableError('upstream greeted with BYE', 'greeting'));
        this.byeSent = true;
        this.closeSoon();
        return;
      }
      this.blocked = false;
      this.flow();
      if (up.leftover.length > 0) this.onUpstreamData(up.leftover);
      this.pumpClient();
    } catch (err) {
      const reason = err instanceof UpstreamUnavailableError ? err.message : String(err);
      this.log.warn({ reason }, 'upstream unavailable');
      this.events.upstreamFailed?.(this, err);
      if (!this.closed) {
        this.writeClient(Buffer.from('* BYE [UNAVAILABLE] Mail server is unavailable, try again later\r\n'));
        this.byeSent = true;
        this.closeSoon();
      }
    }
  }

  private endpoint() {
    const tlsVersion = this.client instanceof tls.TLSSocket ? this.client.getProtocol() : null;
    return {
      clientIp: this.clientIp.replace(/^::ffff:/, ''),
      clientPort: this.clientPort,
      localIp: this.localIp.replace(/^::ffff:/, ''),
      localPort: this.localPort,
      sessionId: this.id,
      tlsVersion,
    };
  }

  // ---------------------------------------------------------------- sockets

  private readonly onClientData = (chunk: Buffer) => {
    if (this.closed) return; // read only to see the client's close; nothing more is relayed or kept
    this.cf.push(chunk);
    if (this.cf.buffered > this.backlogPeak) this.backlogPeak = this.cf.buffered;
    this.pumpClient();
  };
  private readonly onClientEnd = () => this.shutdown('client closed');
  private readonly onClientError = (err: Error) => this.shutdown(`client error: ${err.message}`);
  private readonly onClientTimeout = () => {
    this.sayBye('Disconnected for inactivity.');
    this.shutdown('idle timeout');
  };
  private readonly onLoginTimeout = () => {
    this.loginTimer = null;
    if (this.authenticated || this.closed) return;
    this.log.debug({ timeoutMs: this.settings.loginTimeoutMs }, 'no login within --login-timeout: disconnecting');
    if (this.clientHandshaking) {
      // in the middle of a STARTTLS handshake nothing can be said
      this.shutdown('login timeout during the STARTTLS handshake');
      this.client.destroy();
      return;
    }
    this.sayBye('Disconnected: login took too long.');
    this.shutdown('login timeout');
  };
  private readonly onClientDrain = () => {
    this.clientNeedsDrain = false;
    this.flow();
  };
  private readonly onUpstreamDataBound = (chunk: Buffer) => this.onUpstreamData(chunk);
  private readonly onUpstreamEnd = () => {
    const boundary = this.sf.atBoundary;
    const rest = this.sf.drain(); // an unterminated last line still belongs to the client
    if (rest.length > 0) this.writeClient(rest);
    // the server went away without a BYE (crashed, killed): say it for it, as on a connection error
    else if (boundary) this.sayBye('[UNAVAILABLE] Connection to the mail server was lost');
    this.shutdown('upstream closed');
  };
  private readonly onUpstreamError = (err: Error) => {
    this.sayBye('[UNAVAILABLE] Connection to the mail server was lost');
    this.shutdown(`upstream error: ${err.message}`);
  };
  private readonly onUpstreamDrain = () => {
    this.upstreamNeedsDrain = false;
    this.flow();
    this.pumpClient();
  };

  private clientHandlers(): Array<[string, (...args: any[]) => void]> {
    return [
      ['data', this.onClientData],
      ['end', this.onClientEnd],
      ['close', this.onClientEnd],
      ['error', this.onClientError],
      ['timeout', this.onClientTimeout],
      ['drain', this.onClientDrain],
    ];
  }

  private upstreamHandlers(): Array<[string, (...args: any[]) => void]> {
    return [
      ['data', this.onUpstreamDataBound],
      ['end', this.onUpstreamEnd],
      ['close', this.onUpstreamEnd],
      ['error', this.onUpstreamError],
      ['drain', this.onUpstreamDrain],
    ];
  }

  private attachClient(socket: net.Socket): void {
    for (const [event, handler] of this.clientHandlers()) socket.on(event, handler);
  }

  private detachClient(socket: net.Socket): void {
    for (const [event, handler] of this.clientHandlers()) socket.off(event, handler);
  }

  private attachUpstream(socket: net.Socket, pump: ReadPump | null): void {
    this.upstream = socket;
    socket.setKeepAlive(true, 60_000);
    socket.setNoDelay(true);
    for (const [event, handler] of this.upstreamHandlers()) socket.on(event, handler);
    pump?.setSink((view, release) => this.onUpstreamView(view, release));
  }

  /**
   * A read in the pump's recycled buffer. Whatever still points into it must be
   * gone before the next read: the framer copies what it keeps, and reading waits
   * until the client socket has taken the bytes written from it.
   */
  private onUpstreamView(view: Buffer, release: () => void): boolean {
    this.onUpstreamData(view);
    this.sf.ownBytes();
    if (this.closed || this.client.writableLength === 0) return true;
    this.awaitingClientFlush = true;
    this.client.write(EMPTY, () => {
      release();
      this.awaitingClientFlush = false;
      this.flow();
    });
    return false;
  }

  private detachUpstream(socket: net.Socket): void {
    for (const [event, handler] of this.upstreamHandlers()) socket.off(event, handler);
  }

  private armLoginTimer(): void {
    const elapsed = this.settings.acceptedAt === undefined ? 0 : performance.now() - this.settings.acceptedAt;
    this.loginTimer = setTimeout(this.onLoginTimeout, Math.max(0, this.settings.loginTimeoutMs - elapsed));
    this.loginTimer.unref();
  }

  private clearLoginTimer(): void {
    if (this.loginTimer) clearTimeout(this.loginTimer);
    this.loginTimer = null;
  }

  /** Reading follows writing: a side that cannot take more stops the other. */
  private flow(): void {
    if (this.closed || this.clientHandshaking) return;
    const clientReads =
      !this.blocked && !this.upstreamNeedsDrain && this.upstream !== null && this.cf.buffered < MAX_CLIENT_BACKLOG;
    if (clientReads) this.client.resume();
    else this.client.pause();
    if (this.upstream) {
      if (this.clientNeedsDrain || this.awaitingClientFlush) this.upstream.pause();
      else this.upstream.resume();
    }
  }

  private writeUpstream(data: Buffer): void {
    if (!this.upstream || this.closed) return;
    this.upstream.write(data);
    if (this.upstream.writableLength > WRITE_HIGH_WATER) this.upstreamNeedsDrain = true;
  }

  private writeClient(data: Buffer): void {
    this.flushRelayed();
    if (this.closed) return;
    this.client.write(data);
    if (this.client.writableLength > WRITE_HIGH_WATER) this.clientNeedsDrain = true;
  }

  /** Server bytes passed on unchanged: joined with the previous ones when they follow them in the same buffer. */
  private relay(data: Buffer): void {
    if (this.closed || data.length === 0) return;
    const run = this.runStart;
    if (run !== null && data.buffer === run.buffer && data.byteOffset === run.byteOffset + this.runLength) {
      this.runLength += data.length;
      return;
    }
    this.flushRelayed();
    this.runStart = data;
    this.runLength = data.length;
  }

  private flushRelayed(): void {
    const run = this.runStart;
    if (run === null) return;
    this.runStart = null;
    if (this.closed) return;
    this.client.write(this.runLength === run.length ? run : Buffer.from(run.buffer, run.byteOffset, this.runLength));
    if (this.client.writableLength > WRITE_HIGH_WATER) this.clientNeedsDrain = true;
  }

  // ------------------------------------------------------ client -> upstream

  private pumpClient(): void {
    const upstream = this.upstream;
    if (this.closed || this.blocked || !upstream) return;
    upstream.cork(); // one write for all segments of this batch
    try {
      for (let seg = this.cf.next(); seg; seg = this.cf.next()) {
        this.onClientSegment(seg);
        if (this.blocked || this.closed) break;
      }
    } finally {
      upstream.uncork();
    }
    this.flow();
  }

  private onClientSegment(seg: Segment): void {
    if (seg.type === 'line' && seg.startsMessage) this.message = this.beginMessage(seg);
    const msg = this.message;
    if (!msg) return;

    if (seg.type === 'line' && !seg.complete && !this.authenticated && msg.mode !== 'discard') {
      // over-long line before login: Dovecot would refuse it too
      this.sayBye('Command line too long.');
      this.shutdown('pre-auth line too long');
      return;
    }
    if (
      seg.type === 'line' &&
      seg.complete &&
      seg.literal &&
      !this.authenticated &&
      (msg.mode === 'forward' || msg.mode === 'capture') &&
      seg.literal.size > this.settings.preauthMaxLine
    ) {
      // refused before the announcing line, or any of the literal, reaches the server
      this.sayBye('Literal too large.');
      this.shutdown('pre-auth literal too large');
      return;
    }

    switch (msg.mode) {
      case 'forward':
      case 'exchange':
        this.writeUpstream(seg.data);
        if (msg.mode === 'exchange' && seg.type === 'line' && seg.complete) this.captureSaslResponse(seg);
        break;
      case 'capture':
        this.writeUpstream(this.rewriteClientLine(msg, seg));
        this.collect(msg, seg);
        break;
      case 'collect':
        this.collect(msg, seg);
        if (msg.size > this.settings.localCommandMax) {
          msg.mode = 'discard';
          msg.local = 'too-long';
          msg.parts = [];
        }
        break;
      case 'discard':
        break;
    }

    if (seg.type === 'line' && seg.complete && seg.literal) this.onLiteralAnnounced(msg, seg);
    if (this.messageEnded(seg)) this.endMessage(msg);
  }

  /** A client ID without `x-*` keys: only the proxy may tell Dovecot the client's address. */
  private rewriteClientLine(msg: ClientMessage, seg: Segment): Buffer {
    if (msg.name !== 'ID' || seg.type !== 'line' || !seg.startsMessage || !seg.complete || seg.literal) return seg.data;
    return stripForwardingKeys(msg.tag ?? '', [{ kind: 'text', data: seg.data }]) ?? seg.data;
  }

  private messageEnded(seg: Segment): boolean {
    return seg.type === 'line' && seg.complete && seg.literal === null;
  }

  private beginMessage(seg: LineSegment): ClientMessage {
    const ex = this.exchange;
    if (ex && this.isExchangeLine(ex, seg)) return newMessage(ex.tag, null, 'exchange');
    const head = commandHead(seg.data);
    this.events.command?.(this, head?.name ?? null, seg.data);
    if (!head) return newMessage(null, null, 'forward');
    const { tag, name } = head;
    const local = this.localKind(name);
    if (local) return newMessage(tag, name, 'collect', local);
    if (name === 'LOGIN' || name === 'AUTHENTICATE' || name === 'ID' || name === 'ENABLE') return newMessage(tag, name, 'capture');
    return newMessage(tag, name, 'forward');
  }

  /**
   * Inside IDLE and AUTHENTICATE the client's lines are DONE and SASL responses,
   * not commands: one per continuation request from the server.
   */
  private isExchangeLine(ex: Pending, seg: LineSegment): boolean {
    if (ex.kind === 'idle') {
      if (!/^DONE\r?\n$/i.test(seg.data.toString('latin1', 0, 8))) return false;
      this.exchange = null; // the client has left IDLE; the tagged OK follows
      return true;
    }
    if ((ex.credits ?? 0) <= 0) return false;
    ex.credits = (ex.credits ?? 0) - 1;
    return true;
  }

  private localKind(name: string): LocalKind | null {
    switch (name) {
      case 'XAPPLEPUSHSERVICE':
        return 'xapple';
      case 'STARTTLS':
        return 'starttls';
      case 'COMPRESS':
        return 'compress';
      case 'LOGIN':
      case 'AUTHENTICATE':
        return !this.authenticated && this.loginDisabled() ? 'privacy' : null;
      default:
        return null;
    }
  }

  private collect(msg: ClientMessage, seg: Segment): void {
    if (msg.size > MAX_CAPTURE && msg.mode === 'capture') return;
    msg.size += seg.data.length;
    msg.parts.push({ kind: seg.type === 'literal' ? 'literal' : 'text', data: Buffer.from(seg.data) });
  }

  private onLiteralAnnounced(msg: ClientMessage, seg: LineSegment): void {
    const literal = seg.literal!;
    // the server grants or refuses a synchronizing literal itself (too large before login: refused in onClientSegment)
    if (msg.mode === 'forward' || msg.mode === 'capture') return;
    if (msg.mode === 'exchange') return;
    if (msg.mode === 'collect' && msg.size + literal.size > this.settings.localCommandMax) {
      msg.mode = 'discard';
      msg.local = 'too-long';
      msg.parts = [];
    }
    if (!literal.sync) return;
    if (msg.mode === 'discard') {
      // refused: the client sends no literal and reads our tagged BAD instead
      this.cf.refuseContinuation();
      this.endMessage(msg);
      return;
    }
    this.inject(Buffer.from('+ Ready for literal data\r\n'), () => {
      this.cf.grantContinuation();
      this.resumeClientSoon();
    });
  }

  private resumeClientSoon(): void {
    queueMicrotask(() => this.pumpClient());
  }

  private endMessage(msg: ClientMessage): void {
    this.message = null;
    if (msg.mode === 'exchange') return;
    if (msg.mode === 'collect' || msg.mode === 'discard') {
      this.answerLocally(msg);
      return;
    }
    if (!msg.tag || !msg.name) return;
    const pending: Pending = { tag: msg.tag, kind: 'other' };
    if (msg.name === 'LOGIN' && !this.authenticated) {
      pending.kind = 'login';
      pending.username = loginUsername(msg.parts);
    } else if (msg.name === 'AUTHENTICATE' && !this.authenticated) {
      this.beginSasl(pending, msg.parts);
    } else if (msg.name === 'IDLE') {
      pending.kind = 'idle';
      this.exchange = pending; // until the tagged reply, client lines are DONE, not commands
    }
    this.outstanding.push(pending);
  }

  private beginSasl(pending: Pending, parts: CommandPart[]): void {
    pending.kind = 'authenticate';
    const words = parts[0]?.data.toString('latin1').trim().split(' ') ?? [];
    pending.mechanism = (words[2] ?? '').toUpperCase();
    const initial = words[3];
    // without an initial response (or with "=", an empty one) the first client response carries the name
    pending.username = initial !== undefined && initial !== '=' ? saslUsername(pending.mechanism, initial) : undefined;
    this.exchange = pending;
  }

  private captureSaslResponse(seg: LineSegment): void {
    const ex = this.exchange;
    if (!ex || ex.kind !== 'authenticate' || ex.username !== undefined) return;
    ex.username = saslUsername(ex.mechanism ?? '', seg.data.toString('latin1'));
  }

  // -------------------------------------------------- locally answered commands

  private answerLocally(msg: ClientMessage): void {
    const tag = msg.tag ?? '*';
    this.blocked = true;
    this.flow();
    this.local = { tag, reply: null };
    const finish = (reply: Buffer, after?: () => void) => {
      if (!this.local || this.closed) return;
      this.local.reply = reply;
      this.local.after = after;
      this.releaseLocal();
    };
    switch (msg.local) {
      case 'too-long':
        return finish(Buffer.from(`${tag} BAD Command too long\r\n`));
      case 'compress':
        return finish(Buffer.from(`${tag} NO [CANNOT] Compression is not available\r\n`));
      case 'privacy':
        return finish(
          Buffer.from(`${tag} NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n`),
        );
      case 'starttls':
        return this.answerStarttls(tag, finish);
      case 'xapple':
        return this.answerPush(msg, finish);
      default:
        return finish(Buffer.from(`${tag} BAD Unexpected command\r\n`));
    }
  }

  private answerPush(msg: ClientMessage, finish: (reply: Buffer) => void): void {
    const tag = msg.tag ?? '*';
    if (!this.push) {
      finish(Buffer.from(`${tag} NO XAPPLEPUSHSERVICE: push is not configured on this server\r\n`));
      return;
    }
    const cmd: LocalCommand = {
      tag,
      parts: msg.parts,
      user: this.user,
      authenticated: this.authenticated,
      utf8: this.utf8,
      sessionId: this.id,
    };
    this.push.handle(cmd).then(finish, (err: unknown) => {
      this.log.error({ err: String(err) }, 'push registration failed');
      finish(Buffer.from(`${tag} NO [UNAVAILABLE] XAPPLEPUSHSERVICE failed, try again later\r\n`));
    });
  }

  private answerStarttls(tag: string, finish: (reply: Buffer, after?: () => void) => void): void {
    const context = this.settings.starttls();
    if (this.clientTls) return finish(Buffer.from(`${tag} BAD TLS is already active.\r\n`));
    if (this.authenticated) return finish(Buffer.from(`${tag} BAD STARTTLS is not allowed after login.\r\n`));
    if (!context) return finish(Buffer.from(`${tag} BAD STARTTLS is not available.\r\n`));
    finish(Buffer.from(`${tag} OK Begin TLS negotiation now.\r\n`), () => this.upgradeClient(context));
  }

  /** Writes a locally answered reply once every earlier command has completed. */
  private releaseLocal(): void {
    const local = this.local;
    if (!local || local.reply === null || this.outstanding.length > 0) return;
    this.local = null;
    this.inject(local.reply, () => {
      if (local.after) {
        local.after();
        return;
      }
      this.blocked = false;
      this.flow();
      this.resumeClientSoon();
    });
  }

  private inject(bytes: Buffer, after?: () => void): void {
    this.injections.push({ bytes, after });
    this.flushInjections();
  }

  private flushInjections(): void {
    while (this.injections.length > 0 && this.sf.atBoundary && !this.closed) {
      const next = this.injections.shift()!;
      this.writeClient(next.bytes);
      next.after?.();
    }
  }

  private upgradeClient(context: tls.SecureContext): void {
    const raw = this.client;
    this.cf.drain(); // bytes pipelined after STARTTLS must not survive the handshake
    this.detachClient(raw);
    while (raw.writableCorked > 0) raw.uncork(); // the OK must go out in clear before the handshake
    raw.pause();
    while (raw.read() !== null) {
      /* discard what was buffered in the stream as well */
    }
    this.clientHandshaking = true;
    const secure = new tls.TLSSocket(raw, { isServer: true, secureContext: context });
    this.client = secure;
    this.cf = new Framer({ side: 'client', maxLine: this.settings.preauthMaxLine });
    secure.once('secure', () => {
      this.clientHandshaking = false;
      this.clientTls = true;
      this.events.tlsStarted?.(this);
      this.attachClient(secure);
      secure.setTimeout(this.settings.idleTimeoutMs);
      this.log.debug({ protocol: secure.getProtocol() }, 'client STARTTLS complete');
      if (this.settings.upstream.clientIp === 'proxy-v2') {
        void this.reconnectUpstream();
        return;
      }
      this.blocked = false;
      this.flow();
      this.pumpClient();
    });
    secure.once('error', (err) => this.shutdown(`client TLS handshake failed: ${err.message}`));
  }

  /** PROXY v2 carries the TLS state, so the upstream leg is reopened after STARTTLS. */
  private async reconnectUpstream(): Promise<void> {
    const old = this.upstream;
    if (old) {
      this.detachUpstream(old);
      old.destroy();
    }
    this.upstream = null;
    try {
      const up = await openUpstream(this.settings.upstream, this.endpoint());
      if (this.closed) {
        up.socket.destroy();
        return;
      }
      this.sf = new Framer({ side: 'server', batchNumbered: true });
      this.attachUpstream(up.socket, up.pump);
      if (up.leftover.length > 0) this.onUpstreamData(up.leftover);
      this.blocked = false;
      this.flow();
      this.pumpClient();
    } catch (err) {
      this.events.upstreamFailed?.(this, err);
      this.sayBye('[UNAVAILABLE] Mail server is unavailable, try again later');
      this.shutdown(`upstream reconnect failed: ${String(err)}`);
    }
  }

  // ------------------------------------------------------ upstream -> client

  private onUpstreamData(chunk: Buffer): void {
    if (this.closed) return;
    this.sf.push(chunk);
    const client = this.client; // STARTTLS may replace this.client while the batch runs
    client.cork();
    try {
      for (let seg = this.sf.next(); seg; seg = this.sf.next()) {
        this.onServerSegment(seg);
        if (this.closed) return;
      }
    } finally {
      this.flushRelayed();
      client.uncork();
    }
    this.flow();
  }

  private onServerSegment(seg: Segment): void {
    let data = seg.data;
    let grant = false;
    if (seg.type === 'line' && seg.startsMessage && seg.complete && !isNumberedData(data)) {
      const head = classifyResponse(seg.data);
      switch (head.kind) {
        case 'continuation':
          grant = this.cf.awaitingContinuation && this.message !== null && this.message.mode !== 'collect';
          if (!grant && this.exchange?.kind === 'authenticate') this.exchange.credits = (this.exchange.credits ?? 0) + 1;
          break;
        case 'tagged':
          this.onTagged(head.tag, head.status);
          data = rewriteCapabilityLine(data, this.capabilityPolicy());
          break;
        case 'status':
          if (head.status === 'BYE') this.byeSent = true;
          data = rewriteCapabilityLine(data, this.capabilityPolicy());
          break;
        case 'data':
          if (head.name === 'CAPABILITY') {
            this.noticeUpstreamCapabilities(data);
            data = rewriteCapabilityLine(data, this.capabilityPolicy());
          } else if (head.name === 'ENABLED' && /\bUTF8=ACCEPT\b/i.test(data.toString('latin1'))) {
            this.utf8 = true;
          }
          break;
        default:
          break;
      }
    }
    if (data === seg.data) this.relay(data);
    else this.writeClient(data);
    if (grant) {
      this.cf.grantContinuation();
      this.resumeClientSoon();
    }
    if (this.sf.atBoundary) {
      this.flushInjections();
      this.releaseLocal();
    }
  }

  private onTagged(tag: string, status: 'OK' | 'NO' | 'BAD'): void {
    if (this.cf.awaitingContinuation && this.message?.tag === tag) {
      // the server refused the command: its literal never comes
      this.cf.refuseContinuation();
      this.message = null;
      this.resumeClientSoon();
    }
    const i = this.outstanding.findIndex((p) => p.tag === tag);
    if (i < 0) return;
    const [pending] = this.outstanding.splice(i, 1);
    if (this.exchange === pending) this.exchange = null;
    if (status === 'OK' && (pending.kind === 'login' || pending.kind === 'authenticate')) {
      this.onLogin(pending.username ?? null);
    }
  }

  private onLogin(username: string | null): void {
    this.authenticated = true;
    this.clearLoginTimer();
    this.user = username;
    this.cf.setMaxLine(64 * 1024);
    // every later line of the session names its user
    if (username !== null) this.log = this.log.with({ user: username });
    this.log.info('login');
    this.events.authenticated?.(this, username);
  }

  private noticeUpstreamCapabilities(line: Buffer): void {
    if (this.upstreamLoginDisabledWarned || this.authenticated) return;
    if (/ LOGINDISABLED\b/i.test(line.toString('latin1'))) {
      this.upstreamLoginDisabledWarned = true;
      this.log.warn('upstream announces LOGINDISABLED to the proxy: add the proxy to login_trusted_networks or use --upstream-tls');
    }
  }

  // ------------------------------------------------------------- policies

  private loginDisabled(): boolean {
    return !this.clientTls && !this.settings.allowPlaintextAuth && !isLoopback(this.clientIp);
  }

  capabilityPolicy(): CapabilityPolicy {
    // Dovecot sends the post-login list untagged just before the tagged OK of LOGIN
    const loggingIn = this.outstanding[0]?.kind === 'login' || this.outstanding[0]?.kind === 'authenticate';
    const preauth = !this.authenticated && !loggingIn;
    return {
      push: this.push?.advertised ?? false,
      starttls: preauth && !this.clientTls && this.settings.starttls() !== null,
      loginDisabled: preauth && this.loginDisabled(),
    };
  }

  // -------------------------------------------------------------- closing

  /** `* BYE` to the client, only where a response may start. */
  private sayBye(text: string): void {
    if (this.byeSent || this.closed || !this.sf.atBoundary) return;
    this.byeSent = true;
    this.writeClient(Buffer.from(`* BYE ${text}\r\n`));
  }

  /** Asks the session to end (server shutdown): BYE at a boundary, then close. */
  close(reason: string, bye?: string): void {
    if (bye) this.sayBye(bye);
    this.shutdown(reason);
  }

  private closeSoon(): void {
    this.shutdown('greeting was BYE or upstream unavailable');
  }

  private shutdown(reason: string): void {
    if (this.closed) return;
    this.flushRelayed();
    this.closed = true;
    this.clearLoginTimer();
    this.log.debug({ reason }, 'session closed');
    const up = this.upstream;
    for (const socket of [this.client, up]) {
      if (!socket) continue;
      socket.end();
      socket.resume(); // let pending reads drain so 'close' comes
      setTimeout(() => socket.destroy(), CLOSE_GRACE_MS).unref();
    }
    this.events.closed?.(this);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * Bytes this session holds now: queued for either socket, read and not yet handled, and received but not yet
   * relayed (framers, replies waiting for a response boundary). Observation for tests and diagnostics.
   */
  bufferedBytes(): number {
    const up = this.upstream;
    let injected = 0;
    for (const i of this.injections) injected += i.bytes.length;
    return (
      this.client.writableLength +
      this.client.readableLength +
      (up ? up.writableLength + up.readableLength : 0) +
      this.cf.buffered +
      this.sf.buffered +
      injected
    );
  }

  /** Most client bytes read and held unrelayed at once (the client framer's high-water mark). */
  get clientBacklogPeak(): number {
    return this.backlogPeak;
  }
}
