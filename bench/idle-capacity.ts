/**
 * `tsx bench/idle-capacity.ts` (one of `npm run bench`'s benchmarks): idle capacity — thousands of TLS sessions idling through one xaps-proxy
 * process: the proxy's memory per session and its CPU while they idle.
 *
 *   node scripts/bootstrap.mjs bench && npx tsx bench/idle-capacity.ts [--sessions 10000] [--reps 3] [--idle-seconds 20] …
 *   npx tsx bench/idle-capacity.ts --help
 *
 * Processes, all on loopback: xaps-proxy as operators run it (`node dist/cli/main.js serve
 * --listen-tls …`), a lightweight upstream stand-in (idle-lib/standin.ts: Dovecot here cannot hold
 * 10,000 sessions, one imap process each), the clients (idle-lib/clients.ts: connect, LOGIN, SELECT,
 * IDLE, then nothing), and this orchestrator, which reads the proxy's /proc and /metrics.
 *
 * Aim: under 30 KB of proxy memory per idle TLS session. Timing never fails the run; a session
 * that cannot be opened, is lost while idling or does not answer afterwards does (exit 1).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { sleep, startTcpRelay } from '../src/testbed/index.js';
import { fdLimit } from '../src/testbed/processes.js';
import { ChildPeer } from './lib/peer.js';
import { ArgsError, positiveInt, splitOption } from './lib/args.js';
import { BenchFailure, commandLine, isEntryPoint, onCleanup, runMain, say } from './lib/lifecycle.js';
import { openFds, processCpuMs, processMemory, type ProcessMemory } from './lib/procstat.js';
import { commit, machine, median, table, writeReport } from './lib/report.js';
import { startProxyProcess } from './lib/targets.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const HERE = path.dirname(fileURLToPath(import.meta.url));
const AIM_KB = 30;
const KB = 1024;
/** fds the proxy needs besides two per session (stdio, epoll, listeners, metrics, log, libuv). */
const FD_RESERVE = 64;
/** Quiet time after the warm-up before the baseline is read. */
const BASELINE_QUIET_MS = 10_000;

// ------------------------------------------------------------------- args ---

type Diagnostic = 'plain' | 'floor' | 'haproxy';

interface Args {
  sessions: number;
  steps: number[];
  reps: number;
  idleSeconds: number;
  diagnostics: Diagnostic[];
  /** Sessions of the diagnostic runs (the per-session figure does not depend on the count). */
  diagnosticSessions: number;
  concurrency: number;
  /** The build to measure (default dist/). */
  dist: string;
  out: string;
  json: string | null;
}

const DEFAULTS: Args = {
  sessions: 10_000,
  steps: [2000, 5000],
  reps: 3,
  idleSeconds: 20,
  diagnostics: ['plain', 'floor', 'haproxy'],
  diagnosticSessions: 3000,
  concurrency: 100,
  dist: 'dist',
  out: 'bench/results/idle-capacity.md',
  json: null,
};

const USAGE = `usage: npx tsx bench/idle-capacity.ts [options]
       (npm run bench runs it with every other benchmark; node scripts/bootstrap.mjs bench builds dist/ first)

Opens N TLS sessions through one xaps-proxy process (to a lightweight upstream stand-in),
each LOGIN, SELECT INBOX, IDLE, and measures the proxy's memory per session (VmRSS growth
over the same process with no session) and its CPU while they idle.

  --sessions N       idle sessions (default ${DEFAULTS.sessions}; capped by the fd limit: the proxy
                     needs 2 per session)
  --steps LIST       also measure at these session counts on the way up (default ${DEFAULTS.steps.join(',')}; "none")
  --reps N           repetitions with a fresh proxy each, median quoted (default ${DEFAULTS.reps})
  --idle-seconds S   window over which idle CPU is measured (default ${DEFAULTS.idleSeconds})
  --diagnostics LIST once each, for comparison (default ${DEFAULTS.diagnostics.join(',')}; "none"):
                     plain = the same through the proxy's plaintext listener (what TLS costs);
                     floor = a bare Node.js TLS relay (tls.createServer + net.connect + pipe);
                     haproxy = haproxy mode tcp terminating TLS (TLS in front of the proxy instead)
  --diagnostic-sessions N  sessions of those runs (default ${DEFAULTS.diagnosticSessions})
  --concurrency N    sessions being opened at the same time (default ${DEFAULTS.concurrency})
  --dist DIR         the build to run (default ${DEFAULTS.dist}; e.g. a patched copy, to compare)
  --out FILE         markdown report (default ${DEFAULTS.out}; overwritten)
  --json FILE        also write the results as JSON (used by bench/all.ts)
  -h, --help         this text
`;

