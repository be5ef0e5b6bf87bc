/**
 * Fills one user's Maildir with a deterministic set of messages, fast: the files are written
 * straight into Maildir/cur (no delivery agent), then Dovecot is made to notice them with one
 * `doveadm mailbox status`, which syncs the maildir and assigns UIDs.
 *
 * Messages are stored with CRLF line ends and `,S=<size>,W=<size>` in the file name, so the
 * physical size equals the RFC822 size Dovecot serves: the bytes written are exactly the
 * literal bytes a `BODY.PEEK[]` fetch must return.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { prng } from '../../src/testbed/random.js';
import { runCommand } from '../../src/testbed/index.js';

export interface MailboxSpec {
  messages: number;
  seed: number;
}

export interface FilledMailbox {
  messages: number;
  /** Sum of the message sizes (what one full BODY.PEEK[] fetch returns as literal bytes). */
  totalBytes: number;
  minSize: number;
  maxSize: number;
  /** Sum of the header sizes (BODY.PEEK[HEADER] literals). */
  headerBytes: number;
  /** SHA-1 of all messages in UID order (= the literal stream of `UID FETCH 1:* BODY.PEEK[]`). */
  digest: string;
  /** Time spent writing files and letting Dovecot index them. */
  fillMs: number;
  indexMs: number;
  /** With `perMessage`: size and SHA-1 of each message, by UID - 1. */
  sizes?: number[];
  digests?: string[];
  /** With `perMessage`: the file names written into Maildir/cur, in UID order. */
  files?: string[];
}

const KB = 1024;

/**
 * Mixed sizes, 2 KB – 200 KB: 40 % log-uniform 2–20 KB (text mail), 60 % log-uniform
 * 20–200 KB (attachments). Mean ≈ 50 KB: 2000 messages ≈ 100 MB.
 */
export function messageSizes(n: number, seed: number): number[] {
  const rnd = prng(seed);
  const sizes: number[] = [];
  for (let i = 0; i < n; i++) {
    const small = rnd() < 0.4;
    const s = (small ? 2 * KB : 20 * KB) * Math.pow(10, rnd());
    sizes.push(Math.round(s));
  }
  return sizes;
}

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';

/** A pool of base64-looking text in 76-char CRLF lines, from which message bodies are cut. */
function bodyPool(bytes: number, seed: number): Buffer {
  const rnd = prng(seed ^ 0x5bd1e995);
  const lineLen = 78; // 76 + CRLF
  const lines = Math.ceil(bytes / lineLen) + 1;
  const buf = Buffer.allocUnsafe(lines * lineLen);
  let p = 0;
  for (let l = 0; l < lines; l++) {
    for (let i = 0; i < 76; i++) buf[p++] = B64.charCodeAt((rnd() * 64) | 0);
    buf[p++] = 0x0d;
    buf[p++] = 0x0a;
  }
  return buf;
}

function header(i: number, size: number): string {
  const date = new Date(Date.UTC(2024, 0, 1) + i * 60_000).toUTCString().replace('GMT', '+0000');
  return [
    `Return-Path: <sender${i % 17}@example.org>`,
    `Message-ID: <bench-${i}@xaps-proxy.bench>`,
    `Date: ${date}`,
    `From: Sender ${i % 17} <sender${i % 17}@example.org>`,
    'To: Bench User <bench@example.org>',
    `Subject: Benchmark message ${i} (${size} bytes)`,
    'MIME-Version: 1.0',
    'Content-Type: multipart/mixed; boundary="xaps-bench-boundary"',
    '',
    '--xaps-bench-boundary',
    'Content-Type: application/octet-stream; name="data.bin"',
    'Content-Transfer-Encoding: base64',
    '',
    '',
  ].join('\r\n');
}

/** The message with index i, exactly `size` bytes (at least the header plus a closing line). */
export function buildMessage(i: number, size: number, pool: Buffer, rnd: () => number): { data: Buffer; headerBytes: number } {
  const head = Buffer.from(header(i, size), 'latin1');
  const headerBytes = head.indexOf('\r\n\r\n') + 4;
  const tail = Buffer.from('\r\n--xaps-bench-boundary--\r\n', 'latin1');
  const bodyLen = Math.max(0, size - head.length - tail.length);
  // start on a line boundary somewhere in the pool, so messages differ
  const lineLen = 78;
  const maxStart = Math.max(0, pool.length - bodyLen);
  const start = Math.floor((rnd() * maxStart) / lineLen) * lineLen;
  const body = Buffer.from(pool.subarray(start, start + bodyLen));
  // the last body line must end in CRLF so the tail starts on its own line
  if (bodyLen >= 2) {
    body[bodyLen - 2] = 0x0d;
    body[bodyLen - 1] = 0x0a;
  } else if (bodyLen === 1) {
    body[0] = 0x41;
  }
  return { data: Buffer.concat([head, body, tail]), headerBytes };
}

