/**
 * `npm run bench`: every benchmark on this machine, one after the other, then BENCHMARKS.md at
 * the root — one table per benchmark with its aim, filled in from this run, plus the machine,
 * the date, the commit and the command that reproduces each table.
 *
 *   npm run bench                       # the full run (under 20 minutes on 2 cores)
 *   npm run bench -- --only mix,idle    # some of them (BENCHMARKS.md then lists only those)
 *   npm run bench -- --quick            # smoke settings, to bench/results/BENCHMARKS.quick.md
 *   npx tsx bench/all.ts --help
 *
 * Each benchmark runs in its own process (`tsx bench/<name>.ts … --json <tmp>`), writes its own
 * detailed report into bench/results/ as when run alone, and hands its figures over as JSON.
 * Timing never fails the run; a benchmark that breaks (wrong bytes, lost push, crash, over its
 * time limit) is reported as such in BENCHMARKS.md and the run exits 1.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { IdleSummary } from './idle-capacity.js';
import { idleHeadlineTable } from './idle-capacity.js';
import type { MixSummary } from './imap-mix.js';
import { mixAimLines, mixHeadlineTable } from './imap-mix.js';
import { commandLine, onCleanup, runMain, say } from './lib/lifecycle.js';
import { commit, machine, table, writeReport } from './lib/report.js';
import { TARGET_LABEL, type TargetName, type Variant } from './lib/targets.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const HERE = path.dirname(fileURLToPath(import.meta.url));

type Key = 'mix' | 'fetch' | 'idle' | 'push' | 'apns';

interface Step {
  key: Key;
  title: string;
  script: string;
  /** The full run's options (what `npm run bench` passes). */
  args: string[];
  /** The --quick options. */
  quick: string[];
  /** Planned duration; the step is stopped at twice this (then counted as broken). */
  budgetS: number;
}

const STEPS: Step[] = [
  {
    key: 'mix',
    title: 'Proxy overhead: a mail client\'s command mix',
    script: 'imap-mix.ts',
    args: ['--rounds', '5', '--measure', '4', '--paced', '5'],
    quick: ['--clients', '16', '--users', '8', '--messages', '60', '--rounds', '1', '--measure', '2', '--paced', '2'],
    budgetS: 400,
  },
  {
    key: 'fetch',
    title: 'Proxy overhead: bulk FETCH throughput',
    script: 'proxy-throughput.ts',
    args: ['--rounds', '3'],
    quick: ['--messages', '200', '--rounds', '1'],
    budgetS: 90,
  },
  {
    key: 'idle',
    title: 'Idle capacity: TLS sessions idling through one proxy process',
    script: 'idle-capacity.ts',
    args: ['--sessions', '10000', '--steps', '2000', '--reps', '3', '--idle-seconds', '10', '--diagnostic-sessions', '4000'],
    quick: ['--sessions', '1000', '--steps', '500', '--reps', '1', '--idle-seconds', '3', '--diagnostic-sessions', '500'],
    budgetS: 300,
  },
  {
    key: 'push',
    title: 'Push latency per watch mode',
    script: 'push-latency.ts',
    args: [],
    quick: ['--deliveries', '5', '--users', '3', '--memory-users', '50'],
    budgetS: 130,
  },
  {
    key: 'apns',
    title: 'APNs push throughput',
    script: 'apns-throughput.ts',
    args: [],
    quick: ['--devices', '2000', '--rounds', '1'],
    budgetS: 120,
  },
];


interface Args {
  only: Key[];
  quick: boolean;
  out: string;
}

const USAGE = `usage: npm run bench [-- options]
       npx tsx bench/all.ts [options]

Runs every benchmark (${STEPS.map((s) => s.key).join(', ')}) with the settings below, one after
the other, and writes BENCHMARKS.md: one table per benchmark, filled in from this run.

  --only LIST    some of them (comma-separated keys)
  --quick        smoke settings (a minute or two), written to bench/results/BENCHMARKS.quick.md
                 unless --out is given: for trying the machinery, not for quoting
  --out FILE     where the summary goes (default BENCHMARKS.md)
  -h, --help     this text

${STEPS.map((s) => `  ${s.key.padEnd(6)} tsx bench/${s.script} ${s.args.join(' ')}   (~${Math.round(s.budgetS / 60)} min)`).join('\n')}
`;

