/**
 * Value types for configuration options. Each one is a zod schema that turns a raw value
 * (a command-line or environment string, a YAML scalar, `true` for a bare switch) into a
 * typed value, plus what help and `config check` need to print it back.
 *
 * Error messages produced here describe the problem only ("expected HOST:PORT"); the loader
 * adds the option name, the offending input (masked for secrets) and its origin.
 */
import { accessSync, closeSync, constants as fsConstants, openSync, readSync, statSync } from 'node:fs';
import { isIP, isIPv4, isIPv6 } from 'node:net';
import { z } from 'zod';
import { parseRedisUrl, redactRedisUrl } from '../store/redis-url.js';

/**
 * What sort of value an option takes. Tests iterate over OPTIONS by kind, so a new kind
 * (or a new option of a kind with no bad-value case) cannot go unchecked.
 */
export type ValueKind =
  | 'host-port'
  | 'host-name'
  | 'duration'
  | 'boolean'
  | 'integer'
  | 'enum'
  | 'text'
  | 'checked-text'
  | 'file'
  | 'secret-file'
  | 'directory'
  | 'redis-url';

export interface ValueType<T> {
  readonly kind: ValueKind;
  /** Bounds of `integer` (both) and `duration` (min, in ms). */
  readonly limits?: { readonly min: number; readonly max?: number };
  /** The accepted values of `enum`. */
  readonly values?: readonly string[];
  /** Parses a raw value into T (issues carry messages without option name or input). */
  readonly schema: z.ZodType<T>;
  /** Placeholder in help, e.g. `HOST:PORT`. */
  readonly placeholder: string;
  /** `switch`: a bare `--flag` means true and does not consume the next argument. */
  readonly arity: 'value' | 'switch';
  /** Relative paths are made absolute (against cwd, or the config file's directory) before parsing. */
  readonly isPath?: boolean;
  /** The textual form accepted on input, so printed configuration can be read back. */
  format(value: T): string | number | boolean;
  /** Printable form with secrets masked (for `secret` options). Default: `***`. */
  mask?(value: T): string;
  /** Masked text of a raw, possibly invalid input of a `secret` option. Default: `***`. */
  maskRaw?(raw: unknown): string;
}

/** Issue params: the message already shows the relevant input; the loader must not append it. */
export const HIDE_INPUT = { hideInput: true } as const;

type Ctx = { addIssue(issue: { code: 'custom'; message: string; params?: Record<string, unknown> }): void };

function fail(ctx: Ctx, message: string, hideInput = false): never {
  ctx.addIssue({ code: 'custom', message, ...(hideInput ? { params: { ...HIDE_INPUT } } : {}) });
  return z.NEVER;
}

/** A non-empty string (trimmed); numbers are not accepted where text is expected. */
function nonEmptyString(expected: string) {
  return z.string({ error: `expected ${expected}` }).trim().min(1, { error: `expected ${expected}` });
}

// ---------------------------------------------------------------------------------------------
// host:port

export interface HostPort {
  /** Hostname or IP address; IPv6 without brackets (as `net` wants it). */
  readonly host: string;
  readonly port: number;
}

const LABEL = '[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?';
const HOSTNAME_RE = new RegExp(`^${LABEL}(?:\\.${LABEL})*\\.?$`);

export function isHostname(s: string): boolean {
  return s.length <= 253 && HOSTNAME_RE.test(s) && !/^[0-9.]+$/.test(s);
}

