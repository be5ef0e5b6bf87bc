/**
 * The mixed IMAP workload: many concurrent clients, each looping over sessions shaped like a
 * mail client's — connect, ID, LOGIN, LIST, SELECT INBOX, a flag resync (FETCH FLAGS of the
 * whole mailbox), the headers of the newest 20 messages, then 4–10 actions (open a message:
 * FETCH BODY[], 40 %; change a flag: STORE, 25 %; NOOP poll, 15 %; save a draft and delete it:
 * APPEND + STORE \Deleted + UID EXPUNGE, 10 %; IDLE for a moment, 10 %), LOGOUT.
 *
 * Two ways to run it:
 *   closed loop (thinkMs 0): every client sends its next command as soon as the last one is
 *     answered: the most commands per second the target and everything around it manage;
 *   paced (thinkMs > 0): a pause after every answer, exponential with that mean, so the offered
 *     load is a fixed fraction of capacity and latency is service time, not queueing.
 *
 * Every answer is checked: tagged OK, each FETCH BODY[] literal has the size and SHA-1 of the
 * message written with that UID, the header FETCH returns 20 literals, the flag FETCH one
 * response per message, APPEND an APPENDUID. A mismatch is a BenchFailure (wrong bytes).
 */
import { prng } from '../../src/testbed/random.js';
import { BenchFailure } from '../lib/lifecycle.js';
import { MixClient, type Endpoint, type Reply } from './client.js';

export const OPS = [
  'ID',
  'LOGIN',
  'LIST',
  'SELECT',
  'FETCH FLAGS',
  'FETCH HEADERS',
  'FETCH BODY',
  'STORE',
  'NOOP',
  'APPEND',
  'EXPUNGE',
  'IDLE',
  'DONE',
  'LOGOUT',
] as const;
export type Op = (typeof OPS)[number];

export interface MailboxModel {
  messages: number;
  /** By UID - 1. */
  sizes: number[];
  digests: string[];
}

export interface PhaseOptions {
  endpoint: Endpoint;
  /** Client i logs in as users[i % users.length]. */
  users: { user: string; password: string }[];
  clients: number;
  box: MailboxModel;
  /** Seeds every client's choices: the same seed gives every target the same sessions. */
  seed: number;
  /** Time before the measured window (connections ramping up). */
  warmMs: number;
  measureMs: number;
  /** 0: closed loop; otherwise the mean pause after each answer (exponential). */
  thinkMs: number;
  /** How long an IDLE lasts once the server has said `+`. */
  idleHoldMs: number;
}

export interface PhaseResult {
  windowMs: number;
  /** Tagged answers received within the window (IDLE…DONE counts once). */
  commands: number;
  /** Per op: latencies (ms) of the commands sent and answered within the window. */
  latencies: Map<Op, number[]>;
  /** Connect + TLS handshake + greeting, ms, within the window. */
  connectMs: number[];
  sessions: number;
  bytes: number;
  /** CPU of this process (the load generator) during the window, ms. */
  clientCpuMs: number;
}

const quote = (s: string) => `"${s.replace(/(["\\])/g, '\\$1')}"`;

/** A small draft, 1–6 KB, different each time. */
function draft(rnd: () => number, n: number): Buffer {
  const lines = [
    'From: Bench User <bench@example.org>',
    'To: Someone <someone@example.org>',
    `Subject: Draft ${n}`,
    `Message-ID: <draft-${n}-${Math.floor(rnd() * 1e9)}@xaps-proxy.bench>`,
    'Date: Mon, 1 Jan 2024 00:00:00 +0000',
    'MIME-Version: 1.0',
    'Content-Type: text/plain; charset=us-ascii',
    '',
  ];
  const bodyLines = 15 + Math.floor(rnd() * 70);
  for (let i = 0; i < bodyLines; i++) lines.push(`Line ${i} of a draft that the benchmark saves and deletes again, ${n}.`);
  return Buffer.from(lines.join('\r\n') + '\r\n', 'latin1');
}