function parseArgs(argv: string[]): Args | 'help' {
  const a: Args = { ...DEFAULTS, steps: [...DEFAULTS.steps], diagnostics: [...DEFAULTS.diagnostics] };
  for (let i = 0; i < argv.length; i++) {
    const opt = splitOption(argv[i]!);
    const k = opt.name;
    let v = opt.value;
    if (k === '-h' || k === '--help') return 'help';
    v ??= argv[++i];
    if (v === undefined) throw new ArgsError(`${k} needs a value`);
    const int = (min: number) => positiveInt(k, v, min);
    switch (k) {
      case '--sessions': a.sessions = int(1); break;
      case '--reps': a.reps = int(1); break;
      case '--idle-seconds': a.idleSeconds = int(1); break;
      case '--concurrency': a.concurrency = int(1); break;
      case '--diagnostic-sessions': a.diagnosticSessions = int(1); break;
      case '--out': a.out = v; break;
      case '--dist': a.dist = v; break;
      case '--json': a.json = v; break;
      case '--steps':
        a.steps = v === 'none' ? [] : v.split(',').map((s) => {
          if (!/^\d+$/.test(s.trim())) throw new ArgsError(`--steps: not a number: ${s}`);
          return Number(s.trim());
        });
        break;
      case '--diagnostics':
        a.diagnostics = v === 'none' ? [] : v.split(',').map((s) => s.trim()).filter(Boolean).map((s) => {
          if (s !== 'plain' && s !== 'floor' && s !== 'haproxy') throw new ArgsError(`--diagnostics: unknown ${JSON.stringify(s)} (plain, floor, haproxy)`);
          return s;
        });
        break;
      default:
        throw new ArgsError(`unknown argument ${JSON.stringify(argv[i])}`);
    }
  }
  return a;
}

function canonical(a: Args): string {
  const parts = ['--sessions', String(a.sessions), '--steps', a.steps.length ? a.steps.join(',') : 'none', '--reps', String(a.reps), '--idle-seconds', String(a.idleSeconds)];
  parts.push('--diagnostics', a.diagnostics.length ? a.diagnostics.join(',') : 'none');
  if (a.diagnostics.length) parts.push('--diagnostic-sessions', String(a.diagnosticSessions));
  if (a.concurrency !== DEFAULTS.concurrency) parts.push('--concurrency', String(a.concurrency));
  if (a.dist !== DEFAULTS.dist) parts.push('--dist', a.dist);
  if (a.out !== DEFAULTS.out) parts.push('--out', a.out);
  return `node scripts/bootstrap.mjs bench && npx tsx bench/idle-capacity.ts ${parts.join(' ')}`;
}

// -------------------------------------------------------------- measuring ---

interface Mem extends ProcessMemory {
  /** JS heap used / external (Buffers, ArrayBuffers, native objects V8 knows of), bytes; null when unknown. */
  heapUsed: number | null;
  external: number | null;
}

type Kind = 'tls' | 'plain' | 'floor' | 'haproxy';
const KIND_LABEL: Record<Kind, string> = {
  tls: 'xaps-proxy, TLS (--listen-tls)',
  plain: 'xaps-proxy, plaintext (--listen)',
  floor: 'bare Node.js TLS relay (floor)',
  haproxy: 'haproxy mode tcp, terminating TLS',
};

interface Relay {
  kind: Kind;
  pid: number;
  port: number;
  memory(): Promise<Mem>;
  logTail(): string;
  stop(): Promise<void>;
}

