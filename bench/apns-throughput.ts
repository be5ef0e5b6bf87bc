/**
 * APNs push throughput: how many pushes per second one xaps-proxy process delivers to APNs.
 *
 *   npm run bench:apns -- [--devices 20000] [--users 5000] [--rounds 5] [--window 1000] …
 *   npx tsx bench/apns-throughput.ts --help
 *
 * Everything on loopback, in four processes so that each variant's CPU and memory are its own:
 *
 *   this process    orchestrates (idle while a round is measured), writes the report
 *   mock APNs       bench/apns-mock-server.ts: the real TLS + HTTP/2 mock (src/testbed/mock-apns.ts), not recording
 *   raw client      Http2ApnsClient alone, sending one notification per device with `--window` requests in flight
 *   pipeline        what `serve` runs: embedded registration store (temp dir) with `--devices` registrations over
 *                   `--users` users (INBOX + one other mailbox each), LocalChangeGuard, PushDispatcher with serve's
 *                   default settings (coalescing window 2 s, queue 100 000, 1000 in flight) and Http2ApnsClient with
 *                   2 connections; a round calls dispatcher.notify() once for every user (half INBOX, half the
 *                   other mailbox, alternating per round) and ends when every device's push was answered
 *
 * The pushing processes and the mock run the compiled dist/ (what `node dist/cli/main.js serve` runs; `npm run
 * bench:apns` builds it first, and a dist/ older than src/ is refused), typed by src/: see Lib below.
 *
 * Rounds alternate between the two variants (pipeline first in odd rounds, raw first in even ones) after one
 * unmeasured warm-up round each. Coalescing: a device's first change is pushed at once and opens a window; a change
 * within the window would be merged into a follow-up sent at the window's end, and the round would measure the
 * window, not throughput. So each pipeline round uses fresh change ids (the change guard remembers ids for 10 min)
 * and, after its last push, waits until the dispatcher has forgotten every device (dispatcher.stats().devices === 0:
 * every window has ended) before the round is over; the next round's changes are therefore all "first" changes,
 * pushed at once. The wait is not part of the measured time.
 *
 * Reported per variant: median pushes/s over the rounds, pipeline/raw ratio, the pushing process's CPU per push
 * (process.cpuUsage: user + system, all threads; and its main thread alone, with GC pauses), the mock's CPU per push
 * (to see whether the mock was the limit), the CPU other processes took meanwhile (a disturbed round is run again),
 * peak RSS of the pushing process (max of sampled memoryUsage().rss and resourceUsage().maxRSS) and heap used at the
 * end. Aim: ≥ 10 000 pushes/s from one process. Timing never fails the run; exit 1 when a push was lost, failed,
 * duplicated or answered with anything but 200 (checked both by the dispatcher's xaps_pushes_total and by the mock's
 * per-device counts), or when a process crashed.
 */
import { execFileSync, fork, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { Session } from 'node:inspector/promises';
import os from 'node:os';
import path from 'node:path';
import { PerformanceObserver, performance } from 'node:perf_hooks';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Counter } from 'prom-client';
import type { Http2ApnsClient } from '../src/apns/client.js';
import type { ApnsCredentials, ApnsNotification } from '../src/apns/types.js';
import type { Registry } from '../src/ops/metrics.js';
import type { MailboxRef } from '../src/store/index.js';
import { createTestCa, issueMailPushCert } from '../src/testbed/apns-certs.js';
import type { MockSnapshot } from './apns-mock-server.js';
import { formatProfile, summarizeProfile } from './lib/cpuprofile.js';
import { processCpuMs, treeCpuMs } from './lib/procstat.js';
import { commit, machine, median, table, writeReport } from './lib/report.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const SELF = fileURLToPath(import.meta.url);
const MOCK_SCRIPT = path.join(path.dirname(SELF), 'apns-mock-server.ts');

/** The aim: pushes per second through the whole pipeline, from one process. */
const AIM_PUSHES_PER_SECOND = 10_000;

// Serve's defaults (src/config/options.ts), applied through the same dispatcherSettings() serve uses.
const SERVE = {
  apnsPushType: 'background',
  apnsPriority: '5',
  apnsExpiration: 86_400_000,
  apnsMaxAttempts: 8,
  apnsConnections: 2,
  apnsRequestTimeout: 15_000,
  pushCoalesceWindow: 2_000,
  pushQueueSize: 100_000,
} as const;

// ------------------------------------------------------------- project code ---

/**
 * The project code the measured processes run: the compiled dist/ (tsc output, what `node dist/cli/main.js serve`
 * runs; `npm run bench:apns` builds it first), typed by src/. Not src/ through tsx: its transform adds a
 * `__name(...)` call to every closure created, which costs the hot paths CPU the real proxy does not spend, and its
 * one-line output makes profiles useless (dist has source maps back to src/).
 */
interface Lib {
  client: typeof import('../src/apns/client.js');
  dispatcher: typeof import('../src/apns/dispatcher.js');
  guard: typeof import('../src/apns/change-guard.js');
  payload: typeof import('../src/apns/payload.js');
  log: typeof import('../src/ops/log.js');
  metrics: typeof import('../src/ops/metrics.js');
  store: typeof import('../src/store/index.js');
}

async function loadLib(distDir: string): Promise<Lib> {
  const load = (rel: string): Promise<unknown> => import(pathToFileURL(path.join(distDir, rel)).href);
  const [client, dispatcher, guard, payload, log, metrics, store] = await Promise.all([
    load('apns/client.js'),
    load('apns/dispatcher.js'),
    load('apns/change-guard.js'),
    load('apns/payload.js'),
    load('ops/log.js'),
    load('ops/metrics.js'),
    load('store/index.js'),
  ]);
  return { client, dispatcher, guard, payload, log, metrics, store } as Lib;
}

/** The dist/ modules the measured processes load (their relative imports are followed). */
const DIST_ENTRIES = [
  'apns/client.js',
  'apns/dispatcher.js',
  'apns/change-guard.js',
  'apns/payload.js',
  'ops/log.js',
  'ops/metrics.js',
  'store/index.js',
  'testbed/mock-apns.js',
];

/**
 * The src/ files behind the dist/ modules the benchmark loads (DIST_ENTRIES and everything they import) whose
 * compiled output is missing or older than the source: then dist/ must be rebuilt before it is measured.
 */
function staleDist(): string[] {
  const stale: string[] = [];
  const seen = new Set<string>();
  const visit = (rel: string): void => {
    if (seen.has(rel)) return;
    seen.add(rel);
    const out = path.join(ROOT, 'dist', rel);
    const src = path.join(ROOT, 'src', rel.replace(/\.js$/, '.ts'));
    let code: string;
    try {
      code = fs.readFileSync(out, 'utf8');
      if (fs.existsSync(src) && fs.statSync(out).mtimeMs < fs.statSync(src).mtimeMs) stale.push(path.relative(ROOT, src));
    } catch {
      stale.push(`${path.relative(ROOT, src)} (no dist/${rel})`);
      return;
    }
    for (const m of code.matchAll(/(?:from|import)\s*\(?\s*'(\.{1,2}\/[^']+\.js)'/g)) {
      visit(path.posix.normalize(path.posix.join(path.posix.dirname(rel), m[1]!)));
    }
  };
  for (const e of DIST_ENTRIES) visit(e);
  return stale;
}

