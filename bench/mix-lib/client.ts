/**
 * The mixed-workload benchmark's IMAP client: raw sockets, one command at a time, the least
 * parsing that finds where a response ends (lines, `{n}` literals skipped by count), plus what a
 * mail client's session needs: a synchronizing literal (APPEND waits for `+`), IDLE/DONE, and,
 * for checking, the size and SHA-1 of each literal and the untagged FETCH count.
 */
import { createHash, type Hash } from 'node:crypto';
import { ImapWire, STALL_MS, type Endpoint } from '../lib/imap-wire.js';

export type { Endpoint } from '../lib/imap-wire.js';

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

export class MixClient extends ImapWire<Pending> {
  constructor() {
    super('m');
  }

  static async connect(ep: Endpoint, timeoutMs = 20_000): Promise<MixClient> {
    const c = new MixClient();
    await c.open(ep, timeoutMs);
    return c;
  }

  protected override stalled(where: string): void {
    if (this.pending || this.greeting) this.fail(new Error(`${where}: no bytes for ${STALL_MS / 1000} s while a command was running`));
  }

  protected override greetingText(text: string): string {
    return text.trim();
  }

  protected override received(p: Pending, n: number): void {
    p.reply.bytes += n;
  }

  protected override literalData(p: Pending | null, chunk: Buffer, start: number, end: number): void {
    p?.current?.update(chunk.subarray(start, end));
    if (this.literalLeft === 0 && p?.current) {
      p.reply.literalDigests.push(p.current.digest('hex'));
      p.current = null;
    }
  }

  protected override literalStart(p: Pending | null, line: Buffer, lit: number): void {
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
  }

  protected override response(p: Pending, line: Buffer): void {
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
    if (ImapWire.isTagged(line, p.tag)) {
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

  private begin(text: string, hash: boolean, onContinue: ((tag: string) => void) | null): Promise<Reply> {
    return this.start<Reply>(text, (tag, resolve, reject) => ({
      tag,
      resolve,
      reject,
      onContinue: onContinue ? () => onContinue(tag) : null,
      hash,
      reply: { status: 'BAD', text: '', literalSizes: [], literalDigests: [], fetches: 0, bytes: 0 },
      current: null,
    }));
  }

  /** One command without literals; `hash`: SHA-1 each literal of the response. */
  command(text: string, hash = false): Promise<Reply> {
    return this.begin(text, hash, null);
  }

  /** `APPEND <mailbox> <flags> {n}` with a synchronizing literal: the message goes after the server's `+`. */
  append(mailbox: string, flags: string, message: Buffer): Promise<Reply> {
    return this.begin(`APPEND ${mailbox} ${flags} {${message.length}}`, false, () => {
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
    const reply = await this.begin('IDLE', false, () => {
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

  get isBroken(): boolean {
    return this.failure !== null;
  }
}
