/** Helpers shared by the store implementations: validation, copying, ordering, expiry. */
import { createHash } from 'node:crypto';
import type { MailboxRef, Registration, RegistrationInput } from './types.js';

const TOKEN_RE = /^[0-9a-f]{64}$/;
const MD5_RE = /^[0-9a-f]{32}$/;

/** A MailboxRef for a decoded (UTF-8) mailbox name. */
export function mailboxRef(name: string): MailboxRef {
  return { name, md5: createHash('md5').update(name, 'utf8').digest('hex') };
}

/** Device tokens are compared in lowercase; callers may hand in either case. */
export function normalizeToken(token: string): string {
  return typeof token === 'string' ? token.toLowerCase() : token;
}

export function isLive(reg: { lastSeen: number }, ttlMs: number, now: number): boolean {
  return reg.lastSeen + ttlMs > now;
}

export function validateTtl(ttlMs: number): number {
  if (typeof ttlMs !== 'number' || !Number.isFinite(ttlMs) || ttlMs <= 0) {
    throw new RangeError(`store ttlMs must be a positive number of milliseconds, got ${String(ttlMs)}`);
  }
  return Math.floor(ttlMs);
}

function isTime(n: unknown): n is number {
  return typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;
}

export function validateUser(user: unknown): asserts user is string {
  if (typeof user !== 'string' || user.length === 0) throw new TypeError('registration user must be a non-empty string');
}

/**
 * Checks an upsert input (throws TypeError, never logs the token) and returns a normalized copy
 * without `now`: lowercase token, copied mailbox list.
 */
export function normalizeInput(input: RegistrationInput): Omit<Registration, 'firstSeen' | 'lastSeen'> {
  if (input === null || typeof input !== 'object') throw new TypeError('registration input must be an object');
  validateUser(input.user);
  const deviceToken = normalizeToken(input.deviceToken);
  if (typeof deviceToken !== 'string' || !TOKEN_RE.test(deviceToken)) {
    throw new TypeError('registration deviceToken must be 64 hex digits');
  }
  if (typeof input.accountId !== 'string' || input.accountId.length === 0) {
    throw new TypeError('registration accountId must be a non-empty string');
  }
  if (typeof input.subtopic !== 'string' || input.subtopic.length === 0) {
    throw new TypeError('registration subtopic must be a non-empty string');
  }
  if (input.version !== 1 && input.version !== 2) throw new TypeError('registration version must be 1 or 2');
  if (!Array.isArray(input.mailboxes)) throw new TypeError('registration mailboxes must be an array');
  const mailboxes = input.mailboxes.map((m) => {
    if (m === null || typeof m !== 'object' || typeof m.name !== 'string' || typeof m.md5 !== 'string') {
      throw new TypeError('registration mailboxes must be {name, md5} objects');
    }
    const md5 = m.md5.toLowerCase();
    if (!MD5_RE.test(md5)) throw new TypeError(`mailbox md5 must be 32 hex digits (mailbox ${JSON.stringify(m.name)})`);
    return { name: m.name, md5 };
  });
  if (input.now !== undefined && !isTime(input.now)) throw new TypeError('registration now must be ms since epoch');
  return {
    user: input.user,
    deviceToken,
    accountId: input.accountId,
    subtopic: input.subtopic,
    mailboxes,
    version: input.version,
  };
}

export function copyRegistration(r: Registration): Registration {
  return {
    user: r.user,
    deviceToken: r.deviceToken,
    accountId: r.accountId,
    subtopic: r.subtopic,
    mailboxes: r.mailboxes.map((m) => ({ name: m.name, md5: m.md5 })),
    version: r.version,
    firstSeen: r.firstSeen,
    lastSeen: r.lastSeen,
  };
}

/**
 * Parses a stored registration (JSON already decoded); returns null when it does not have the shape of one.
 * Unknown extra fields are ignored (forward compatibility).
 */
export function parseRegistration(v: unknown): Registration | null {
  if (v === null || typeof v !== 'object') return null;
  const o = v as Record<string, unknown>;
  if (typeof o.user !== 'string' || typeof o.deviceToken !== 'string' || typeof o.accountId !== 'string') return null;
  if (typeof o.subtopic !== 'string' || (o.version !== 1 && o.version !== 2)) return null;
  if (!isTime(o.firstSeen) || !isTime(o.lastSeen) || !Array.isArray(o.mailboxes)) return null;
  const mailboxes: MailboxRef[] = [];
  for (const m of o.mailboxes as unknown[]) {
    if (m === null || typeof m !== 'object') return null;
    const mm = m as Record<string, unknown>;
    if (typeof mm.name !== 'string' || typeof mm.md5 !== 'string') return null;
    mailboxes.push({ name: mm.name, md5: mm.md5 });
  }
  return {
    user: o.user,
    deviceToken: o.deviceToken,
    accountId: o.accountId,
    subtopic: o.subtopic,
    mailboxes,
    version: o.version,
    firstSeen: o.firstSeen,
    lastSeen: o.lastSeen,
  };
}

/** Code-unit order, the same in both implementations. */
export function compareStrings(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

export function compareRegistrations(a: Registration, b: Registration): number {
  return compareStrings(a.user, b.user) || compareStrings(a.deviceToken, b.deviceToken);
}

/** Run `fn` over `items` with at most `limit` in flight; results keep the input order. */
export async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i] as T);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}