function httpGet(port: number, p: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: p, timeout: 10_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => resolve(body));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
  });
}

function metric(text: string, name: string): number | null {
  const m = new RegExp(`^${name}(?:\\{[^}]*\\})? ([0-9.e+-]+)`, 'm').exec(text);
  return m ? Number(m[1]) : null;
}

interface RunPoint {
  sessions: number;
  mem: Mem;
}

interface RunResult {
  kind: Kind;
  rep: number;
  sessions: number;
  base: Mem;
  points: RunPoint[];
  /** Memory at `sessions` after the idle window (the headline). */
  final: Mem;
  openMs: number;
  /** Proxy CPU while the sessions idled, % of one core; and with none (before any session). */
  idleCpuPct: number;
  baseCpuPct: number;
  fdsAtFull: number | null;
  afterCloseRssKb: number;
  probe: { probed: number; ok: number; p50Ms: number; maxMs: number };
  upstreamOpen: number;
}

const rssKbOf = (pid: number) => processMemory(pid)?.rssKb ?? NaN;

/** Waits until VmRSS stops moving (3 samples 1 s apart within 0.5 %, at most `maxMs`). */
async function settle(pid: number, maxMs = 15_000): Promise<void> {
  const t0 = Date.now();
  let prev = rssKbOf(pid);
  let calm = 0;
  while (Date.now() - t0 < maxMs) {
    await sleep(1000);
    const now = rssKbOf(pid);
    if (!Number.isFinite(now)) throw new Error(`pid ${pid} is gone`);
    calm = Math.abs(now - prev) <= prev * 0.005 ? calm + 1 : 0;
    prev = now;
    if (calm >= 3) return;
  }
}

async function cpuPct(pid: number, seconds: number): Promise<number> {
  const c0 = processCpuMs(pid);
  const t0 = performance.now();
  await sleep(seconds * 1000);
  const c1 = processCpuMs(pid);
  if (c0 === undefined || c1 === undefined) throw new Error(`pid ${pid} is gone`);
  return ((c1 - c0) / (performance.now() - t0)) * 100;
}

interface Env {
  distDir: string;
  /** The build knows --max-connections-per-ip. */
  perIpFlag: boolean;
  work: string;
  certPath: string;
  keyPath: string;
  standin: ChildPeer;
  standinPort: number;
  clients: ChildPeer;
}

async function startRelay(env: Env, kind: Kind, rep: number): Promise<Relay> {
  if (kind === 'haproxy') {
    const relay = await startTcpRelay({ target: { host: '127.0.0.1', port: env.standinPort }, tls: { certPemPath: env.certPath, keyPemPath: env.keyPath } });
    onCleanup('haproxy', () => relay.stop());
    return {
      kind,
      pid: relay.pid,
      port: relay.port,
      async memory() {
        const m = processMemory(relay.pid);
        if (!m) throw new Error('haproxy is gone');
        return { ...m, heapUsed: null, external: null };
      },
      logTail: () => (fs.existsSync(relay.logPath) ? fs.readFileSync(relay.logPath, 'utf8').split('\n').slice(-20).join('\n') : ''),
      stop: () => relay.stop(),
    };
  }
  if (kind === 'floor') {
    const peer = ChildPeer.fork('bare relay', path.join(HERE, 'idle-lib', 'bare-relay.ts'));
    onCleanup('bare relay', () => peer.stop());
    const { port } = await peer.call<{ port: number }>({
      type: 'start',
      cert: fs.readFileSync(env.certPath, 'utf8'),
      key: fs.readFileSync(env.keyPath, 'utf8'),
      upstreamPort: env.standinPort,
    });
    return {
      kind,
      pid: peer.pid,
      port,
      async memory() {
        const m = processMemory(peer.pid);
        if (!m) throw new Error('the bare relay is gone');
        const u = await peer.call<NodeJS.MemoryUsage>({ type: 'memory' });
        return { ...m, heapUsed: u.heapUsed, external: u.external };
      },
      logTail: () => '',
      stop: () => peer.stop(),
    };
  }
  const proxy = await startProxyProcess({
    root: ROOT,
    upstreamPort: env.standinPort,
    certPath: env.certPath,
    keyPath: env.keyPath,
    workDir: env.work,
    distDir: env.distDir,
    // every client comes from 127.0.0.1: the per-address cap (a defence against one client host) must not apply
    serveArgs: env.perIpFlag ? ['--max-connections-per-ip', '0'] : [],
    logName: `xaps-proxy-${kind}-${rep}.log`,
  });
  onCleanup('xaps-proxy', () => proxy.stop());
  return {
    kind,
    pid: proxy.pid,
    port: kind === 'tls' ? proxy.tlsPort : proxy.plainPort,
    async memory() {
      const m = processMemory(proxy.pid);
      if (!m) throw new Error(`xaps-proxy (pid ${proxy.pid}) is gone`);
      const text = await httpGet(proxy.metricsPort, '/metrics');
      return { ...m, heapUsed: metric(text, 'xaps_nodejs_heap_size_used_bytes'), external: metric(text, 'xaps_nodejs_external_memory_bytes') };
    },
    logTail: () => (fs.existsSync(proxy.logPath) ? fs.readFileSync(proxy.logPath, 'utf8').split('\n').slice(-20).join('\n') : ''),
    stop: () => proxy.stop(),
  };
}

