/**
 * The IMAP framer (src/imap/framer.ts) under generated input. Oracles:
 * - a stream generated from a model (commands or responses with literals, sync or not, granted
 *   or refused) frames into exactly the model's lines and literals, however it is chunked and
 *   whatever maxLine is, and the bytes that come out are the bytes that went in;
 * - for arbitrary bytes, any split gives the same frames as the whole, nothing throws, no byte
 *   is lost, and what the framer holds between reads stays within maxLine;
 * - a literal's payload is never scanned: replacing its bytes changes nothing else;
 * - the bytes survive the caller recycling its read buffer (ownBytes);
 * - batching numbered responses (batchNumbered) changes how lines are grouped into segments, nothing else.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { Framer, parseLiteralAtEnd, type LiteralInfo, type Segment, type Side } from '../../src/imap/framer.js';
import { fuzzAssert, fuzzRuns } from '../helpers/fuzz.js';

// ------------------------------------------------------------------------------------------
// Harness

interface Fed {
  segs: Segment[];
  /** Most bytes the framer held after a read was fully drained. */
  maxHeld: number;
  /** Bytes still unframed at the end (Framer.drain). */
  rest: Buffer;
  atBoundary: boolean;
}

/**
 * Feeds `pieces` one read at a time, draining after each; `decide(i)` grants (true) or refuses the i-th sync literal.
 * `batch`: the server side groups numbered responses (FramerOptions.batchNumbered).
 */
function feed(side: Side, pieces: readonly Buffer[], maxLine: number, decide: (i: number) => boolean, batch = false): Fed {
  const f = new Framer({ side, maxLine, batchNumbered: batch });
  const segs: Segment[] = [];
  let asked = 0;
  let maxHeld = 0;
  for (const piece of pieces) {
    f.push(piece);
    for (;;) {
      const seg = f.next();
      if (seg) {
        segs.push(seg);
        continue;
      }
      if (!f.awaitingContinuation) break;
      if (decide(asked++)) f.grantContinuation();
      else f.refuseContinuation();
    }
    maxHeld = Math.max(maxHeld, f.buffered);
  }
  const atBoundary = f.atBoundary;
  return { segs, maxHeld, rest: f.drain(), atBoundary };
}

function split(input: Buffer, cuts: readonly number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => (input.length > 1 ? 1 + (c % (input.length - 1)) : 0)))]
    .filter((c) => c > 0 && c < input.length)
    .sort((a, b) => a - b);
  const out: Buffer[] = [];
  let prev = 0;
  for (const p of [...points, input.length]) {
    if (p > prev) out.push(input.subarray(prev, p));
    prev = p;
  }
  return out;
}

/** How an input is cut into reads: at random points, byte by byte, or not at all. */
type Cut = { cuts: number[] } | 'bytes' | 'whole';
const chunking: fc.Arbitrary<Cut> = fc.oneof(
  { weight: 6, arbitrary: fc.array(fc.nat(), { maxLength: 40 }).map((cuts) => ({ cuts })) },
  { weight: 1, arbitrary: fc.constant<Cut>('bytes') },
  { weight: 1, arbitrary: fc.constant<Cut>('whole') },
);

function cut(input: Buffer, how: Cut): Buffer[] {
  if (how === 'whole') return input.length ? [input] : [];
  if (how === 'bytes') return [...input].map((x) => Buffer.from([x]));
  return split(input, how.cuts);
}

/** A line or a literal as the session sees it once partial segments are put back together. */
type Token =
  | { t: 'line'; data: string; startsMessage: boolean; literal: LiteralInfo | null; complete: boolean }
  | { t: 'literal'; data: string; complete: boolean };

function ok(cond: boolean, what: string): asserts cond {
  if (!cond) throw new Error(what);
}

/**
 * A batch of numbered responses as the single-line segments it stands for, after checking it is one: complete,
 * `lines` lines each `* <digit>…` ending at its LF, none announcing a literal, all outside any message.
 */
