/**
 * The socket side shared by the benchmarks' raw IMAP clients (bench/lib/imap-load.ts and
 * bench/mix-lib/client.ts): connect (plain or implicit TLS), wait for the greeting, and the
 * least parsing that finds where a response ends: lines, and `{n}` literals skipped by count
 * (their bytes are never scanned). One command at a time; what a client counts or checks per
 * command lives in its `pending` object and the hooks below.
 */
import net from 'node:net';
import tls from 'node:tls';

export interface Endpoint {
  host: string;
  port: number;
  /** Implicit TLS (IMAPS). */
  tls?: { ca: Buffer; servername: string };
}

const LF = 0x0a;
export const STALL_MS = 30_000;

/** `n` when the line ends with a literal announcement `{n}`, else -1. */
export function literalAtEnd(line: Buffer): number {
  // `… {123}\r\n` or `… {123+}\r\n` or `… ~{123}\r\n`
  let i = line.length - 1;
  if (i < 0 || line[i] !== LF) return -1;
  i--;
  if (i >= 0 && line[i] === 0x0d) i--;
  if (i < 0 || line[i] !== 0x7d) return -1;
  i--;
  if (i >= 0 && line[i] === 0x2b) i--;
  const end = i + 1;
  while (i >= 0 && line[i] >= 0x30 && line[i] <= 0x39) i--;
  if (end - (i + 1) === 0 || line[i] !== 0x7b) return -1;
  return Number(line.toString('latin1', i + 1, end));
}

/** The command in flight: its tag and how it fails. */
export interface PendingCommand {
  tag: string;
  reject: (e: Error) => void;
}

export abstract class ImapWire<P extends PendingCommand> {
  protected socket!: net.Socket;
  private lineParts: Buffer[] = [];
  protected literalLeft = 0;
  protected pending: P | null = null;
  protected greeting: { resolve: () => void; reject: (e: Error) => void } | null = null;
  protected failure: Error | null = null;
  private seq = 0;
  protected closed = false;

  /** `tagPrefix`: the tags are `<prefix>1`, `<prefix>2`, … */
  protected constructor(private readonly tagPrefix: string) {}

  /** No bytes for STALL_MS (`where`: host:port). */
  protected abstract stalled(where: string): void;
  /** `n` bytes arrived while `p` was in flight. */
  protected abstract received(p: P, n: number): void;
  /** Bytes `start`–`end` of `chunk` are literal content; `this.literalLeft` already counts them off. */
  protected abstract literalData(p: P | null, chunk: Buffer, start: number, end: number): void;
  /** `line` announces a literal of `size` bytes (`this.literalLeft` is set). */
  protected abstract literalStart(p: P | null, line: Buffer, size: number): void;
  /** Any other line while `p` is in flight; `after`: bytes of the current chunk that follow it. */
  protected abstract response(p: P, line: Buffer, after: number): void;
  /** The greeting as quoted in the error when it is not `* OK` / `* PREAUTH`. */
  protected abstract greetingText(text: string): string;

  protected open(ep: Endpoint, timeoutMs: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => this.fail(new Error(`no greeting from ${ep.host}:${ep.port} within ${timeoutMs} ms`)), timeoutMs);
      this.greeting = {
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      const sock = ep.tls
        ? tls.connect({ host: ep.host, port: ep.port, ca: ep.tls.ca, servername: ep.tls.servername })
        : net.connect({ host: ep.host, port: ep.port });
      this.socket = sock;
      sock.setNoDelay(true);
      // A relay that loses bytes leaves us waiting for a literal or tagged line that never completes.
      sock.setTimeout(STALL_MS, () => this.stalled(`${ep.host}:${ep.port}`));
      sock.on('data', (chunk: Buffer) => this.onData(chunk));
      sock.on('error', (e) => this.fail(new Error(`${ep.host}:${ep.port}: ${e.message}`)));
      sock.on('close', () => {
        this.closed = true;
        this.fail(new Error(`${ep.host}:${ep.port} closed the connection`));
      });
    });
  }

  protected fail(err: Error): void {
    this.failure ??= err;
    const g = this.greeting;
    this.greeting = null;
    g?.reject(err);
    const p = this.pending;
    this.pending = null;
    p?.reject(err);
    if (!this.closed) this.socket?.destroy();
  }

  private onData(chunk: Buffer): void {
    const p = this.pending;
    if (p) this.received(p, chunk.length);
    let pos = 0;
    const len = chunk.length;
    while (pos < len) {
      if (this.literalLeft > 0) {
        const n = Math.min(this.literalLeft, len - pos);
        this.literalLeft -= n;
        this.literalData(p, chunk, pos, pos + n);
        pos += n;
        continue;
      }
      const lf = chunk.indexOf(LF, pos);
      if (lf < 0) {
        this.lineParts.push(chunk.subarray(pos));
        return;
      }
      let line = chunk.subarray(pos, lf + 1);
      if (this.lineParts.length > 0) {
        this.lineParts.push(line);
        line = Buffer.concat(this.lineParts);
        this.lineParts = [];
      }
      pos = lf + 1;
      this.onLine(line, len - pos);
    }
  }

  private onLine(line: Buffer, after: number): void {
    const lit = literalAtEnd(line);
    if (lit >= 0) {
      this.literalLeft = lit;
      // a `{0}` literal has no bytes: the line continues after it
      this.literalStart(this.pending, line, lit);
      return;
    }
    if (this.greeting) {
      const g = this.greeting;
      this.greeting = null;
      const text = line.toString('latin1');
      if (/^\* (OK|PREAUTH)\b/i.test(text)) g.resolve();
      else g.reject(new Error(`unexpected greeting: ${this.greetingText(text)}`));
      return;
    }
    const p = this.pending;
    if (p) this.response(p, line, after);
  }

  /** Sends `<tag> <text>\r\n` with `make(tag, …)` as the command in flight. */
  protected start<R>(text: string, make: (tag: string, resolve: (r: R) => void, reject: (e: Error) => void) => P): Promise<R> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.pending) return Promise.reject(new Error('one command at a time'));
    const tag = `${this.tagPrefix}${++this.seq}`;
    return new Promise<R>((resolve, reject) => {
      this.pending = make(tag, resolve, reject);
      this.socket.write(`${tag} ${text}\r\n`);
    });
  }

  /** `tag OK|NO|BAD …`: the tagged line of `tag`? */
  protected static isTagged(line: Buffer, tag: string): boolean {
    return line.length > tag.length + 1 && line[tag.length] === 0x20 && line.toString('latin1', 0, tag.length) === tag;
  }

  destroy(): void {
    this.failure ??= new Error('closed');
    this.socket?.destroy();
  }
}