interface OpenResult {
  opened: number;
  failed: number;
  errors: string[];
  ms: number;
  total: number;
}

async function openSessions(env: Env, relay: Relay, count: number, concurrency: number): Promise<OpenResult> {
  const r = await env.clients.call<OpenResult>({
    type: 'open',
    host: '127.0.0.1',
    port: relay.port,
    tls: relay.kind === 'plain' ? null : { ca: fs.readFileSync(env.certPath, 'utf8'), servername: 'localhost' },
    count,
    concurrency,
    user: 'idle',
    password: 'idlepw',
  });
  if (r.failed > 0) {
    throw new BenchFailure(`${r.failed} of ${count} sessions through ${KIND_LABEL[relay.kind]} could not be opened: ${r.errors.join('; ')}\n${relay.logTail()}`);
  }
  return r;
}

async function runOnce(env: Env, kind: Kind, rep: number, n: number, steps: number[], idleSeconds: number, concurrency: number): Promise<RunResult> {
  const label = `${KIND_LABEL[kind]}${kind === 'tls' ? ` rep ${rep}` : ''}`;
  const relay = await startRelay(env, kind, rep);
  try {
    // warm-up: code paths compiled, TLS context and pools in use; then nothing open
    await openSessions(env, relay, 200, concurrency);
    await env.clients.call({ type: 'closeAll' });
    // V8 gives memory back some seconds after allocation stops (its memory reducer): wait for
    // that, as the reading with all sessions comes after an idle window too
    await sleep(BASELINE_QUIET_MS);
    await settle(relay.pid);
    const baseCpuPct = await cpuPct(relay.pid, Math.min(5, idleSeconds));
    const base = await relay.memory();
    say(`${label}: 0 sessions → VmRSS ${(base.rssKb / KB).toFixed(1)} MiB, CPU ${baseCpuPct.toFixed(2)} % of a core`);
    const points: RunPoint[] = [];
    let open = 0;
    let openMs = 0;
    for (const target of [...steps.filter((s) => s < n), n]) {
      const r = await openSessions(env, relay, target - open, concurrency);
      open = r.total;
      openMs += r.ms;
      if (open !== target) throw new BenchFailure(`${label}: ${open} sessions alive, ${target} opened (sessions lost)`);
      await settle(relay.pid);
      const mem = await relay.memory();
      points.push({ sessions: open, mem });
      say(
        `${label}: ${open} sessions (opened at ${((r.opened / r.ms) * 1000).toFixed(0)}/s) → VmRSS ${(mem.rssKb / KB).toFixed(1)} MiB, ` +
          `${(((mem.rssKb - base.rssKb) * KB) / open / KB).toFixed(1)} KiB/session`,
      );
    }
    const fdsAtFull = openFds(relay.pid) ?? null;
    const idleCpuPct = await cpuPct(relay.pid, idleSeconds);
    const final = await relay.memory();
    const up = await env.standin.call<{ open: number }>({ type: 'stats' });
    const status = await env.clients.call<{ alive: number; lost: number }>({ type: 'status' });
    if (status.alive !== n || status.lost > 0) throw new BenchFailure(`${label}: ${status.lost} idle sessions were closed while idling (${status.alive} of ${n} alive)\n${relay.logTail()}`);
    const probe = await env.clients.call<{ probed: number; ok: number; failures: string[]; p50Ms: number; maxMs: number }>({ type: 'probe', sample: 200 });
    if (probe.ok !== probe.probed) throw new BenchFailure(`${label}: ${probe.probed - probe.ok} of ${probe.probed} probed sessions did not answer DONE/NOOP/IDLE: ${probe.failures.join('; ')}`);
    say(
      `${label}: idle ${idleSeconds} s → CPU ${idleCpuPct.toFixed(2)} % of a core, VmRSS ${(final.rssKb / KB).toFixed(1)} MiB ` +
        `(${(((final.rssKb - base.rssKb) * KB) / n / KB).toFixed(1)} KiB/session); ${probe.ok}/${probe.probed} probed sessions answered`,
    );
    await env.clients.call({ type: 'closeAll' });
    await sleep(2000);
    const afterCloseRssKb = rssKbOf(relay.pid);
    return { kind, rep, sessions: n, base, points, final, openMs, idleCpuPct, baseCpuPct, fdsAtFull, afterCloseRssKb, probe, upstreamOpen: up.open };
  } finally {
    await env.clients.call({ type: 'closeAll' }).catch(() => undefined);
    await relay.stop();
  }
}