class Stop extends Error {}

export async function runPhase(o: PhaseOptions): Promise<PhaseResult> {
  const t0 = performance.now();
  const w0 = t0 + o.warmMs;
  const w1 = w0 + o.measureMs;
  const latencies = new Map<Op, number[]>(OPS.map((op) => [op, []]));
  const connectMs: number[] = [];
  let commands = 0;
  let sessions = 0;
  let bytes = 0;
  let cpu0: NodeJS.CpuUsage | null = null;
  let cpu1: NodeJS.CpuUsage | null = null;
  const cpuTimer0 = setTimeout(() => (cpu0 = process.cpuUsage()), o.warmMs);
  const cpuTimer1 = setTimeout(() => (cpu1 = process.cpuUsage()), o.warmMs + o.measureMs);
  const M = o.box.messages;
  const errors: Error[] = [];

  const client = async (index: number): Promise<void> => {
    const rnd = prng((o.seed * 7919 + index * 104_729 + 1) >>> 0);
    const account = o.users[index % o.users.length]!;
    const think = async () => {
      if (o.thinkMs <= 0) return;
      const ms = -Math.log(1 - rnd()) * o.thinkMs;
      await new Promise((r) => setTimeout(r, ms));
    };
    const stopping = () => performance.now() >= w1;
    let drafts = 0;

    const record = (op: Op, start: number, end: number, ms = end - start) => {
      if (end >= w0 && end <= w1) commands++;
      if (start >= w0 && end <= w1) latencies.get(op)!.push(ms);
    };
    const expectOk = (op: Op, r: Reply) => {
      if (r.status !== 'OK') throw new BenchFailure(`${op} through ${o.endpoint.host}:${o.endpoint.port} answered ${r.text}`);
    };

    // paced clients start spread out instead of all at once
    if (o.thinkMs > 0) await new Promise((r) => setTimeout(r, rnd() * o.thinkMs * 2));
    while (!stopping()) {
      const tc = performance.now();
      const c = await MixClient.connect(o.endpoint);
      const tc1 = performance.now();
      if (tc >= w0 && tc1 <= w1) connectMs.push(tc1 - tc);
      let loggedIn = false;
      const step = async (op: Op, run: () => Promise<Reply>, check?: (r: Reply) => void): Promise<Reply> => {
        if (stopping() && op !== 'LOGOUT') throw new Stop();
        await think();
        const s = performance.now();
        const r = await run();
        const e = performance.now();
        bytes += r.bytes;
        expectOk(op, r);
        check?.(r);
        record(op, s, e);
        return r;
      };
      try {
        await step('ID', () => c.command('ID ("name" "xaps-bench" "version" "1.0")'));
        await step('LOGIN', () => c.command(`LOGIN ${quote(account.user)} ${quote(account.password)}`));
        loggedIn = true;
        await step('LIST', () => c.command('LIST "" "*"'));
        await step('SELECT', () => c.command('SELECT INBOX'));
        await step('FETCH FLAGS', () => c.command(`UID FETCH 1:${M} (UID FLAGS)`), (r) => {
          if (r.fetches < M) throw new BenchFailure(`UID FETCH 1:${M} (FLAGS) returned ${r.fetches} FETCH responses, expected ${M}`);
        });
        const from = Math.max(1, M - 19);
        await step(
          'FETCH HEADERS',
          () => c.command(`UID FETCH ${from}:${M} (UID RFC822.SIZE FLAGS INTERNALDATE BODY.PEEK[HEADER.FIELDS (DATE FROM TO CC SUBJECT MESSAGE-ID CONTENT-TYPE)])`),
          (r) => {
            if (r.literalSizes.length !== M - from + 1) throw new BenchFailure(`header FETCH returned ${r.literalSizes.length} literals, expected ${M - from + 1}`);
          },
        );
        const actions = 4 + Math.floor(rnd() * 7);
        for (let a = 0; a < actions; a++) {
          const x = rnd();
          if (x < 0.4) {
            const uid = 1 + Math.floor(rnd() * M);
            await step('FETCH BODY', () => c.command(`UID FETCH ${uid} (UID BODY.PEEK[])`, true), (r) => {
              const size = o.box.sizes[uid - 1]!;
              if (r.literalSizes.length !== 1 || r.literalSizes[0] !== size) {
                throw new BenchFailure(`UID ${uid} BODY[]: literals ${JSON.stringify(r.literalSizes)}, expected one of ${size} bytes`);
              }
              if (r.literalDigests[0] !== o.box.digests[uid - 1]) throw new BenchFailure(`UID ${uid} BODY[]: content differs from the message written (SHA-1)`);
            });
          } else if (x < 0.65) {
            const uid = 1 + Math.floor(rnd() * M);
            const flag = rnd() < 0.7 ? '\\Seen' : '\\Flagged';
            const sign = rnd() < 0.5 ? '+' : '-';
            await step('STORE', () => c.command(`UID STORE ${uid} ${sign}FLAGS (${flag})`));
          } else if (x < 0.8) {
            await step('NOOP', () => c.command('NOOP'));
          } else if (x < 0.9) {
            const msg = draft(rnd, ++drafts);
            const r = await step('APPEND', () => c.append('INBOX', '(\\Seen \\Draft)', msg), (r) => {
              if (!/\[APPENDUID \d+ \d+\]/i.test(r.text)) throw new BenchFailure(`APPEND answered without APPENDUID: ${r.text}`);
            });
            const uid = Number(/\[APPENDUID \d+ (\d+)\]/i.exec(r.text)![1]);
            await step('STORE', () => c.command(`UID STORE ${uid} +FLAGS.SILENT (\\Deleted)`));
            await step('EXPUNGE', () => c.command(`UID EXPUNGE ${uid}`));
          } else {
            if (stopping()) throw new Stop();
            await think();
            const s = performance.now();
            const r = await c.idle(o.idleHoldMs);
            const e = performance.now();
            bytes += r.reply.bytes;
            expectOk('IDLE', r.reply);
            // one command; its two waits are recorded apart, the hold in neither
            if (e >= w0 && e <= w1) commands++;
            if (s >= w0 && e <= w1) {
              latencies.get('IDLE')!.push(r.idleMs);
              latencies.get('DONE')!.push(r.doneMs);
            }
          }
        }
        await step('LOGOUT', () => c.command('LOGOUT'));
        loggedIn = false;
        if (performance.now() <= w1) sessions++;
      } catch (err) {
        if (!(err instanceof Stop)) throw err;
        if (loggedIn) await step('LOGOUT', () => c.command('LOGOUT')).catch(() => undefined);
      } finally {
        c.destroy();
      }
    }
  };

  await Promise.all(
    Array.from({ length: o.clients }, (_, i) =>
      client(i).catch((err: Error) => {
        errors.push(err);
      }),
    ),
  );
  clearTimeout(cpuTimer0);
  clearTimeout(cpuTimer1);
  if (errors.length) {
    const wrong = errors.find((e) => e instanceof BenchFailure);
    if (wrong) throw wrong;
    throw new Error(`${errors.length} of ${o.clients} clients failed: ${errors.slice(0, 3).map((e) => e.message).join('; ')}`);
  }
  const c0 = cpu0 as NodeJS.CpuUsage | null;
  const c1 = (cpu1 as NodeJS.CpuUsage | null) ?? process.cpuUsage();
  const clientCpuMs = c0 ? (c1.user - c0.user + c1.system - c0.system) / 1000 : NaN;
  return { windowMs: o.measureMs, commands, latencies, connectMs, sessions, bytes, clientCpuMs };
}
