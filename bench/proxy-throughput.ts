/**
 * `npm run bench:proxy`: IMAP fetch throughput of xaps-proxy compared with Dovecot direct and
 * with haproxy `mode tcp` (a blind relay), plaintext and TLS, all on loopback.
 *
 * Aim: xaps-proxy at least 0.95× the blind relay's throughput. Timing never fails the run;
 * a target that returns different bytes does (exit 1). See bench/README.md.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { dovecotAvailable, haproxyAvailable, sleep, startDovecot } from '../src/testbed/index.js';
import { ArgsError, canonicalArgs, parseArgs, USAGE, type BenchArgs } from './lib/args.js';
import { fillMaildir } from './lib/mailbox.js';
import { CorrectnessError, expected, verify, type Reference } from './lib/verify.js';
import { runFetch, StallError, type FetchRunResult } from './lib/imap-load.js';
import { processUsage, treeCpuDelta, treeCpuMs, type ProcessUsage } from './lib/procstat.js';
import { endpointOf, proxyLogLines, startProxyProcess, startRelays, TARGET_LABEL, type TargetEnv, type TargetName, type Variant } from './lib/targets.js';
import {
  AIM,
  aimLines,
  commit,
  machine,
  relayDetailTable,
  resultsTable,
  roundsTable,
  summarize,
  writeReport,
  type RunSample,
} from './lib/report.js';
import { formatProfile, summarizeProfile } from './lib/cpuprofile.js';
import { commandLine, onCleanup, runMain, say } from './lib/lifecycle.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const USER = 'bench';
const PASSWORD = 'benchpw';
const MB = 1e6;

// -------------------------------------------------------------------- dist ---

function newestMtime(dir: string, ext: string): { file: string; mtime: number } | undefined {
  let best: { file: string; mtime: number } | undefined;
  for (const e of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (!e.isFile() || !e.name.endsWith(ext)) continue;
    const file = path.join(e.parentPath ?? (e as unknown as { path: string }).path, e.name);
    const mtime = fs.statSync(file).mtimeMs;
    if (!best || mtime > best.mtime) best = { file, mtime };
  }
  return best;
}

/** dist/ is what operators run; build it if it is missing, warn if src/ is newer. */
function ensureDist(): void {
  const main = path.join(ROOT, 'dist', 'cli', 'main.js');
  if (!fs.existsSync(main)) {
    say('dist/cli/main.js is missing: building (npx tsc -p tsconfig.build.json) ...');
    const r = spawnSync('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: ROOT, stdio: ['ignore', 'inherit', 'inherit'] });
    if (!fs.existsSync(main)) throw new Error(`build did not produce ${main} (tsc exit ${r.status ?? r.signal})`);
    if (r.status !== 0) say('tsc reported errors but emitted dist/; benchmarking what it emitted');
    return;
  }
  const src = newestMtime(path.join(ROOT, 'src'), '.ts');
  const dist = newestMtime(path.join(ROOT, 'dist'), '.js');
  if (src && dist && src.mtime > dist.mtime + 1000) {
    say(`warning: ${path.relative(ROOT, src.file)} is newer than dist/: run \`npm run build\` (npm run bench:proxy does) to measure the current code`);
  }
}

// ------------------------------------------------------------------ targets ---

interface Measured extends FetchRunResult {
  /** CPU and page faults of the haproxy / xaps-proxy process during the FETCH phase; null for direct. */
  relay: ProcessUsage | null;
  dovecotCpuMs: number;
}

async function measure(env: TargetEnv, args: BenchArgs, variant: Variant, target: TargetName, hash: boolean): Promise<Measured> {
  const { ep, pid } = endpointOf(env, variant, target);
  let relay0: ProcessUsage | undefined;
  let relay: ProcessUsage | null = null;
  let dove0 = new Map<number, number>();
  let dovecotCpuMs = 0;
  const res = await runFetch({
    endpoint: ep,
    user: USER,
    password: PASSWORD,
    connections: args.connections,
    fetches: args.fetches,
    headers: args.headers,
    hash,
    onStart: () => {
      dove0 = treeCpuMs(env.dovecot.pid);
      if (pid !== null) relay0 = processUsage(pid);
    },
    onEnd: () => {
      dovecotCpuMs = treeCpuDelta(dove0, treeCpuMs(env.dovecot.pid));
      if (pid !== null) {
        const after = processUsage(pid);
        if (relay0 === undefined || after === undefined) throw new Error(`${TARGET_LABEL[target]} (pid ${pid}) is gone`);
        relay = { userMs: after.userMs - relay0.userMs, sysMs: after.sysMs - relay0.sysMs, minflt: after.minflt - relay0.minflt };
      }
    },
  });
  return { ...res, relay, dovecotCpuMs };
}

// --------------------------------------------------------------------- main ---

async function main(): Promise<number> {
  const args = commandLine(parseArgs, USAGE, (err) => err instanceof ArgsError);
  if (typeof args === 'number') return args;
  if (!dovecotAvailable()) throw new Error('Dovecot is not installed (run: node scripts/bootstrap.mjs bench)');
  if (args.targets.includes('relay') && !haproxyAvailable()) throw new Error('haproxy is not installed (run: node scripts/bootstrap.mjs bench)');
  if (args.targets.includes('proxy') && args.dist === 'dist') ensureDist();
  const t0 = Date.now();
  const started = new Date();
  const loadBefore = os.loadavg()[0];
  const command = `npm run bench:proxy -- ${canonicalArgs(args).join(' ')}`;
  const workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'xaps-bench-'));
  onCleanup('work dir', async () => fs.rmSync(workDir, { recursive: true, force: true }));

  // ---- Dovecot and the mailbox
  say('starting Dovecot ...');
  const dovecot = await startDovecot({ users: { [USER]: PASSWORD }, maxConnections: Math.max(100, args.connections * 4) });
  onCleanup('Dovecot', () => dovecot.destroy());
  for (const w of dovecot.warnings) say(`Dovecot: ${w}`);
  const isRoot = process.getuid?.() === 0;
  say(`writing ${args.messages} messages into ${USER}'s Maildir ...`);
  const box = await fillMaildir({
    messages: args.messages,
    seed: args.seed,
    home: path.join(dovecot.dir, 'mail', USER),
    owner: isRoot ? 'dovecot:dovecot' : undefined,
    doveadm: (a) => dovecot.doveadm(a),
    user: USER,
  });
  say(
    `mailbox: ${box.messages} messages, ${(box.totalBytes / MB).toFixed(1)} MB ` +
      `(${(box.minSize / 1024).toFixed(1)}–${(box.maxSize / 1024).toFixed(1)} KB); written in ${(box.fillMs / 1000).toFixed(1)} s, ` +
      `indexed by Dovecot in ${(box.indexMs / 1000).toFixed(1)} s`,
  );

  // ---- relays
  const env: TargetEnv = { dovecot, relays: null, proxy: null, ca: fs.readFileSync(dovecot.caCertPath) };
  if (args.targets.includes('relay')) {
    say('starting haproxy (mode tcp; plain, and TLS-terminating) ...');
    env.relays = await startRelays(dovecot.imapPort, dovecot.caCertPath, dovecot.tlsKeyPath, (stop) => onCleanup('haproxy', stop));
  }
  if (args.targets.includes('proxy')) {
    say(`starting xaps-proxy (node dist/cli/main.js serve${args.profile ? ', under --cpu-prof' : ''}) ...`);
    const profileDir = args.profile ? path.join(ROOT, 'bench', 'results', 'profiles', started.toISOString().replace(/[:.]/g, '-')) : undefined;
    env.proxy = await startProxyProcess({
      root: ROOT,
      upstreamPort: dovecot.imapPort,
      certPath: dovecot.caCertPath,
      keyPath: dovecot.tlsKeyPath,
      workDir,
      profileDir,
      distDir: path.resolve(ROOT, args.dist),
    });
    onCleanup('xaps-proxy', () => env.proxy!.stop());
  }

  // ---- warm-up and correctness: one hashed run per target (Dovecot builds its cache here)
  const want = expected(box, args);
  const runMb = (want.literalBytes * args.connections * args.fetches) / MB;
  say(
    `workload: ${args.connections} connections × ${args.fetches} × UID FETCH 1:* ${args.headers ? '(BODY.PEEK[HEADER] BODY.PEEK[])' : '(BODY.PEEK[])'} ` +
      `= ${runMb.toFixed(0)} MB of literals per run`,
  );
  const reference: Reference = { digest: args.headers ? null : box.digest, untaggedBytes: null };
  for (const variant of args.variants) {
    for (const target of args.targets) {
      const what = `${variant} ${TARGET_LABEL[target]}`;
      const r = await measure(env, args, variant, target, true);
      verify(r.perConnection, box, args, `warm-up run through ${what}`, reference);
      say(`warm-up ${what}: ${(r.bytes / MB / (r.wallMs / 1000)).toFixed(1)} MB/s, content verified (SHA-1 ${reference.digest?.slice(0, 12)}…)`);
    }
  }

  // ---- measured rounds, targets alternating
  const samples: RunSample[] = [];
  for (let round = 1; round <= args.rounds; round++) {
    for (const variant of args.variants) {
      for (const target of args.targets) {
        await sleep(100); // let the previous run's Dovecot processes exit
        const what = `${variant} ${TARGET_LABEL[target]}`;
        const r = await measure(env, args, variant, target, args.hashAll);
        verify(r.perConnection, box, args, `round ${round} through ${what}`, reference);
        const mb = r.bytes / MB;
        const s: RunSample = {
          variant,
          target,
          round,
          mbps: mb / (r.wallMs / 1000),
          bytes: r.bytes,
          wallMs: r.wallMs,
          relayCpuMsPerMb: r.relay === null ? null : (r.relay.userMs + r.relay.sysMs) / mb,
          relayUserMsPerMb: r.relay === null ? null : r.relay.userMs / mb,
          relaySysMsPerMb: r.relay === null ? null : r.relay.sysMs / mb,
          relayMinfltPerMb: r.relay === null ? null : r.relay.minflt / mb,
          clientCpuMsPerMb: r.clientCpuMs / mb,
          dovecotCpuMsPerMb: r.dovecotCpuMs / mb,
        };
        samples.push(s);
        say(
          `round ${round}/${args.rounds} ${what}: ${s.mbps.toFixed(1)} MB/s (${(r.wallMs / 1000).toFixed(2)} s)` +
            (s.relayCpuMsPerMb === null
              ? ''
              : `, relay CPU ${s.relayCpuMsPerMb.toFixed(2)} ms/MB (user ${s.relayUserMsPerMb!.toFixed(2)}, sys ${s.relaySysMsPerMb!.toFixed(2)}, ` +
                `${s.relayMinfltPerMb!.toFixed(0)} minor faults/MB)`),
        );
      }
    }
  }

  // ---- stop the proxy first (a --cpu-prof profile is written when it exits)
  let proxyLog = '';
  let profileText = '';
  if (env.proxy) {
    await env.proxy.stop();
    proxyLog = proxyLogLines(env.proxy).join('\n');
    if (env.proxy.profileDir) {
      const files = fs.readdirSync(env.proxy.profileDir).filter((f) => f.endsWith('.cpuprofile'));
      for (const f of files) {
        const file = path.join(env.proxy.profileDir, f);
        profileText += `${path.relative(ROOT, file)}\n${formatProfile(summarizeProfile(file, ROOT), 30)}\n`;
      }
      if (!files.length) profileText = `no .cpuprofile was written in ${env.proxy.profileDir}\n`;
    }
  }

  // ---- report
  const rows = summarize(samples, args.variants, args.targets);
  const m = machine();
  const lines: string[] = [];
  lines.push('## xaps-proxy throughput (`npm run bench:proxy`)', '');
  lines.push(`Aim: xaps-proxy at least ${AIM}× the throughput of a blind relay (haproxy \`mode tcp\`), plaintext and TLS.`);
  lines.push('Informational: timing never fails this benchmark; only wrong bytes do.', '');
  lines.push(
    `Workload: one mailbox of ${box.messages} messages, ${(box.totalBytes / MB).toFixed(1)} MB ` +
      `(${(box.minSize / 1024).toFixed(1)}–${(box.maxSize / 1024).toFixed(1)} KB each); ` +
      `${args.connections} concurrent connections each LOGIN, SELECT INBOX, then ` +
      `\`UID FETCH 1:* ${args.headers ? '(BODY.PEEK[HEADER] BODY.PEEK[])' : '(BODY.PEEK[])'}\` ${args.fetches}× in a row ` +
      `(${runMb.toFixed(0)} MB per run, wall time from the FETCHes to the last tagged OK). ` +
      `Targets alternate within each round; ${args.rounds} measured rounds after one verified warm-up run per target; medians shown. ` +
      `MB = 10^6 bytes of everything received during the FETCH.`,
    '',
  );
  lines.push(resultsTable(rows), '');
  lines.push(...aimLines(rows, args.variants).map((l) => `- ${l}`), '');
  lines.push(
    '`relay CPU ms/MB`: user+system CPU of the haproxy or xaps-proxy process (/proc/PID/stat) per MB relayed; ' +
      '`client`: the load generator (raw sockets, same machine); `Dovecot`: its master and all its processes. ' +
      'TLS: direct = Dovecot\'s imaps port; haproxy and xaps-proxy terminate TLS (same certificate) and talk plain IMAP to Dovecot.',
    '',
  );
  lines.push('Per round (MB/s):', '', roundsTable(rows), '');
  if (args.targets.some((t) => t !== 'direct')) {
    lines.push('Relay processes, medians per MB relayed (user/system CPU split, minor page faults):', '', relayDetailTable(rows), '');
  }
  lines.push(
    `Correctness: every FETCH on every connection and target returned ${want.literals} literals, ${want.literalBytes} literal bytes, ` +
      `${reference.untaggedBytes} bytes before the tagged OK; ${args.hashAll ? 'every' : 'the warm-up'} runs' SHA-1 over the fetched literals matched` +
      `${args.headers ? ' across targets' : ' the messages written'} (${reference.digest}).`,
    '',
  );
  if (args.profile) lines.push('**This run profiled xaps-proxy (--cpu-prof): its throughput figures are not comparable.**', '');
  lines.push(
    `Machine: ${m.nproc} CPUs (${m.cpu}), ${m.memGb} GiB RAM, ${m.kernel}; Node ${m.node}; Dovecot ${m.dovecot}; ${m.haproxy}`,
    '',
    `Date: ${started.toISOString()} (took ${((Date.now() - t0) / 1000).toFixed(0)} s; ` +
      `1-minute load average ${loadBefore.toFixed(1)} before, ${os.loadavg()[0].toFixed(1)} after: other work on the machine adds noise)`,
    '',
    `Commit: ${commit(ROOT)}`,
    '',
    `Reproduce: \`${command}\``,
    '',
  );
  const report = lines.join('\n');
  process.stdout.write('\n' + report);
  if (profileText) process.stdout.write(`\nxaps-proxy CPU profile:\n${profileText}`);
  if (proxyLog) process.stdout.write(`\nxaps-proxy logged (warn and above):\n${proxyLog.split('\n').slice(-20).join('\n')}\n`);
  const out = path.resolve(ROOT, args.out);
  writeReport(out, report);
  say(`report written to ${path.relative(process.cwd(), out) || out}`);
  if (args.json) {
    const json = {
      bench: 'proxy-throughput',
      command,
      started: started.toISOString(),
      seconds: (Date.now() - t0) / 1000,
      messages: box.messages,
      mailboxMb: box.totalBytes / MB,
      connections: args.connections,
      fetches: args.fetches,
      rounds: args.rounds,
      aim: AIM,
      rows: rows.map((r) => ({
        variant: r.variant,
        target: r.target,
        medianMbps: r.medianMbps,
        minMbps: r.minMbps,
        maxMbps: r.maxMbps,
        vsRelay: r.vsRelay,
        vsDirect: r.vsDirect,
        relayCpuMsPerMb: r.relayCpuMsPerMb,
      })),
      aimLines: aimLines(rows, args.variants),
    };
    writeReport(path.resolve(ROOT, args.json), JSON.stringify(json, null, 2));
  }
  return 0;
}

runMain(main, (err) => {
  if (err instanceof CorrectnessError) {
    return `\n[bench] CORRECTNESS FAILURE: ${err.message}\n[bench] a target did not relay the mailbox byte for byte\n`;
  }
  if (err instanceof StallError) return `\n[bench] FAILED, a target stalled: ${err.message}\n`;
  return undefined;
});
