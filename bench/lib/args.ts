/** Command line of bench/proxy-throughput.ts, and the option helpers the other benchmarks share (ArgsError, splitOption, positiveInt). */
import type { TargetName, Variant } from './targets.js';

export interface BenchArgs {
  messages: number;
  rounds: number;
  connections: number;
  fetches: number;
  headers: boolean;
  variants: Variant[];
  targets: TargetName[];
  seed: number;
  profile: boolean;
  hashAll: boolean;
  /** The xaps-proxy build to run (default dist). */
  dist: string;
  out: string;
  /** Also write the results as JSON here (bench/all.ts reads it). */
  json: string | null;
}

export const DEFAULTS: BenchArgs = {
  messages: 2000,
  rounds: 5,
  connections: 4,
  fetches: 3,
  headers: false,
  variants: ['plain', 'tls'],
  targets: ['direct', 'relay', 'proxy'],
  seed: 1,
  profile: false,
  hashAll: false,
  dist: 'dist',
  out: 'bench/results/proxy-throughput.md',
  json: null,
};

export const USAGE = `usage: npm run bench:proxy -- [options]
       npx tsx bench/proxy-throughput.ts [options]

Fetches a whole mailbox over C concurrent IMAP connections through each target (Dovecot direct,
haproxy mode tcp, xaps-proxy), in alternating rounds, and reports the median MB/s per target,
the ratios, and the relays' CPU time per MB.

  --messages N       messages in the mailbox, 2 KB – 200 KB each, ~50 KB mean (default ${DEFAULTS.messages})
  --rounds N         measured rounds; each round runs every target once (default ${DEFAULTS.rounds})
  --connections N    concurrent connections per run, each fetching the whole mailbox (default ${DEFAULTS.connections})
  --fetches N        full-mailbox fetches per connection per run, back to back (default ${DEFAULTS.fetches})
  --headers          fetch BODY.PEEK[HEADER] as well as BODY.PEEK[]
  --variants LIST    plain,tls (default ${DEFAULTS.variants.join(',')})
  --targets LIST     direct,relay,proxy (default ${DEFAULTS.targets.join(',')})
  --seed N           seed of the generated mailbox (default ${DEFAULTS.seed})
  --profile          run xaps-proxy under node --cpu-prof and print where its time goes
                     (slows it down: throughput numbers of such a run are not comparable)
  --hash-all         SHA-1 the content of every run, not only the warm-up runs (costs client CPU;
                     without it measured runs are checked by literal and byte counts)
  --dist DIR         the xaps-proxy build to run (default ${DEFAULTS.dist}; e.g. a patched copy, to compare)
  --out FILE         markdown report (default ${DEFAULTS.out}; overwritten)
  --json FILE        also write the results as JSON (used by bench/all.ts)
  -h, --help         this text
`;

export class ArgsError extends Error {}

/** `--name=value` → name and value; any other argument → itself, value undefined. */
export function splitOption(arg: string): { name: string; value: string | undefined } {
  const eq = arg.indexOf('=');
  if (arg.startsWith('--') && eq > 0) return { name: arg.slice(0, eq), value: arg.slice(eq + 1) };
  return { name: arg, value: undefined };
}

/** The value of option `name` as an integer >= `min` (else ArgsError). */
export function positiveInt(name: string, v: string | undefined, min = 1): number {
  if (v === undefined || !/^\d+$/.test(v) || Number(v) < min) throw new ArgsError(`${name} needs an integer >= ${min}, got ${JSON.stringify(v ?? '')}`);
  return Number(v);
}

function list<T extends string>(name: string, v: string | undefined, allowed: readonly T[]): T[] {
  const items = (v ?? '').split(',').map((s) => s.trim()).filter(Boolean);
  if (items.length === 0) throw new ArgsError(`${name} needs a comma-separated list of ${allowed.join(', ')}`);
  for (const i of items) if (!allowed.includes(i as T)) throw new ArgsError(`${name}: unknown ${JSON.stringify(i)} (one of ${allowed.join(', ')})`);
  // keep the canonical order: direct, relay, proxy / plain, tls
  return allowed.filter((a) => items.includes(a));
}

export function parseArgs(argv: string[]): BenchArgs | 'help' {
  const a: BenchArgs = { ...DEFAULTS, variants: [...DEFAULTS.variants], targets: [...DEFAULTS.targets] };
  for (let i = 0; i < argv.length; i++) {
    const { name: arg, value } = splitOption(argv[i]);
    const next = () => value ?? argv[++i];
    switch (arg) {
      case '-h':
      case '--help':
        return 'help';
      case '--messages':
        a.messages = positiveInt(arg, next());
        break;
      case '--rounds':
        a.rounds = positiveInt(arg, next());
        break;
      case '--connections':
        a.connections = positiveInt(arg, next());
        break;
      case '--fetches':
        a.fetches = positiveInt(arg, next());
        break;
      case '--headers':
        a.headers = true;
        break;
      case '--variants':
        a.variants = list(arg, next(), ['plain', 'tls'] as const);
        break;
      case '--targets':
        a.targets = list(arg, next(), ['direct', 'relay', 'proxy'] as const);
        break;
      case '--seed':
        a.seed = positiveInt(arg, next(), 0);
        break;
      case '--profile':
        a.profile = true;
        break;
      case '--hash-all':
        a.hashAll = true;
        break;
      case '--out':
        a.out = next() ?? '';
        if (!a.out) throw new ArgsError('--out needs a file name');
        break;
      case '--dist':
        a.dist = next() ?? '';
        if (!a.dist) throw new ArgsError('--dist needs a directory');
        break;
      case '--json':
        a.json = next() ?? '';
        if (!a.json) throw new ArgsError('--json needs a file name');
        break;
      default:
        throw new ArgsError(`unknown argument ${JSON.stringify(argv[i])}`);
    }
  }
  return a;
}

/** The options as a command line with every value explicit (for "reproduce with"). */
export function canonicalArgs(a: BenchArgs): string[] {
  const out = ['--messages', String(a.messages), '--rounds', String(a.rounds), '--connections', String(a.connections), '--fetches', String(a.fetches)];
  if (a.headers) out.push('--headers');
  if (a.variants.join(',') !== DEFAULTS.variants.join(',')) out.push('--variants', a.variants.join(','));
  if (a.targets.join(',') !== DEFAULTS.targets.join(',')) out.push('--targets', a.targets.join(','));
  if (a.seed !== DEFAULTS.seed) out.push('--seed', String(a.seed));
  if (a.profile) out.push('--profile');
  if (a.hashAll) out.push('--hash-all');
  if (a.dist !== DEFAULTS.dist) out.push('--dist', a.dist);
  if (a.out !== DEFAULTS.out) out.push('--out', a.out);
  return out;
}