function parseArgs(argv: string[]): Args | 'help' {
  const a: Args = { only: STEPS.map((s) => s.key), quick: false, out: '' };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i]!;
    if (k === '-h' || k === '--help') return 'help';
    if (k === '--quick') a.quick = true;
    else if (k === '--only') {
      const keys = (argv[++i] ?? '').split(',').map((x) => x.trim()).filter(Boolean);
      for (const key of keys) if (!STEPS.some((s) => s.key === key)) throw new Error(`--only: unknown ${JSON.stringify(key)} (${STEPS.map((s) => s.key).join(', ')})`);
      if (!keys.length) throw new Error('--only needs a list');
      a.only = keys as Key[];
    } else if (k === '--out') {
      a.out = argv[++i] ?? '';
      if (!a.out) throw new Error('--out needs a file name');
    } else throw new Error(`unknown argument ${JSON.stringify(k)}`);
  }
  a.out ||= a.quick ? 'bench/results/BENCHMARKS.quick.md' : 'BENCHMARKS.md';
  return a;
}

// --------------------------------------------------------------- running ---

interface Outcome {
  step: Step;
  ok: boolean;
  seconds: number;
  error?: string;
  json?: unknown;
}

let current: { pid: number; kill: () => void } | null = null;

function runStep(step: Step, quick: boolean, jsonPath: string): Promise<Outcome> {
  const t0 = Date.now();
  // a quick run keeps its detailed reports out of bench/results/
  const out = quick ? ['--out', jsonPath.replace(/\.json$/, '.md')] : [];
  const args = [...process.execArgv, path.join(HERE, step.script), ...(quick ? step.quick : step.args), ...out, '--json', jsonPath];
  say(`── ${step.key}: tsx bench/${step.script} ${(quick ? step.quick : step.args).join(' ')} (planned ~${step.budgetS} s)`);
  return new Promise<Outcome>((resolve) => {
    const child = spawn(process.execPath, args, { cwd: ROOT, stdio: ['ignore', 'inherit', 'inherit'] });
    let timedOut = false;
    const limit = setTimeout(() => {
      timedOut = true;
      say(`${step.key} is over twice its planned time: stopping it`);
      child.kill('SIGTERM');
      setTimeout(() => child.kill('SIGKILL'), 30_000).unref();
    }, step.budgetS * 2 * 1000 + (quick ? 120_000 : 0));
    current = { pid: child.pid ?? -1, kill: () => child.kill('SIGTERM') };
    child.on('exit', (code, signal) => {
      clearTimeout(limit);
      current = null;
      const seconds = (Date.now() - t0) / 1000;
      let json: unknown;
      try {
        json = JSON.parse(fs.readFileSync(jsonPath, 'utf8'));
      } catch {
        json = undefined;
      }
      const ok = code === 0 && json !== undefined && !timedOut;
      const error = ok
        ? undefined
        : timedOut
          ? `stopped after ${seconds.toFixed(0)} s (over twice the planned ${step.budgetS} s)`
          : code !== 0
            ? `exited with ${signal ?? `status ${code}`} (its output above says why)`
            : 'wrote no results';
      say(`── ${step.key}: ${ok ? 'done' : `FAILED: ${error}`} in ${seconds.toFixed(0)} s`);
      resolve({ step, ok, seconds, error, json });
    });
  });
}

// --------------------------------------------------------------- tables ---

const f0 = (x: number | null | undefined) => (x === null || x === undefined || !Number.isFinite(x) ? '—' : Math.round(x).toLocaleString('en-US'));
const f1 = (x: number | null | undefined) => (x === null || x === undefined || !Number.isFinite(x) ? '—' : x.toFixed(1));
const f2 = (x: number | null | undefined) => (x === null || x === undefined || !Number.isFinite(x) ? '—' : x.toFixed(2));
const vl = (v: Variant) => (v === 'tls' ? 'TLS' : 'plain');

interface FetchJson {
  command: string;
  messages: number;
  mailboxMb: number;
  connections: number;
  fetches: number;
  rounds: number;
  aim: number;
  rows: { variant: Variant; target: TargetName; medianMbps: number; minMbps: number; maxMbps: number; vsRelay: number | null; vsDirect: number | null; relayCpuMsPerMb: number | null }[];
}

