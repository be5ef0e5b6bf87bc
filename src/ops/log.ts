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