// ----------------------------------------------------------------- report ---

const perSessionKb = (r: RunResult, m: Mem = r.final, n = r.sessions) => ((m.rssKb - r.base.rssKb) * KB) / n / KB;
const heapPerSessionKb = (r: RunResult) =>
  r.final.heapUsed !== null && r.base.heapUsed !== null ? (r.final.heapUsed - r.base.heapUsed) / r.sessions / KB : NaN;
const externalPerSessionKb = (r: RunResult) =>
  r.final.external !== null && r.base.external !== null ? (r.final.external - r.base.external) / r.sessions / KB : NaN;
/** Growth between the first measured step and the full count, per session: one-off costs excluded. */
function marginalKb(r: RunResult): number {
  const first = r.points[0];
  if (!first || first.sessions >= r.sessions) return NaN;
  return ((r.final.rssKb - first.mem.rssKb) * KB) / (r.sessions - first.sessions) / KB;
}

export interface IdleSummary {
  bench: 'idle-capacity';
  command: string;
  started: string;
  seconds: number;
  wanted: number;
  sessions: number;
  capNote: string | null;
  reps: number;
  idleSeconds: number;
  aimKb: number;
  kbPerSession: number;
  kbPerSessionRuns: number[];
  marginalKb: number;
  heapKbPerSession: number;
  externalKbPerSession: number;
  idleCpuPct: number;
  baseCpuPct: number;
  rssBaseMiB: number;
  rssFullMiB: number;
  openPerSecond: number;
  plainKbPerSession: number | null;
  floorKbPerSession: number | null;
  haproxyKbPerSession: number | null;
  diagnosticSessions: number | null;
  floorIdleCpuPct: number | null;
  aimMet: boolean;
}

const f1 = (x: number) => (Number.isFinite(x) ? x.toFixed(1) : '—');
const f2 = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : '—');
const mib = (kb: number) => `${(kb / KB).toFixed(1)} MiB`;