interface PushJson {
  command: string;
  deliveries: number;
  users: number;
  modes: { mode: string; server: string; n: number; lost: number; pushP50Ms: number; pushP99Ms: number; serverIdleP50Ms: number; proxyMinusIdleP50Ms: number; aim: string; aimMet: boolean }[];
  skipped: string[];
  memory: { wanted: number; watched: number; perUserKb: number; rss0MiB: number; rss1MiB: number; connectS: number } | null;
}

interface ApnsJson {
  command: string;
  devices: number;
  users: number;
  rounds: number;
  aimPushesPerSecond: number;
  aimMet: boolean;
  retried: string[];
  variants: { label: string; medianRate: number; minRate: number; maxRate: number; ratioToRaw: number; cpuUsPerPush: number; peakRssMb: number }[];
}

interface Section {
  step: Step;
  summary: { aim: string; result: string; met: string }[];
  body: string[];
}

function mixSection(step: Step, s: MixSummary): Section {
  const body = [
    mixHeadlineTable(s),
    '',
    ...mixAimLines(s).map((l) => `- ${l}`),
    ...(['plain', 'tls'] as Variant[]).flatMap((v) => {
      const p = s.rows.find((r) => r.variant === v && r.target === 'proxy');
      const h = s.rows.find((r) => r.variant === v && r.target === 'relay');
      if (!p || !h || p.relayCpuPerK === null || h.relayCpuPerK === null || p.relayUserPerK === null || h.relayUserPerK === null) return [];
      return [
        `- ${vl(v)}, CPU per 1000 commands (closed loop): xaps-proxy ${f0(p.relayCpuPerK)} ms (${f0(p.relayUserPerK)} user + ${f0(p.relayCpuPerK - p.relayUserPerK)} system), ` +
          `haproxy ${f0(h.relayCpuPerK)} ms (${f0(h.relayUserPerK)} + ${f0(h.relayCpuPerK - h.relayUserPerK)}); Dovecot ${f0(p.dovecotCpuPerK)} vs ${f0(h.dovecotCpuPerK)} ms; the machine was ${f0(p.machineBusyPct)} % busy.`,
      ];
    }),
    '',
    `How measured: ${s.clients} clients on ${s.users} mailboxes of ${s.messages} messages each loop over sessions shaped like a mail client's ` +
      '(connect, ID, LOGIN, LIST, SELECT, FETCH of all flags, headers of the newest 20, then 4–10 of: FETCH BODY[] 40 %, STORE 25 %, NOOP 15 %, ' +
      'APPEND + STORE \\Deleted + UID EXPUNGE 10 %, IDLE 10 %; LOGOUT). Per round and target, ' +
      `commands/s come from ${s.measureS} s of closed loop (next command as soon as the last is answered) and latency from ${s.pacedS} s paced at ` +
      `${s.pacedRate} commands/s offered (send to tagged answer, every command; IDLE's hold excluded). ${s.rounds} rounds, target order rotating; ` +
      '× and "added" are medians over rounds of the ratio / difference with the same round\'s direct Dovecot or haproxy. Every body fetched is checked byte for byte (size + SHA-1). ' +
      'Details, per-command latencies and CPU per command: [bench/results/imap-mix.md](bench/results/imap-mix.md).',
    '',
    `Reproduce alone: \`${s.command}\``,
  ];
  return {
    step,
    summary: s.aims.flatMap((a) => [
      { aim: `mix, ${vl(a.variant)}: commands/s ≥ 0.95 × blind relay`, result: `${f2(a.ratioVsRelay)} ×`, met: a.ratioMet === null ? '—' : a.ratioMet ? 'met' : '**not met**' },
      { aim: `mix, ${vl(a.variant)}: p99 added vs direct < 1 ms`, result: `${a.p99AddedVsDirect === null ? '—' : `${a.p99AddedVsDirect >= 0 ? '+' : ''}${a.p99AddedVsDirect.toFixed(2)} ms`}`, met: a.p99Met === null ? '—' : a.p99Met ? 'met' : '**not met**' },
    ]),
    body,
  };
}

