/**
 * Structured logging (pino). JSON on stdout; human-readable when stdout is a terminal.
 * Redaction is enforced here so that no caller can leak a secret by accident:
 * passwords, SASL payloads, master credentials and private keys are censored by key,
 * device tokens are shortened by `shortToken` before they are logged at all.
 */
import { pino, type Logger, type LevelWithSilent } from 'pino';

export type { Logger };

const REDACT_PATHS = [
  'password', '*.password', 'pass', '*.pass',
  'masterPassword', '*.masterPassword',
  'sasl', '*.sasl', 'saslPayload', '*.saslPayload',
  'authorization', '*.authorization', 'secret', '*.secret',
  'privateKey', '*.privateKey', 'key', '*.key', 'passphrase', '*.passphrase',
];

export interface LogOptions {
  level?: LevelWithSilent;
  /** Force pretty (true) or JSON (false); default: pretty when stdout is a TTY. */
  pretty?: boolean;
  destination?: NodeJS.WritableStream;
}

export function createLogger(opts: LogOptions = {}): Logger {
  const pretty = opts.pretty ?? Boolean(process.stdout.isTTY);
  const base = {
    level: opts.level ?? 'info',
    base: { pid: process.pid },
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
  };
  if (pretty && !opts.destination) {
    return pino({ ...base, transport: { target: 'pino-pretty', options: { colorize: true } } });
  }
  if (opts.destination) return pino(base, opts.destination);
  return pino(base);
}

/**
 * Changes the level at run time (SIGHUP). Loggers made from `root` with `child(bindings)`
 * follow, including those of sessions already open: a pino child without a level of its
 * own takes its level methods from its parent through the prototype chain. A child created
 * with an explicit `{ level }` would keep that level, so none is.
 */
export function setLogLevel(root: Logger, level: LevelWithSilent): void {
  root.level = level;
}

/** A logger that drops everything (tests, library use). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}

/** A device token as it may appear in logs: an 8-digit prefix, never the whole token. */
export function shortToken(token: string): string {
  return token.length <= 8 ? '…' : `${token.slice(0, 8)}…`;
}

type FieldLevel = 'debug' | 'info' | 'warn' | 'error';

/**
 * Lines that carry fixed fields (a client session's id, address and user), added as each line is written. A pino
 * child per session would cost an object with shapes of its own and the work of building it for every connection,
 * whether or not the session ever logs. Level changes on the root apply at once.
 */
export class FieldLogger {
  constructor(
    private readonly root: Logger,
    private readonly fields: Readonly<Record<string, unknown>>,
  ) {}

  /** The same fields and `extra` (later lines of a session that has logged in carry the user). */
  with(extra: Record<string, unknown>): FieldLogger {
    return new FieldLogger(this.root, { ...this.fields, ...extra });
  }

  debug(objOrMsg: Record<string, unknown> | string, msg?: string): void {
    this.write('debug', objOrMsg, msg);
  }

  info(objOrMsg: Record<string, unknown> | string, msg?: string): void {
    this.write('info', objOrMsg, msg);
  }

  warn(objOrMsg: Record<string, unknown> | string, msg?: string): void {
    this.write('warn', objOrMsg, msg);
  }

  error(objOrMsg: Record<string, unknown> | string, msg?: string): void {
    this.write('error', objOrMsg, msg);
  }

  private write(level: FieldLevel, objOrMsg: Record<string, unknown> | string, msg?: string): void {
    if (!this.root.isLevelEnabled(level)) return;
    if (typeof objOrMsg === 'string') this.root[level](this.fields, objOrMsg);
    else this.root[level]({ ...this.fields, ...objOrMsg }, msg);
  }
}
