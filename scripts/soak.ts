/**
 * npm run soak -- --minutes N [--watch notify|idle|events] [options]
 *
 * Drives connection churn, registrations and deliveries through a real xaps-proxy process (in front of a throwaway
 * Dovecot — or Cyrus for --watch idle — pushing to a mock APNs) at steady rates for N minutes, in one watch mode
 * (NOTIFY watchers, IDLE/STATUS watchers, or Dovecot's Lua push hook into the events listener), then reports lost,
 * duplicate and wrong pushes and
 * the proxy's memory after the warm-up. Exit 0 when nothing was lost or wrong, the proxy stayed alive, its RSS stayed
 * within the tolerance and the load reached its minimums; 1 otherwise; 2 for a bad command line.
 * The runner is test/soak/runner.ts (shared with test/integration/soak.test.ts); `npm run soak` bootstraps
 * (packages, dist/) first and runs the proxy from dist/ unless --entry tsx.
 */
import { runSoak, SOAK_DEFAULTS, type SoakOptions } from '../test/soak/runner.js';
import { formatSummary } from '../test/soak/report.js';

const NUMERIC: Record<string, keyof SoakOptions> = {
  '--minutes': 'minutes',
  '--idle-max-per-user': 'idleMaxPerUser',
  '--poll-interval-ms': 'pollIntervalMs',
  '--users': 'users',
  '--churn-rate': 'churnRate',
  '--churn-concurrency': 'churnConcurrency',
  '--sticky': 'stickyClients',
  '--delivery-rate': 'deliveryRate',
  '--rereg-rate': 'reregRate',
  '--turnover-rate': 'turnoverRate',
  '--tls-share': 'tlsShare',
  '--abort-share': 'abortShare',
  '--apns-error-rate': 'apnsErrorRate',
  '--coalesce-window-ms': 'coalesceWindowMs',
  '--arm-delay-ms': 'armDelayMs',
  '--sample-interval-ms': 'sampleIntervalMs',
  '--tolerance': 'tolerance',
  '--drain-max-ms': 'drainMaxMs',
  '--seed': 'seed',
};

function usage(): string {
  const d = SOAK_DEFAULTS;
  return [
    'usage: npm run soak -- --minutes N [options]',
    '',
    `  --minutes N               length of the load phase (default ${d.minutes})`,
    `  --watch notify|idle|events  the proxy's watch mode (default ${d.watch}): NOTIFY against Dovecot, IDLE against`,
    '                            Cyrus (see --upstream), or events from Dovecot\'s push_notification Lua hook',
    `  --upstream auto|dovecot|cyrus  the IMAP server (default ${d.upstream}: Cyrus for idle, Dovecot otherwise)`,
    `  --idle-max-per-user N     idle mode: IDLE connections per user, the rest polled (default ${d.idleMaxPerUser})`,
    `  --poll-interval-ms N      idle mode: the proxy's --poll-interval (default ${d.pollIntervalMs})`,
    `  --users N                 IMAP users (default ${d.users})`,
    `  --churn-rate N            short IMAP sessions per second (default ${d.churnRate})`,
    `  --churn-concurrency N     most short sessions at once (default ${d.churnConcurrency})`,
    `  --sticky N                long-lived IDLE clients (default ${d.stickyClients})`,
    `  --delivery-rate N         LMTP deliveries per second (default ${d.deliveryRate})`,
    `  --rereg-rate N            re-registrations per second (default ${d.reregRate})`,
    `  --turnover-rate N         new/retired devices per second (default ${d.turnoverRate})`,
    `  --tls-share X             share of sessions over TLS (default ${d.tlsShare})`,
    `  --abort-share X           share of sessions cut off without LOGOUT (default ${d.abortShare})`,
    `  --apns-error-rate X       share of APNs requests answered 503 (default ${d.apnsErrorRate})`,
    `  --coalesce-window-ms N    the proxy's --push-coalesce-window (default ${d.coalesceWindowMs})`,
    `  --arm-delay-ms N          a registration counts for deliveries this long after its OK (default ${d.armDelayMs})`,
    '  --sample-interval-ms N    memory sampling interval (default: 2000, shorter for runs under ~2 min)',
    `  --tolerance X             allowed memory growth after the warm-up (default ${d.tolerance})`,
    `  --drain-max-ms N          longest wait for the last pushes (default ${d.drainMaxMs})`,
    `  --seed N                  random seed (default ${d.seed})`,
    `  --store embedded|redis    registration store (default ${d.store})`,
    `  --entry dist|tsx          run the proxy from dist/ or from src/ through tsx (default ${d.entry})`,
    '  --json                    print the whole result as JSON on stdout (progress goes to stderr)',
    '  --quiet                   no progress lines',
    '  --keep                    keep the temp dir (proxy data) afterwards',
    '  --records                 with --json: include every delivery, push and device (for post-mortems)',
  ].join('\n');
}

