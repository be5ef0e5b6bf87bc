/**
 * A small IMAP client for the watchers' own upstream connections (NOTIFY, IDLE, STATUS polls).
 *
 * Setup (TCP, PROXY v2, TLS/STARTTLS, greeting) is `openUpstream` from the proxy; framing is
 * the project's server-side `Framer`; values are read with `ArgReader`. Commands are sent one
 * at a time (a queue): the watchers issue few of them, and serializing keeps continuation
 * requests (`+`, for AUTHENTICATE, IDLE and synchronizing literals) unambiguous. Every
 * untagged response goes to `onUntagged`, and those received while a command runs are also
 * returned with its result.
 *
 * Nothing here logs, and errors name a command only by its verb: AUTHENTICATE and LOGIN
 * carry the master password.
 */
import dgram from 'node:dgram';
import net from 'node:net';
import { Framer } from '../imap/framer.js';
import { capabilitiesOf, classifyResponse, type ResponseHead } from '../imap/response.js';
import type { CommandPart } from '../imap/tokens.js';
import { openUpstream, type ClientEndpoint, type UpstreamSettings } from '../proxy/upstream.js';

/** One complete server response: its line pieces and literal payloads, in order. */
export interface ImapResponse {
  parts: CommandPart[];
  head: ResponseHead;
  /** The first line (latin1, without CRLF): status text, response codes. */
  line: string;
}

export interface TaggedResult {
  status: 'OK' | 'NO' | 'BAD';
  /** The response code without brackets (`AUTHENTICATIONFAILED`, `READ-ONLY`, …), or null. */
  code: string | null;
  /** The human-readable text after the code. */
  text: string;
  /** Untagged responses received while the command ran. */
  untagged: ImapResponse[];
}

/** A piece of a command: text as is, or a literal (sent as `{n}`/`{n+}` + the bytes). */
export type CommandChunk = string | { literal: Buffer };

export interface CommandOptions {
  /** 0: no timeout (IDLE). Default: the connection's commandTimeoutMs. */
  timeoutMs?: number;
  /**
   * Called for each continuation request (`+ …`) the command gets, with its text. Returns
   * the line to send (without CRLF), or null to send nothing (IDLE).
   */
  onContinuation?: (text: string) => string | null;
}

export class ImapError extends Error {}
/** The connection is gone (closed, reset, BYE, timeout). */
export class ImapClosedError extends ImapError {}
/** A command finished NO or BAD where OK was needed. */
export class ImapCommandError extends ImapError {
  constructor(
    readonly verb: string,
    readonly result: TaggedResult,
  ) {
    super(`${verb} failed: ${result.status}${result.code ? ` [${result.code}]` : ''} ${result.text}`.trim());
  }
}

export interface ImapConnectionOptions {
  upstream: UpstreamSettings;
  /**
   * The addresses a PROXY v2 header declares (upstream clientIp 'proxy-v2'). Default: this
   * host's address towards the upstream, port 0, on both ends. Ignored for other modes.
   */
  endpoint?: ClientEndpoint;
  /** Default timeout of a command (ms). Default 60 s. */
  commandTimeoutMs?: number;
  onUntagged?: (response: ImapResponse) => void;
  /** Called once when the connection ends, with why. */
  onClose?: (err: ImapClosedError) => void;
  /** Largest response accepted (bytes); beyond it the connection is dropped. Default 8 MiB. */
  maxResponseBytes?: number;
}

interface Pending {
  tag: string;
  verb: string;
  chunks: CommandChunk[];
  opts: CommandOptions;
  resolve: (r: TaggedResult) => void;
  reject: (e: Error) => void;
  untagged: ImapResponse[];
  timer?: NodeJS.Timeout;
  /** Waiting for `+` after a synchronizing literal's `{n}`: its bytes and the chunks after it. */
  rest: { literal: Buffer; after: CommandChunk[] } | null;
}

const CODE = /^\[([^\]]*)\]\s?/;

/** Splits `OK [CODE args] text` resp-text into its code and text. */
export function splitRespText(afterStatus: string): { code: string | null; text: string } {
  const m = CODE.exec(afterStatus);
  if (!m) return { code: null, text: afterStatus };
  return { code: m[1]!, text: afterStatus.slice(m[0].length) };
}

/** Status and resp-text of an untagged status response line (`* OK [CODE] text`), or null. */
export function untaggedStatus(r: ImapResponse): { status: string; code: string | null; text: string } | null {
  if (r.head.kind !== 'status') return null;
  const m = /^\* (\S+) ?(.*)$/.exec(r.line);
  if (!m) return null;
  return { status: m[1]!.toUpperCase(), ...splitRespText(m[2]!) };
}