/** Parse `HOST:PORT` / `[IPv6]:PORT`; returns an error message instead of throwing. */
export function parseHostPort(input: string): HostPort | { error: string } {
  const s = input.trim();
  let host: string;
  let portText: string;
  if (s.startsWith('[')) {
    const m = /^\[([^\]]*)\]:(.*)$/.exec(s);
    if (!m) return { error: 'expected [IPv6]:PORT' };
    host = m[1]!;
    portText = m[2]!;
    if (!isIPv6(host)) return { error: `"${host}" is not an IPv6 address` };
  } else {
    const i = s.lastIndexOf(':');
    if (i < 0) return { error: 'expected HOST:PORT (the port is missing)' };
    host = s.slice(0, i);
    portText = s.slice(i + 1);
    if (host.includes(':')) return { error: 'IPv6 addresses must be in brackets, e.g. [::1]:993' };
    if (host === '') return { error: 'expected HOST:PORT (the host is missing; use 0.0.0.0 or [::] for all addresses)' };
    if (/^[0-9.]+$/.test(host) && !isIPv4(host)) return { error: `"${host}" is not a valid IPv4 address` };
    if (!isIPv4(host) && !isHostname(host)) return { error: `"${host}" is not a valid host name` };
  }
  if (!/^\d{1,5}$/.test(portText)) return { error: 'expected HOST:PORT with a numeric port' };
  const port = Number(portText);
  if (port < 1 || port > 65535) return { error: 'the port must be between 1 and 65535' };
  return { host, port };
}

export function formatHostPort(hp: HostPort): string {
  return isIPv6(hp.host) ? `[${hp.host}]:${hp.port}` : `${hp.host}:${hp.port}`;
}

export function hostPort(): ValueType<HostPort> {
  return {
    schema: nonEmptyString('HOST:PORT').transform((s, ctx): HostPort => {
      const r = parseHostPort(s);
      return 'error' in r ? fail(ctx, r.error) : r;
    }),
    kind: 'host-port',
    placeholder: 'HOST:PORT',
    arity: 'value',
    format: formatHostPort,
  };
}

/** A host name or IP address (no port), e.g. a TLS server name. */
export function hostName(): ValueType<string> {
  return {
    schema: nonEmptyString('a host name').refine((s) => isIP(s) !== 0 || isHostname(s), {
      error: 'expected a host name or IP address',
    }),
    kind: 'host-name',
    placeholder: 'NAME',
    arity: 'value',
    format: (v) => v,
  };
}

// ---------------------------------------------------------------------------------------------
// durations

const UNITS: ReadonlyArray<readonly [string, number]> = [
  ['d', 86_400_000],
  ['h', 3_600_000],
  ['m', 60_000],
  ['s', 1_000],
  ['ms', 1],
];
const UNIT_MS = new Map(UNITS);
const DURATION_PART = /(\d+(?:\.\d+)?)(ms|s|m|h|d)/y;

/**
 * `500ms`, `30s`, `35m`, `2h`, `30d`, combinations such as `1h30m`, or a bare number of
 * seconds (string or number). Returns milliseconds, or undefined when malformed.
 */
export function parseDuration(raw: string | number): number | undefined {
  if (typeof raw === 'number') return Number.isFinite(raw) && raw >= 0 ? Math.round(raw * 1000) : undefined;
  const s = raw.trim();
  if (/^\d+(?:\.\d+)?$/.test(s)) return Math.round(Number(s) * 1000);
  if (s === '') return undefined;
  let total = 0;
  DURATION_PART.lastIndex = 0;
  while (DURATION_PART.lastIndex < s.length) {
    const m = DURATION_PART.exec(s);
    if (!m) return undefined;
    total += Number(m[1]) * UNIT_MS.get(m[2]!)!;
  }
  return Math.round(total);
}

/** Shortest exact form: 2592000000 → `30d`, 2100000 → `35m`, 1500 → `1500ms`. */
export function formatDuration(ms: number): string {
  if (ms === 0) return '0s';
  for (const [unit, size] of UNITS) if (ms % size === 0) return `${ms / size}${unit}`;
  return `${ms}ms`;
}

