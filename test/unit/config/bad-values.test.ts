/**
 * `config check` refuses every kind of bad value, from every source, with exit 2 and one line
 * naming the option, the problem and where the value came from. The cases are generated from
 * OPTIONS by value kind, so a new option is covered as soon as it exists, and a new kind (or a
 * checked text option) without bad-value cases here fails the test.
 */
import { execFile } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runConfigCheck } from '../../../src/cli/config-check.js';
import {
  camelCase,
  ConfigError,
  envVarName,
  formatDuration,
  loadConfig,
  OPTIONS,
  optionNames,
  RULES,
  type Command,
  type OptionName,
  type OptionSpec,
  type Report,
} from '../../../src/config/index.js';
import type { ValueKind } from '../../../src/config/values.js';
import { cleanEnv, memoryIO, ROOT } from '../cli/helpers.js';

type Source = 'flag' | 'env' | 'file';
const SOURCES: readonly Source[] = ['flag', 'env', 'file'];

interface Bad {
  readonly raw: string;
  readonly problem: RegExp;
  /** Where this value can be given at all (an empty XAPS_* variable means "unset"). */
  readonly sources?: readonly Source[];
}

const NOT_FROM_ENV: readonly Source[] = ['flag', 'file'];

let dir: string;
const path = (name: string) => join(dir, name);

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'xaps-bad-values-'));
  mkdirSync(path('a-directory'));
  writeFileSync(path('plain.txt'), 'not a directory\n');
  writeFileSync(path('empty-first-line'), '\nthe secret belongs on the first line\n');
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

function fileCases(): Bad[] {
  return [
    { raw: path('missing.pem'), problem: new RegExp(`cannot read file "${escape(path('missing.pem'))}": no such file`) },
    { raw: path('a-directory'), problem: /cannot read file ".*a-directory": is a directory/ },
    { raw: path('plain.txt/inside.pem'), problem: /cannot read file ".*plain\.txt\/inside\.pem": a parent is not a directory/ },
  ];
}

/** Text options with a check of their own: what each one refuses. */
const CHECKED_TEXT: Partial<Record<OptionName, Bad[]>> = {
  'apns-topic': [{ raw: 'com.example.push', problem: /must start with "com\.apple\.mobilemail\.push\." or "com\.apple\.mail\."/ }],
  'apns-endpoint': [
    { raw: 'http://api.push.apple.com', problem: /expected production, sandbox or an https:\/\/HOST\[:PORT\] URL/ },
    { raw: 'staging', problem: /expected production, sandbox or an https:\/\/HOST\[:PORT\] URL/ },
  ],
  'cert-service-url': [{ raw: 'ftp://identity.example.com/new', problem: /expected an http\(s\):\/\/ URL/ }],
  'tls-min-version': [
    { raw: 'TLSv1.1', problem: /expected TLSv1\.2 or TLSv1\.3/ },
    { raw: '1.2', problem: /expected TLSv1\.2 or TLSv1\.3/ },
  ],
  'tls-ciphers': [{ raw: 'NO-SUCH-CIPHER:ALSO-NOT', problem: /not a usable OpenSSL cipher list \(no cipher match\)/ }],
};