function summarizeRuns(args: Args, n: number, capNote: string | null, runs: RunResult[], started: Date, seconds: number): IdleSummary {
  const tls = runs.filter((r) => r.kind === 'tls');
  const plain = runs.find((r) => r.kind === 'plain');
  const floor = runs.find((r) => r.kind === 'floor');
  const haproxy = runs.find((r) => r.kind === 'haproxy');
  const kb = median(tls.map((r) => perSessionKb(r)));
  return {
    bench: 'idle-capacity',
    command: canonical(args),
    started: started.toISOString(),
    seconds,
    wanted: args.sessions,
    sessions: n,
    capNote,
    reps: tls.length,
    idleSeconds: args.idleSeconds,
    aimKb: AIM_KB,
    kbPerSession: kb,
    kbPerSessionRuns: tls.map((r) => perSessionKb(r)),
    marginalKb: median(tls.map(marginalKb)),
    heapKbPerSession: median(tls.map(heapPerSessionKb)),
    externalKbPerSession: median(tls.map(externalPerSessionKb)),
    idleCpuPct: median(tls.map((r) => r.idleCpuPct)),
    baseCpuPct: median(tls.map((r) => r.baseCpuPct)),
    rssBaseMiB: median(tls.map((r) => r.base.rssKb)) / KB,
    rssFullMiB: median(tls.map((r) => r.final.rssKb)) / KB,
    openPerSecond: median(tls.map((r) => (r.sessions / r.openMs) * 1000)),
    plainKbPerSession: plain ? marginalKb(plain) : null,
    floorKbPerSession: floor ? marginalKb(floor) : null,
    haproxyKbPerSession: haproxy ? marginalKb(haproxy) : null,
    diagnosticSessions: plain?.sessions ?? floor?.sessions ?? haproxy?.sessions ?? null,
    floorIdleCpuPct: floor ? floor.idleCpuPct : null,
    aimMet: kb < AIM_KB,
  };
}

/** The headline table (also used by bench/all.ts for BENCHMARKS.md). */
export function idleHeadlineTable(s: IdleSummary): string {
  const rows: string[][] = [
    ['idle TLS sessions through one xaps-proxy process', `${s.sessions.toLocaleString('en-US')}${s.sessions < s.wanted ? ` (of ${s.wanted.toLocaleString('en-US')} wanted: fd limit, see below)` : ''}`],
    ['upstream', 'lightweight IMAP stand-in (bench/idle-lib/standin.ts), not Dovecot: Dovecot here cannot hold that many sessions (one imap process each)'],
    [`proxy memory per session (VmRSS growth ÷ sessions, median of ${s.reps})`, `**${f1(s.kbPerSession)} KiB** (runs: ${s.kbPerSessionRuns.map(f1).join(', ')})`],
    ['aim', `< ${s.aimKb} KiB per session → ${s.aimMet ? '**met**' : '**NOT met**'}`],
    ['of which JS heap / external (Buffers, native handles V8 knows of)', `${f1(s.heapKbPerSession)} / ${f1(s.externalKbPerSession)} KiB`],
    ['marginal per session (first step → all: one-off growth such as V8 enlarging its young generation left out)', `${f1(s.marginalKb)} KiB`],
    ['proxy VmRSS with 0 / all sessions', `${s.rssBaseMiB.toFixed(1)} / ${s.rssFullMiB.toFixed(1)} MiB`],
    [`proxy CPU while all idle (${s.idleSeconds} s window)`, `${f2(s.idleCpuPct)} % of one core (with no session: ${f2(s.baseCpuPct)} %)`],
    ['sessions opened per second (TLS handshake, LOGIN, SELECT, IDLE)', f1(s.openPerSecond)],
  ];
  const dn = s.diagnosticSessions ?? 0;
  const at = s.diagnosticSessions === null ? '' : ` (marginal, ${Math.round(dn / 4).toLocaleString('en-US')} → ${dn.toLocaleString('en-US')} sessions)`;
  if (s.plainKbPerSession !== null) rows.push([`comparison: xaps-proxy's plaintext listener (what TLS adds)${at}`, `${f1(s.plainKbPerSession)} KiB per session`]);
  if (s.floorKbPerSession !== null) {
    rows.push([`comparison: bare Node.js TLS relay (tls.createServer + net.connect + pipe; the floor for a Node relay)${at}`, `${f1(s.floorKbPerSession)} KiB per session, idle CPU ${f2(s.floorIdleCpuPct ?? NaN)} %`]);
  }
  if (s.haproxyKbPerSession !== null) rows.push([`comparison: haproxy mode tcp terminating TLS (TLS in front instead)${at}`, `${f1(s.haproxyKbPerSession)} KiB per session (haproxy's VmRSS)`]);
  return table(['idle capacity', 'value'], rows, ['l', 'l']);
}