function unbatch(s: Segment): Segment[] {
  if (s.type !== 'line' || s.lines <= 1) return [s];
  ok(s.complete && s.startsMessage && s.startsLine && s.literal === null, 'batch flags wrong');
  const out: Segment[] = [];
  let start = 0;
  for (let lf = s.data.indexOf(0x0a); lf >= 0; lf = s.data.indexOf(0x0a, start)) {
    const line = s.data.subarray(start, lf + 1);
    ok(/^\* \d/.test(line.toString('latin1', 0, 3)), 'batched line not numbered');
    ok(parseLiteralAtEnd(line) === null, 'batched line announces a literal');
    out.push({ ...s, data: line, lines: 1 });
    start = lf + 1;
  }
  ok(start === s.data.length && out.length === s.lines, 'batch line count wrong');
  return out;
}

/**
 * Joins partial line segments and literal pieces, checking the flags of every segment on the
 * way: only a line's first segment starts it (and maybe a message), partial segments carry no
 * literal, a literal's `remaining` counts down to 0.
 */
function tokens(batched: readonly Segment[]): Token[] {
  const segs = batched.flatMap(unbatch);
  const out: Token[] = [];
  let line: Buffer[] | null = null;
  let startsMessage = false;
  let literal: Buffer[] | null = null;
  let remaining = -1;
  for (const s of segs) {
    ok(s.data.length > 0, 'empty segment');
    if (s.type === 'literal') {
      ok(line === null, 'literal inside a line');
      ok(remaining < 0 || s.remaining === remaining - s.data.length, 'literal remaining does not count down');
      (literal ??= []).push(s.data);
      remaining = s.remaining;
      if (s.remaining === 0) {
        out.push({ t: 'literal', data: Buffer.concat(literal).toString('latin1'), complete: true });
        literal = null;
        remaining = -1;
      }
      continue;
    }
    ok(literal === null, 'line inside a literal');
    ok(s.startsLine === (line === null), 'startsLine wrong');
    ok(!s.startsMessage || s.startsLine, 'startsMessage on a continued line');
    if (line === null) {
      line = [];
      startsMessage = s.startsMessage;
    }
    line.push(s.data);
    if (!s.complete) {
      ok(s.literal === null && !s.data.includes(0x0a), 'partial segment with a literal or LF');
      continue;
    }
    ok(s.data.indexOf(0x0a) === s.data.length - 1, 'complete line not ending at its only LF');
    out.push({ t: 'line', data: Buffer.concat(line).toString('latin1'), startsMessage, literal: s.literal, complete: true });
    line = null;
  }
  if (line) out.push({ t: 'line', data: Buffer.concat(line).toString('latin1'), startsMessage, literal: null, complete: false });
  if (literal) out.push({ t: 'literal', data: Buffer.concat(literal).toString('latin1'), complete: false });
  return out;
}

/**
 * The frames of a fed stream with what the framer still holds appended to the unfinished last
 * line: how much of that line was emitted as partial segments depends on the chunking.
 */
