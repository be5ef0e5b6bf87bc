/**
 * The mixed-workload benchmark's IMAP client: raw sockets, one command at a time, the least
 * parsing that finds where a response ends (lines, `{n}` literals skipped by count), plus what a
 * mail client's session needs: a synchronizing literal (APPEND waits for `+`), IDLE/DONE, and,
 * for checking, the size and SHA-1 of each literal and the untagged FETCH count.
 */
import net from 'node:net';
import tls from 'node:tls';
import { createHash, type Hash } from 'node:crypto';

export interface Endpoint {
  host: string;
  port: number;
  /** Implicit TLS (IMAPS). */
  tls?: { ca: Buffer; servername: string };
}

export interface Reply {
  status: 'OK' | 'NO' | 'BAD';
  /** The tagged line, without CRLF. */
  text: string;
  /** Literal sizes, in order. */
  literalSizes: number[];
  /** SHA-1 of each literal, when asked for. */
  literalDigests: string[];
  /** Untagged `* n FETCH` responses. */
  fetches: number;
  /** Bytes received for this command, its tagged line included. */
  bytes: number;
}

const LF = 0x0a;
const STALL_MS = 30_000;

function literalAtEnd(line: Buffer): number {
  // `… {123}\r\n` / `{123+}` / `~{123}`
  let i = line.length - 1;
  if (i < 0 || line[i] !== LF) return -1;
  i--;
  if (i >= 0 && line[i] === 0x0d) i--;
  if (i < 0 || line[i] !== 0x7d) return -1;
  i--;
  if (i >= 0 && line[i] === 0x2b) i--;
  const end = i + 1;
  while (i >= 0 && line[i]! >= 0x30 && line[i]! <= 0x39) i--;
  if (end - (i + 1) === 0 || line[i] !== 0x7b) return -1;
  return Number(line.toString('latin1', i + 1, end));
}

interface Pending {
  tag: string;
  resolve: (r: Reply) => void;
  reject: (e: Error) => void;
  /** Waiting for a continuation request (`+`) before the rest is sent. */
  onContinue: (() => void) | null;
  hash: boolean;
  reply: Reply;
  current: Hash | null;
}