/** Bad values by kind of value; `Record` makes a new kind a type error until it has cases. */
const BY_KIND: Record<ValueKind, (name: OptionName, spec: OptionSpec) => Bad[]> = {
  'host-port': () => [
    { raw: 'imap.example.net', problem: /expected HOST:PORT \(the port is missing\)/ },
    { raw: 'imap.example.net:70000', problem: /the port must be between 1 and 65535/ },
    { raw: '[::1:143', problem: /expected \[IPv6\]:PORT/ },
    { raw: '::1:143', problem: /IPv6 addresses must be in brackets/ },
  ],
  'host-name': () => [{ raw: 'bad_host!', problem: /expected a host name or IP address/ }],
  duration: (_name, spec) => {
    const min = spec.type.limits!.min;
    const below =
      min === 0
        ? []
        : [{ raw: `${min - 1}ms`, problem: min === 1 ? /must be greater than 0/ : new RegExp(`must be at least ${formatDuration(min)}`) }];
    return [
      { raw: 'soon', problem: /expected a duration such as 500ms, 30s/ },
      { raw: '-5s', problem: /expected a duration/ },
      { raw: '10 parsecs', problem: /expected a duration/ },
      ...below,
    ];
  },
  boolean: () => [{ raw: 'maybe', problem: /expected true\|false\|1\|0\|yes\|no/ }],
  integer: (_name, spec) => {
    const { min, max } = spec.type.limits as { min: number; max: number };
    const range = new RegExp(`must be between ${min} and ${max}`);
    return [
      { raw: 'many', problem: /expected a whole number/ },
      { raw: '1.5', problem: /expected a whole number/ },
      { raw: String(min - 1), problem: range },
      { raw: String(max + 1), problem: range },
    ];
  },
  enum: (_name, spec) => [{ raw: 'bogus', problem: new RegExp(`expected one of ${escape(spec.type.values!.join('|'))}, got "bogus"`) }],
  // Any non-empty text is fine; only an explicitly empty value is wrong.
  text: () => [{ raw: '', problem: /expected [a-zA-Z ]+, got "(\*\*\*)?"/, sources: NOT_FROM_ENV }],
  'checked-text': (name) => CHECKED_TEXT[name] ?? [],
  file: fileCases,
  'secret-file': () => [
    ...fileCases(),
    { raw: path('empty-first-line'), problem: /".*empty-first-line": the first line \(.+\) is empty/ },
  ],
  directory: () => [
    { raw: path('plain.txt'), problem: /".*plain\.txt" exists and is not a directory/ },
    { raw: '', problem: /expected a directory path/, sources: NOT_FROM_ENV },
  ],
  'redis-url': () => [
    { raw: 'http://:hunter2@redis:6379', problem: /unknown scheme "http:\/\/"/ },
    { raw: 'redis://:hunter2@redis:99999/0', problem: /port "99999" is not a number from 1 to 65535/ },
  ],
};

const ALL = optionNames();
const spec = (name: OptionName) => OPTIONS[name] as OptionSpec;

/** A valid serve configuration, minus the option under test so the bad value is the one that counts. */
function baseArgs(without: readonly OptionName[]): string[] {
  const base: Array<[OptionName, string]> = [
    ['listen', '127.0.0.1:1143'],
    ['upstream', 'imap.example.net:143'],
  ];
  return base.filter(([n]) => !without.includes(n)).flatMap(([n, v]) => [`--${n}`, v]);
}

/** The option's value(s) given from one source: argv additions, environment, and the YAML file if any. */
function give(values: ReadonlyArray<readonly [OptionName, string]>, source: Source, file: string): { argv: string[]; env: Record<string, string> } {
  switch (source) {
    case 'flag':
      return {
        argv: values.flatMap(([n, raw]) => (spec(n).type.arity === 'switch' || raw === '' ? [`--${n}=${raw}`] : [`--${n}`, raw])),
        env: {},
      };
    case 'env':
      return { argv: [], env: Object.fromEntries(values.map(([n, raw]) => [envVarName(n), raw])) };
    case 'file':
      writeFileSync(file, values.map(([n, raw]) => `${n}: ${JSON.stringify(raw)}\n`).join(''));
      return { argv: ['--config', file], env: {} };
  }
}

function originOf(source: Source, name: OptionName, file: string, line = 1): string {
  return source === 'flag' ? 'the command line' : source === 'env' ? envVarName(name) : `${file} line ${line}`;
}

function sourcesOf(name: OptionName, bad: Bad): Source[] {
  return SOURCES.filter((s) => (bad.sources ?? SOURCES).includes(s) && !(s === 'file' && spec(name).inFile === false));
}

/** Runs the check for a command: `config check` for serve's options, loading for the others. */
function check(command: Command, argv: string[], env: Record<string, string>): { code: number; out: string; err: string } {
  if (command === 'serve') {
    const io = memoryIO({ env, cwd: dir });
    const code = runConfigCheck(argv, io);
    return { code, out: io.out(), err: io.err() };
  }
  try {
    loadConfig({ argv, env, cwd: dir, command });
    return { code: 0, out: '', err: '' };
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    return { code: 2, out: '', err: `xaps-proxy: ${err.message}\n` };
  }
}