function view(fed: Fed): Token[] {
  const out = tokens(fed.segs);
  const last = out[out.length - 1];
  if (last && last.t === 'line' && !last.complete) {
    out[out.length - 1] = { ...last, data: last.data + fed.rest.toString('latin1'), startsMessage: false };
  } else if (fed.rest.length > 0) {
    out.push({ t: 'line', data: fed.rest.toString('latin1'), startsMessage: false, literal: null, complete: false });
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// A model of valid streams

interface LiteralModel {
  sync: boolean;
  binary: boolean;
  /** Client side: whether the server grants a synchronizing literal (refused: no payload follows). */
  granted: boolean;
  payload: Buffer;
}
interface LineModel {
  text: Buffer;
  eol: '\r\n' | '\n';
  literal: LiteralModel | null;
}
type MessageModel = LineModel[];

const b = (s: string) => Buffer.from(s, 'latin1');

/** Bytes of a line body: anything but LF, with IMAP punctuation and now and then a long run. */
const lineText = fc
  .array(
    fc.oneof(
      { weight: 4, arbitrary: fc.uint8Array({ maxLength: 12 }).map((a) => Buffer.from(a.map((x) => (x === 0x0a ? 0x20 : x)))) },
      {
        weight: 3,
        arbitrary: fc
          .constantFrom('A1 ', '* ', 'OK', ' {5}', '{12+}', '~{3}', '{0}', ' {1234567890123456}', '}', '{', '"', '\r', ' ', '(', ')', 'BODY[] ', 'x'.repeat(70))
          .map(b),
      },
    ),
    { maxLength: 8 },
  )
  .map((parts) => Buffer.concat(parts));

/** The last line of a message must not announce a literal (up to 15 digits is one). */
const plainLineText = lineText.map((t) => (/\{\d{1,15}\+?\}\r?$/.test(t.toString('latin1')) ? Buffer.concat([t, b('x')]) : t));

/** Payloads are anything, often bytes that would mean something if the framer scanned them. */
const payload = fc.oneof(
  fc.uint8Array({ maxLength: 80 }).map((a) => Buffer.from(a)),
  fc
    .array(fc.constantFrom('\r\n', '\n', 'A1 OK done {5}\r\n', '* 1 FETCH (BODY[] {3}\r\nabc)\r\n', '{99}\r\n', '~{4+}\r\n', '+ go\r\n', 'x'.repeat(150)), {
      maxLength: 4,
    })
    .map((parts) => b(parts.join(''))),
  fc.constant(Buffer.alloc(0)),
);

const eol = fc.constantFrom<'\r\n' | '\n'>('\r\n', '\r\n', '\n');

const literalModel = fc.record({ sync: fc.boolean(), binary: fc.boolean(), granted: fc.oneof(fc.constant(true), fc.boolean()), payload });

const announcedLine = fc.record({ text: lineText, eol, literal: literalModel }).map(
  (l): LineModel => ({
    ...l,
    // without `~` of its own the text must not end in one: `x~` + `{5}` would be literal8
    text: !l.literal.binary && l.text[l.text.length - 1] === 0x7e ? Buffer.concat([l.text, b('x')]) : l.text,
  }),
);

/** A client command: lines announcing literals, then a last line without one. */
const clientMessage = fc
  .tuple(fc.array(announcedLine, { maxLength: 3 }), fc.record({ text: plainLineText, eol }))
  .map(([withLiterals, last]): MessageModel => [...withLiterals, { ...last, literal: null }]);

const STATUS_HEADS = ['* OK', '* no', '* BAD', '* BYE', '* PREAUTH', 'A1 OK', 'a2 NO', 'tag.3 BAD', '+', '+ '];
const DATA_HEADS = ['* 1 FETCH (BODY[] ', '* LIST () "/" ', '* 3 EXISTS', '* 12 FETCH (FLAGS (\\Seen)) ', '* 4 EXPUNGE', '* CAPABILITY IMAP4rev1 ', '* SEARCH ', 'X1 FOO ', '* ok-not-status '];

/** A server response: a status/continuation line (its text may end in `{n}`: still text), or data with literals. */
const serverMessage = fc.oneof(
  fc
    .record({ head: fc.constantFrom(...STATUS_HEADS), text: lineText, eol })
    .map(({ head, text, eol: e }): MessageModel => [
      { text: head.startsWith('+') || text.length === 0 ? Buffer.concat([b(head), text]) : Buffer.concat([b(`${head} `), text]), eol: e, literal: null },
    ]),
  fc
    .tuple(fc.constantFrom(...DATA_HEADS), clientMessage)
    .map(([head, lines]): MessageModel => lines.map((l, i) => (i === 0 ? { ...l, text: Buffer.concat([b(head), l.text]) } : l))),
);

function announcement(l: LiteralModel): string {
  return `${l.binary ? '~' : ''}{${l.payload.length}${l.sync ? '' : '+'}}`;
}

/** The bytes of a stream, the tokens it must frame into, and the grant decisions for its sync literals. */
function render(side: Side, messages: readonly MessageModel[]): { input: Buffer; expected: Token[]; decisions: boolean[] } {
  const bytes: Buffer[] = [];
  const expected: Token[] = [];
  const decisions: boolean[] = [];
  for (const message of messages) {
    for (let i = 0; i < message.length; i++) {
      const l = message[i]!;
      const data = Buffer.concat([l.text, b(l.literal ? announcement(l.literal) : ''), b(l.eol)]);
      bytes.push(data);
      const info = l.literal ? { size: l.literal.payload.length, sync: side === 'client' && l.literal.sync, binary: l.literal.binary } : null;
      expected.push({ t: 'line', data: data.toString('latin1'), startsMessage: i === 0, literal: info, complete: true });
      if (!l.literal) continue;
      if (info!.sync) {
        decisions.push(l.literal.granted);
        if (!l.literal.granted) break; // refused: the client sends no literal and the command is over
      }
      bytes.push(l.literal.payload);
      if (l.literal.payload.length > 0) expected.push({ t: 'literal', data: l.literal.payload.toString('latin1'), complete: true });
    }
  }
  return { input: Buffer.concat(bytes), expected, decisions };
}

const stream = (side: Side) => fc.array(side === 'client' ? clientMessage : serverMessage, { minLength: 1, maxLength: 6 });

/**
 * maxLine for a side. Server status lines are recognised from the first 64 bytes of their first
 * segment, and a streamed line's first segment is always longer than maxLine, so the server side
 * runs with maxLine >= 64 (the proxy uses 64 KiB and more); the client side with anything.
 */
const maxLineFor = (side: Side) => (side === 'server' ? fc.integer({ min: 64, max: 400 }) : fc.integer({ min: 1, max: 400 }));

const sideArb = fc.constantFrom<Side>('client', 'server');

// ------------------------------------------------------------------------------------------

describe('framer properties', () => {
  it('frames a generated stream into exactly its model, however it is chunked, with numbered responses batched or not', () => {
    const prop = fc.property(
      sideArb.chain((side) => fc.tuple(fc.constant(side), stream(side), maxLineFor(side), chunking, fc.boolean())),
      ([side, messages, maxLine, how, batch]) => {
        const { input, expected, decisions } = render(side, messages);
        const fed = feed(side, cut(input, how), maxLine, (i) => decisions[i] ?? true, batch);
        expect(Buffer.concat(fed.segs.map((s) => s.data)).equals(input)).toBe(true); // byte for byte
        expect(tokens(fed.segs)).toEqual(expected);
        expect(fed.rest.length).toBe(0);
        expect(fed.atBoundary).toBe(true);
        expect(fed.maxHeld).toBeLessThanOrEqual(maxLine);
      },
    );
    fuzzAssert(prop, fuzzRuns(400));
  });

  it('never scans a literal: other payload bytes of the same length change nothing else', () => {
    const prop = fc.property(
      sideArb.chain((side) => fc.tuple(fc.constant(side), stream(side), maxLineFor(side), chunking, fc.uint8Array({ minLength: 1, maxLength: 1 }))),
      ([side, messages, maxLine, how, [fill]]) => {
        const blank = messages.map((m) => m.map((l) => (l.literal ? { ...l, literal: { ...l.literal, payload: Buffer.alloc(l.literal.payload.length, fill!) } } : l)));
        const a = render(side, messages);
        const z = render(side, blank);
        const ta = tokens(feed(side, cut(a.input, how), maxLine, (i) => a.decisions[i] ?? true).segs);
        const tz = tokens(feed(side, cut(z.input, how), maxLine, (i) => z.decisions[i] ?? true).segs);
        expect(tz.map((t) => (t.t === 'literal' ? { ...t, data: '' } : t))).toEqual(ta.map((t) => (t.t === 'literal' ? { ...t, data: '' } : t)));
      },
    );
    fuzzAssert(prop, fuzzRuns(300));
  });

  /** Arbitrary bytes, weighted towards the ones the framer looks at. */
  const garbage = fc
    .array(
      fc.oneof(
        fc.uint8Array({ maxLength: 64 }).map((a) => Buffer.from(a)),
        fc.constantFrom('\r\n', '\n', '\r', '{', '}', '~{', '+}', '{5}\r\n', '{0+}\r\n', '~{2}\n', '{99999}\r\n', '{1234567890123456}\r\n', '* OK ', 'A1 NO ', '+ ', '* 1 FETCH ', '* 9 X\r\n', '* 10 FETCH (FLAGS ())\r\n', 'x'.repeat(100)).map(b),
        fc.nat({ max: 20 }).map((n) => b(`{${n}}\r\n`)),
      ),
      { maxLength: 40 },
    )
    .map((parts) => Buffer.concat(parts));

  it('gives the same frames for any split of arbitrary bytes, never throws, loses nothing and holds at most maxLine', () => {
    const prop = fc.property(
      sideArb.chain((side) => fc.tuple(fc.constant(side), garbage, maxLineFor(side), chunking, fc.array(fc.boolean(), { minLength: 1, maxLength: 8 }), fc.boolean())),
      ([side, input, maxLine, how, grants, batch]) => {
        const decide = (i: number) => grants[i % grants.length]!;
        const whole = feed(side, input.length ? [input] : [], maxLine, decide);
        // the same bytes batched (server side) and split differently frame into the same lines
        const split = feed(side, cut(input, how), maxLine, decide, batch);
        expect(Buffer.concat([...split.segs.map((s) => s.data), split.rest]).equals(input)).toBe(true);
        expect(Buffer.concat([...whole.segs.map((s) => s.data), whole.rest]).equals(input)).toBe(true);
        expect(view(split)).toEqual(view(whole));
        expect(split.maxHeld).toBeLessThanOrEqual(maxLine);
        expect(whole.maxHeld).toBeLessThanOrEqual(maxLine);
      },
    );
    fuzzAssert(prop, fuzzRuns(400));
  });

  it('keeps its bytes when the caller recycles the read buffer (ownBytes)', () => {
    const prop = fc.property(
      sideArb.chain((side) => fc.tuple(fc.constant(side), stream(side), maxLineFor(side))),
      fc.array(fc.integer({ min: 1, max: 40 }), { minLength: 1, maxLength: 300 }),
      ([side, messages], sizes) => {
        const { input, decisions } = render(side, messages);
        const f = new Framer({ side, maxLine: 64 });
        const recycled = Buffer.alloc(64);
        const out: Buffer[] = [];
        let pos = 0;
        let asked = 0;
        for (const size of sizes) {
          if (pos >= input.length) break;
          const n = Math.min(size, input.length - pos, recycled.length);
          input.copy(recycled, 0, pos, pos + n);
          pos += n;
          f.push(recycled.subarray(0, n));
          for (;;) {
            const seg = f.next();
            if (seg) {
              out.push(Buffer.from(seg.data)); // consumed at once, as the session does
              continue;
            }
            if (!f.awaitingContinuation) break;
            if (decisions[asked++] ?? true) f.grantContinuation();
            else f.refuseContinuation();
          }
          f.ownBytes();
          recycled.fill(0x58); // the next read overwrites the buffer
        }
        expect(Buffer.concat([...out, f.drain()]).equals(input.subarray(0, pos))).toBe(true);
      },
    );
    fuzzAssert(prop, fuzzRuns(300));
  });
});