/** This host's address towards `host` (no packet is sent: a UDP socket is only connected). */
export function localAddressTowards(host: string, port: number): Promise<{ local: string; remote: string }> {
  return new Promise((resolve) => {
    const family = net.isIPv6(host) ? 'udp6' : 'udp4';
    const sock = dgram.createSocket(family);
    const fallback = { local: family === 'udp6' ? '::1' : '127.0.0.1', remote: net.isIP(host) ? host : '127.0.0.1' };
    const done = (v: { local: string; remote: string }) => {
      try {
        sock.close();
      } catch {
        /* closed */
      }
      resolve(v);
    };
    sock.once('error', () => done(fallback));
    sock.connect(port, host, () => {
      try {
        done({ local: sock.address().address, remote: sock.remoteAddress().address });
      } catch {
        done(fallback);
      }
    });
  });
}

export class ImapConnection {
  readonly capabilities = new Set<string>();
  private framer = new Framer({ side: 'server', maxLine: 64 * 1024 });
  private current: CommandPart[] = [];
  private currentSize = 0;
  private currentLine: Buffer[] = [];
  private queue: Pending[] = [];
  private active: Pending | null = null;
  private tagCounter = 0;
  private closedError: ImapClosedError | null = null;
  private loggingOut = false;
  private closeWaiters: Array<(e: ImapClosedError) => void> = [];
  private lastActivity = Date.now();
  private readonly commandTimeoutMs: number;
  private readonly maxResponseBytes: number;

  private constructor(
    private readonly socket: net.Socket,
    private readonly opts: ImapConnectionOptions,
  ) {
    this.commandTimeoutMs = opts.commandTimeoutMs ?? 60_000;
    this.maxResponseBytes = opts.maxResponseBytes ?? 8 * 1024 * 1024;
  }

  /** Connects, reads the greeting (which must be OK) and learns the capabilities. */
  static async connect(opts: ImapConnectionOptions): Promise<ImapConnection> {
    const s = opts.upstream;
    const clientIp = s.clientIp === 'proxy-v2' ? 'proxy-v2' : 'none';
    let endpoint: ClientEndpoint | undefined = opts.endpoint;
    if (!endpoint) {
      let local = '0.0.0.0';
      let remote = '0.0.0.0';
      if (clientIp === 'proxy-v2') ({ local, remote } = await localAddressTowards(s.host, s.port));
      endpoint = { clientIp: local, clientPort: 0, localIp: remote, localPort: s.port, tlsVersion: null, sessionId: 'watcher' };
    }
    const up = await openUpstream({ ...s, clientIp }, endpoint);
    const conn = new ImapConnection(up.socket, opts);
    const greeting = up.greeting.toString('latin1').replace(/\r?\n$/, '');
    if (up.greetingStatus !== 'OK') {
      up.socket.destroy();
      throw new ImapClosedError(`upstream greeting is not OK: ${greeting.slice(0, 200)}`);
    }
    const caps = capabilitiesOf(up.greeting);
    if (caps) conn.setCapabilities(caps);
    conn.attach(up.leftover);
    // watcher traffic is small: copies from the recycled read buffer are cheap
    up.pump?.setSink((view) => (conn.onData(Buffer.from(view)), true));
    if (!caps) await conn.refreshCapabilities();
    return conn;
  }

  private attach(leftover: Buffer): void {
    const sock = this.socket;
    sock.setKeepAlive(true, 60_000);
    sock.on('data', (d: Buffer) => this.onData(d));
    sock.on('error', (err) => this.fail(new ImapClosedError(`upstream connection error: ${err.message}`)));
    sock.on('close', () => this.fail(new ImapClosedError('upstream closed the connection')));
    if (leftover.length > 0) this.onData(leftover);
    if (sock.destroyed) this.fail(new ImapClosedError('upstream closed the connection'));
  }

  get closed(): boolean {
    return this.closedError !== null;
  }

  /** Resolves (never rejects) with the reason once the connection has ended. */
  whenClosed(): Promise<ImapClosedError> {
    if (this.closedError) return Promise.resolve(this.closedError);
    return new Promise((resolve) => this.closeWaiters.push(resolve));
  }

  /** Milliseconds since the last byte was sent or received. */
  get idleForMs(): number {
    return Date.now() - this.lastActivity;
  }

  /** True while a command is in flight or queued (an IDLE counts). */
  get busy(): boolean {
    return this.active !== null || this.queue.length > 0;
  }

  hasCapability(name: string): boolean {
    return this.capabilities.has(name.toUpperCase());
  }

