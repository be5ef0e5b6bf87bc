/**
 * The benchmark's own IMAP load generator: raw sockets and a minimal response scanner, so the
 * client is as cheap as possible and never the component being measured. It understands just
 * enough IMAP to find where a tagged response ends: lines, and `{n}` literals it skips by count
 * (never scanning their bytes).
 */
import { createHash, type Hash } from 'node:crypto';
import { ImapWire, STALL_MS, type Endpoint } from './imap-wire.js';

export type { Endpoint } from './imap-wire.js';

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

/** The server (or relay) stopped sending in the middle of a response. */
export class StallError extends Error {}

interface Waiter {
  tag: string;
  resolve: (r: CommandResult) => void;
  reject: (e: Error) => void;
  bytes: number;
  literalBytes: number;
  literals: number;
  hash: Hash | null;
}

export class RawImapClient extends ImapWire<Waiter> {
  constructor() {
    super('b');
  }

  static async connect(ep: Endpoint, timeoutMs = 15_000): Promise<RawImapClient> {
    const c = new RawImapClient();
    await c.open(ep, timeoutMs);
    return c;
  }

  protected override stalled(where: string): void {
    this.fail(new StallError(`${where}: no bytes for ${STALL_MS / 1000} s while a command was running (lost or extra bytes?)`));
  }

  protected override greetingText(text: string): string {
    return text.trimEnd();
  }

  protected override received(w: Waiter, n: number): void {
    w.bytes += n;
  }

  protected override literalData(w: Waiter | null, chunk: Buffer, start: number, end: number): void {
    if (w) {
      w.literalBytes += end - start;
      w.hash?.update(chunk.subarray(start, end));
    }
  }

  protected override literalStart(w: Waiter | null): void {
    if (w) w.literals++;
  }

  /** `after`: bytes of the current chunk that follow this line. */
  protected override response(w: Waiter, line: Buffer, after: number): void {
    // tagged line? `<tag> OK|NO|BAD …`
    if (ImapWire.isTagged(line, w.tag)) {
      const text = line.toString('latin1').trimEnd();
      const status = text.slice(w.tag.length + 1, w.tag.length + 4).toUpperCase().trim();
      this.pending = null;
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
    return this.start<CommandResult>(text, (tag, resolve, reject) => ({
      tag,
      resolve,
      reject,
      bytes: 0,
      literalBytes: 0,
      literals: 0,
      hash: opts.hash ? createHash('sha1') : null,
    }));
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