// ------------------------------------------------------------------- options ---

interface Options {
  /** The build measured (default dist/). */
  dist: string;
  devices: number;
  users: number;
  rounds: number;
  window: number;
  coalesceMs: number;
  connections: number;
  profile: boolean;
  /** Rounds disturbed by other processes (> BUSY_CORES) are run again, at most this often each. */
  retryBusy: number;
  out: string;
  /** Also write the summary as JSON here (bench/all.ts reads it). */
  json: string | null;
}

const DEFAULTS: Options = {
  dist: 'dist',
  devices: 20_000,
  users: 5_000,
  rounds: 5,
  window: 1_000,
  coalesceMs: SERVE.pushCoalesceWindow,
  connections: SERVE.apnsConnections,
  profile: false,
  retryBusy: 2,
  out: 'bench/results/apns-throughput.md',
  json: null,
};

/** Other processes using more than this many cores during a round disturb it (see --retry-busy). */
const BUSY_CORES = 0.2;

const USAGE = `usage: npm run bench:apns -- [options]
       npx tsx bench/apns-throughput.ts [options]

Pushes per second to a mock APNs (in its own process) from one process: the raw
Http2ApnsClient, and the whole delivery pipeline as serve runs it (embedded store,
change guard, PushDispatcher, Http2ApnsClient). Median over rounds, CPU per push,
peak memory. Exit 1 only when a push was lost or failed.

  --devices N          registrations in the store = pushes per round (default ${DEFAULTS.devices})
  --users N            users they belong to; one notify() per user per round (default: devices / 4)
  --rounds N           measured rounds per variant, after one warm-up round each (default ${DEFAULTS.rounds})
  --window N           raw client: requests kept in flight (default ${DEFAULTS.window}, the dispatcher's
                       maxInFlight, so that both variants run at the same concurrency)
  --coalesce-window MS pipeline: the dispatcher's coalescing window (default ${DEFAULTS.coalesceMs}, serve's)
  --connections N      HTTP/2 connections of both clients (default ${DEFAULTS.connections}, serve's)
  --profile            CPU-profile both pushing processes during the measured rounds (V8 sampling
                       profiler, as node --cpu-prof) and print the top functions; slows them down
  --retry-busy N       run a round again when other processes used more than ${BUSY_CORES} cores during it,
                       at most N times per round (default ${DEFAULTS.retryBusy}; 0: never); the last attempt counts
  --out FILE           markdown report (default ${DEFAULTS.out}; overwritten)
  --json FILE          also write the summary as JSON (used by bench/all.ts)
  --dist DIR           the build to measure (default ${DEFAULTS.dist}/, which must be newer than src/; another
                       directory, e.g. a patched copy, is taken as it is)
  -h, --help           this text

The measured processes run the compiled dist/ (as \`node dist/cli/main.js serve\` does), not src/
through tsx. NODE_OPTIONS applies to every process (e.g. NODE_OPTIONS=--max-semi-space-size=64)
and is part of the reproduce line in the report.
`;

class ArgsError extends Error {}

function parseArgs(argv: string[]): Options | 'help' {
  const o: Options = { ...DEFAULTS };
  let usersGiven = false;
  const int = (name: string, v: string | undefined, min: number): number => {
    if (v === undefined || !/^\d+$/.test(v) || Number(v) < min) throw new ArgsError(`${name} needs an integer >= ${min}, got ${JSON.stringify(v ?? '')}`);
    return Number(v);
  };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i]!;
    let value: string | undefined;
    const eq = arg.indexOf('=');
    if (arg.startsWith('--') && eq > 0) {
      value = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    const next = (): string | undefined => value ?? argv[++i];
    switch (arg) {
      case '-h':
      case '--help':
        return 'help';
      case '--devices':
        o.devices = int(arg, next(), 1);
        break;
      case '--users':
        o.users = int(arg, next(), 1);
        usersGiven = true;
        break;
      case '--rounds':
        o.rounds = int(arg, next(), 1);
        break;
      case '--window':
        o.window = int(arg, next(), 1);
        break;
      case '--coalesce-window':
        o.coalesceMs = int(arg, next(), 0);
        break;
      case '--connections':
        o.connections = int(arg, next(), 1);
        break;
      case '--profile':
        o.profile = true;
        break;
      case '--retry-busy':
        o.retryBusy = int(arg, next(), 0);
        break;
      case '--dist':
        o.dist = next() ?? '';
        if (!o.dist) throw new ArgsError('--dist needs a directory');
        break;
      case '--out':
        o.out = next() ?? '';
        if (!o.out) throw new ArgsError('--out needs a file name');
        break;
      case '--json':
        o.json = next() ?? '';
        if (!o.json) throw new ArgsError('--json needs a file name');
        break;
      default:
        throw new ArgsError(`unknown argument ${JSON.stringify(argv[i])}`);
    }
  }
  if (!usersGiven) o.users = Math.max(1, Math.round(o.devices / 4));
  if (o.users > o.devices) throw new ArgsError(`--users (${o.users}) cannot exceed --devices (${o.devices}): every user needs a device`);
  return o;
}

/** The options with every value explicit, for "reproduce with". */
function canonicalArgs(o: Options): string[] {
  const out = ['--devices', String(o.devices), '--users', String(o.users), '--rounds', String(o.rounds), '--window', String(o.window)];
  if (o.coalesceMs !== DEFAULTS.coalesceMs) out.push('--coalesce-window', String(o.coalesceMs));
  if (o.connections !== DEFAULTS.connections) out.push('--connections', String(o.connections));
  if (o.profile) out.push('--profile');
  if (o.retryBusy !== DEFAULTS.retryBusy) out.push('--retry-busy', String(o.retryBusy));
  if (o.out !== DEFAULTS.out) out.push('--out', o.out);
  if (o.dist !== DEFAULTS.dist) out.push('--dist', o.dist);
  return out;
}

// -------------------------------------------------------------- device model ---

interface BenchRegistration {
  user: string;
  userIndex: number;
  deviceToken: string;
  accountId: string;
  subtopic: string;
  mailboxes: MailboxRef[];
  version: 2;
}

interface Model {
  inbox: MailboxRef;
  users: string[];
  /** Per user: the one other mailbox its devices push. */
  other: MailboxRef[];
  regs: BenchRegistration[];
  /** Devices per user. */
  devicesOf: number[];
}

function hex(seed: string): string {
  return createHash('sha256').update(seed).digest('hex');
}

/** Deterministic: device j belongs to user j mod users; INBOX plus one other mailbox each (iOS pushes INBOX always). */
function buildModel(devices: number, userCount: number, mailboxRef: (name: string) => MailboxRef): Model {
  const users = Array.from({ length: userCount }, (_, i) => `user${i}@bench.example`);
  const other = users.map((_, i) => mailboxRef(i % 3 === 0 ? 'Archive' : i % 3 === 1 ? `Lists/list-${i % 97}` : 'Sent Messages'));
  const inbox = mailboxRef('INBOX');
  const devicesOf = new Array<number>(userCount).fill(0);
  const regs: BenchRegistration[] = [];
  for (let j = 0; j < devices; j++) {
    const u = j % userCount;
    devicesOf[u]!++;
    const a = hex(`bench-account-${j}`).toUpperCase();
    regs.push({
      user: users[u]!,
      userIndex: u,
      deviceToken: hex(`bench-device-${j}`),
      accountId: `${a.slice(0, 8)}-${a.slice(8, 12)}-4${a.slice(13, 16)}-8${a.slice(17, 20)}-${a.slice(20, 32)}`,
      subtopic: 'com.apple.mobilemail',
      mailboxes: [inbox, other[u]!],
      version: 2,
    });
  }
  return { inbox, users, other, regs, devicesOf };
}