  setCapabilities(tokens: string[]): void {
    this.capabilities.clear();
    for (const t of tokens) this.capabilities.add(t.toUpperCase());
  }

  async refreshCapabilities(): Promise<void> {
    const r = await this.command('CAPABILITY');
    for (const u of r.untagged) {
      const caps = capabilitiesOf(Buffer.from(u.line + '\r\n', 'latin1'));
      if (caps) this.setCapabilities(caps);
    }
  }

  /**
   * Sends a command (text after the tag) and resolves with its tagged result, whatever the
   * status. Rejects only when the connection ends or the command times out (which also
   * closes the connection: its state is unknown then).
   */
  command(chunks: string | CommandChunk[], opts: CommandOptions = {}): Promise<TaggedResult> {
    if (this.closedError) return Promise.reject(this.closedError);
    const list = typeof chunks === 'string' ? [chunks] : chunks;
    const first = typeof list[0] === 'string' ? list[0] : '';
    const verb = (/^\S+/.exec(first)?.[0] ?? 'command').toUpperCase();
    return new Promise<TaggedResult>((resolve, reject) => {
      const tag = `w${++this.tagCounter}`;
      this.queue.push({ tag, verb, chunks: list, opts, resolve, reject, untagged: [], rest: null });
      this.pump();
    });
  }

  /** Like command(), but rejects with ImapCommandError unless the status is OK. */
  async ok(chunks: string | CommandChunk[], opts: CommandOptions = {}): Promise<TaggedResult> {
    const r = await this.command(chunks, opts);
    if (r.status !== 'OK') {
      const first = typeof chunks === 'string' ? chunks : typeof chunks[0] === 'string' ? chunks[0] : '';
      throw new ImapCommandError((/^\S+/.exec(first)?.[0] ?? 'command').toUpperCase(), r);
    }
    return r;
  }

  /**
   * Starts IDLE; resolves once the server accepted it (`+`). `done()` ends it and resolves
   * with the tagged result. Rejects if the server refuses IDLE.
   */
  async idle(): Promise<{ done: () => Promise<TaggedResult> }> {
    let isStarted = false;
    let accepted!: () => void;
    let refused!: (e: Error) => void;
    const started = new Promise<void>((resolve, reject) => {
      accepted = resolve;
      refused = reject;
    });
    const finished = this.command('IDLE', {
      timeoutMs: this.commandTimeoutMs, // for the `+`; cleared below
      onContinuation: () => {
        isStarted = true;
        // IDLE may last long: no timeout from here on (the caller's refresh bounds it)
        if (this.active?.timer) clearTimeout(this.active.timer);
        accepted();
        return null;
      },
    });
    finished.then(
      (r) => {
        if (!isStarted) refused(new ImapCommandError('IDLE', r));
      },
      (e: Error) => {
        if (!isStarted) refused(e);
      },
    );
    await started;
    let ending: Promise<TaggedResult> | null = null;
    return {
      done: () => {
        if (!ending) {
          if (!this.closedError) this.write('DONE\r\n');
          const timer = setTimeout(
            () => this.fail(new ImapClosedError(`no answer to DONE within ${this.commandTimeoutMs} ms`)),
            this.commandTimeoutMs,
          );
          ending = finished.finally(() => clearTimeout(timer));
        }
        return ending;
      },
    };
  }

  /** LOGOUT (best effort, bounded by timeoutMs), then closes the socket. */
  async logout(timeoutMs = 2000): Promise<void> {
    if (this.closedError) return;
    this.loggingOut = true;
    const timer = setTimeout(() => this.close(), timeoutMs);
    try {
      await this.command('LOGOUT', { timeoutMs }).catch(() => undefined);
    } finally {
      clearTimeout(timer);
      this.close();
    }
  }

  /** Closes at once; pending commands reject. */
  close(reason = 'connection closed by the watcher'): void {
    this.fail(new ImapClosedError(reason));
  }

  // ----------------------------------------------------------------- internals ---

  private write(data: string | Buffer): void {
    this.lastActivity = Date.now();
    this.socket.write(data);
  }

  private pump(): void {
    if (this.active || this.closedError) return;
    const next = this.queue.shift();
    if (!next) return;
    this.active = next;
    const timeoutMs = next.opts.timeoutMs ?? this.commandTimeoutMs;
    if (timeoutMs > 0) {
      next.timer = setTimeout(() => {
        this.fail(new ImapClosedError(`no answer to ${next.verb} within ${timeoutMs} ms`));
      }, timeoutMs);
    }
    this.sendChunks(next, [`${next.tag} `, ...next.chunks]);
  }

