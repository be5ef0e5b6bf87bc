/**
 * Line codec of the embedded store's files. Every line is
 *
 *   <crc32 of JSON, 8 lowercase hex> <space> <JSON object> <LF>
 *
 * and every JSON object has a string `type`. Files:
 *   store.journal   first line {"type":"journal","format":1,"gen":G}, then one line per mutation, appended, fsync'ed:
 *                     {"type":"reg.put","reg":{…}}                          a registration, inserted or replaced
 *                     {"type":"reg.del","user":…,"token":…}                 a registration removed; when it was the
 *                                                                           user's last one, the user's mailbox
 *                                                                           states go with it (no line of their own)
 *                     {"type":"mbx.put","user":…,"mailbox":…,               the last STATUS a watcher saw of one
 *                      "status":{"uidValidity":V,"uidNext":N,"messages":M}} mailbox (MailboxStateStore), replaced
 *   store.snapshot  first line {"type":"snapshot","format":1,"gen":G,"records":N,"bodyBytes":B,"sha256":…}, then N
 *                   put lines (B bytes whose SHA-256 is given): every live reg.put, then the mbx.put lines of the
 *                   users that have one; written to a temp file, fsync'ed, renamed.
 * `mbx.put` was added without changing `format`: files without it (older versions) load unchanged; a file with it
 * is refused by an older version as "unknown record type" (no silent loss on a downgrade). Later record types are new
 * `type` values the same way.
 */
import { crc32 } from './crc32.js';
import { StoreCorruptError } from './types.js';

export const FORMAT = 1;

export interface RecordBase {
  type: string;
  [k: string]: unknown;
}

export function encodeLine(rec: RecordBase): Buffer {
  const json = Buffer.from(JSON.stringify(rec), 'utf8');
  const out = Buffer.allocUnsafe(json.length + 10);
  out.write(crc32(json).toString(16).padStart(8, '0'), 0, 'latin1');
  out[8] = 0x20;
  json.copy(out, 9);
  out[out.length - 1] = 0x0a;
  return out;
}

export function corrupt(file: string, offset: number, problem: string): StoreCorruptError {
  return new StoreCorruptError(`store file ${file} is damaged at byte offset ${offset}: ${problem}`, { file, offset });
}

const HEX = /^[0-9a-f]{8}$/;

/** Parses the line buf[start, end) (end = index of its LF). Throws StoreCorruptError naming file and offset. */
export function parseLine(buf: Buffer, start: number, end: number, file: string): RecordBase {
  if (end - start < 11) throw corrupt(file, start, 'record too short');
  const crcHex = buf.toString('latin1', start, start + 8);
  if (!HEX.test(crcHex) || buf[start + 8] !== 0x20) throw corrupt(file, start, 'record does not start with a checksum');
  if (crc32(buf, start + 9, end) !== parseInt(crcHex, 16)) throw corrupt(file, start, 'checksum mismatch');
  let v: unknown;
  try {
    v = JSON.parse(buf.toString('utf8', start + 9, end));
  } catch {
    throw corrupt(file, start, 'record is not valid JSON');
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v) || typeof (v as RecordBase).type !== 'string') {
    throw corrupt(file, start, 'record has no type');
  }
  return v as RecordBase;
}

export interface ParsedLine { offset: number; rec: RecordBase }

/**
 * Splits buf into checked records. A final segment without LF is returned as `torn` (callers decide whether that
 * is tolerable); damage anywhere else throws.
 */
export function parseLines(buf: Buffer, file: string, from = 0): { lines: ParsedLine[]; torn?: { offset: number; bytes: number } } {
  const lines: ParsedLine[] = [];
  let off = from;
  while (off < buf.length) {
    const nl = buf.indexOf(0x0a, off);
    if (nl < 0) return { lines, torn: { offset: off, bytes: buf.length - off } };
    lines.push({ offset: off, rec: parseLine(buf, off, nl, file) });
    off = nl + 1;
  }
  return { lines };
}
