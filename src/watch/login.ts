/**
 * Master-user login of the watchers: one upstream session per watched user, opened with the
 * master user's credentials on that user's behalf.
 *
 * - `plain-authzid`: `AUTHENTICATE PLAIN base64(user \0 master \0 password)` (RFC 4616), inline
 *   when the server offers SASL-IR (RFC 4959), else after its `+`. Dovecot (master passdb) and
 *   Cyrus (master in `proxyservers`/`admins`) both accept it.
 * - `separator`: `LOGIN "user*master" password` (Dovecot `auth_master_user_separator`).
 *
 * The password lives in a private field of MasterCredentials, which renders as
 * `[redacted]` through JSON.stringify, util.inspect and String(); errors carry the server's
 * answer and the user name, never the password or the command.
 */
import fs from 'node:fs';
import { inspect } from 'node:util';
import { quote } from '../imap/tokens.js';
import { ImapCommandError, type CommandChunk, type ImapConnection, type TaggedResult } from './imap-connection.js';

export type MasterLoginMode = 'plain-authzid' | 'separator';

export interface MasterCredentialsInit {
  user: string;
  password: string;
  mode?: MasterLoginMode;
  /** For mode separator (default "*"). */
  separator?: string;
}

export class MasterCredentials {
  readonly user: string;
  readonly mode: MasterLoginMode;
  readonly separator: string;
  readonly #password: string;

  constructor(init: MasterCredentialsInit) {
    if (!init.user) throw new Error('master user must not be empty');
    if (!init.password) throw new Error('master password must not be empty');
    if (/[\0\r\n]/.test(init.user)) throw new Error('master user contains invalid characters');
    if (/\0/.test(init.password)) throw new Error('master password contains a NUL character');
    this.user = init.user;
    this.mode = init.mode ?? 'plain-authzid';
    this.separator = init.separator ?? '*';
    this.#password = init.password;
  }

  /** Reads the password from the first line of a file (--master-password-file). */
  static fromFile(file: string, init: Omit<MasterCredentialsInit, 'password'>): MasterCredentials {
    const text = fs.readFileSync(file, 'utf8');
    const password = text.split(/\r?\n/)[0] ?? '';
    if (!password) throw new Error(`${file}: the first line (the master password) is empty`);
    return new MasterCredentials({ ...init, password });
  }

  /** @internal for the login exchange only. */
  revealPassword(): string {
    return this.#password;
  }

  toJSON(): Record<string, string> {
    return { user: this.user, mode: this.mode, separator: this.separator, password: '[redacted]' };
  }

  toString(): string {
    return `MasterCredentials(${this.user}, ${this.mode})`;
  }

  [inspect.custom](): string {
    return this.toString();
  }
}

/** Why a login failed, as a bounded metric label. */
export type LoginFailureReason =
  /** Wrong master user or password (`[AUTHENTICATIONFAILED]`). */
  | 'authentication'
  /** The master may not act for this user, or the user does not exist (`[AUTHORIZATIONFAILED]`, Cyrus "Invalid user"). */
  | 'authorization'
  /** The server refuses plaintext logins on this connection (LOGINDISABLED, `[PRIVACYREQUIRED]`). */
  | 'privacy'
  /** Temporary (`[UNAVAILABLE]`, `[INUSE]`, `[LIMIT]`). */
  | 'unavailable'
  | 'other';

export const LOGIN_FAILURE_REASONS: readonly LoginFailureReason[] = [
  'authentication',
  'authorization',
  'privacy',
  'unavailable',
  'other',
];

export class LoginError extends Error {
  constructor(
    readonly user: string,
    readonly reason: LoginFailureReason,
    /** The server's answer (status, code, text): never contains the password. */
    readonly serverAnswer: string,
  ) {
    super(`master login for ${user} failed (${reason}): ${serverAnswer}`);
  }
}

/** Classifies a failed login answer. */
export function classifyLoginFailure(code: string | null, text: string): LoginFailureReason {
  const c = (code ?? '').split(' ')[0]!.toUpperCase();
  if (c === 'AUTHENTICATIONFAILED') return 'authentication';
  if (c === 'AUTHORIZATIONFAILED') return 'authorization';
  if (c === 'PRIVACYREQUIRED') return 'privacy';
  if (c === 'UNAVAILABLE' || c === 'INUSE' || c === 'LIMIT' || c === 'SERVERBUG') return 'unavailable';
  // Cyrus: "NO Invalid user" (unknown authzid), "NO Login failed: authorization failure"
  if (/invalid user|authori[sz]ation/i.test(text)) return 'authorization';
  if (/authentication fail|invalid credentials|bad password/i.test(text)) return 'authentication'; // Cyrus: "NO authentication failure"
  return 'other';
}

function answerText(r: TaggedResult): string {
  return `${r.status}${r.code ? ` [${r.code}]` : ''} ${r.text}`.trim();
}

/** A string argument: quoted when it is plain 7-bit text, else a literal. */
function astring(value: string): CommandChunk[] {
  if (/^[\x20-\x7e]*$/.test(value)) return [quote(value)];
  return [{ literal: Buffer.from(value, 'utf8') }];
}

/**
 * Logs in as `user` with the master credentials. Resolves when authenticated (capabilities
 * refreshed); rejects with LoginError on a refusal, or with the connection's error.
 */
export async function masterLogin(conn: ImapConnection, user: string, creds: MasterCredentials): Promise<void> {
  if (/[\0\r\n]/.test(user) || user === '') throw new LoginError(user, 'other', 'invalid user name');
  let result: TaggedResult;
  if (creds.mode === 'separator') {
    if (conn.hasCapability('LOGINDISABLED')) {
      throw new LoginError(user, 'privacy', 'the upstream announces LOGINDISABLED: secure the upstream connection (TLS)');
    }
    const chunks: CommandChunk[] = ['LOGIN ', ...astring(`${user}${creds.separator}${creds.user}`), ' ', ...astring(creds.revealPassword())];
    // LOGIN with a literal password: join adjacent strings so that chunks stay as the API expects
    result = await conn.command(joinStrings(chunks));
  } else {
    const payload = Buffer.from(`${user}\0${creds.user}\0${creds.revealPassword()}`, 'utf8').toString('base64');
    if (conn.hasCapability('SASL-IR')) {
      result = await conn.command(`AUTHENTICATE PLAIN ${payload}`, {
        onContinuation: () => '*', // a second challenge means trouble: cancel
      });
    } else {
      let sent = false;
      result = await conn.command('AUTHENTICATE PLAIN', {
        onContinuation: () => {
          if (sent) return '*';
          sent = true;
          return payload;
        },
      });
    }
  }
  if (result.status !== 'OK') {
    const reason =
      conn.hasCapability('LOGINDISABLED') && !result.code ? 'privacy' : classifyLoginFailure(result.code, result.text);
    throw new LoginError(user, reason, answerText(result));
  }
  // The tagged OK usually carries [CAPABILITY …]; when not, ask (post-login list differs).
  if (!result.code || !/^CAPABILITY /i.test(result.code)) {
    const caps = await conn.command('CAPABILITY');
    if (caps.status !== 'OK') throw new ImapCommandError('CAPABILITY', caps);
  }
}

function joinStrings(chunks: CommandChunk[]): CommandChunk[] {
  const out: CommandChunk[] = [];
  for (const c of chunks) {
    const last = out[out.length - 1];
    if (typeof c === 'string' && typeof last === 'string') out[out.length - 1] = last + c;
    else out.push(c);
  }
  return out;
}
