/**
 * The idle-capacity benchmark's clients, in their own process (forked by bench/idle-capacity.ts):
 * thousands of IMAP sessions that connect (implicit TLS or plain), LOGIN, SELECT INBOX and IDLE,
 * then sit there, as idling phones and desktop clients do.
 *
 * Requests:
 *   { type: 'open', host, port, tls, count, concurrency, user, password } → OpenResult
 *   { type: 'status' }                      → { alive, lost }
 *   { type: 'probe', sample }               → DONE + NOOP + IDLE again on `sample` sessions spread over all
 *   { type: 'closeAll' }                    → destroys every session, waits until all are closed
 */
import net from 'node:net';
import tls from 'node:tls';
import { serveRequests } from '../lib/peer.js';

interface Conn {
  sock: net.Socket;
  buf: string;
  /** Resolves on the first line matching, rejects on close/timeout. */
  want: { re: RegExp; resolve: (line: string) => void; reject: (e: Error) => void } | null;
  closed: boolean;
  expectedOpen: boolean;
}

const conns: Conn[] = [];
let lost = 0;
const STEP_TIMEOUT_MS = 30_000;

function expect(c: Conn, re: RegExp): Promise<string> {
  return new Promise<string>((resolve, reject) => {
    if (c.closed) return reject(new Error('connection closed'));
    const timer = setTimeout(() => {
      c.want = null;
      reject(new Error(`timeout waiting for ${re}`));
    }, STEP_TIMEOUT_MS);
    c.want = {
      re,
      resolve: (l) => {
        clearTimeout(timer);
        resolve(l);
      },
      reject: (e) => {
        clearTimeout(timer);
        reject(e);
      },
    };
  });
}

function onData(c: Conn, chunk: string): void {
  c.buf += chunk;
  for (let i = c.buf.indexOf('\n'); i >= 0; i = c.buf.indexOf('\n')) {
    const line = c.buf.slice(0, i);
    c.buf = c.buf.slice(i + 1);
    const w = c.want;
    if (w && w.re.test(line)) {
      c.want = null;
      w.resolve(line);
    }
  }
}

interface TlsOpt {
  ca: string;
  servername: string;
}

const quote = (s: string) => `"${s.replace(/["\\]/g, '\\$&')}"`;

async function openOne(host: string, port: number, t: TlsOpt | null, user: string, password: string): Promise<Conn> {
  const sock = t ? tls.connect({ host, port, ca: t.ca, servername: t.servername }) : net.connect({ host, port });
  sock.setEncoding('latin1');
  const c: Conn = { sock, buf: '', want: null, closed: false, expectedOpen: false };
  sock.on('data', (d: string) => onData(c, d));
  sock.on('error', () => undefined);
  sock.on('close', () => {
    c.closed = true;
    if (c.expectedOpen) lost++;
    c.want?.reject(new Error('connection closed'));
    c.want = null;
  });
  try {
    await expect(c, /^\* OK/);
    sock.write(`a LOGIN ${quote(user)} ${quote(password)}\r\n`);
    const login = await expect(c, /^a /);
    if (!/^a OK/.test(login)) throw new Error(`LOGIN: ${login.trim()}`);
    sock.write('b SELECT INBOX\r\n');
    const sel = await expect(c, /^b /);
    if (!/^b OK/.test(sel)) throw new Error(`SELECT: ${sel.trim()}`);
    sock.write('c IDLE\r\n');
    await expect(c, /^\+/);
  } catch (err) {
    sock.destroy();
    throw err;
  }
  c.expectedOpen = true;
  return c;
}

interface OpenRequest {
  host: string;
  port: number;
  tls: TlsOpt | null;
  count: number;
  concurrency: number;
  user: string;
  password: string;
}

async function openMany(r: OpenRequest): Promise<{ opened: number; failed: number; errors: string[]; ms: number; total: number }> {
  const t0 = performance.now();
  let next = 0;
  let opened = 0;
  let failed = 0;
  const errors = new Map<string, number>();
  const worker = async () => {
    while (next < r.count) {
      next++;
      try {
        conns.push(await openOne(r.host, r.port, r.tls, r.user, r.password));
        opened++;
      } catch (err) {
        failed++;
        const m = (err as Error).message;
        errors.set(m, (errors.get(m) ?? 0) + 1);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(r.concurrency, r.count) }, worker));
  return {
    opened,
    failed,
    errors: [...errors].map(([m, n]) => `${n}× ${m}`).slice(0, 5),
    ms: performance.now() - t0,
    total: conns.filter((c) => !c.closed).length,
  };
}

/** DONE (expect the IDLE's OK), NOOP, IDLE again, on `sample` sessions spread over all: are they alive? */
async function probe(sample: number): Promise<{ probed: number; ok: number; failures: string[]; p50Ms: number; maxMs: number }> {
  const live = conns.filter((c) => !c.closed);
  const pick = Array.from({ length: Math.min(sample, live.length) }, (_, i) => live[Math.floor((i * live.length) / Math.min(sample, live.length))]!);
  const times: number[] = [];
  const failures: string[] = [];
  let ok = 0;
  let n = 0;
  await Promise.all(
    pick.map(async (c) => {
      const k = ++n;
      const t0 = performance.now();
      try {
        c.sock.write('DONE\r\n');
        const done = await expect(c, /^c /);
        if (!/^c OK/.test(done)) throw new Error(`IDLE ended with ${done.trim()}`);
        c.sock.write(`p${k} NOOP\r\n`);
        const noop = await expect(c, new RegExp(`^p${k} `));
        if (!/ OK/.test(noop)) throw new Error(`NOOP: ${noop.trim()}`);
        c.sock.write('c IDLE\r\n');
        await expect(c, /^\+/);
        times.push(performance.now() - t0);
        ok++;
      } catch (err) {
        failures.push((err as Error).message);
      }
    }),
  );
  times.sort((a, b) => a - b);
  return { probed: pick.length, ok, failures: failures.slice(0, 5), p50Ms: times[times.length >> 1] ?? NaN, maxMs: times[times.length - 1] ?? NaN };
}

async function closeAll(): Promise<{ closed: number }> {
  const all = conns.splice(0);
  for (const c of all) {
    c.expectedOpen = false;
    c.sock.destroy();
  }
  const deadline = Date.now() + 30_000;
  while (all.some((c) => !c.closed) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  return { closed: all.length };
}

serveRequests(async (msg) => {
  switch (msg.type) {
    case 'open':
      return openMany(msg as unknown as OpenRequest);
    case 'status':
      return { alive: conns.filter((c) => !c.closed).length, lost };
    case 'probe':
      return probe(Number(msg.sample));
    case 'closeAll':
      return closeAll();
    default:
      throw new Error(`unknown request ${msg.type}`);
  }
});
