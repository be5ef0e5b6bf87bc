/**
 * Loading: command-line flags > environment (XAPS_*) > YAML file (--config / XAPS_CONFIG)
 * > defaults, then validation by the schema derived from OPTIONS.
 */
import { readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { isMap, isScalar, LineCounter, parseDocument } from 'yaml';
import { ConfigError } from './errors.js';
import {
  camelCase,
  configSchema,
  envVarName,
  getOption,
  optionNames,
  REQUIRED_ISSUE,
  RULE_ISSUE,
  RULES,
  type Command,
  type Config,
  type ConfigFor,
  type OptionName,
  type OptionSpec,
  type Report,
} from './options.js';
import { closest } from './suggest.js';
import { unreadableFileReason } from './values.js';

export interface LoadConfigInput<C extends Command = Command> {
  /** Arguments after the subcommand (e.g. `['--listen', '0.0.0.0:143']`). */
  readonly argv: readonly string[];
  /** Environment; default `process.env`. */
  readonly env?: Readonly<Record<string, string | undefined>>;
  /** Base for relative paths given as flags or env; default `process.cwd()`. */
  readonly cwd?: string;
  /** Which command's options to accept and validate; default `serve`. */
  readonly command?: C;
}

/** Where a value came from. */
export interface Origin {
  readonly kind: 'flag' | 'env' | 'file' | 'default';
  /** `--listen`, `XAPS_LISTEN`, `/etc/xaps-proxy.yaml line 3`, `default`. */
  readonly label: string;
}

interface Entry {
  raw: unknown;
  origin: Origin;
  /** Base directory for relative paths. */
  base: string;
}

interface Meta {
  /** What it was loaded from, so that it can be loaded again (SIGHUP). */
  input: LoadConfigInput;
  command: Command;
  origins: ReadonlyMap<OptionName, Origin>;
  warnings: readonly string[];
}

const META = new WeakMap<object, Meta>();

/** Where each option of a loaded configuration came from (empty for hand-made objects). */
export function configOrigins(config: object): ReadonlyMap<OptionName, Origin> {
  return META.get(config)?.origins ?? new Map();
}

/** The command a configuration was loaded for, when it came from `loadConfig`. */
export function configCommand(config: object): Command | undefined {
  return META.get(config)?.command;
}

/**
 * Warnings about a loaded configuration (each one line, naming the option), e.g. disabled
 * upstream certificate verification or an unknown XAPS_* environment variable.
 */
export function configWarnings(config: object): readonly string[] {
  return META.get(config)?.warnings ?? [];
}

/**
 * The configuration loaded again from the same flags, environment and config file as
 * `config` (the file is re-read, so edits to it take effect). Throws ConfigError as
 * `loadConfig` does; `config` itself is left as it was.
 */
export function reloadConfig<T extends object>(config: T): T {
  const meta = META.get(config);
  if (!meta) throw new Error('reloadConfig: not a configuration returned by loadConfig');
  return loadConfig(meta.input as LoadConfigInput & { command: Command }) as T;
}

export function loadConfig(input: LoadConfigInput<'serve'>): Config;
export function loadConfig<C extends Command>(input: LoadConfigInput<C> & { readonly command: C }): ConfigFor<C>;
export function loadConfig(input: LoadConfigInput): object {
  const command: Command = input.command ?? 'serve';
  const env = input.env ?? process.env;
  const cwd = input.cwd ?? process.cwd();
  const names = optionNames(command);

  const flags = readFlags(input.argv, command, cwd);
  const fromEnv = readEnv(env, names, cwd);
  const configEntry = flags.get('config') ?? fromEnv.get('config');
  const fromFile = configEntry ? readConfigFile(configEntry, cwd) : new Map<OptionName, Entry>();

  const entries = new Map<OptionName, Entry>();
  const raw: Record<string, unknown> = {};
  for (const name of names) {
    const spec = getOption(name)!;
    let entry = flags.get(name) ?? fromEnv.get(name) ?? fromFile.get(name);
    if (!entry && spec.default !== undefined) {
      entry = { raw: spec.default, origin: { kind: 'default', label: 'default' }, base: cwd };
    }
    if (entry && spec.type.isPath && typeof entry.raw === 'string' && entry.raw.trim() !== '') {
      entry.raw = resolve(entry.base, entry.raw.trim());
    }
    if (entry) entries.set(name, entry);
    raw[camelCase(name)] = entry?.raw;
  }

  const result = configSchema(command).safeParse(raw);
  if (!result.success) {
    const issue = result.error.issues[0]!;
    throw issueToError(issue, entries);
  }

  const config = deepFreeze(result.data as Record<string, unknown>);
  const origins = new Map<OptionName, Origin>();
  for (const [name, entry] of entries) origins.set(name, entry.origin);
  const warnings = [...ruleWarnings(command, config, origins), ...envWarnings(env)];
  META.set(config, { input: { argv: [...input.argv], env, cwd, command }, command, origins, warnings });
  return config;
}

// ---------------------------------------------------------------------------------------------
// Sources

function readFlags(argv: readonly string[], command: Command, cwd: string): Map<OptionName, Entry> {
  const out = new Map<OptionName, Entry>();
  const valid = optionNames(command);
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--') {
      if (i + 1 < argv.length) throw new ConfigError(`unexpected argument ${JSON.stringify(argv[i + 1])}`);
      break;
    }
    if (!arg.startsWith('--')) {
      if (arg.startsWith('-') && arg.length > 1) throw new ConfigError(`${arg}: unknown option${hint(arg, valid, '--')}`);
      throw new ConfigError(`unexpected argument ${JSON.stringify(arg)}`);
    }
    const eq = arg.indexOf('=');
    const name = eq < 0 ? arg.slice(2) : arg.slice(2, eq);
    const spec = getOption(name);
    if (!spec) throw new ConfigError(`--${name}: unknown option${hint(name, valid, '--')}`, { option: name });
    if (!(spec.commands as readonly string[]).includes(command)) {
      throw new ConfigError(`--${name}: not used by the "${command}" command`, { option: name });
    }
    let value: unknown;
    if (eq >= 0) value = arg.slice(eq + 1);
    else if (spec.type.arity === 'switch') value = true;
    else {
      const next = argv[i + 1];
      if (next === undefined || (next.startsWith('--') && next.length > 2)) {
        throw new ConfigError(`--${name}: missing value (expected ${spec.type.placeholder})`, { option: name });
      }
      value = next;
      i++;
    }
    out.set(name as OptionName, { raw: value, origin: { kind: 'flag', label: `--${name}` }, base: cwd });
  }
  return out;
}

