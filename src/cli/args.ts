/**
 * Small CLI plumbing shared by the subcommands: I/O handles (so commands can be run in tests
 * without a process), usage errors, and command-local flags such as `devices list --user U`
 * (configuration options themselves are parsed by src/config).
 */
import { readFileSync } from 'node:fs';
import { optionsHelp, type Command } from '../config/index.js';

export interface Output {
  write(chunk: string): unknown;
}

export interface CliIO {
  readonly stdout: Output;
  readonly stderr: Output;
  readonly env: Readonly<Record<string, string | undefined>>;
  readonly cwd: string;
}

export function processIO(): CliIO {
  return { stdout: process.stdout, stderr: process.stderr, env: process.env, cwd: process.cwd() };
}

/** Bad command line (not a configuration problem): exit 2 after `xaps-proxy: <message>`. */
export class UsageError extends Error {
  override readonly name = 'UsageError';
}

export const PROG = 'xaps-proxy';

export function wantsHelp(argv: readonly string[]): boolean {
  return argv.includes('--help') || argv.includes('-h');
}

export type LocalFlagKind = 'string' | 'boolean';
export type LocalFlagValues<S extends Record<string, LocalFlagKind>> = {
  [K in keyof S]?: S[K] extends 'boolean' ? boolean : string;
};

/**
 * Remove the command-local flags in `spec` from `argv` (`--user U`, `--user=U`, `--json`);
 * returns their values and the remaining arguments (configuration options) untouched.
 */
export function takeLocalFlags<const S extends Record<string, LocalFlagKind>>(
  argv: readonly string[],
  spec: S,
): { values: LocalFlagValues<S>; rest: string[] } {
  const values: Record<string, string | boolean> = {};
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--') {
      rest.push(...argv.slice(i));
      break;
    }
    const eq = arg.indexOf('=');
    const name = arg.startsWith('--') ? (eq < 0 ? arg.slice(2) : arg.slice(2, eq)) : '';
    const kind = Object.hasOwn(spec, name) ? spec[name] : undefined;
    if (kind === undefined) {
      rest.push(arg);
      continue;
    }
    if (kind === 'boolean') {
      if (eq >= 0) throw new UsageError(`--${name} takes no value`);
      values[name] = true;
      continue;
    }
    let value: string | undefined;
    if (eq >= 0) value = arg.slice(eq + 1);
    else {
      value = argv[i + 1];
      if (value === undefined || value.startsWith('--')) throw new UsageError(`--${name}: missing value`);
      i++;
    }
    if (value.trim() === '') throw new UsageError(`--${name}: empty value`);
    values[name] = value;
  }
  return { values: values as LocalFlagValues<S>, rest };
}

export function version(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

export function usage(): string {
  return `Usage: ${PROG} <command> [options]

Commands:
  serve                                    run the proxy
  config check                             validate the configuration and print it (secrets masked)
  devices list [--user U] [--json]         list device registrations
  devices remove --user U --token T        remove one registration
  devices purge-expired                    remove registrations older than --registration-ttl
  test-push --user U [--token T] [--json]  send one push to a user's devices and print APNs's answers
  cert show [FILE…]                        inspect a Mail push certificate (topic, validity, key match)
  cert csr --out DIR                       new key and CSR for Apple's developer portal
  cert request | cert renew                the historical macOS Server request flow (refused by Apple since 2024-10-29)
  demo                                     run a self-contained demonstration
  version                                  print the version
  help [command]                           this help; "${PROG} help serve" lists all options

Options are given as flags, XAPS_* environment variables or a --config YAML file.
`;
}

/** `help`, `help serve`, `serve --help`, …: usage plus the options of the command. */
export function helpText(topic?: string): string {
  const command: Command | undefined =
    topic === 'devices' || topic === 'test-push' || topic === 'cert' ? topic : topic === 'serve' || topic === 'config' ? 'serve' : undefined;
  const heading =
    topic === 'test-push'
      ? `Usage: ${PROG} test-push --user U [--token T] [--json] [options]
  Sends one push to each stored registration of U (or to the device whose token starts with T)
  and prints what APNs answered. Exit 0 when every push was delivered.
`
      : topic === 'cert'
        ? `Usage: ${PROG} cert show [FILE…] | csr --out DIR | request | renew [options]
`
        : topic === 'devices'
      ? `Usage: ${PROG} devices <command> [options]
  list [--user U] [--json]     registrations (tokens shortened; --json: full records)
  remove --user U --token T    remove one; T may be a unique prefix of at least 8 hex digits
  purge-expired                drop registrations not renewed within --registration-ttl
`
      : topic === 'config'
        ? `Usage: ${PROG} config check [options]\n  Validate the configuration of "serve" and print it (secrets masked).\n`
        : topic === 'serve'
          ? `Usage: ${PROG} serve [options]\n`
          : usage();
  return `${heading}\n${optionsHelp(command)}`;
}