function fetchSection(step: Step, s: FetchJson): Section {
  const body = [
    table(
      ['variant', 'target', 'median MB/s (min–max)', '× direct', '× relay', 'relay CPU ms/MB'],
      s.rows.map((r) => [
        vl(r.variant),
        TARGET_LABEL[r.target],
        `${f1(r.medianMbps)} (${f1(r.minMbps)}–${f1(r.maxMbps)})`,
        f2(r.vsDirect),
        f2(r.vsRelay),
        r.target === 'direct' ? '—' : f2(r.relayCpuMsPerMb),
      ]),
      ['l', 'l', 'r', 'r', 'r', 'r'],
    ),
    '',
    `How measured: one mailbox of ${s.messages} messages (${s.mailboxMb.toFixed(0)} MB, 2–200 KB each); ${s.connections} connections each \`UID FETCH 1:* (BODY.PEEK[])\` ${s.fetches}× ` +
      `after LOGIN/SELECT; MB/s over everything received; targets alternate within each of ${s.rounds} rounds after a verified warm-up (SHA-1 of the content), medians; ratios of the medians. ` +
      'Details: [bench/results/proxy-throughput.md](bench/results/proxy-throughput.md).',
    '',
    `Reproduce alone: \`${s.command}\``,
  ];
  const summary = (['plain', 'tls'] as Variant[]).flatMap((v) => {
    const p = s.rows.find((r) => r.variant === v && r.target === 'proxy');
    if (!p || p.vsRelay === null) return [];
    return [{ aim: `bulk FETCH, ${vl(v)}: MB/s ≥ 0.95 × blind relay`, result: `${f2(p.vsRelay)} ×`, met: p.vsRelay >= s.aim ? 'met' : '**not met**' }];
  });
  return { step, summary, body };
}

function idleSection(step: Step, s: IdleSummary): Section {
  const body = [
    idleHeadlineTable(s),
    '',
    ...(s.capNote ? [`- ${s.capNote}`] : []),
    ...(s.plainKbPerSession !== null && s.floorKbPerSession !== null
      ? [
          `- Marginal cost per session: xaps-proxy with TLS ${f1(s.marginalKb)} KiB, with plaintext ${f1(s.plainKbPerSession)} KiB (TLS adds ${f1(s.marginalKb - s.plainKbPerSession)}); ` +
            `a bare Node.js TLS relay ${f1(s.floorKbPerSession)} KiB, so xaps-proxy's own share above what Node's TLS relay costs is ${f1(s.marginalKb - s.floorKbPerSession)} KiB.`,
        ]
      : []),
    '',
    `How measured: one xaps-proxy process (\`serve --listen-tls\`, as operators run it) in front of a lightweight IMAP stand-in (bench/idle-lib/standin.ts: greeting, ID, LOGIN, SELECT, IDLE — ` +
      'Dovecot on this machine cannot hold that many sessions, one imap process each); the clients, in another process, connect with TLS, LOGIN, SELECT and IDLE. ' +
      `Per session = (proxy VmRSS with all sessions idling, after a ${s.idleSeconds} s idle window − VmRSS of the same process 10 s after a warm-up, no session open) ÷ sessions; ` +
      `median of ${s.reps} fresh processes. Idle CPU = the proxy's utime+stime over that window. Every session must still answer DONE/NOOP/IDLE afterwards (200 probed). ` +
      'Details and per-run figures: [bench/results/idle-capacity.md](bench/results/idle-capacity.md).',
    '',
    `Reproduce alone: \`${s.command}\``,
  ];
  return {
    step,
    summary: [{ aim: 'idle: proxy memory < 30 KB per idle TLS session', result: `${f1(s.kbPerSession)} KiB${s.sessions < s.wanted ? ` (at ${s.sessions.toLocaleString('en-US')} sessions)` : ''}`, met: s.aimMet ? 'met' : '**not met**' }],
    body,
  };
}