function readEnv(env: Readonly<Record<string, string | undefined>>, names: readonly OptionName[], cwd: string) {
  const out = new Map<OptionName, Entry>();
  for (const name of names) {
    const variable = envVarName(name);
    const value = env[variable];
    // An empty variable counts as unset (compose files often blank out variables).
    if (value === undefined || value.trim() === '') continue;
    out.set(name, { raw: value, origin: { kind: 'env', label: variable }, base: cwd });
  }
  return out;
}

function readConfigFile(entry: Entry, cwd: string): Map<OptionName, Entry> {
  const from = ` (from ${originText(entry.origin)})`;
  if (typeof entry.raw !== 'string' || entry.raw.trim() === '') {
    throw new ConfigError(`--config: expected a file path${from}`, { option: 'config', origin: entry.origin.label });
  }
  const path = resolve(cwd, entry.raw.trim());
  const why = unreadableFileReason(path);
  let text: string;
  try {
    if (why !== undefined) throw new Error(why);
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new ConfigError(`--config: cannot read file "${path}": ${why ?? (err as Error).message}${from}`, {
      option: 'config',
      origin: entry.origin.label,
    });
  }

  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: false, uniqueKeys: true });
  if (doc.errors.length > 0) {
    const e = doc.errors[0]!;
    const at = ` line ${lines.linePos(e.pos[0]).line}`;
    const what = e.message.split('\n')[0]!.replace(/ at line \d+, column \d+:?$/, '');
    throw new ConfigError(`--config: invalid YAML in ${path}${at}: ${what}`, { option: 'config', origin: path });
  }
  const out = new Map<OptionName, Entry>();
  if (doc.contents === null) return out;
  if (!isMap(doc.contents)) {
    throw new ConfigError(`--config: ${path} must be a mapping of option names to values (e.g. "upstream: imap.example.net:143")`, {
      option: 'config',
      origin: path,
    });
  }
  const valid = optionNames();
  const base = dirname(path);
  for (const pair of doc.contents.items) {
    const keyNode = pair.key;
    const line = isScalar(keyNode) && keyNode.range ? lines.linePos(keyNode.range[0]).line : undefined;
    const where = `${path}${line ? ` line ${line}` : ''}`;
    const key = isScalar(keyNode) ? String(keyNode.value) : String(keyNode);
    const spec = getOption(key);
    if (!spec) {
      throw new ConfigError(`unknown key ${JSON.stringify(key)} in ${where}${hint(key, valid, '')}`, { option: key, origin: where });
    }
    if (spec.inFile === false) {
      throw new ConfigError(`${JSON.stringify(key)} cannot be set in the config file (${where})`, { option: key, origin: where });
    }
    const valueNode = pair.value;
    const value: unknown = valueNode == null ? null : isScalar(valueNode) ? valueNode.value : (valueNode as { toJSON(): unknown }).toJSON();
    if (value === null || value === undefined) continue; // `key:` with no value = unset
    out.set(key as OptionName, { raw: value, origin: { kind: 'file', label: where }, base });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Messages

function hint(input: string, candidates: readonly string[], prefix: string): string {
  const best = closest(input, candidates);
  if (!best) return '';
  return prefix ? ` (did you mean ${prefix}${best}?)` : ` (did you mean ${JSON.stringify(best)}?)`;
}

export function originText(origin: Origin): string {
  switch (origin.kind) {
    case 'flag':
      return 'the command line';
    case 'default':
      return 'the default';
    default:
      return origin.label;
  }
}

function truncate(s: string, max = 80): string {
  return s.length > max ? `${s.slice(0, max - 1)}…` : s;
}

function showInput(raw: unknown, spec: OptionSpec): string {
  if (spec.secret) return JSON.stringify(truncate(spec.type.maskRaw?.(raw) ?? '***'));
  if (typeof raw === 'string') return JSON.stringify(truncate(raw));
  if (Array.isArray(raw)) return 'a list';
  if (raw !== null && typeof raw === 'object') return 'a mapping';
  return String(raw);
}

const NAME_BY_KEY = new Map<string, OptionName>(optionNames().map((n) => [camelCase(n), n]));

interface IssueLike {
  readonly path: readonly PropertyKey[];
  readonly message: string;
  readonly params?: Record<string, unknown>;
}

function issueToError(issue: IssueLike, entries: ReadonlyMap<OptionName, Entry>): ConfigError {
  const name = NAME_BY_KEY.get(String(issue.path[0]));
  if (!name) return new ConfigError(issue.message);
  const spec = getOption(name)!;
  const entry = entries.get(name);
  const params = issue.params ?? {};
  if (params[REQUIRED_ISSUE]) {
    return new ConfigError(
      `--${name}: required (use --${name} ${spec.type.placeholder}, ${envVarName(name)} or "${name}:" in the config file)`,
      { option: name },
    );
  }
  let message = `--${name}: ${issue.message}`;
  const related = params[RULE_ISSUE];
  if (Array.isArray(related)) {
    const parts: string[] = [];
    if (entry) parts.push(`from ${originText(entry.origin)}`);
    for (const other of related as OptionName[]) {
      const o = entries.get(other);
      if (o) parts.push(`--${other} from ${originText(o.origin)}`);
    }
    if (parts.length) message += ` (${parts.join('; ')})`;
    return new ConfigError(message, { option: name, origin: entry?.origin.label });
  }
  if (!params.hideInput && entry) message += `, got ${showInput(entry.raw, spec)}`;
  if (entry) message += ` (from ${originText(entry.origin)})`;
  return new ConfigError(message, { option: name, origin: entry?.origin.label });
}

function ruleWarnings(command: Command, config: object, origins: ReadonlyMap<OptionName, Origin>): string[] {
  const out: string[] = [];
  const report: Report = (option, message, related = []) => {
    const parts: string[] = [];
    const own = origins.get(option);
    if (own && own.kind !== 'default') parts.push(`from ${originText(own)}`);
    for (const other of related) {
      const o = origins.get(other);
      if (o && o.kind !== 'default') parts.push(`--${other} from ${originText(o)}`);
    }
    out.push(`--${option}: ${message}${parts.length ? ` (${parts.join('; ')})` : ''}`);
  };
  for (const rule of RULES) {
    if (rule.command === command && rule.severity === 'warning') (rule.check as (c: object, r: Report) => void)(config, report);
  }
  return out;
}

function envWarnings(env: Readonly<Record<string, string | undefined>>): string[] {
  const known = new Map(optionNames().map((n) => [envVarName(n), n]));
  const out: string[] = [];
  for (const variable of Object.keys(env).sort()) {
    if (!variable.startsWith('XAPS_') || known.has(variable)) continue;
    const best = closest(variable.slice(5), [...known.values()]);
    out.push(`${variable}: not a configuration variable, ignored${best ? ` (did you mean ${envVarName(best)}?)` : ''}`);
  }
  return out;
}

function deepFreeze<T>(value: T): T {
  if (value !== null && typeof value === 'object' && !Object.isFrozen(value)) {
    for (const v of Object.values(value)) deepFreeze(v);
    Object.freeze(value);
  }
  return value;
}