export class MixClient {
  private socket!: net.Socket;
  private lineParts: Buffer[] = [];
  private literalLeft = 0;
  private pending: Pending | null = null;
  private greeting: { resolve: () => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;
  private seq = 0;
  private closed = false;

  static async connect(ep: Endpoint, timeoutMs = 20_000): Promise<MixClient> {
    const c = new MixClient();
    await c.open(ep, timeoutMs);
    return c;
  }

  private open(ep: Endpoint, timeoutMs: number): Promise<void> {
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
      sock.setTimeout(STALL_MS, () => {
        if (this.pending || this.greeting) this.fail(new Error(`${ep.host}:${ep.port}: no bytes for ${STALL_MS / 1000} s while a command was running`));
      });
      sock.on('data', (chunk: Buffer) => this.onData(chunk));
      sock.on('error', (e) => this.fail(new Error(`${ep.host}:${ep.port}: ${e.message}`)));
      sock.on('close', () => {
        this.closed = true;
        this.fail(new Error(`${ep.host}:${ep.port} closed the connection`));
      });
    });
  }

  private fail(err: Error): void {
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
    if (p) p.reply.bytes += chunk.length;
    let pos = 0;
    const len = chunk.length;
    while (pos < len) {
      if (this.literalLeft > 0) {
        const n = Math.min(this.literalLeft, len - pos);
        p?.current?.update(chunk.subarray(pos, pos + n));
        this.literalLeft -= n;
        pos += n;
        if (this.literalLeft === 0 && p?.current) {
          p.reply.literalDigests.push(p.current.digest('hex'));
          p.current = null;
        }
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
      this.onLine(line);
    }
  }

  private onLine(line: Buffer): void {
    const p = this.pending;
    const lit = literalAtEnd(line);
    if (lit >= 0) {
      this.literalLeft = lit;
      if (p) {
        if (line[0] === 0x2a && / FETCH /i.test(line.toString('latin1', 0, Math.min(line.length, 40)))) p.reply.fetches++;
        p.reply.literalSizes.push(lit);
        if (p.hash) {
          p.current = createHash('sha1');
          if (lit === 0) {
            p.reply.literalDigests.push(p.current.digest('hex'));
            p.current = null;
          }
        }
      }
      return;
    }
    if (this.greeting) {
      const g = this.greeting;
      this.greeting = null;
      const text = line.toString('latin1');
      if (/^\* (OK|PREAUTH)\b/i.test(text)) g.resolve();
      else g.reject(new Error(`unexpected greeting: ${text.trim()}`));
      return;
    }
    if (!p) return;
    const c0 = line[0];
    if (c0 === 0x2b /* + */) {
      const k = p.onContinue;
      p.onContinue = null;
      k?.();
      return;
    }
    if (c0 === 0x2a /* * */) {
      // a continuation line of a FETCH with literals was counted at its literal
      if (/^\* \d+ FETCH /i.test(line.toString('latin1', 0, Math.min(line.length, 40)))) p.reply.fetches++;
      return;
    }
    if (line.length > p.tag.length + 1 && line[p.tag.length] === 0x20 && line.toString('latin1', 0, p.tag.length) === p.tag) {
      const text = line.toString('latin1').trimEnd();
      const word = text.slice(p.tag.length + 1).split(' ', 1)[0]!.toUpperCase();
      p.reply.status = word === 'OK' ? 'OK' : word === 'NO' ? 'NO' : 'BAD';
      p.reply.text = text;
      this.pending = null;
      if (p.onContinue) p.onContinue = null; // refused before the literal was asked for
      p.resolve(p.reply);
    }
    // anything else: the rest of a line that carried literals; nothing to do
  }

  private start(text: string, hash: boolean, onContinue: ((tag: string) => void) | null): Promise<Reply> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.pending) return Promise.reject(new Error('one command at a time'));
    const tag = `m${++this.seq}`;
    return new Promise<Reply>((resolve, reject) => {
      this.pending = {
        tag,
        resolve,
        reject,
        onContinue: onContinue ? () => onContinue(tag) : null,
        hash,
        reply: { status: 'BAD', text: '', literalSizes: [], literalDigests: [], fetches: 0, bytes: 0 },
        current: null,
      };
      this.socket.write(`${tag} ${text}\r\n`);
    });
  }

  /** One command without literals; `hash`: SHA-1 each literal of the response. */
  command(text: string, hash = false): Promise<Reply> {
    return this.start(text, hash, null);
  }

  /** `APPEND <mailbox> <flags> {n}` with a synchronizing literal: the message goes after the server's `+`. */
  append(mailbox: string, flags: string, message: Buffer): Promise<Reply> {
    return this.start(`APPEND ${mailbox} ${flags} {${message.length}}`, false, () => {
      this.socket.write(Buffer.concat([message, Buffer.from('\r\n')]));
    });
  }

  /**
   * IDLE, hold `holdMs` once the server has said `+`, then DONE. Resolves with the time the `+`
   * took and the time DONE took to its tagged reply (ms); the hold itself is in neither.
   */
  async idle(holdMs: number): Promise<{ idleMs: number; doneMs: number; reply: Reply }> {
    const t0 = performance.now();
    let t1 = 0;
    let t2 = 0;
    const reply = await this.start('IDLE', false, () => {
      t1 = performance.now();
      setTimeout(() => {
        if (this.failure) return;
        t2 = performance.now();
        this.socket.write('DONE\r\n');
      }, holdMs);
    });
    const t3 = performance.now();
    if (t1 === 0) return { idleMs: t3 - t0, doneMs: 0, reply }; // refused
    return { idleMs: t1 - t0, doneMs: t3 - t2, reply };
  }

  destroy(): void {
    this.failure ??= new Error('closed');
    this.socket?.destroy();
  }

  get isBroken(): boolean {
    return this.failure !== null;
  }
}