describe('every value kind has bad-value cases', () => {
  it('covers the kind of every option, and has no cases for kinds no option uses', () => {
    const used = new Set(ALL.map((n) => spec(n).type.kind));
    expect([...used].sort()).toEqual(Object.keys(BY_KIND).sort());
    for (const name of ALL) {
      const cases = BY_KIND[spec(name).type.kind](name, spec(name));
      expect(cases.length, `--${name} (${spec(name).type.kind}) has no bad value`).toBeGreaterThan(0);
      // every source that can set the option is tried with at least one bad value
      const sources = new Set(cases.flatMap((c) => sourcesOf(name, c)));
      const expected = SOURCES.filter((s) => !(s === 'file' && spec(name).inFile === false));
      // an empty environment variable means "unset": free text cannot be wrong there
      const unreachable = spec(name).type.kind === 'text' ? ['env'] : [];
      expect([...sources].sort(), `--${name}`).toEqual(expected.filter((s) => !unreachable.includes(s)).sort());
    }
  });
});

describe('config check refuses bad values, naming the option, the problem and the source', () => {
  for (const name of ALL) {
    it(`--${name}`, () => {
      const s = spec(name);
      const command: Command = (s.commands as readonly Command[]).includes('serve') ? 'serve' : s.commands[0]!;
      for (const bad of BY_KIND[s.type.kind](name, s)) {
        for (const source of sourcesOf(name, bad)) {
          const file = path(`${name}.yaml`);
          const given = give([[name, bad.raw]], source, file);
          const argv = [...(command === 'serve' ? baseArgs([name]) : []), ...given.argv];
          const r = check(command, argv, given.env);
          const what = `--${name} ${JSON.stringify(bad.raw)} from ${source}`;
          expect(r.code, what).toBe(2);
          expect(r.out, what).toBe('');
          expect(r.err, what).toMatch(new RegExp(`^xaps-proxy: --${escape(name)}: [^\\n]+\\n$`));
          expect(r.err, what).toMatch(bad.problem);
          expect(r.err, what).toContain(`(from ${originOf(source, name, file)})`);
          if (s.secret) expect(r.err, what).not.toContain('hunter2');
        }
      }
    });
  }
});

interface RuleCase {
  /** What is set (all from the source under test). */
  readonly values: ReadonlyArray<readonly [OptionName, string]>;
  /** The option the error names, what it says, and the options it points at. */
  readonly option: OptionName;
  readonly problem: RegExp;
  readonly related?: readonly OptionName[];
}