function pushSection(step: Step, s: PushJson): Section {
  const body = [
    table(
      ['watch mode', 'server', 'deliveries', 'lost', 'push p50 / p99 ms', "server's own IDLE p50 ms", 'proxy − IDLE p50', 'aim'],
      s.modes.map((m) => [m.mode, m.server, String(m.n), String(m.lost), `${f0(m.pushP50Ms)} / ${f0(m.pushP99Ms)}`, f0(m.serverIdleP50Ms), `${m.proxyMinusIdleP50Ms >= 0 ? '+' : ''}${f0(m.proxyMinusIdleP50Ms)}`, m.aim]),
      ['l', 'l', 'r', 'r', 'r', 'r', 'r', 'l'],
    ),
    '',
    ...s.skipped.map((x) => `- skipped ${x}`),
    ...(s.memory
      ? [
          `- Memory per watched user (notify mode, Dovecot, ${s.memory.watched} of ${s.memory.wanted} users watched after ${s.memory.connectS.toFixed(0)} s): ` +
            `**${f1(s.memory.perUserKb)} KiB** (proxy VmRSS ${s.memory.rss0MiB.toFixed(1)} MiB with no user, ${s.memory.rss1MiB.toFixed(1)} MiB with them).`,
        ]
      : []),
    '',
    `How measured: xaps-proxy as operators run it, the mock APNs (TLS + HTTP/2) in the benchmark process; per mode ${s.deliveries} real deliveries (dovecot-lda / Cyrus deliver) rotating over ${s.users} users; ` +
      "push latency = the mock's receive time − the time the delivery command was started; the baseline is a plain IMAP client IDLE-ing directly on the same server, same deliveries (the server's own notification delay). " +
      'Aims: p50 within 0.1 s of the server\'s own delay (notify, idle); p50 under 50 ms (events). Details: [bench/results/push-latency.md](bench/results/push-latency.md).',
    '',
    `Reproduce alone: \`${s.command}\``,
  ];
  return {
    step,
    summary: s.modes.map((m) => ({
      aim: m.mode === 'events' ? 'push, events: p50 < 50 ms' : `push, ${m.mode}: p50 within 100 ms of the server's IDLE`,
      result: m.mode === 'events' ? `${f0(m.pushP50Ms)} ms` : `${m.proxyMinusIdleP50Ms >= 0 ? '+' : ''}${f0(m.proxyMinusIdleP50Ms)} ms`,
      met: m.aimMet ? 'met' : '**not met**',
    })),
    body,
  };
}

function apnsSection(step: Step, s: ApnsJson): Section {
  const pipeline = s.variants.find((v) => v.label.startsWith('pipeline'));
  const body = [
    table(
      ['variant', 'median pushes/s (min–max)', '× raw client', 'CPU µs/push', 'peak RSS MB'],
      s.variants.map((v) => [v.label, `${f0(v.medianRate)} (${f0(v.minRate)}–${f0(v.maxRate)})`, f2(v.ratioToRaw), f1(v.cpuUsPerPush), f0(v.peakRssMb)]),
      ['l', 'r', 'r', 'r', 'r'],
    ),
    '',
    `How measured: ${s.devices.toLocaleString('en-US')} registered devices of ${s.users.toLocaleString('en-US')} users, one push each per round, to the mock APNs (TLS + HTTP/2, own process); ` +
      `the raw HTTP/2 client alone vs the whole pipeline as serve runs it (store, change guard, dispatcher, client); ${s.rounds} rounds alternating after a warm-up, medians; ` +
      `every push must be answered 200 exactly once${s.retried.length ? `; rounds run again because other processes used the CPUs: ${s.retried.join(', ')}` : ''}. ` +
      'Details: [bench/results/apns-throughput.md](bench/results/apns-throughput.md).',
    '',
    `Reproduce alone: \`${s.command}\``,
  ];
  return {
    step,
    summary: [{ aim: `APNs: ≥ ${s.aimPushesPerSecond.toLocaleString('en-US')} pushes/s from one process`, result: `${f0(pipeline?.medianRate)} pushes/s`, met: s.aimMet ? 'met' : '**not met**' }],
    body,
  };
}

function sectionFor(o: Outcome): Section {
  if (!o.ok || !o.json) {
    return {
      step: o.step,
      summary: [{ aim: o.step.title, result: `FAILED: ${o.error}`, met: '—' }],
      body: [`**This benchmark did not complete: ${o.error}.** Run it alone to see why: \`node scripts/bootstrap.mjs bench && npx tsx bench/${o.step.script} ${o.step.args.join(' ')}\`.`],
    };
  }
  switch (o.step.key) {
    case 'mix':
      return mixSection(o.step, o.json as MixSummary);
    case 'fetch':
      return fetchSection(o.step, o.json as FetchJson);
    case 'idle':
      return idleSection(o.step, o.json as IdleSummary);
    case 'push':
      return pushSection(o.step, o.json as PushJson);
    case 'apns':
      return apnsSection(o.step, o.json as ApnsJson);
  }
}