/** `min` (ms, default 1): 0 allows a zero duration, e.g. "do not wait". */
export function duration(opts: { min?: number; minReason?: string } = {}): ValueType<number> {
  const min = opts.min ?? 1;
  return {
    schema: z
      .union([z.number(), z.string()], { error: 'expected a duration such as 30s, 35m, 2h or 30d' })
      .transform((raw, ctx): number => {
        const ms = parseDuration(raw);
        if (ms === undefined) return fail(ctx, 'expected a duration such as 500ms, 30s, 35m, 2h, 30d or a number of seconds');
        if (ms < min) {
          const why = opts.minReason ? ` (${opts.minReason})` : '';
          return fail(ctx, min === 1 ? `must be greater than 0${why}` : `must be at least ${formatDuration(min)}${why}`);
        }
        return ms;
      }),
    kind: 'duration',
    limits: { min },
    placeholder: 'DURATION',
    arity: 'value',
    format: formatDuration,
  };
}

// ---------------------------------------------------------------------------------------------
// booleans, enums, text

const TRUE = new Set(['true', '1', 'yes', 'on']);
const FALSE = new Set(['false', '0', 'no', 'off']);

export function boolean(): ValueType<boolean> {
  return {
    schema: z
      .union([z.boolean(), z.number(), z.string()], { error: 'expected true|false' })
      .transform((raw, ctx): boolean => {
        const s = String(raw).trim().toLowerCase();
        if (TRUE.has(s)) return true;
        if (FALSE.has(s)) return false;
        return fail(ctx, 'expected true|false|1|0|yes|no');
      }),
    kind: 'boolean',
    placeholder: '',
    arity: 'switch',
    format: (v) => v,
  };
}

/** A whole number within [min, max]. */
export function integer(opts: { min?: number; max?: number } = {}): ValueType<number> {
  const min = opts.min ?? Number.MIN_SAFE_INTEGER;
  const max = opts.max ?? Number.MAX_SAFE_INTEGER;
  return {
    schema: z
      .union([z.number(), z.string()], { error: 'expected a whole number' })
      .transform((raw, ctx): number => {
        const n = typeof raw === 'number' ? raw : /^\s*-?\d+\s*$/.test(raw) ? Number(raw) : NaN;
        if (!Number.isSafeInteger(n)) return fail(ctx, 'expected a whole number');
        if (n < min || n > max) return fail(ctx, `must be between ${min} and ${max}`);
        return n;
      }),
    kind: 'integer',
    limits: { min, max },
    placeholder: 'N',
    arity: 'value',
    format: (v) => v,
  };
}

export function oneOf<const V extends readonly [string, ...string[]]>(values: V): ValueType<V[number]> {
  const expected = `expected one of ${values.join('|')}`;
  return {
    // a YAML number is its text: `apns-priority: 10`
    schema: z.preprocess(
      (raw) => (typeof raw === 'number' ? String(raw) : raw),
      z.string({ error: expected }).trim().toLowerCase().pipe(z.enum(values, { error: expected })),
    ) as unknown as z.ZodType<V[number]>,
    kind: 'enum',
    values,
    placeholder: values.join('|'),
    arity: 'value',
    format: (v) => v,
  };
}

export function text(opts: { placeholder: string; expected?: string; check?: (s: string) => string | undefined }): ValueType<string> {
  // one line: `config check` prints every value as one YAML line (and no option needs two)
  const base = nonEmptyString(opts.expected ?? 'a string').refine((s) => !/[\r\n]/.test(s), { error: 'must be a single line' });
  const check = opts.check;
  return {
    schema: check ? base.transform((s, ctx): string => {
      const problem = check(s);
      return problem === undefined ? s : fail(ctx, problem);
    }) : base,
    kind: check ? 'checked-text' : 'text',
    placeholder: opts.placeholder,
    arity: 'value',
    format: (v) => v,
  };
}

// ---------------------------------------------------------------------------------------------
// paths

function describeFsError(err: unknown): string {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (code === 'ENOENT') return 'no such file';
  if (code === 'EACCES' || code === 'EPERM') return 'permission denied';
  if (code === 'ENOTDIR') return 'a parent is not a directory';
  return (err as Error | undefined)?.message ?? String(err);
}