function parse(argv: string[]): { opts: Partial<SoakOptions> & { minutes: number }; json: boolean; quiet: boolean } {
  const opts: Partial<SoakOptions> = {};
  let json = false;
  let quiet = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const [flag, inline] = a.includes('=') ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)] : [a, undefined];
    const value = () => {
      const v = inline ?? argv[++i];
      if (v === undefined) throw new Error(`${flag} needs a value`);
      return v;
    };
    if (flag === '--help' || flag === '-h') {
      process.stdout.write(`${usage()}\n`);
      process.exit(0);
    } else if (flag === '--json') json = true;
    else if (flag === '--quiet') quiet = true;
    else if (flag === '--keep') opts.keepDir = true;
    else if (flag === '--records') opts.records = true;
    else if (flag === '--watch') {
      const v = value();
      if (v !== 'notify' && v !== 'idle' && v !== 'events') throw new Error('--watch must be notify, idle or events');
      opts.watch = v;
    } else if (flag === '--upstream') {
      const v = value();
      if (v !== 'auto' && v !== 'dovecot' && v !== 'cyrus') throw new Error('--upstream must be auto, dovecot or cyrus');
      opts.upstream = v;
    } else if (flag === '--store') {
      const v = value();
      if (v !== 'embedded' && v !== 'redis') throw new Error('--store must be embedded or redis');
      opts.store = v;
    } else if (flag === '--entry') {
      const v = value();
      if (v !== 'dist' && v !== 'tsx') throw new Error('--entry must be dist or tsx');
      opts.entry = v;
    } else if (flag in NUMERIC) {
      const v = value();
      const n = Number(v);
      if (v.trim() === '' || !Number.isFinite(n) || n < 0) throw new Error(`${flag} must be a number >= 0, got ${JSON.stringify(v)}`);
      (opts as Record<string, number>)[NUMERIC[flag]!] = n;
    } else {
      throw new Error(`unknown option ${a}`);
    }
  }
  const minutes = opts.minutes ?? SOAK_DEFAULTS.minutes;
  if (!(minutes > 0)) throw new Error('--minutes must be > 0');
  if (opts.upstream === 'cyrus' && (opts.watch ?? SOAK_DEFAULTS.watch) !== 'idle') throw new Error('--upstream cyrus goes with --watch idle only');
  if (opts.idleMaxPerUser !== undefined && !(Number.isInteger(opts.idleMaxPerUser) && opts.idleMaxPerUser >= 1)) throw new Error('--idle-max-per-user must be an integer >= 1');
  if (opts.pollIntervalMs !== undefined && !(opts.pollIntervalMs >= 1000)) throw new Error('--poll-interval-ms must be >= 1000');
  return { opts: { ...opts, minutes }, json, quiet };
}

let parsed: ReturnType<typeof parse>;
try {
  parsed = parse(process.argv.slice(2));
} catch (err) {
  process.stderr.write(`soak: ${(err as Error).message}\n\n${usage()}\n`);
  process.exit(2);
}
const { opts, json, quiet } = parsed;
const progress = (line: string) => (json ? process.stderr : process.stdout).write(`${line}\n`);
try {
  const result = await runSoak({ ...opts, log: quiet ? () => undefined : progress });
  if (json) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
  else process.stdout.write(`\n${formatSummary(result)}\n`);
  process.exitCode = result.ok ? 0 : 1;
} catch (err) {
  process.stderr.write(`soak: ${(err as Error).stack ?? String(err)}\n`);
  process.exitCode = 1;
}
// the test bed kills what it started on exit; nothing else should keep the process up
setTimeout(() => process.exit(), 1000).unref();