export interface FillOptions extends MailboxSpec {
  /** The user's home (Dovecot: <dir>/mail/<user>); Maildir is created inside. */
  home: string;
  /** chown the tree to this owner (root runs mail processes as `dovecot`). */
  owner?: string;
  /** Runs doveadm against the instance. */
  doveadm(args: string[]): Promise<string>;
  user: string;
  /** Also return each message's size, SHA-1 and file name. */
  perMessage?: boolean;
}

export async function fillMaildir(opts: FillOptions): Promise<FilledMailbox> {
  const t0 = performance.now();
  const maildir = path.join(opts.home, 'Maildir');
  for (const sub of ['cur', 'new', 'tmp']) await fs.mkdir(path.join(maildir, sub), { recursive: true, mode: 0o700 });
  const sizes = messageSizes(opts.messages, opts.seed);
  const maxSize = sizes.reduce((a, b) => Math.max(a, b), 0);
  const pool = bodyPool(Math.max(maxSize * 2, 1024 * 1024), opts.seed);
  const rnd = prng(opts.seed ^ 0x27d4eb2d);
  let totalBytes = 0;
  let headerBytes = 0;
  let minSize = Infinity;
  let maxActual = 0;
  const digest = createHash('sha1');
  const perSize: number[] = [];
  const perDigest: string[] = [];
  const perFile: string[] = [];
  const base = 1_700_000_000;
  const width = String(opts.messages).length;
  // write in parallel batches: the disk is not the limit, syscalls are
  const batch = 64;
  for (let i = 0; i < opts.messages; i += batch) {
    const writes: Promise<void>[] = [];
    for (let j = i; j < Math.min(i + batch, opts.messages); j++) {
      const msg = buildMessage(j + 1, sizes[j], pool, rnd);
      totalBytes += msg.data.length;
      headerBytes += msg.headerBytes;
      minSize = Math.min(minSize, msg.data.length);
      maxActual = Math.max(maxActual, msg.data.length);
      digest.update(msg.data);
      // Dovecot assigns UIDs to new files in file-name order; the zero-padded index keeps that
      // equal to the generation order.
      const name = `${base + j}.M${String(j + 1).padStart(width, '0')}P1.xaps-bench,S=${msg.data.length},W=${msg.data.length}:2,`;
      writes.push(fs.writeFile(path.join(maildir, 'cur', name), msg.data, { mode: 0o600 }));
      if (opts.perMessage) {
        perSize.push(msg.data.length);
        perDigest.push(createHash('sha1').update(msg.data).digest('hex'));
        perFile.push(name);
      }
    }
    await Promise.all(writes);
  }
  if (opts.owner) await runCommand('chown', ['-R', opts.owner, opts.home]);
  const t1 = performance.now();
  // one sync: Dovecot reads the directory, assigns UIDs, writes its index
  const status = await opts.doveadm(['mailbox', 'status', '-u', opts.user, 'messages vsize', 'INBOX']);
  const t2 = performance.now();
  const m = /messages=(\d+)/.exec(status);
  const seen = m ? Number(m[1]) : NaN;
  if (seen !== opts.messages) {
    throw new Error(`Dovecot sees ${seen} messages in INBOX, ${opts.messages} were written (doveadm said: ${status.trim()})`);
  }
  const v = /vsize=(\d+)/.exec(status);
  if (v && Number(v[1]) !== totalBytes) {
    throw new Error(`Dovecot reports vsize=${v[1]} for INBOX, ${totalBytes} bytes were written`);
  }
  return {
    messages: opts.messages,
    totalBytes,
    headerBytes,
    minSize: opts.messages > 0 ? minSize : 0,
    maxSize: maxActual,
    digest: digest.digest('hex'),
    fillMs: t1 - t0,
    indexMs: t2 - t1,
    ...(opts.perMessage ? { sizes: perSize, digests: perDigest, files: perFile } : {}),
  };
}