/** Why `path` cannot be read as a file, or undefined when it can. */
export function unreadableFileReason(path: string): string | undefined {
  try {
    if (statSync(path).isDirectory()) return 'is a directory';
    accessSync(path, fsConstants.R_OK);
    return undefined;
  } catch (err) {
    return describeFsError(err);
  }
}

/** A file that must exist and be readable (checked when the configuration is loaded). */
export function readableFile(): ValueType<string> {
  return {
    schema: nonEmptyString('a file path').transform((p, ctx): string => {
      const why = unreadableFileReason(p);
      return why === undefined ? p : fail(ctx, `cannot read file "${p}": ${why}`, true);
    }),
    kind: 'file',
    placeholder: 'FILE',
    arity: 'value',
    isPath: true,
    format: (v) => v,
  };
}

/** The first line of a file, at most `max` bytes read (secret files are one short line). */
function firstLineOf(path: string, max = 4096): string {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(max);
    const n = readSync(fd, buf, 0, max, 0);
    return buf.subarray(0, n).toString('utf8').split(/\r?\n/, 1)[0] ?? '';
  } finally {
    closeSync(fd);
  }
}

/**
 * A readable file whose first line holds a secret (a password, a shared secret). Checked
 * for being non-empty at load time, so `config check` catches an empty file instead of the
 * running proxy; the content is never part of a message.
 */
export function secretFile(what: string): ValueType<string> {
  return {
    schema: nonEmptyString('a file path').transform((p, ctx): string => {
      const why = unreadableFileReason(p);
      if (why !== undefined) return fail(ctx, `cannot read file "${p}": ${why}`, true);
      let line: string;
      try {
        line = firstLineOf(p);
      } catch (err) {
        return fail(ctx, `cannot read file "${p}": ${describeFsError(err)}`, true);
      }
      return line.trim() === '' ? fail(ctx, `"${p}": the first line (${what}) is empty`, true) : p;
    }),
    kind: 'secret-file',
    placeholder: 'FILE',
    arity: 'value',
    isPath: true,
    format: (v) => v,
  };
}

/** A directory path (made absolute; created by whoever uses it, so it need not exist yet). */
export function directory(): ValueType<string> {
  return {
    schema: nonEmptyString('a directory path').transform((p, ctx): string => {
      let isDirectory: boolean;
      try {
        isDirectory = statSync(p).isDirectory();
      } catch {
        return p; // missing (created later) or not inspectable here: whoever uses it reports that
      }
      return isDirectory ? p : fail(ctx, `"${p}" exists and is not a directory`, true);
    }),
    kind: 'directory',
    placeholder: 'DIR',
    arity: 'value',
    isPath: true,
    format: (v) => v,
  };
}

// ---------------------------------------------------------------------------------------------
// redis URL (parsed and redacted exactly as the store will: src/store/redis-url.ts)

/** Mask the password (and `*pass*`/`*secret*`/`*token*` query values) of a URL. */
export function maskUrlSecrets(url: string): string {
  return redactRedisUrl(url);
}

export function redisUrl(): ValueType<string> {
  return {
    schema: nonEmptyString('a redis:// URL').transform((s, ctx): string => {
      try {
        parseRedisUrl(s);
        return s;
      } catch (err) {
        // "invalid --redis-url "<redacted>": problem" → "problem"; the loader adds the redacted input.
        const message = (err as Error).message.replace(/^invalid --redis-url ".*?": /, '');
        return fail(ctx, message);
      }
    }),
    kind: 'redis-url',
    placeholder: 'URL',
    arity: 'value',
    format: (v) => v,
    mask: maskUrlSecrets,
    maskRaw: (raw) => (typeof raw === 'string' ? maskUrlSecrets(raw.trim()) : '***'),
  };
}