/** The mailbox that changes for user `u` in round `r`: INBOX for half the users, the other one for the rest. */
function changedMailbox(model: Model, u: number, round: number): MailboxRef {
  return (u + round) % 2 === 0 ? model.inbox : model.other[u]!;
}

// ---------------------------------------------------------------- IPC (both) ---

type Reply = { id: number; ok: true; result: unknown } | { id: number; ok: false; error: string };

/** The parent's handle on a forked child that answers {id, type, …} requests. */
class Peer {
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private gone: Error | undefined;
  readonly exit: Promise<void>;

  constructor(
    readonly name: string,
    readonly child: ChildProcess,
  ) {
    child.on('message', (m: Reply) => {
      const w = this.waiting.get(m.id);
      if (!w) return;
      this.waiting.delete(m.id);
      if (m.ok) w.resolve(m.result);
      else w.reject(new Error(`${name}: ${m.error}`));
    });
    this.exit = new Promise<void>((resolve) => {
      child.once('exit', (code, signal) => {
        this.gone = new Error(`${name} process exited (${signal ?? `code ${code}`})`);
        for (const w of this.waiting.values()) w.reject(this.gone);
        this.waiting.clear();
        resolve();
      });
    });
    child.on('error', (err) => {
      this.gone ??= new Error(`${name} process: ${err.message}`);
      for (const w of this.waiting.values()) w.reject(this.gone);
      this.waiting.clear();
    });
  }