describe('cross-option rules', () => {
  let cert: string;
  beforeAll(() => {
    cert = path('cert.pem');
    writeFileSync(cert, 'PEM');
  });
  const cases = (): RuleCase[] => [
    { values: [['upstream', 'imap:143']], option: 'listen', problem: /at least one of --listen and --listen-tls is required/ },
    { values: [['listen-tls', '127.0.0.1:993']], option: 'tls-cert', problem: /required when --listen-tls is set/, related: ['listen-tls'] },
    { values: [['listen-tls', '127.0.0.1:993'], ['tls-cert', cert]], option: 'tls-key', problem: /required when --listen-tls is set/, related: ['listen-tls'] },
    { values: [['tls-cert', cert]], option: 'tls-key', problem: /required together with --tls-cert/, related: ['tls-cert'] },
    { values: [['tls-key', cert]], option: 'tls-cert', problem: /required together with --tls-key/, related: ['tls-key'] },
    {
      values: [['listen', '127.0.0.1:993'], ['listen-tls', '127.0.0.1:993'], ['tls-cert', cert], ['tls-key', cert]],
      option: 'listen-tls',
      problem: /must not be the same address as --listen/,
      related: ['listen'],
    },
    { values: [['apns-cert', cert], ['apns-p12', cert]], option: 'apns-p12', problem: /cannot be combined with --apns-cert/, related: ['apns-cert'] },
    { values: [['apns-key', cert]], option: 'apns-key', problem: /requires --apns-cert/ },
    { values: [['apns-key', cert], ['apns-p12', cert]], option: 'apns-key', problem: /cannot be combined with --apns-p12/, related: ['apns-p12'] },
    { values: [['cert-vendor-cert', cert]], option: 'cert-vendor-key', problem: /required together with --cert-vendor-cert/, related: ['cert-vendor-cert'] },
    { values: [['cert-vendor-key', cert]], option: 'cert-vendor-cert', problem: /required together with --cert-vendor-key/, related: ['cert-vendor-key'] },
    {
      values: [['cert-vendor-cert', cert], ['cert-vendor-key', cert]],
      option: 'cert-apple-id',
      problem: /required for automatic renewal/,
      related: ['cert-vendor-cert'],
    },
  ];

  /** The values of a case parsed by each option's own type, as a rule sees them. */
  function parsed(c: RuleCase): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    for (const [n, raw] of [...c.values, ['upstream', 'imap:143'] as const]) out[camelCase(n)] = spec(n).type.schema.parse(raw);
    return out;
  }

  it('every error rule is exercised by a case', () => {
    const checks = [...new Set(RULES.filter((r) => r.severity === 'error').map((r) => r.check))];
    for (const [i, ruleCheck] of checks.entries()) {
      const fired = cases().filter((c) => {
        let reported = false;
        const report: Report = () => (reported = true);
        (ruleCheck as (config: unknown, report: Report) => void)(parsed(c), report);
        return reported;
      });
      expect(fired.length, `error rule #${i} (${ruleCheck.toString().slice(0, 120)}) has no case`).toBeGreaterThan(0);
    }
  });

  it('each is refused from flags, environment and the config file, naming the options and their sources', () => {
    for (const c of cases()) {
      for (const source of SOURCES) {
        const file = path('rules.yaml');
        const given = give(c.values, source, file);
        const sets = (...names: OptionName[]) => c.values.some(([n]) => names.includes(n));
        const upstream = sets('upstream') ? [] : ['--upstream', 'imap:143'];
        const listen = c.option === 'listen' || sets('listen', 'listen-tls') ? [] : ['--listen', '127.0.0.1:1143'];
        const r = check('serve', [...upstream, ...listen, ...given.argv], given.env);
        const what = `${c.option}: ${c.values.map(([n]) => n).join(', ')} from ${source}`;
        expect(r.code, what).toBe(2);
        expect(r.err, what).toMatch(new RegExp(`^xaps-proxy: --${escape(c.option)}: [^\\n]+\\n$`));
        expect(r.err, what).toMatch(c.problem);
        for (const other of c.related ?? []) {
          const line = c.values.findIndex(([n]) => n === other) + 1;
          expect(r.err, what).toContain(`--${other} from ${originOf(source, other, file, line)}`);
        }
      }
    }
  });
});

describe('a file that exists but cannot be read', () => {
  it('is refused by the real command with "permission denied" (run as an unprivileged user when root)', async () => {
    const locked = mkdtempSync(join(tmpdir(), 'xaps-unreadable-'));
    try {
      chmodSync(locked, 0o755);
      const secret = join(locked, 'master.pw');
      writeFileSync(secret, 'pw\n');
      chmodSync(secret, 0o000);
      // Root reads any file; an unprivileged user is what a misconfigured deployment has. The command is loaded
      // first and the process then drops to nobody: the checkout itself may be unreadable to nobody (a clone
      // inside a 0700 temporary directory), and only the secret file's permissions are under test.
      const script = [
        `const { main } = await import(${JSON.stringify(pathToFileURL(join(ROOT, 'src/cli/main.ts')).href)});`,
        'if (process.getuid() === 0) { process.setgid(65534); process.setuid(65534); }',
        'process.exitCode = await main(JSON.parse(process.env.TEST_CLI_ARGV));',
      ].join('\n');
      const r = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
        execFile(
          process.execPath,
          ['--import', join(ROOT, 'node_modules/tsx/dist/esm/index.mjs'), '--input-type=module', '-e', script],
          {
            cwd: tmpdir(),
            env: { ...cleanEnv({ XAPS_MASTER_PASSWORD_FILE: secret }), TEST_CLI_ARGV: JSON.stringify(['config', 'check', ...baseArgs([])]) },
            timeout: 30_000,
          },
          (err, stdout, stderr) => resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr }),
        );
      });
      expect(r.code).toBe(2);
      expect(r.stderr).toBe(`xaps-proxy: --master-password-file: cannot read file "${secret}": permission denied (from XAPS_MASTER_PASSWORD_FILE)\n`);
    } finally {
      rmSync(locked, { recursive: true, force: true });
    }
  });
});
