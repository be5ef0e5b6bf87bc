/**
 * Streaming IMAP framer for one direction of a connection.
 *
 * It cuts a byte stream into line segments and literal payload segments, without
 * parsing anything else. Segments reference the input buffers (subarray, no copy)
 * whenever a line lies within one input chunk, and literal payloads are never
 * copied or scanned. Lines longer than `maxLine` are streamed as partial segments
 * so that a huge line (a long SEARCH response, say) never has to be held whole.
 *
 * Client side: a synchronizing literal `{n}` stops the framer until the session
 * says whether the server granted it (`+`) or refused it (tagged NO/BAD), because
 * only then is it known whether the next bytes are literal data or a new command.
 *
 * Server side: status responses (`tag OK|NO|BAD`, `* OK|NO|BAD|BYE|PREAUTH`) and
 * continuation requests (`+ …`) end in resp-text, which has no literal, so a
 * trailing `{5}` there is text (RFC 3501 §9).
 */

export type Side = 'client' | 'server';

export interface LiteralInfo {
  size: number;
  /** `{n}` from a client: the client waits for `+` before sending the data. */
  sync: boolean;
  /** `~{n}` literal8 (RFC 3516). */
  binary: boolean;
}

export interface LineSegment {
  type: 'line';
  /** Bytes exactly as received; forward them unchanged unless rewriting. */
  data: Buffer;
  /** First segment of a command (client) or response (server). */
  startsMessage: boolean;
  /** False when earlier parts of this same line were already emitted as partials. */
  startsLine: boolean;
  /** The line ends in LF here. False: an over-long line is being streamed; more follows. */
  complete: boolean;
  /** Set on a complete line that announces a literal. */
  literal: LiteralInfo | null;
  /** Complete responses in `data`: more than 1 only for a batch of numbered responses (FramerOptions.batchNumbered). */
  lines: number;
}

export interface LiteralSegment {
  type: 'literal';
  data: Buffer;
  /** Literal bytes still to come after this segment. */
  remaining: number;
}

export type Segment = LineSegment | LiteralSegment;

export interface FramerOptions {
  side: Side;
  /** Lines longer than this are emitted in partial segments instead of being buffered. */
  maxLine?: number;
  /**
   * Server side: consecutive `* <number> …` responses without a literal that lie in one input chunk come as one
   * line segment (`lines` > 1). A relay that looks at none of them (EXISTS, EXPUNGE, a FETCH of flags for a
   * whole mailbox) then handles one segment instead of hundreds.
   */
  batchNumbered?: boolean;
}

const LF = 0x0a;
const CR = 0x0d;
const EMPTY = Buffer.alloc(0);
const TAIL_KEEP = 32; // enough for `~{` + 15 digits + `+}` + CRLF
const MAX_LITERAL_DIGITS = 15; // keeps sizes within Number.MAX_SAFE_INTEGER

export class Framer {
  readonly side: Side;
  private maxLine: number;
  private readonly batchNumbered: boolean;
  private chunks: Buffer[] = [];
  private offset = 0; // read position in chunks[0]
  private bufferedBytes = 0;

  private literalRemaining = 0;
  private inMessage = false; // a message has started and not yet ended
  private textOnly = false; // current server message cannot carry literals
  private pendingSync: LiteralInfo | null = null;

  // a line that spans chunks is gathered here until LF (or streamed past maxLine)
  private lineParts: Buffer[] = [];
  private lineLength = 0;
  private lineStreamed = false; // parts of the current line were already emitted
  private lineTail: Buffer = EMPTY; // last bytes of streamed parts

  constructor(opts: FramerOptions) {
    this.side = opts.side;
    this.maxLine = opts.maxLine ?? 64 * 1024;
    this.batchNumbered = opts.side === 'server' && opts.batchNumbered === true;
  }

  setMaxLine(n: number): void {
    this.maxLine = n;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.bufferedBytes += chunk.length;
  }

  /** Bytes received but not yet returned in a segment. */
  get buffered(): number {
    return this.bufferedBytes + this.lineLength;
  }

  /** True between messages: no partial line, no literal and no continuation pending. */
  get atBoundary(): boolean {
    return !this.inMessage && this.lineLength === 0 && !this.lineStreamed;
  }

  /** Client side: the framer waits for the session to grant or refuse a `{n}` literal. */
  get awaitingContinuation(): boolean {
    return this.pendingSync !== null;
  }