  static start(name: string, script: string, args: string[]): Peer {
    const child = fork(script, args, { execArgv: childExecArgv(), stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    return new Peer(name, child);
  }

  call<T>(msg: Record<string, unknown>, timeoutMs = 10 * 60_000): Promise<T> {
    if (this.gone) return Promise.reject(this.gone);
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        reject(new Error(`${this.name}: no answer to ${String(msg.type)} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiting.set(id, {
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v as T);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      this.child.send({ ...msg, id });
    });
  }

  /** Ends the child (only this one, by its own handle) if it is still running. */
  kill(): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGTERM');
  }
}

/** The parent's node flags (tsx's loader) minus profiling/inspection flags, which must not apply to the children. */
function childExecArgv(): string[] {
  const out: string[] = [];
  const withValue = new Set(['--cpu-prof-dir', '--cpu-prof-name', '--cpu-prof-interval', '--heap-prof-dir', '--heap-prof-name', '--heap-prof-interval']);
  const args = process.execArgv;
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (withValue.has(a)) {
      i++;
      continue;
    }
    if (/^--(cpu-prof|heap-prof|prof|inspect)/.test(a)) continue;
    out.push(a);
  }
  return out;
}

// ------------------------------------------------------------------- workers ---

interface WorkerSetup {
  role: Role;
  distDir: string;
  /** The benchmark's other processes (orchestrator, mock, the other variant): not "other processes". */
  benchPids: number[];
  devices: number;
  users: number;
  window: number;
  coalesceMs: number;
  connections: number;
  mockUrl: string;
  mockCaPem: string;
  credentials: ApnsCredentials;
  topic: string;
  /** Write a .cpuprofile of the measured rounds here. */
  profileFile: string | null;
}

type Role = 'raw' | 'pipeline';

interface SetupResult {
  setupMs: number;
  registrations: number;
  users: number;
}

interface RoundResult {
  round: number;
  /** Pushes the round must deliver (one per device). */
  expected: number;
  delivered: number;
  wallMs: number;
  /** CPU of the whole process (all threads), µs. */
  cpuUs: number;
  /** CPU of the main thread (the event loop) alone, µs; null where /proc is not available. */
  mainCpuUs: number | null;
  /** Main-thread GC pauses during the round (perf_hooks 'gc' entries), ms. */
  gcMs: number;
  /** CPU used by processes outside the benchmark during the round, cores (see otherCoresMeter). */
  otherCores: number;
  /** Non-zero outcomes of the round: xaps_pushes_total deltas (pipeline) or answer statuses (raw). */
  outcomes: Record<string, number>;
  /** Pipeline: time until every notify() had resolved (changes scheduled). */
  notifyMs?: number;
  /** Pipeline: wait after the last push until every coalescing window had ended (not measured). */
  drainMs?: number;
  problems: string[];
}

interface FinalResult {
  /** Max of memoryUsage().rss sampled every 50 ms over the process's life, bytes. */
  peakRssSampled: number;
  /** resourceUsage().maxRSS, bytes. */
  maxRss: number;
  rssEnd: number;
  heapUsedEnd: number;
  heapTotalEnd: number;
  sessionsOpened: number;
  profileFile: string | null;
}

type WorkerRequest =
  | { id: number; type: 'setup'; setup: WorkerSetup }
  | { id: number; type: 'round'; round: number; seq: number }
  | { id: number; type: 'finish' };

interface Worker {
  /** `round` names the round in messages; `seq` (unique per call) picks the mailboxes and the change ids. */
  round(round: number, seq: number): Promise<RoundResult>;
  /** Closes what the worker opened; returns the client's sessionsOpened. */
  close(): Promise<number>;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function waitFor(cond: () => boolean, timeoutMs: number, stepMs: number): Promise<boolean> {
  const deadline = performance.now() + timeoutMs;
  while (!cond()) {
    if (performance.now() > deadline) return false;
    await sleep(stepMs);
  }
  return true;
}

/** GC pauses of this process so far, ms (perf_hooks 'gc' entries; they arrive asynchronously: see gcSettled). */
let gcPausesMs = 0;

function observeGc(): void {
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) gcPausesMs += e.duration;
  }).observe({ entryTypes: ['gc'] });
}

/** gcPausesMs once the entries of what already happened have been delivered. */
async function gcSettled(): Promise<number> {
  await sleep(10);
  return gcPausesMs;
}

let clockTicks: number | undefined;

/** CPU time of this process's main thread (the event loop; its tid is the pid) so far, µs; null without /proc. */
function mainThreadCpuUs(): number | null {
  try {
    const text = fs.readFileSync(`/proc/self/task/${process.pid}/stat`, 'utf8');
    const rest = text.slice(text.lastIndexOf(')') + 2).split(' ');
    if (clockTicks === undefined) {
      try {
        clockTicks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
      } catch {
        clockTicks = 100;
      }
    }
    // rest[11] = utime (field 14), rest[12] = stime (field 15), in clock ticks
    return ((Number(rest[11]) + Number(rest[12])) * 1e6) / clockTicks;
  } catch {
    return null;
  }
}

function since(start: number | null): number | null {
  const now = mainThreadCpuUs();
  return start === null || now === null ? null : now - start;
}

/**
 * Starts measuring the CPU that processes outside the benchmark use: the machine's busy time (os.cpus()) minus this
 * process, `benchPids` and the kernel's threads (children of kthreadd, pid 2: ksoftirqd does much of the loopback
 * networking of the benchmark itself). The returned function gives the cores they used since, on average.
 */
function otherCoresMeter(benchPids: number[]): () => number {
  const ours = (): number => {
    const self = process.cpuUsage();
    let ms = (self.user + self.system) / 1000;
    for (const pid of benchPids) ms += processCpuMs(pid) ?? 0;
    for (const kernelMs of treeCpuMs(2).values()) ms += kernelMs;
    return ms;
  };
  const busy0 = machineBusyMs();
  const ours0 = ours();
  const t0 = performance.now();
  return () => Math.max(0, machineBusyMs() - busy0 - (ours() - ours0)) / (performance.now() - t0);
}

function cpuUs(since: NodeJS.CpuUsage): number {
  const d = process.cpuUsage(since);
  return d.user + d.system;
}

function makeClient(lib: Lib, s: WorkerSetup, registry: Registry): Http2ApnsClient {
  return new lib.client.Http2ApnsClient({
    endpoint: s.mockUrl,
    ca: s.mockCaPem,
    credentials: s.credentials,
    connections: s.connections,
    requestTimeoutMs: SERVE.apnsRequestTimeout,
    registry,
    log: lib.log.silentLogger(),
  });
}

/** The raw client: one notification per device (built before the clock starts), `window` in flight. */
async function rawWorker(lib: Lib, s: WorkerSetup, model: Model): Promise<Worker> {
  const registry = lib.metrics.createRegistry();
  const client = makeClient(lib, s, registry);
  return {
    async round(round, seq) {
      const now = Date.now();
      const notes: ApnsNotification[] = model.regs.map((reg) =>
        lib.payload.buildNotification(reg, [changedMailbox(model, reg.userIndex, seq)], {
          topic: s.topic,
          pushType: SERVE.apnsPushType,
          priority: 5,
          expirationMs: SERVE.apnsExpiration,
          now,
        }),
      );
      const total = notes.length;
      const outcomes: Record<string, number> = {};
      const note = (k: string): void => {
        outcomes[k] = (outcomes[k] ?? 0) + 1;
      };
      let sent = 0;
      let done = 0;
      const gc0 = await gcSettled();
      mainThreadCpuUs(); // (reads getconf once, outside the measurement)
      const others = otherCoresMeter(s.benchPids);
      const main0 = mainThreadCpuUs();
      const cpu0 = process.cpuUsage();
      const t0 = performance.now();
      await new Promise<void>((resolve) => {
        // One pair of handlers for all sends (no closure per request in the loop being measured).
        const finish = (): void => {
          done++;
          if (done === total) resolve();
          else pump();
        };
        const onAnswer = (r: { status: number; reason?: string }): void => {
          note(r.status === 200 ? 'delivered' : `status ${r.status}${r.reason ? ` ${r.reason}` : ''}`);
          finish();
        };
        const onError = (err: unknown): void => {
          note(`transport ${(err as { kind?: string }).kind ?? 'error'}`);
          finish();
        };
        const pump = (): void => {
          while (sent < total && sent - done < s.window) client.send(notes[sent++]!).then(onAnswer, onError);
        };
        pump();
      });
      const wallMs = performance.now() - t0;
      const cpu = cpuUs(cpu0);
      const mainCpu = since(main0);
      const otherCores = others();
      const gcMs = (await gcSettled()) - gc0;
      const delivered = outcomes.delivered ?? 0;
      const problems: string[] = [];
      if (delivered !== total) problems.push(`raw client round ${round}: ${delivered} of ${total} answered 200 (${JSON.stringify(outcomes)})`);
      return { round, expected: total, delivered, wallMs, cpuUs: cpu, mainCpuUs: mainCpu, gcMs, otherCores, outcomes, problems };
    },
    async close() {
      const opened = client.stats().sessionsOpened;
      await client.close();
      return opened;
    },
  };
}

/** Final outcomes of a push: once all pushes of a round have one of these, nothing of it is pending. */
async function pushOutcomes(counter: Counter<'result'>): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const v of (await counter.get()).values) out[String(v.labels.result)] = v.value;
  return out;
}

/** The pipeline as serve runs it: embedded store + LocalChangeGuard + PushDispatcher + Http2ApnsClient. */
async function pipelineWorker(lib: Lib, s: WorkerSetup, model: Model): Promise<Worker> {
  const registry = lib.metrics.createRegistry();
  const dataDir = await mkdtemp(path.join(os.tmpdir(), 'xaps-bench-apns-'));
  const store = await lib.store.createStore({ dataDir, ttlMs: lib.store.DEFAULT_TTL_MS });
  // Populate (group commits of the embedded store: a batch of concurrent upserts per fsync).
  const BATCH = 2_000;
  for (let i = 0; i < model.regs.length; i += BATCH) {
    await Promise.all(
      model.regs.slice(i, i + BATCH).map((r) =>
        store.upsert({ user: r.user, deviceToken: r.deviceToken, accountId: r.accountId, subtopic: r.subtopic, mailboxes: r.mailboxes, version: r.version }),
      ),
    );
  }
  const client = makeClient(lib, s, registry);
  const dispatcher = new lib.dispatcher.PushDispatcher({
    store,
    transport: client,
    topic: () => s.topic,
    guard: new lib.guard.LocalChangeGuard(),
    registry,
    logger: lib.log.silentLogger(),
    ...lib.dispatcher.dispatcherSettings({ ...SERVE, pushCoalesceWindow: s.coalesceMs }),
  });
  const pushes = registry.getSingleMetric('xaps_pushes_total') as Counter<'result'> | undefined;
  const changes = registry.getSingleMetric('xaps_push_changes_total') as Counter<'result'> | undefined;
  if (!pushes || !changes) throw new Error('the dispatcher registered no xaps_pushes_total / xaps_push_changes_total');
  const expected = model.regs.length; // every device pushes INBOX and its user's other mailbox
  const windowWaitMs = s.coalesceMs + 10_000;

  return {
    async round(round, seq) {
      const problems: string[] = [];
      // Every window of the previous round has ended (the previous round waited for it): all changes are "first".
      if (!(await waitFor(() => dispatcher.stats().devices === 0, windowWaitMs, 20))) {
        problems.push(`pipeline round ${round}: ${dispatcher.stats().devices} devices still inside a coalescing window before the round`);
      }
      const before = await pushOutcomes(pushes);
      const changesBefore = await pushOutcomes(changes);
      const gc0 = await gcSettled();
      mainThreadCpuUs();
      const others = otherCoresMeter(s.benchPids);
      const main0 = mainThreadCpuUs();
      const cpu0 = process.cpuUsage();
      const t0 = performance.now();
      let scheduled = false;
      let notifyMs = 0;
      const detectedAt = Date.now();
      const all = model.users.map((user, u) => {
        const mailbox = changedMailbox(model, u, seq).name;
        // Fresh per round: like a watcher's mailbox + UIDVALIDITY + UIDNEXT after new mail.
        return dispatcher.notify({ user, mailbox, changeId: `${mailbox}\u0000uidvalidity=1\u0000uidnext=${1000 + seq}`, detectedAt });
      });
      void Promise.all(all).then(() => {
        scheduled = true;
        notifyMs = performance.now() - t0;
      });
      // Done when every change is scheduled and nothing waits or is in flight: every push got its final answer.
      const idle = (): boolean => {
        if (!scheduled) return false;
        const st = dispatcher.stats();
        return st.pending === 0 && st.inFlight === 0;
      };
      const finished = await waitFor(idle, Math.max(60_000, expected), 1);
      const wallMs = performance.now() - t0;
      const cpu = cpuUs(cpu0);
      const mainCpu = since(main0);
      const otherCores = others();
      const gcMs = (await gcSettled()) - gc0;
      const after = await pushOutcomes(pushes);
      const changesAfter = await pushOutcomes(changes);
      const outcomes: Record<string, number> = {};
      for (const [k, v] of Object.entries(after)) if (v - (before[k] ?? 0) !== 0) outcomes[k] = v - (before[k] ?? 0);
      const delivered = outcomes.delivered ?? 0;
      if (!finished) problems.push(`pipeline round ${round}: not finished after ${Math.round(wallMs)} ms (${JSON.stringify(dispatcher.stats())})`);
      if (delivered !== expected) problems.push(`pipeline round ${round}: ${delivered} of ${expected} pushes delivered (${JSON.stringify(outcomes)})`);
      const bad = Object.keys(outcomes).filter((k) => k !== 'delivered');
      if (bad.length) problems.push(`pipeline round ${round}: pushes ${bad.map((k) => `${k}=${outcomes[k]}`).join(', ')}`);
      const scheduledChanges = (changesAfter.scheduled ?? 0) - (changesBefore.scheduled ?? 0);
      if (scheduledChanges !== model.users.length) {
        problems.push(`pipeline round ${round}: ${scheduledChanges} of ${model.users.length} changes scheduled (${JSON.stringify(changesAfter)})`);
      }
      // Drain: wait until every window opened by this round has ended (not measured; see the header).
      const d0 = performance.now();
      if (!(await waitFor(() => dispatcher.stats().devices === 0, windowWaitMs, 20))) {
        problems.push(`pipeline round ${round}: coalescing windows did not end within ${windowWaitMs} ms`);
      }
      const drainMs = performance.now() - d0;
      const late = (await pushOutcomes(pushes)).delivered! - after.delivered!;
      if (late !== 0) problems.push(`pipeline round ${round}: ${late} follow-up pushes after the round (changes were coalesced)`);
      return { round, expected, delivered, wallMs, cpuUs: cpu, mainCpuUs: mainCpu, gcMs, otherCores, outcomes, notifyMs, drainMs, problems };
    },
    async close() {
      const opened = client.stats().sessionsOpened;
      await dispatcher.close();
      await client.close();
      await store.close();
      await rm(dataDir, { recursive: true, force: true });
      return opened;
    },
  };
}

/** A worker process: answers setup / round / finish from the parent. */
function runWorker(): void {
  if (!process.send) {
    process.stderr.write('--role is internal to bench/apns-throughput.ts (it needs an IPC channel)\n');
    process.exit(2);
  }
  observeGc();
  let peakRss = process.memoryUsage().rss;
  const sampler = setInterval(() => {
    peakRss = Math.max(peakRss, process.memoryUsage().rss);
  }, 50);
  sampler.unref();
  let worker: Worker | undefined;
  let setup: WorkerSetup | undefined;
  let profiler: Session | undefined;

  const handle = async (msg: WorkerRequest): Promise<unknown> => {
    switch (msg.type) {
      case 'setup': {
        const t0 = performance.now();
        setup = msg.setup;
        const lib = await loadLib(setup.distDir);
        const model = buildModel(setup.devices, setup.users, lib.store.mailboxRef);
        worker = setup.role === 'raw' ? await rawWorker(lib, setup, model) : await pipelineWorker(lib, setup, model);
        peakRss = Math.max(peakRss, process.memoryUsage().rss);
        return { setupMs: performance.now() - t0, registrations: model.regs.length, users: model.users.length } satisfies SetupResult;
      }
      case 'round': {
        if (!worker || !setup) throw new Error('round before setup');
        if (msg.round >= 1 && setup.profileFile && !profiler) {
          profiler = new Session();
          profiler.connect();
          await profiler.post('Profiler.enable');
          await profiler.post('Profiler.start');
        }
        const r = await worker.round(msg.round, msg.seq);
        peakRss = Math.max(peakRss, process.memoryUsage().rss);
        return r;
      }
      case 'finish': {
        if (!worker || !setup) throw new Error('finish before setup');
        let profileFile: string | null = null;
        if (profiler && setup.profileFile) {
          const { profile } = await profiler.post('Profiler.stop');
          fs.mkdirSync(path.dirname(setup.profileFile), { recursive: true });
          fs.writeFileSync(setup.profileFile, JSON.stringify(profile));
          profileFile = setup.profileFile;
          profiler.disconnect();
        }
        const mem = process.memoryUsage();
        peakRss = Math.max(peakRss, mem.rss);
        const sessionsOpened = await worker.close();
        clearInterval(sampler);
        return {
          peakRssSampled: peakRss,
          maxRss: process.resourceUsage().maxRSS * 1024,
          rssEnd: mem.rss,
          heapUsedEnd: mem.heapUsed,
          heapTotalEnd: mem.heapTotal,
          sessionsOpened,
          profileFile,
        } satisfies FinalResult;
      }
    }
  };

  process.on('message', (msg: WorkerRequest) => {
    handle(msg).then(
      (result) => {
        process.send!({ id: msg.id, ok: true, result }, () => {
          if (msg.type === 'finish') process.exit(0);
        });
      },
      (err: unknown) => {
        process.send!({ id: msg.id, ok: false, error: err instanceof Error ? (err.stack ?? err.message) : String(err) });
      },
    );
  });
  process.on('disconnect', () => process.exit(0));
}

// -------------------------------------------------------------- orchestrator ---

interface Sample {
  round: number;
  pushes: number;
  wallMs: number;
  rate: number;
  cpuUsPerPush: number;
  /** Main-thread CPU per push, µs (NaN without /proc). */
  mainUsPerPush: number;
  gcUsPerPush: number;
  /** Share of the round the main thread was on a CPU (1 = the event loop was saturated). */
  mainBusy: number;
  mockCpuUsPerPush: number;
  mockCores: number;
  /** CPU used by processes outside this benchmark while the round ran (the machine's busy time minus ours), cores. */
  otherCores: number;
  notifyMs?: number;
  drainMs?: number;
}

interface Variant {
  role: Role;
  label: string;
  peer: Peer;
  setup?: SetupResult;
  samples: Sample[];
  final?: FinalResult;
}

interface Summary {
  label: string;
  medianRate: number;
  minRate: number;
  maxRate: number;
  ratio: number;
  cpuUsPerPush: number;
  mainUsPerPush: number;
  gcUsPerPush: number;
  mainBusy: number;
  mockCpuUsPerPush: number;
  mockCores: number;
  otherCores: number;
  maxOtherCores: number;
  peakRssMb: number;
  heapUsedEndMb: number;
  perRound: number[];
}

const MB = 1024 * 1024;
const f0 = (x: number): string => (Number.isFinite(x) ? Math.round(x).toLocaleString('en-US') : '—');
const f1 = (x: number): string => (Number.isFinite(x) ? x.toFixed(1) : '—');
const f2 = (x: number): string => (Number.isFinite(x) ? x.toFixed(2) : '—');

async function main(): Promise<number> {
  let opts: Options | 'help';
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (err) {
    if (err instanceof ArgsError) {
      process.stderr.write(`${err.message}\n\n${USAGE}`);
      return 2;
    }
    throw err;
  }
  if (opts === 'help') {
    process.stdout.write(USAGE);
    return 0;
  }
  const o = opts;
  const distDir = path.resolve(ROOT, o.dist);
  const stale = o.dist === DEFAULTS.dist ? staleDist() : [];
  if (!fs.existsSync(path.join(distDir, 'apns', 'dispatcher.js'))) {
    process.stderr.write(`${distDir} holds no build (apns/dispatcher.js): run \`npm run build\` first (\`npm run bench:apns\` does).\n`);
    return 2;
  }
  if (stale.length) {
    process.stderr.write(
      `dist/ is older than src/ (${stale.slice(0, 5).join(', ')}${stale.length > 5 ? `, … ${stale.length} files` : ''}): ` +
        'the benchmark measures the compiled code. Run `npm run build` first (`npm run bench:apns` does).\n',
    );
    return 2;
  }
  const started = new Date();
  const loadAtStart = os.loadavg().map((x) => x.toFixed(2)).join(' ');
  const nodeOptions = process.env.NODE_OPTIONS?.trim();
  const command = `${nodeOptions ? `NODE_OPTIONS=${JSON.stringify(nodeOptions)} ` : ''}npm run bench:apns -- ${canonicalArgs(o).join(' ')}`;
  const say = (s: string): void => {
    process.stdout.write(`${s}\n`);
  };
  say(`APNs push throughput: ${o.devices} devices over ${o.users} users, ${o.rounds} rounds (+1 warm-up) per variant`);

  const problems: string[] = [];
  /** Rounds that were run again because other processes competed for the CPUs. */
  const retried: string[] = [];
  const peers: Peer[] = [];
  const stamp = started.toISOString().replace(/[:.]/g, '-');
  const variants: Variant[] = [];
  let mock: Peer | undefined;
  try {
    const ca = createTestCa('xaps-proxy bench CA');
    const cert = issueMailPushCert(ca);
    mock = Peer.start('mock APNs', MOCK_SCRIPT, []);
    peers.push(mock);
    const m = await mock.call<{ url: string; caPem: string }>({ type: 'start', clientCa: ca.certPem, distDir }, 60_000);
    say(`mock APNs (pid ${mock.child.pid}) at ${m.url}`);

    const base = {
      distDir,
      devices: o.devices,
      users: o.users,
      window: o.window,
      coalesceMs: o.coalesceMs,
      connections: o.connections,
      mockUrl: m.url,
      mockCaPem: m.caPem,
      credentials: { kind: 'certificate', certPem: cert.certPem, keyPem: cert.keyPem } as ApnsCredentials,
      topic: cert.topic,
    };
    const profileDir = path.join(ROOT, 'bench', 'results', 'profiles');
    for (const [role, label] of [
      ['raw', `raw Http2ApnsClient (window ${o.window})`],
      ['pipeline', 'pipeline: store + guard + PushDispatcher + Http2ApnsClient'],
    ] as const) {
      const peer = Peer.start(label, SELF, ['--role', role]);
      peers.push(peer);
      variants.push({ role, label, peer, samples: [] });
    }
    const pids = [process.pid, ...peers.map((p) => p.child.pid)].filter((pid): pid is number => pid !== undefined);
    for (const v of variants) {
      const profileFile = o.profile ? path.join(profileDir, `apns-${v.role}-${stamp}.cpuprofile`) : null;
      const benchPids = pids.filter((pid) => pid !== v.peer.child.pid);
      v.setup = await v.peer.call<SetupResult>({ type: 'setup', setup: { ...base, role: v.role, benchPids, profileFile } });
      say(`${v.label} (pid ${v.peer.child.pid}): ready in ${(v.setup.setupMs / 1000).toFixed(1)} s` +
        (v.role === 'pipeline' ? ` (store: ${v.setup.registrations} registrations, ${v.setup.users} users)` : ''));
    }

    let seq = 0;
    const runRound = async (v: Variant, round: number): Promise<void> => {
      for (let attempt = 0; ; attempt++) {
        const s = await attemptRound(v, round);
        const last = attempt >= o.retryBusy;
        if (s.otherCores <= BUSY_CORES || last) {
          if (round > 0) v.samples.push(s);
          return;
        }
        retried.push(`${v.role} round ${round}`);
        say(`  (other processes used ${f2(s.otherCores)} cores: running ${round === 0 ? 'the warm-up' : `round ${round}`} of ${v.role} again)`);
      }
    };
    const attemptRound = async (v: Variant, round: number): Promise<Sample> => {
      const before = await mock!.call<MockSnapshot>({ type: 'snapshot' });
      const r = await v.peer.call<RoundResult>({ type: 'round', round, seq: seq++ });
      const after = await mock!.call<MockSnapshot>({ type: 'snapshot' });
      const otherCores = r.otherCores;
      problems.push(...r.problems);
      // The mock's own count, per device: every device exactly once (nothing lost, nothing duplicated).
      if (after.requests !== r.expected || after.distinctTokens !== r.expected || after.duplicatedTokens !== 0) {
        problems.push(
          `${v.label} round ${round}: the mock got ${after.requests} requests for ${after.distinctTokens} devices ` +
            `(${after.duplicatedTokens} more than once), expected one for each of ${r.expected}`,
        );
      }
      const mockCpu = after.cpuUs - before.cpuUs;
      const s: Sample = {
        round,
        pushes: r.delivered,
        wallMs: r.wallMs,
        rate: r.delivered / (r.wallMs / 1000),
        cpuUsPerPush: r.cpuUs / Math.max(1, r.delivered),
        mainUsPerPush: r.mainCpuUs === null ? NaN : r.mainCpuUs / Math.max(1, r.delivered),
        mainBusy: r.mainCpuUs === null ? NaN : r.mainCpuUs / 1000 / r.wallMs,
        gcUsPerPush: (r.gcMs * 1000) / Math.max(1, r.delivered),
        mockCpuUsPerPush: mockCpu / Math.max(1, after.requests),
        mockCores: mockCpu / 1000 / r.wallMs,
        otherCores,
      };
      if (r.notifyMs !== undefined) s.notifyMs = r.notifyMs;
      if (r.drainMs !== undefined) s.drainMs = r.drainMs;
      const tag = round === 0 ? 'warm-up' : `round ${round}`;
      say(
        `  ${tag.padEnd(8)} ${v.role.padEnd(8)} ${f0(s.rate).padStart(7)} pushes/s  ${f0(s.wallMs).padStart(6)} ms  ` +
          `${f1(s.cpuUsPerPush)} µs CPU/push (main thread ${f1(s.mainUsPerPush)}, GC ${f1(s.gcUsPerPush)}; main thread ${f0(s.mainBusy * 100)}% busy)  mock ${f1(s.mockCpuUsPerPush)} µs/push (${f2(s.mockCores)} cores)` +
          (otherCores >= 0.1 ? `  other processes ${f2(otherCores)} cores` : '') +
          (r.problems.length ? `  PROBLEMS: ${r.problems.length}` : ''),
      );
      return s;
    };

    const [raw, pipe] = variants as [Variant, Variant];
    await runRound(raw, 0);
    await runRound(pipe, 0);
    for (let round = 1; round <= o.rounds; round++) {
      const order = round % 2 === 1 ? [pipe, raw] : [raw, pipe];
      for (const v of order) await runRound(v, round);
    }
    for (const v of variants) {
      v.final = await v.peer.call<FinalResult>({ type: 'finish' });
      await v.peer.exit;
      if (v.final.sessionsOpened > o.connections) {
        say(`  note: ${v.label} opened ${v.final.sessionsOpened} sessions for ${o.connections} connections (reconnects)`);
      }
    }
    const last = await mock.call<MockSnapshot>({ type: 'snapshot' });
    if (last.sessionErrors || last.tlsFailures || last.refusedStreams) {
      problems.push(`mock APNs: ${last.sessionErrors} session errors, ${last.tlsFailures} TLS failures, ${last.refusedStreams} refused streams`);
    }
    await mock.call({ type: 'stop' });
    await mock.exit;
  } catch (err) {
    problems.push(`benchmark aborted: ${err instanceof Error ? err.message : String(err)}`);
  } finally {
    for (const p of peers) p.kill();
  }

  const complete = variants.length === 2 && variants.every((v) => v.final && v.samples.length === o.rounds);
  if (!complete) {
    process.stderr.write(`\nFAILED:\n${problems.map((p) => `  - ${p}`).join('\n')}\n`);
    return 1;
  }

  const summaries = summarize(variants);
  const text = report(o, summaries, variants, problems, retried, started, command, loadAtStart);
  say(`\n${text.console}`);
  writeReport(path.resolve(ROOT, o.out), text.markdown);
  say(`\nreport: ${o.out}`);
  if (o.json) {
    const pipeline = summaries.find((x) => x.label.startsWith('pipeline'));
    const json = {
      bench: 'apns-throughput',
      command,
      started: started.toISOString(),
      seconds: (Date.now() - started.getTime()) / 1000,
      devices: o.devices,
      users: o.users,
      rounds: o.rounds,
      aimPushesPerSecond: AIM_PUSHES_PER_SECOND,
      aimMet: pipeline ? pipeline.medianRate >= AIM_PUSHES_PER_SECOND : false,
      retried,
      variants: summaries.map((x) => ({
        label: x.label,
        medianRate: x.medianRate,
        minRate: x.minRate,
        maxRate: x.maxRate,
        ratioToRaw: x.ratio,
        cpuUsPerPush: x.cpuUsPerPush,
        mainUsPerPush: x.mainUsPerPush,
        peakRssMb: x.peakRssMb,
        perRound: x.perRound,
      })),
    };
    writeReport(path.resolve(ROOT, o.json), JSON.stringify(json, null, 2));
  }
  if (problems.length) {
    process.stderr.write(`\nFAILED (pushes lost or failed):\n${problems.map((p) => `  - ${p}`).join('\n')}\n`);
    return 1;
  }
  return 0;
}

/** CPU time all CPUs of the machine spent outside idle/iowait so far, ms (from os.cpus(), i.e. /proc/stat). */
function machineBusyMs(): number {
  let ms = 0;
  for (const c of os.cpus()) ms += c.times.user + c.times.nice + c.times.sys + c.times.irq;
  return ms;
}

function summarize(variants: Variant[]): Summary[] {
  const rawMedian = median(variants.find((v) => v.role === 'raw')!.samples.map((s) => s.rate));
  return variants.map((v) => {
    const rates = v.samples.map((s) => s.rate);
    const med = median(rates);
    return {
      label: v.label,
      medianRate: med,
      minRate: Math.min(...rates),
      maxRate: Math.max(...rates),
      ratio: med / rawMedian,
      cpuUsPerPush: median(v.samples.map((s) => s.cpuUsPerPush)),
      gcUsPerPush: median(v.samples.map((s) => s.gcUsPerPush)),
      mainUsPerPush: median(v.samples.map((s) => s.mainUsPerPush)),
      mainBusy: median(v.samples.map((s) => s.mainBusy)),
      mockCpuUsPerPush: median(v.samples.map((s) => s.mockCpuUsPerPush)),
      mockCores: median(v.samples.map((s) => s.mockCores)),
      otherCores: median(v.samples.map((s) => s.otherCores)),
      maxOtherCores: Math.max(...v.samples.map((s) => s.otherCores)),
      peakRssMb: Math.max(v.final!.peakRssSampled, v.final!.maxRss) / MB,
      heapUsedEndMb: v.final!.heapUsedEnd / MB,
      perRound: v.samples.map((s) => s.rate),
    };
  });
}

function report(
  o: Options,
  sums: Summary[],
  variants: Variant[],
  problems: string[],
  retried: string[],
  started: Date,
  command: string,
  loadAtStart: string,
): { console: string; markdown: string } {
  const results = table(
    ['variant', 'median pushes/s', 'min–max pushes/s', '× raw', 'CPU µs/push', 'main thread µs/push', 'GC pause µs/push', 'event-loop ceiling pushes/s', 'main thread busy', 'mock CPU µs/push', 'mock cores', 'other procs cores', 'peak RSS MB', 'heap used at end MB'],
    sums.map((s) => [
      s.label,
      f0(s.medianRate),
      `${f0(s.minRate)}–${f0(s.maxRate)}`,
      f2(s.ratio),
      f1(s.cpuUsPerPush),
      f1(s.mainUsPerPush),
      f1(s.gcUsPerPush),
      f0(1e6 / s.mainUsPerPush),
      `${f0(s.mainBusy * 100)}%`,
      f1(s.mockCpuUsPerPush),
      f2(s.mockCores),
      f2(s.otherCores),
      f0(s.peakRssMb),
      f1(s.heapUsedEndMb),
    ]),
    ['l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r'],
  );
  const rounds = table(
    ['variant', ...Array.from({ length: o.rounds }, (_, i) => `round ${i + 1}`)],
    sums.map((s) => [s.label, ...s.perRound.map(f0)]),
    ['l', ...Array<'r'>(o.rounds).fill('r')],
  );
  const [raw, pipe] = sums as [Summary, Summary];
  const aim =
    `Aim: ≥ ${f0(AIM_PUSHES_PER_SECOND)} pushes/s from one process through the whole pipeline → ` +
    (pipe.medianRate >= AIM_PUSHES_PER_SECOND ? `met (median ${f0(pipe.medianRate)})` : `NOT met (median ${f0(pipe.medianRate)})`) +
    `; pipeline/raw client ${f2(pipe.ratio)}. CPU per push: pipeline ${f1(pipe.cpuUsPerPush)} µs, raw client ${f1(raw.cpuUsPerPush)} µs ` +
    `(${f2(pipe.cpuUsPerPush / raw.cpuUsPerPush)}×); main thread ${f1(pipe.mainUsPerPush)} vs ${f1(raw.mainUsPerPush)} µs: ` +
    `a saturated event loop allows ${f0(1e6 / pipe.mainUsPerPush)} pushes/s through the pipeline, ${f0(1e6 / raw.mainUsPerPush)} through the client alone.`;
  const pushesTotal = variants.reduce((n, v) => n + v.samples.reduce((m, s) => m + s.pushes, 0), 0);
  const correctness = problems.length
    ? `Correctness: FAILED\n${problems.map((p) => `- ${p}`).join('\n')}`
    : `Correctness: every measured and warm-up round delivered one push to every device, each answered 200, none lost, ` +
      `failed, retried or duplicated (dispatcher: xaps_pushes_total; mock: per-device counts); ${f0(pushesTotal)} measured pushes.`;
  const pipeSamples = variants.find((v) => v.role === 'pipeline')!.samples;
  const scheduling =
    `Pipeline rounds: all ${o.users} notify() calls resolved (changes scheduled) after a median ${f0(median(pipeSamples.map((s) => s.notifyMs ?? NaN)))} ms; ` +
    `after the last push the round waited a median ${f0(median(pipeSamples.map((s) => s.drainMs ?? NaN)))} ms (not measured) for the coalescing windows to end.`;

  const maxOther = Math.max(...sums.map((s) => s.maxOtherCores));
  const again = retried.length
    ? ` ${retried.length} round(s) were run again because other processes used more than ${BUSY_CORES} cores during them (${retried.join(', ')}).`
    : '';
  const quiet =
    maxOther > BUSY_CORES
      ? `WARNING: the machine was not idle: other processes used up to ${f2(maxOther)} of its ${os.availableParallelism()} CPUs during a counted round ` +
        `(load average ${loadAtStart} at the start); those rates are lower than on an idle machine. Run again when it is idle.${again}`
      : `Other processes used at most ${f2(maxOther)} cores during any counted round (load average ${loadAtStart} at the start).${again}`;
  let profileText = '';
  const profiled = variants.filter((v) => v.final?.profileFile);
  for (const v of profiled) {
    const file = v.final!.profileFile!;
    const summary = formatProfile(summarizeProfile(file, ROOT), 20);
    profileText += `\n### CPU profile: ${v.label}\n\n${path.relative(ROOT, file)} (measured rounds only; the profiler slows the process down, so this run's rates are not comparable)\n\n\`\`\`\n${summary}\n\`\`\`\n`;
  }

  const mc = machine();
  const machineLine = `${mc.nproc} CPUs (${mc.cpu}), ${mc.memGb} GB, ${mc.kernel}, Node ${mc.node}`;
  const consoleText = [
    results,
    '',
    rounds,
    '',
    aim,
    correctness,
    scheduling,
    quiet,
    profileText ? profileText.trimEnd() : '',
  ]
    .filter((l) => l !== '')
    .join('\n');

  const markdown = `# APNs push throughput

Generated by \`npm run bench:apns\` (bench/apns-throughput.ts). Do not edit by hand.

- Date: ${started.toISOString()}
- Machine: ${machineLine}
- Commit: ${commit(ROOT)}
- Reproduce: \`${command}\`

${aim}

${results}

pushes/s per measured round (rounds alternate between the variants; one unmeasured warm-up round each before):

${rounds}

${correctness}

${scheduling}

${quiet}

## What is measured

Everything runs on loopback, in separate processes: the mock APNs (src/testbed/mock-apns.ts: TLS 1.3 + HTTP/2,
client certificate checked, requests validated like Apple does, not recorded) and each variant, so that the CPU
and memory figures belong to one variant only. The pushing processes and the mock run the compiled build
(${path.relative(ROOT, path.resolve(ROOT, o.dist)) || '.'}/) as \`node dist/cli/main.js serve\` does, not src/ through tsx${process.env.NODE_OPTIONS?.trim() ? `; NODE_OPTIONS=${process.env.NODE_OPTIONS.trim()}` : ''}. The machine has ${mc.nproc} CPUs.

- **CPU µs/push**: process.cpuUsage() of the pushing process (user + system, all threads) over the measured
  interval, per push.
- **main thread µs/push**: CPU of the main thread alone (/proc/self/task/<pid>/stat), where all JavaScript runs.
  **main thread busy** = that CPU / wall time: near 100 % the event loop is saturated and the pushing process is
  the limit. **event-loop ceiling** = 10⁶ / main thread µs per push: what one saturated event loop would push if
  nothing else limited it (less noisy than the rate on a busy machine).
- **GC pause µs/push**: the main thread's GC pauses (perf_hooks 'gc' entries), part of its CPU.
- **mock CPU µs/push**, **mock cores**: the mock process's CPU over the round; near 1 core the mock, not the
  pusher, limits the rate.
- **other procs cores**: the machine's busy CPU time (os.cpus()) minus this benchmark's processes and the kernel's
  threads (ksoftirqd carries part of the loopback traffic) over the measured interval. ${
    o.retryBusy > 0
      ? `A round where other processes used more than ${BUSY_CORES} cores is run again (at most ${o.retryBusy} times; the last attempt counts).`
      : 'Rounds disturbed by other processes were not run again (--retry-busy 0).'
  }
- **peak RSS**: max of memoryUsage().rss sampled every 50 ms and resourceUsage().maxRSS over the pushing
  process's whole life, set-up included (for the pipeline: the store's ${o.devices} registrations in memory);
  **heap used at end**: memoryUsage().heapUsed after the last round (garbage not yet collected included). Both
  pushing processes carry tsx's loader (their script is TypeScript), roughly 35 MB of RSS on Node 20 that
  \`node dist/cli/main.js serve\` does not have; the difference between the variants is the pipeline's own.

Variants and method:

- **raw Http2ApnsClient**: ${o.devices} notifications per round (one per device, the same requests the pipeline
  sends, built before the clock starts), ${o.window} kept in flight, ${o.connections} HTTP/2 connections.
- **pipeline**: what \`serve\` runs, with serve's defaults: an embedded registration store in a temp dir holding
  ${o.devices} registrations of ${o.users} users (version 2, INBOX + one other mailbox each), LocalChangeGuard,
  PushDispatcher (coalescing window ${o.coalesceMs} ms, queue ${SERVE.pushQueueSize}, 1000 in flight, background,
  priority 5, expiration 1 day, 8 attempts) and Http2ApnsClient (${o.connections} connections, 15 s timeout), one
  metrics registry with the default process metrics as serve has. A round calls \`dispatcher.notify()\` once for
  every user (half of them INBOX, half their other mailbox, swapped each round; a change id per round), i.e. one
  push per device, and ends when every change is scheduled and nothing is waiting or in flight; the delivered
  count is then read from \`xaps_pushes_total{result="delivered"}\`. The time covers the store reads, the change
  guard, coalescing bookkeeping, payload building and the HTTP/2 exchanges.
- **Coalescing**: a device's first change is pushed at once and opens a ${o.coalesceMs} ms window; a second change
  within it would be merged into a follow-up sent at the window's end, so back-to-back rounds would measure the
  window, not throughput. Each pipeline round therefore uses fresh change ids (the guard remembers ids for 10 min)
  and, after its last push, waits until the dispatcher has forgotten every device (\`stats().devices === 0\`, i.e.
  every window has ended) before the next round of either variant; that wait is outside the measured time, and a
  check confirms that no follow-up push was sent during it.
- Exit status: 0 whatever the rates; 1 when a push was lost, failed, retried, duplicated or answered other than 200.
${profileText ? `\n## Profile\n${profileText}` : ''}`;
  return { console: consoleText, markdown };
}

// ----------------------------------------------------------------------- main ---

const roleAt = process.argv.indexOf('--role');
if (roleAt >= 0) {
  runWorker();
} else {
  main().then(
    (code) => {
      process.exitCode = code;
    },
    (err: unknown) => {
      process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      process.exitCode = 1;
    },
  );
}
