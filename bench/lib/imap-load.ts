/**
 * The benchmark's own IMAP load generator: raw sockets and a minimal response scanner, so the
 * client is as cheap as possible and never the component being measured. It understands just
 * enough IMAP to find where a tagged response ends: lines, and `{n}` literals it skips by count
 * (never scanning their bytes).
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

export interface CommandResult {
  status: 'OK' | 'NO' | 'BAD';
  /** The tagged status line. */
  text: string;
  /** Every byte received from sending the command up to and including the tagged line. */
  bytes: number;
  /** The bytes before the tagged line: deterministic for a given mailbox and command (the tagged
   * line carries Dovecot's timing text). A relay that loses or adds bytes changes this. */
  untaggedBytes: number;
  /** Bytes inside literals. */
  literalBytes: number;
  literals: number;
  /** SHA-1 over the literal bytes in order, when hashing was asked for. */
  digest: string | null;
}

const LF = 0x0a;
const STALL_MS = 30_000;

/** The server (or relay) stopped sending in the middle of a response. */
export class StallError extends Error {}

function literalAtEnd(line: Buffer): number {
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

interface Waiter {
  tag: string;
  resolve: (r: CommandResult) => void;
  reject: (e: Error) => void;
  bytes: number;
  literalBytes: number;
  literals: number;
  hash: Hash | null;
}

export class RawImapClient {
  private socket!: net.Socket;
  private lineParts: Buffer[] = [];
  private literalLeft = 0;
  private waiter: Waiter | null = null;
  private greeting: { resolve: (line: string) => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;
  private tagSeq = 0;
  private closed = false;

  static async connect(ep: Endpoint, timeoutMs = 15_000): Promise<RawImapClient> {
    const c = new RawImapClient();
    await c.open(ep, timeoutMs);
    return c;
  }

  private open(ep: Endpoint, timeoutMs: number): Promise<string> {
    return new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => this.fail(new Error(`no greeting from ${ep.host}:${ep.port} within ${timeoutMs} ms`)), timeoutMs);
      this.greeting = {
        resolve: (l) => {
          clearTimeout(timer);
          resolve(l);
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
      sock.setTimeout(STALL_MS, () =>
        this.fail(new StallError(`${ep.host}:${ep.port}: no bytes for ${STALL_MS / 1000} s while a command was running (lost or extra bytes?)`)),
      );
      sock.on('data', (chunk: Buffer) => this.onData(chunk));
      sock.on('error', (e) => this.fail(new Error(`${ep.host}:${ep.port}: ${e.message}`)));
      sock.on('close', () => {
        this.closed = true;
        this.fail(new Error(`${ep.host}:${ep.port} closed the connection`));
      });
    });
  }

  private fail(err: Error): void {
    if (!this.failure) this.failure = err;
    const g = this.greeting;
    this.greeting = null;
    g?.reject(err);
    const w = this.waiter;
    this.waiter = null;
    w?.reject(err);
    if (!this.closed) this.socket?.destroy();
  }

  private onData(chunk: Buffer): void {
    const w = this.waiter;
    if (w) w.bytes += chunk.length;
    let pos = 0;
    const len = chunk.length;
    while (pos < len) {
      if (this.literalLeft > 0) {
        const n = Math.min(this.literalLeft, len - pos);
        if (w) {
          w.literalBytes += n;
          w.hash?.update(chunk.subarray(pos, pos + n));
        }
        this.literalLeft -= n;
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

  /** `after`: bytes of the current chunk that follow this line. */
  private onLine(line: Buffer, after: number): void {
    const lit = literalAtEnd(line);
    if (lit >= 0) {
      this.literalLeft = lit;
      if (this.waiter) this.waiter.literals++;
      // a `{0}` literal has no bytes: the line continues after it
      return;
    }
    if (this.greeting) {
      const g = this.greeting;
      this.greeting = null;
      const text = line.toString('latin1').trimEnd();
      if (/^\* (OK|PREAUTH)\b/i.test(text)) g.resolve(text);
      else g.reject(new Error(`unexpected greeting: ${text}`));
      return;
    }
    const w = this.waiter;
    if (!w) return;
    // tagged line? `<tag> OK|NO|BAD …`
    if (line.length > w.tag.length + 1 && line[w.tag.length] === 0x20 && line.toString('latin1', 0, w.tag.length) === w.tag) {
      const text = line.toString('latin1').trimEnd();
      const status = text.slice(w.tag.length + 1, w.tag.length + 4).toUpperCase().trim();
      this.waiter = null;
      w.resolve({
        status: status === 'OK' ? 'OK' : status === 'NO' ? 'NO' : 'BAD',
        text,
        bytes: w.bytes - after,
        untaggedBytes: w.bytes - after - line.length,
        literalBytes: w.literalBytes,
        literals: w.literals,
        digest: w.hash ? w.hash.digest('hex') : null,
      });
    }
  }

  /** Send one command (no literals in it) and collect its response. */
  command(text: string, opts: { hash?: boolean } = {}): Promise<CommandResult> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.waiter) return Promise.reject(new Error('one command at a time'));
    const tag = `b${++this.tagSeq}`;
    return new Promise<CommandResult>((resolve, reject) => {
      this.waiter = {
        tag,
        resolve,
        reject,
        bytes: 0,
        literalBytes: 0,
        literals: 0,
        hash: opts.hash ? createHash('sha1') : null,
      };
      this.socket.write(`${tag} ${text}\r\n`);
    });
  }

  async ok(text: string): Promise<CommandResult> {
    const r = await this.command(text);
    if (r.status !== 'OK') throw new Error(`${text.split(' ')[0]} failed: ${r.text}`);
    return r;
  }

  /** LOGOUT politely, then make sure the socket is gone. */
  async close(): Promise<void> {
    if (!this.closed && !this.failure) {
      await Promise.race([this.command('LOGOUT').catch(() => undefined), new Promise((r) => setTimeout(r, 1000))]);
    }
    this.failure ??= new Error('closed');
    this.socket?.destroy();
  }

  destroy(): void {
    this.failure ??= new Error('closed');
    this.socket?.destroy();
  }
}

function quote(s: string): string {
  return `"${s.replace(/(["\\])/g, '\\$1')}"`;
}

export interface FetchRunOptions {
  endpoint: Endpoint;
  user: string;
  password: string;
  connections: number;
  /** Also fetch BODY.PEEK[HEADER]. */
  headers: boolean;
  /** Full-mailbox fetches per connection, one after the other in the same session. */
  fetches: number;
  /** Hash the literal bytes (costs client CPU: only on verification rounds). */
  hash: boolean;
  /** Called right before the FETCH commands go out and right after the last tagged OK. */
  onStart?: () => void;
  onEnd?: () => void;
}

export interface FetchRunResult {
  /** Wall time of the FETCH phase (all connections), ms. */
  wallMs: number;
  /** Bytes received during the FETCH phase, all connections. */
  bytes: number;
  /** [connection][fetch] */
  perConnection: CommandResult[][];
  /** Load-generator CPU during the FETCH phase, ms. */
  clientCpuMs: number;
}

/**
 * Open `connections` sessions, LOGIN and SELECT on each (not timed), then send
 * `UID FETCH 1:* (BODY.PEEK[])` on all at once (`fetches` times in a row on each) and time
 * until the last tagged OK.
 */
export async function runFetch(o: FetchRunOptions): Promise<FetchRunResult> {
  const clients: RawImapClient[] = [];
  try {
    await Promise.all(
      Array.from({ length: o.connections }, async () => {
        const c = await RawImapClient.connect(o.endpoint);
        clients.push(c);
        await c.ok(`LOGIN ${quote(o.user)} ${quote(o.password)}`);
        await c.ok('SELECT INBOX');
      }),
    );
    const items = o.headers ? '(BODY.PEEK[HEADER] BODY.PEEK[])' : '(BODY.PEEK[])';
    o.onStart?.();
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    const results = await Promise.all(
      clients.map(async (c) => {
        const out: CommandResult[] = [];
        for (let i = 0; i < o.fetches; i++) {
          const r = await c.command(`UID FETCH 1:* ${items}`, { hash: o.hash });
          if (r.status !== 'OK') throw new Error(`UID FETCH failed: ${r.text}`);
          out.push(r);
        }
        return out;
      }),
    );
    const t1 = performance.now();
    const cpu = process.cpuUsage(cpu0);
    o.onEnd?.();
    return {
      wallMs: t1 - t0,
      bytes: results.flat().reduce((a, r) => a + r.bytes, 0),
      perConnection: results,
      clientCpuMs: (cpu.user + cpu.system) / 1000,
    };
  } finally {
    await Promise.all(clients.map((c) => c.close()));
  }
}
