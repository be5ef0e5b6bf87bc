import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { classifyResponse, isNumberedData, type ResponseHead, type Status } from '../../../src/imap/response.js';
import { isTextOnlyResponse } from '../../../src/imap/framer.js';
import { fuzzRuns } from '../../helpers/fuzz.js';

/**
 * The byte-level classifiers against a plain reading of the same rules with regular expressions over the
 * latin1 text: the relay runs the byte versions on every server line, so they must agree everywhere.
 */
function classifyByRegex(line: Buffer): ResponseHead {
  if (line.length === 0) return { kind: 'unknown' };
  if (line[0] === 0x2b) return { kind: 'continuation' };
  const head = line.toString('latin1', 0, Math.min(line.length, 256));
  const m = /^(\S+) (\S+?)(?: (\S+?))?(?=[ \r\n]|$)/.exec(head);
  if (!m) return { kind: 'unknown' };
  const [, tag, w1, w2] = m;
  const word = w1.toUpperCase();
  if (tag === '*') {
    if (['OK', 'NO', 'BAD', 'BYE', 'PREAUTH'].includes(word)) return { kind: 'status', status: word as Status };
    if (/^\d+$/.test(w1) && w2) return { kind: 'data', name: w2.toUpperCase() };
    return { kind: 'data', name: word };
  }
  if (word === 'OK' || word === 'NO' || word === 'BAD') return { kind: 'tagged', tag, status: word };
  return { kind: 'unknown' };
}

function textOnlyByRegex(head: Buffer): boolean {
  const text = head.toString('latin1');
  if (text.startsWith('+')) return true;
  const m = /^([^ ]+) ([^ \r\n]*)/.exec(text);
  if (!m) return false;
  const word = m[2].toUpperCase();
  if (!['OK', 'NO', 'BAD', 'BYE', 'PREAUTH'].includes(word)) return false;
  return m[1] === '*' || word === 'OK' || word === 'NO' || word === 'BAD';
}

const pieces = ['*', '+', ' ', '  ', '\t', '\r', '\n', '\r\n', '\xa0', '\x0b', '\x85', '12', '0', 'OK', 'ok', 'No', 'BAD', 'BYE', 'PREAUTH',
  'preauth', 'FETCH', 'exists', 'CAPABILITY', 'A1', 'tag', '(', ')', '[', ']', '{5}', 'é', '\xff', 'x'.repeat(120)];
const lines = fc.array(fc.oneof(fc.constantFrom(...pieces), fc.string({ maxLength: 4 })), { maxLength: 12 }).map((a) => Buffer.from(a.join(''), 'latin1'));

describe('response classification by bytes', () => {
  it('agrees with the regular-expression reading on generated lines', () => {
    fc.assert(
      fc.property(lines, (line) => {
        expect(classifyResponse(line)).toEqual(classifyByRegex(line));
      }),
      { numRuns: fuzzRuns(2000) },
    );
  });

  it('agrees on lines whose head is cut at 256 bytes', () => {
    for (const line of ['* ' + 'A'.repeat(300) + '\r\n', 'T'.repeat(255) + ' OK\r\n', 'T'.repeat(253) + ' OK\r\n', '* 1 ' + 'F'.repeat(260)]) {
      const buf = Buffer.from(line, 'latin1');
      expect(classifyResponse(buf)).toEqual(classifyByRegex(buf));
    }
  });

  it('reads the common shapes', () => {
    const b = (s: string) => Buffer.from(s, 'latin1');
    expect(classifyResponse(b('* 12 fetch (FLAGS ())\r\n'))).toEqual({ kind: 'data', name: 'FETCH' });
    expect(classifyResponse(b('A7 no [TRYCREATE] x\r\n'))).toEqual({ kind: 'tagged', tag: 'A7', status: 'NO' });
    expect(classifyResponse(b('* PREAUTH hi\r\n'))).toEqual({ kind: 'status', status: 'PREAUTH' });
    expect(classifyResponse(b('A7 BYE x\r\n'))).toEqual({ kind: 'unknown' });
    expect(isNumberedData(b('* 3 EXISTS\r\n'))).toBe(true);
    expect(isNumberedData(b('* OK x\r\n'))).toBe(false);
    expect(isNumberedData(b('A1 OK\r\n'))).toBe(false);
  });

  it('knows text-only responses as the regular-expression reading does', () => {
    fc.assert(
      fc.property(lines, (line) => {
        const head = line.subarray(0, 64);
        expect(isTextOnlyResponse(head)).toBe(textOnlyByRegex(head));
      }),
      { numRuns: fuzzRuns(2000) },
    );
  });
});