function report(args: Args, s: IdleSummary, runs: RunResult[], fdNote: string): string {
  const m = machine();
  const lines: string[] = [];
  lines.push('## Idle capacity (`bench/idle-capacity.ts`)', '');
  lines.push(`Aim: under ${AIM_KB} KB of xaps-proxy memory per idle TLS session. Informational: timing never fails this benchmark; a session that cannot be opened or is lost does (exit 1).`, '');
  lines.push(idleHeadlineTable(s), '');
  if (s.capNote) lines.push(`- ${s.capNote}`);
  lines.push(`- ${fdNote}`, '');
  lines.push(
    'Method: xaps-proxy runs as operators run it (`node dist/cli/main.js serve --listen-tls … --listen … --upstream <stand-in>`, own process, no push configured). ' +
      'The clients run in their own process: each session connects (implicit TLS, P-256 certificate), LOGINs, SELECTs INBOX and IDLEs, ' +
      `${args.concurrency} being opened at a time; the upstream is a lightweight stand-in in a third process (greeting, ID, LOGIN, SELECT, IDLE/DONE, a few hundred bytes each). ` +
      `Per repetition, a fresh proxy opens and closes 200 sessions (warm-up), ${BASELINE_QUIET_MS / 1000} s later its VmRSS is read once it is stable (3 readings 1 s apart within 0.5 %) — the baseline — then sessions are opened ` +
      `up to ${args.steps.filter((x) => x < s.sessions).concat(s.sessions).join(', ')}, VmRSS read once stable at each count; then the proxy's CPU (utime+stime from /proc/PID/stat) over ${args.idleSeconds} s of idling, ` +
      'and the memory again at the end of that window: **per session = (VmRSS then − baseline) ÷ sessions**. No forced GC: VmRSS is what the operator sees. ' +
      'Heap and external memory come from the proxy\'s own /metrics (prom-client: heap used, external). Afterwards 200 sessions spread over all must answer DONE, NOOP and IDLE again, ' +
      'and no session may have been closed.',
    '',
  );
  const rows = runs.map((r) => [
    KIND_LABEL[r.kind] + (r.kind === 'tls' ? ` #${r.rep}` : ''),
    String(r.sessions),
    mib(r.base.rssKb),
    r.points.length > 1 ? r.points.slice(0, -1).map((p) => `${p.sessions}: ${f1(perSessionKb(r, p.mem, p.sessions))}`).join(', ') : '—',
    mib(r.final.rssKb),
    f1(perSessionKb(r)),
    f1(marginalKb(r)),
    f1(heapPerSessionKb(r)),
    f1(externalPerSessionKb(r)),
    f1((r.final.anonKb - r.base.anonKb) / r.sessions),
    f2(r.idleCpuPct),
    r.fdsAtFull === null ? '—' : String(r.fdsAtFull),
    mib(r.afterCloseRssKb),
    f1((r.sessions / r.openMs) * 1000),
  ]);
  lines.push('Per run (KiB per session unless noted; "marginal": growth from the first step to all sessions, per session added):', '');
  lines.push(
    table(
      ['run', 'sessions', 'VmRSS, 0 sessions', 'at steps (sessions: KiB/session)', 'VmRSS, all', 'per session', 'marginal', 'heap', 'external', 'RssAnon', 'idle CPU %', 'fds', 'VmRSS after closing all', 'opened/s'],
      rows,
      ['l', 'r', 'r', 'l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r'],
    ),
    '',
  );
  lines.push(
    `Machine: ${m.nproc} CPUs (${m.cpu}), ${m.memGb} GiB RAM, ${m.kernel}; Node ${m.node}.`,
    '',
    `Date: ${s.started} (took ${s.seconds.toFixed(0)} s). Commit: ${commit(ROOT)}.`,
    '',
    `Reproduce: \`${s.command}\``,
    '',
  );
  return lines.join('\n');
}