function document(args: Args, outcomes: Outcome[], started: Date, seconds: number, load: [number, number]): string {
  const m = machine();
  const sections = outcomes.map(sectionFor);
  const cmd = `npm run bench${args.quick || args.only.length < STEPS.length ? ` -- ${[args.quick ? '--quick' : '', args.only.length < STEPS.length ? `--only ${args.only.join(',')}` : ''].filter(Boolean).join(' ')}` : ''}`;
  const lines: string[] = [];
  lines.push('# Benchmarks', '');
  lines.push(
    `Written by \`${cmd}\` (bench/all.ts); do not edit by hand. Every figure comes from that one run on the machine below: ` +
      'each is a ratio, a difference or a percentile measured against a baseline in the same run (direct Dovecot, a blind relay, no proxy), repeated and quoted as a median. ' +
      'Timing never fails a benchmark; wrong bytes, a lost push or a broken session would. bench/README.md explains each benchmark.',
    '',
  );
  if (args.quick) lines.push('**Quick smoke run (`--quick`): settings far too small to quote.**', '');
  lines.push(
    table(
      ['', ''],
      [
        ['machine', `${m.nproc} CPUs (${m.cpu}), ${m.memGb} GiB RAM, ${m.kernel}`],
        ['software', `Node ${m.node} (OpenSSL ${process.versions.openssl}); ${m.dovecot.startsWith('unknown') ? 'Dovecot unknown' : `Dovecot ${m.dovecot}`}; ${m.haproxy}`],
        ['date', `${started.toISOString()} (took ${(seconds / 60).toFixed(1)} min; 1-minute load average ${load[0].toFixed(1)} before, ${load[1].toFixed(1)} after)`],
        ['commit', commit(ROOT)],
        ['command', `\`${cmd}\` — each table also names the command that reproduces it alone`],
        ['time per benchmark', outcomes.map((o) => `${o.step.key} ${o.seconds.toFixed(0)} s`).join(', ')],
      ],
      ['l', 'l'],
    ),
    '',
  );
  lines.push('## Aims', '');
  lines.push(
    table(
      ['aim', 'this run', ''],
      sections.flatMap((s) => s.summary.map((x) => [x.aim, x.result, x.met])),
      ['l', 'r', 'l'],
    ),
    '',
  );
  sections.forEach((s, i) => {
    lines.push(`## ${i + 1}. ${s.step.title}`, '', ...s.body, '');
  });
  return lines.join('\n');
}

// ------------------------------------------------------------------ main ---

async function main(): Promise<number> {
  const args = commandLine(parseArgs, USAGE);
  if (typeof args === 'number') return args;
  const started = new Date();
  const t0 = Date.now();
  const load0 = os.loadavg()[0]!;
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xaps-bench-all-'));
  onCleanup('temp dir', async () => fs.rmSync(tmp, { recursive: true, force: true }));
  onCleanup('running benchmark', async () => current?.kill());
  const steps = STEPS.filter((s) => args.only.includes(s.key));
  say(`running ${steps.map((s) => s.key).join(', ')}${args.quick ? ' (quick)' : ''}; planned ~${Math.round(steps.reduce((a, s) => a + s.budgetS, 0) / 60)} min`);
  const outcomes: Outcome[] = [];
  for (const step of steps) outcomes.push(await runStep(step, args.quick, path.join(tmp, `${step.key}.json`)));
  const seconds = (Date.now() - t0) / 1000;
  const text = document(args, outcomes, started, seconds, [load0, os.loadavg()[0]!]);
  writeReport(path.resolve(ROOT, args.out), text);
  say(`${args.out} written; all benchmarks took ${(seconds / 60).toFixed(1)} min`);
  const failed = outcomes.filter((o) => !o.ok);
  if (failed.length) {
    say(`FAILED: ${failed.map((o) => `${o.step.key} (${o.error})`).join('; ')}`);
    return 1;
  }
  return 0;
}

runMain(main);