  /** Writes chunks up to and including the first synchronizing literal's `{n}` line. */
  private sendChunks(p: Pending, chunks: CommandChunk[]): void {
    const literalPlus = this.hasCapability('LITERAL+');
    const out: Buffer[] = [];
    for (let i = 0; i < chunks.length; i++) {
      const c = chunks[i]!;
      if (typeof c === 'string') {
        out.push(Buffer.from(c, 'utf8'));
        continue;
      }
      if (literalPlus) {
        out.push(Buffer.from(`{${c.literal.length}+}\r\n`, 'latin1'), c.literal);
        continue;
      }
      out.push(Buffer.from(`{${c.literal.length}}\r\n`, 'latin1'));
      p.rest = { literal: c.literal, after: chunks.slice(i + 1) };
      this.write(Buffer.concat(out));
      return;
    }
    out.push(Buffer.from('\r\n'));
    p.rest = null;
    this.write(Buffer.concat(out));
  }

  private onData(chunk: Buffer): void {
    this.lastActivity = Date.now();
    this.framer.push(chunk);
    try {
      for (let seg = this.framer.next(); seg; seg = this.framer.next()) {
        this.currentSize += seg.data.length;
        if (this.currentSize > this.maxResponseBytes) {
          throw new ImapClosedError(`upstream sent a response over ${this.maxResponseBytes} bytes`);
        }
        if (seg.type === 'literal') {
          const last = this.current[this.current.length - 1];
          if (last && last.kind === 'literal' && this.literalOpen) {
            last.data = Buffer.concat([last.data, seg.data]);
          } else {
            this.current.push({ kind: 'literal', data: Buffer.from(seg.data) });
          }
          this.literalOpen = seg.remaining > 0;
          continue;
        }
        this.literalOpen = false;
        this.currentLine.push(Buffer.from(seg.data));
        if (!seg.complete) continue;
        const line = this.currentLine.length === 1 ? this.currentLine[0]! : Buffer.concat(this.currentLine);
        this.currentLine = [];
        this.current.push({ kind: 'text', data: line });
        if (seg.literal) continue;
        const parts = this.current;
        this.current = [];
        this.currentSize = 0;
        this.dispatch(parts);
        if (this.closedError) return;
      }
    } catch (err) {
      this.fail(err instanceof ImapClosedError ? err : new ImapClosedError(`cannot read the upstream: ${(err as Error).message}`));
    }
  }

  private literalOpen = false;

  private dispatch(parts: CommandPart[]): void {
    const firstLine = parts[0]!.data;
    const head = classifyResponse(firstLine);
    const line = firstLine.toString('latin1').replace(/\r?\n$/, '');
    const response: ImapResponse = { parts, head, line };
    const p = this.active;

    if (head.kind === 'continuation') {
      if (!p) return;
      if (p.rest) {
        // the server granted our synchronizing literal: its bytes, then the rest of the command
        const { literal, after } = p.rest;
        p.rest = null;
        this.write(literal);
        this.sendChunks(p, after);
        return;
      }
      const reply = p.opts.onContinuation ? p.opts.onContinuation(line.replace(/^\+ ?/, '')) : null;
      if (reply !== null) this.write(`${reply}\r\n`);
      else if (!p.opts.onContinuation) this.write('*\r\n'); // unexpected: cancel (SASL) rather than hang
      return;
    }
    if (head.kind === 'tagged') {
      if (!p || head.tag !== p.tag) return; // not ours (cannot happen with one command at a time)
      const m = /^\S+ \S+ ?(.*)$/.exec(line);
      const { code, text } = splitRespText(m?.[1] ?? '');
      if (code && /^CAPABILITY /i.test(code)) this.setCapabilities(code.split(' ').slice(1).filter(Boolean));
      clearTimeout(p.timer);
      this.active = null;
      p.resolve({ status: head.status, code, text, untagged: p.untagged });
      this.pump();
      return;
    }
    if (head.kind === 'status' && head.status === 'BYE' && !this.loggingOut) {
      this.opts.onUntagged?.(response);
      this.fail(new ImapClosedError(`upstream said ${line.slice(0, 200)}`));
      return;
    }
    if (head.kind === 'data' && head.name === 'CAPABILITY') {
      const caps = capabilitiesOf(firstLine);
      if (caps) this.setCapabilities(caps);
    }
    if (p) p.untagged.push(response);
    this.opts.onUntagged?.(response);
  }

  private fail(err: ImapClosedError): void {
    if (this.closedError) return;
    this.closedError = err;
    this.socket.destroy();
    const pending = [...(this.active ? [this.active] : []), ...this.queue];
    this.active = null;
    this.queue = [];
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    for (const w of this.closeWaiters.splice(0)) w(err);
    this.opts.onClose?.(err);
  }
}
