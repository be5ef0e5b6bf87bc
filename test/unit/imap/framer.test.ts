import { describe, expect, it } from 'vitest';
import { Framer, parseLiteralAtEnd, type Segment } from '../../../src/imap/framer.js';

function drain(f: Framer): Segment[] {
  const out: Segment[] = [];
  for (let s = f.next(); s; s = f.next()) out.push(s);
  return out;
}

/** Frames `input` split at `cuts`, granting every sync literal; returns a readable trace. */
function frame(side: 'client' | 'server', input: Buffer, cuts: number[] = [], maxLine?: number) {
  const f = new Framer({ side, maxLine });
  const points = [...new Set(cuts.filter((c) => c > 0 && c < input.length))].sort((a, b) => a - b);
  const pieces: Buffer[] = [];
  let prev = 0;
  for (const p of [...points, input.length]) {
    pieces.push(input.subarray(prev, p));
    prev = p;
  }
  const segs: Segment[] = [];
  for (const piece of pieces) {
    f.push(piece);
    for (;;) {
      const got = drain(f);
      segs.push(...got);
      if (f.awaitingContinuation) {
        f.grantContinuation();
        continue;
      }
      if (got.length === 0) break;
    }
  }
  return { segs, out: Buffer.concat(segs.map((s) => s.data)), framer: f };
}

/** Message starts and literal sizes, independent of how the bytes were chunked. */
function shape(segs: Segment[]): string {
  const parts: string[] = [];
  let literal = 0;
  for (const s of segs) {
    if (s.type === 'literal') {
      literal += s.data.length;
      if (s.remaining === 0) {
        parts.push(`L${literal}`);
        literal = 0;
      }
    } else if (s.complete) {
      parts.push(`${s.startsMessage ? 'M' : 'C'}${s.literal ? `{${s.literal.size}}` : ''}`);
    } else if (s.startsMessage) {
      parts.push('M…');
    }
  }
  return parts.join(' ');
}

const SERVER_SESSION = Buffer.from(
  '* OK [CAPABILITY IMAP4rev1 LITERAL+] ready {5}\r\n' +
    '* 1 FETCH (UID 7 BODY[] {45}\r\n* CAPABILITY IMAP4rev1 COMPRESS=DEFLATE\r\nA1 OK\r\n)\r\n' +
    '+ idling {3}\r\n' +
    '* LIST () "/" {3}\r\nFoo\r\n' +
    '* 2 FETCH (BINARY[] ~{4}\r\n\x00\x01\r\n)\r\n' +
    'A1 OK done {9}\r\n',
  'latin1',
);