  /** The server sent `+`: the announced literal follows. */
  grantContinuation(): void {
    if (!this.pendingSync) return;
    this.literalRemaining = this.pendingSync.size;
    this.pendingSync = null;
  }

  /** The server completed the command instead: the literal never comes (RFC 3501 §7.5). */
  refuseContinuation(): void {
    if (!this.pendingSync) return;
    this.pendingSync = null;
    this.endMessage();
  }

  /**
   * Copies whatever the framer still holds, so that the buffers it was given can
   * be reused by the caller (reads into one recycled buffer).
   */
  ownBytes(): void {
    if (this.chunks.length > 0) {
      this.chunks = [Buffer.from(Buffer.concat(this.remainingChunks()))];
      this.offset = 0;
    }
    if (this.lineParts.length > 0) this.lineParts = [Buffer.from(Buffer.concat(this.lineParts))];
  }

  /** Takes every byte not yet framed (STARTTLS: these must be discarded) and resets. */
  drain(): Buffer {
    const rest = Buffer.concat([...this.lineParts, ...this.remainingChunks()]);
    this.chunks = [];
    this.offset = 0;
    this.bufferedBytes = 0;
    this.resetLine();
    this.literalRemaining = 0;
    this.pendingSync = null;
    this.endMessage();
    return rest;
  }

  next(): Segment | null {
    if (this.pendingSync) return null;
    if (this.literalRemaining > 0) return this.nextLiteral();
    return this.nextLine();
  }

  private remainingChunks(): Buffer[] {
    if (this.chunks.length === 0) return [];
    return [this.chunks[0].subarray(this.offset), ...this.chunks.slice(1)];
  }

  private consume(n: number): Buffer {
    const head = this.chunks[0];
    const out = head.subarray(this.offset, this.offset + n);
    this.offset += n;
    this.bufferedBytes -= n;
    if (this.offset >= head.length) {
      this.chunks.shift();
      this.offset = 0;
    }
    return out;
  }

  private nextLiteral(): LiteralSegment | null {
    if (this.chunks.length === 0) return null;
    const available = this.chunks[0].length - this.offset;
    const n = Math.min(available, this.literalRemaining);
    const data = this.consume(n);
    this.literalRemaining -= n;
    return { type: 'literal', data, remaining: this.literalRemaining };
  }

  private nextLine(): LineSegment | null {
    while (this.chunks.length > 0) {
      const chunk = this.chunks[0];
      const lf = chunk.indexOf(LF, this.offset);
      if (lf >= 0) {
        if (this.batchNumbered && this.lineParts.length === 0 && !this.inMessage) {
          const batch = this.numberedBatch(chunk, lf);
          if (batch) return batch;
        }
        const piece = this.consume(lf + 1 - this.offset);
        return this.finishLine(piece);
      }
      const piece = this.consume(chunk.length - this.offset);
      this.lineParts.push(piece);
      this.lineLength += piece.length;
      if (this.lineLength > this.maxLine) return this.streamPartial();
    }
    return null;
  }

  /**
   * From the read position, the numbered responses without a literal that end in `chunk`, when there are at least
   * two; null otherwise (the caller frames one line as usual).
   */
  private numberedBatch(chunk: Buffer, firstLf: number): LineSegment | null {
    const start = this.offset;
    if (!isPlainNumbered(chunk, start, firstLf)) return null;
    let end = firstLf + 1;
    let lines = 1;
    for (;;) {
      const lf = chunk.indexOf(LF, end);
      if (lf < 0 || lf + 1 - end > this.maxLine || !isPlainNumbered(chunk, end, lf)) break;
      end = lf + 1;
      lines++;
    }
    if (lines < 2 || firstLf + 1 - start > this.maxLine) return null;
    const data = this.consume(end - start);
    return { type: 'line', data, startsMessage: true, startsLine: true, complete: true, literal: null, lines };
  }

  private streamPartial(): LineSegment {
    const data = this.lineParts.length === 1 ? this.lineParts[0] : Buffer.concat(this.lineParts);
    const startsLine = !this.lineStreamed;
    const startsMessage = startsLine && !this.inMessage;
    if (startsMessage) this.beginMessage(data);
    this.lineTail = tailOf(Buffer.concat([this.lineTail, data]));
    this.lineParts = [];
    this.lineLength = 0;
    this.lineStreamed = true;
    return { type: 'line', data, startsMessage, startsLine, complete: false, literal: null, lines: 0 };
  }

