import { describe, expect, it } from 'vitest';
import { crc32 } from '../../../src/store/crc32.js';
import { encodeLine, parseLines } from '../../../src/store/records.js';
import { StoreCorruptError } from '../../../src/store/types.js';

describe('crc32', () => {
  it('matches the standard check values', () => {
    expect(crc32(Buffer.from('123456789'))).toBe(0xcbf43926);
    expect(crc32(Buffer.alloc(0))).toBe(0);
    expect(crc32(Buffer.from('The quick brown fox jumps over the lazy dog'))).toBe(0x414fa339);
  });
});

describe('record lines', () => {
  it('round-trip, with the torn tail reported separately', () => {
    const a = encodeLine({ type: 'x', v: 'ünï\ncode' });
    const b = encodeLine({ type: 'y', n: 1 });
    expect(a.at(-1)).toBe(0x0a);
    expect(a.subarray(0, -1).includes(0x0a)).toBe(false);
    const buf = Buffer.concat([a, b, b.subarray(0, 5)]);
    const { lines, torn } = parseLines(buf, 'f');
    expect(lines.map((l) => l.rec)).toEqual([{ type: 'x', v: 'ünï\ncode' }, { type: 'y', n: 1 }]);
    expect(lines.map((l) => l.offset)).toEqual([0, a.length]);
    expect(torn).toEqual({ offset: a.length + b.length, bytes: 5 });
  });

  it('reports damage with file and offset', () => {
    const a = encodeLine({ type: 'x' });
    const b = Buffer.from(encodeLine({ type: 'y', n: 12345 }));
    b[20] = 0x39 - (b[20] === 0x39 ? 1 : 0);
    try {
      parseLines(Buffer.concat([a, b]), '/data/store.journal');
      expect.unreachable();
    } catch (err) {
      expect(err).toBeInstanceOf(StoreCorruptError);
      expect((err as StoreCorruptError).offset).toBe(a.length);
      expect((err as Error).message).toBe(`store file /data/store.journal is damaged at byte offset ${a.length}: checksum mismatch`);
    }
  });
});