// ------------------------------------------------------------------- main ---

function makeCert(dir: string): { certPath: string; keyPath: string } {
  const certPath = path.join(dir, 'idle.pem');
  const keyPath = path.join(dir, 'idle.key');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2',
    '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
    '-keyout', keyPath, '-out', certPath,
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  return { certPath, keyPath };
}

async function main(): Promise<number> {
  const args = commandLine(parseArgs, USAGE, (err) => err instanceof ArgsError);
  if (typeof args === 'number') return args;
  if (!fs.existsSync(path.resolve(ROOT, args.dist, 'cli', 'main.js'))) throw new Error(`${args.dist}/cli/main.js is missing: run \`npm run build\` (node scripts/bootstrap.mjs bench does)`);
  const started = new Date();
  const t0 = Date.now();
  const limit = fdLimit();
  const hard = limit?.hard ?? 1024;
  const maxSessions = Math.floor((hard - FD_RESERVE) / 2);
  const n = Math.min(args.sessions, maxSessions);
  const fdNote =
    `fd limit (RLIMIT_NOFILE) of this process and so of the proxy: soft ${limit?.soft ?? '?'}, hard ${hard}; Node raises the soft limit to the hard one at start. ` +
    `The proxy holds 2 fds per session (client and upstream socket) plus about ${FD_RESERVE / 2}–${FD_RESERVE} of its own.`;
  const capNote =
    n < args.sessions
      ? `Only ${n.toLocaleString('en-US')} of the ${args.sessions.toLocaleString('en-US')} sessions asked for: ${args.sessions.toLocaleString('en-US')} need ${2 * args.sessions + FD_RESERVE / 2}+ fds in the proxy, ` +
        `over this machine's hard limit of ${hard}, which needs CAP_SYS_RESOURCE to raise (\`ulimit -Hn\`; a container's limit is set by its runtime). ` +
        'The per-session figures do not depend on the count (see the steps).'
      : null;
  if (capNote) say(capNote);

  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'xaps-bench-idle-'));
  onCleanup('work dir', async () => fs.rmSync(work, { recursive: true, force: true }));
  const { certPath, keyPath } = makeCert(work);
  const standin = ChildPeer.fork('upstream stand-in', path.join(HERE, 'idle-lib', 'standin.ts'));
  onCleanup('upstream stand-in', () => standin.stop());
  const { port: standinPort } = await standin.call<{ port: number }>({ type: 'start' });
  const clients = ChildPeer.fork('idle clients', path.join(HERE, 'idle-lib', 'clients.ts'));
  onCleanup('idle clients', () => clients.stop());
  const distDir = path.resolve(ROOT, args.dist);
  const help = execFileSync(process.execPath, [path.join(distDir, 'cli', 'main.js'), 'help', 'serve'], { encoding: 'utf8' });
  const env: Env = { distDir, perIpFlag: help.includes('--max-connections-per-ip'), work, certPath, keyPath, standin, standinPort, clients };
  say(`upstream stand-in (pid ${standin.pid}) on ${standinPort}; clients in pid ${clients.pid}; ${n} sessions, ${args.reps} repetitions`);

  const runs: RunResult[] = [];
  for (let rep = 1; rep <= args.reps; rep++) runs.push(await runOnce(env, 'tls', rep, n, args.steps, args.idleSeconds, args.concurrency));
  const dn = Math.min(n, args.diagnosticSessions);
  for (const d of args.diagnostics) runs.push(await runOnce(env, d, 1, dn, [Math.round(dn / 4)], Math.min(10, args.idleSeconds), args.concurrency));

  const seconds = (Date.now() - t0) / 1000;
  const summary = summarizeRuns(args, n, capNote, runs, started, seconds);
  const text = report(args, summary, runs, fdNote);
  process.stdout.write(`\n${text}`);
  writeReport(path.resolve(ROOT, args.out), text);
  if (args.json) writeReport(path.resolve(ROOT, args.json), JSON.stringify(summary, null, 2));
  say(`report written to ${args.out}`);
  return 0;
}

if (isEntryPoint(import.meta.url)) runMain(main);