describe('framer', () => {
  it('relays a server session byte-identically and finds literals only where they are', () => {
    const { segs, out } = frame('server', SERVER_SESSION);
    expect(out.equals(SERVER_SESSION)).toBe(true);
    expect(shape(segs)).toBe('M M{45} L45 C M M M{3} L3 C M{4} L4 C M');
    // greeting, FETCH with literal, + idling (text), LIST with literal, literal8 FETCH, tagged OK (text)
  });

  it('treats a trailing {n} in resp-text as text', () => {
    const { segs } = frame('server', Buffer.from('A1 NO [ALERT] quota {12}\r\n* BYE over {3}\r\n'));
    expect(segs.every((s) => s.type === 'line' && s.literal === null)).toBe(true);
  });

  it('waits for the server before a synchronizing literal and resumes on a grant', () => {
    const f = new Framer({ side: 'client' });
    f.push(Buffer.from('A1 LOGIN {5}\r\nalice secret\r\nA2 NOOP\r\n'));
    const first = drain(f);
    expect(first).toHaveLength(1);
    expect(f.awaitingContinuation).toBe(true);
    expect(f.next()).toBeNull();
    f.grantContinuation();
    const rest = drain(f);
    expect(rest.map((s) => s.data.toString())).toEqual(['alice', ' secret\r\n', 'A2 NOOP\r\n']);
    expect(rest[2].type === 'line' && rest[2].startsMessage).toBe(true);
  });

  it('treats the bytes after a refused literal as a new command', () => {
    const f = new Framer({ side: 'client' });
    f.push(Buffer.from('A1 APPEND INBOX {99999}\r\nA2 NOOP\r\n'));
    drain(f);
    expect(f.awaitingContinuation).toBe(true);
    f.refuseContinuation();
    const [next] = drain(f);
    expect(next.type === 'line' && next.startsMessage && next.data.toString()).toBe('A2 NOOP\r\n');
  });

  it('does not wait for non-synchronizing literals', () => {
    const { segs } = frame('client', Buffer.from('A1 APPEND INBOX {3+}\r\nabc\r\nA2 NOOP\r\n'));
    expect(shape(segs)).toBe('M{3} L3 C M');
  });

  it('streams over-long lines in parts and still sees the literal at their end', () => {
    const long = `* SEARCH ${'12345 '.repeat(5000)}{4}\r\nabcd\r\n* OK x\r\n`;
    const { segs, out } = frame('server', Buffer.from(long), [100, 7000, 20000, 30005], 1024);
    expect(out.toString()).toBe(long);
    const partials = segs.filter((s) => s.type === 'line' && !s.complete);
    expect(partials.length).toBeGreaterThan(1);
    expect(segs.every((s) => s.data.length <= 30005)).toBe(true);
    expect(shape(segs)).toBe('M… C{4} L4 C M');
  });

  it('parses literal headers', () => {
    expect(parseLiteralAtEnd(Buffer.from('x {12}\r\n'))).toEqual({ size: 12, sync: true, binary: false });
    expect(parseLiteralAtEnd(Buffer.from('x {0+}\r\n'))).toEqual({ size: 0, sync: false, binary: false });
    expect(parseLiteralAtEnd(Buffer.from('x ~{7}\n'))).toEqual({ size: 7, sync: true, binary: true });
    expect(parseLiteralAtEnd(Buffer.from('x {}\r\n'))).toBeNull();
    expect(parseLiteralAtEnd(Buffer.from('x {1234567890123456}\r\n'))).toBeNull();
    expect(parseLiteralAtEnd(Buffer.from('x "{5}"\r\n'))).toBeNull();
  });

  it('hands back unframed bytes on drain (STARTTLS)', () => {
    const f = new Framer({ side: 'client' });
    f.push(Buffer.from('A1 STARTTLS\r\nA2 CAPA'));
    f.push(Buffer.from('BILITY\r\n'));
    expect(f.next()?.data.toString()).toBe('A1 STARTTLS\r\n');
    expect(f.drain().toString()).toBe('A2 CAPABILITY\r\n');
    expect(f.next()).toBeNull();
    expect(f.atBoundary).toBe(true);
  });

  // Properties (any chunking, literals never scanned, bounded memory, ownBytes): test/fuzz/framer.test.ts
});

describe('batched numbered responses (batchNumbered)', () => {
  const input = Buffer.from(
    '* 1 FETCH (FLAGS (\\Seen))\r\n* 2 FETCH (FLAGS ())\r\n* 3 EXISTS\r\n* OK [UIDNEXT 9] x\r\n' +
      '* 4 FETCH (BODY[] {3}\r\nabc)\r\n* 5 EXPUNGE\r\n* 6 EXPUNGE\n' +
      'A1 OK done\r\n',
  );

  it('groups consecutive numbered responses of one read into one segment and frames the rest as usual', () => {
    const f = new Framer({ side: 'server', batchNumbered: true });
    f.push(input);
    const segs = drain(f).map((s) => [s.type, s.type === 'line' ? s.lines : 0, s.data.toString('latin1')]);
    expect(segs).toEqual([
      ['line', 3, '* 1 FETCH (FLAGS (\\Seen))\r\n* 2 FETCH (FLAGS ())\r\n* 3 EXISTS\r\n'],
      ['line', 1, '* OK [UIDNEXT 9] x\r\n'],
      ['line', 1, '* 4 FETCH (BODY[] {3}\r\n'],
      ['literal', 0, 'abc'],
      ['line', 1, ')\r\n'],
      ['line', 2, '* 5 EXPUNGE\r\n* 6 EXPUNGE\n'],
      ['line', 1, 'A1 OK done\r\n'],
    ]);
    expect(f.atBoundary).toBe(true);
  });

  it('never batches across reads, on the client side, or when not asked', () => {
    const split = new Framer({ side: 'server', batchNumbered: true });
    split.push(input.subarray(0, 30));
    split.push(input.subarray(30));
    expect(drain(split)[0]!.data.toString('latin1')).toBe('* 1 FETCH (FLAGS (\\Seen))\r\n');
    for (const f of [new Framer({ side: 'client', batchNumbered: true }), new Framer({ side: 'server' })]) {
      f.push(Buffer.from('* 1 X\r\n* 2 Y\r\n'));
      expect(drain(f).map((s) => s.data.toString('latin1'))).toEqual(['* 1 X\r\n', '* 2 Y\r\n']);
    }
  });
});