  private finishLine(lastPiece: Buffer): LineSegment {
    let data: Buffer;
    if (this.lineParts.length === 0) {
      data = lastPiece;
    } else {
      this.lineParts.push(lastPiece);
      data = Buffer.concat(this.lineParts);
    }
    const startsLine = !this.lineStreamed;
    const startsMessage = startsLine && !this.inMessage;
    if (startsMessage) this.beginMessage(data);
    const tail = this.lineStreamed ? tailOf(Buffer.concat([this.lineTail, data])) : data;
    this.resetLine();

    const literal = this.textOnly ? null : parseLiteralAtEnd(tail);
    if (literal && this.side === 'server') literal.sync = false; // servers never wait for "+"
    if (!literal) {
      this.endMessage();
    } else if (literal.sync) {
      this.pendingSync = literal;
    } else {
      this.literalRemaining = literal.size;
    }
    return { type: 'line', data, startsMessage, startsLine, complete: true, literal, lines: 1 };
  }

  private beginMessage(firstBytes: Buffer): void {
    this.inMessage = true;
    this.textOnly = this.side === 'server' && isTextOnlyResponse(firstBytes.subarray(0, 64));
  }

  private endMessage(): void {
    this.inMessage = false;
    this.textOnly = false;
  }

  private resetLine(): void {
    this.lineParts = [];
    this.lineLength = 0;
    this.lineStreamed = false;
    this.lineTail = EMPTY;
  }
}

function tailOf(buf: Buffer): Buffer {
  return buf.length <= TAIL_KEEP ? buf : buf.subarray(buf.length - TAIL_KEEP);
}

/** `* <digit>…` from `start` to the LF at `lf`, announcing no literal: a response complete in itself. */
function isPlainNumbered(chunk: Buffer, start: number, lf: number): boolean {
  if (lf - start < 4 || chunk[start] !== 0x2a || chunk[start + 1] !== 0x20) return false;
  const d = chunk[start + 2];
  if (d < 0x30 || d > 0x39) return false;
  // a literal announcement ends in `}` before the line end
  const last = chunk[lf - 1] === CR ? lf - 2 : lf - 1;
  return chunk[last] !== 0x7d;
}

/**
 * `… {12}\r\n`, `… {12+}\r\n`, `… ~{12}\r\n` at the end of a line → the literal it announces.
 * `line` ends with LF.
 */
export function parseLiteralAtEnd(line: Buffer): LiteralInfo | null {
  let i = line.length - 1;
  if (i < 0 || line[i] !== LF) return null;
  i--;
  if (i >= 0 && line[i] === CR) i--;
  if (i < 0 || line[i] !== 0x7d /* } */) return null;
  i--;
  let sync = true;
  if (i >= 0 && line[i] === 0x2b /* + */) {
    sync = false;
    i--;
  }
  const digitsEnd = i + 1;
  while (i >= 0 && line[i] >= 0x30 && line[i] <= 0x39) i--;
  const digits = digitsEnd - (i + 1);
  if (digits === 0 || digits > MAX_LITERAL_DIGITS) return null;
  if (i < 0 || line[i] !== 0x7b /* { */) return null;
  const size = Number(line.toString('latin1', i + 1, digitsEnd));
  const binary = i >= 1 && line[i - 1] === 0x7e; /* ~ */
  return { size, sync, binary };
}

/** Continuation requests and status responses end in resp-text: no literal there. */
export function isTextOnlyResponse(head: Buffer): boolean {
  if (head.length === 0) return false;
  if (head[0] === 0x2b /* + */) return true;
  const sp = head.indexOf(0x20);
  if (sp <= 0) return false;
  const start = sp + 1;
  // `* 12 FETCH …`, the bulk of a server's lines: a number is no status word
  if (start < head.length && head[start] >= 0x30 && head[start] <= 0x39) return false;
  let end = start;
  while (end < head.length && head[end] !== 0x20 && head[end] !== CR && head[end] !== LF) end++;
  const n = end - start;
  if (n !== 2 && n !== 3 && n !== 7) return false;
  const word = head.toString('latin1', start, end).toUpperCase();
  const tagged = !(sp === 1 && head[0] === 0x2a); /* * */
  if (word === 'OK' || word === 'NO' || word === 'BAD') return true;
  // a tagged response is never BYE/PREAUTH, but treating those as text is harmless
  return !tagged && (word === 'BYE' || word === 'PREAUTH');
}
