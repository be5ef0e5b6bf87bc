/**
 * Shared by the fault tests (test/integration/faults/*): sessions that register devices the way iOS does,
 * condition waits with generous deadlines (never a duration assertion), a crash detector for in-process proxies,
 * per-device bookkeeping of what the mock APNs received, and metric reads.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Registry } from 'prom-client';
import type { MockApns, RecordedRequest } from '../../src/testbed/mock-apns.js';
import { RawImap } from './raw-imap.js';

export const ACCOUNT = '0715A26B-1C2D-4E3F-8A9B-0C1D2E3F4A5B';

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A small RFC 5322 message. */
export const message = (subject: string): string =>
  `From: a@example.org\r\nTo: b@example.org\r\nSubject: ${subject}\r\nMessage-ID: <${subject.replace(/\W+/g, '.')}.${Date.now()}@example.org>\r\n\r\nhello\r\n`;

/** Polls `pred` until it holds; throws naming `what` (and the last error) after `timeoutMs`. */
export async function waitUntil(
  what: string,
  pred: () => boolean | Promise<boolean>,
  timeoutMs = 30_000,
  intervalMs = 50,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      if (await pred()) return;
      last = undefined;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? ` (last error: ${String(last)})` : ''}`);
    }
    await sleep(intervalMs);
  }
}

/** Runs `fn` over `items`, at most `limit` at once. */
export async function mapLimit<T>(items: readonly T[], limit: number, fn: (item: T, index: number) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++;
      await fn(items[i]!, i);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
}

/** A 64-hex device token, distinct per (group, n). */
export function deviceToken(group: number, n: number): string {
  if (group > 0xffff || n > 0xffff) throw new RangeError('deviceToken: group and n are 16-bit numbers');
  return `${group.toString(16).padStart(4, '0')}${n.toString(16).padStart(4, '0')}`.repeat(8);
}

/** The XAPPLEPUSHSERVICE command iOS sends (version 2). */
export function registerCommand(tag: string, token: string, mailboxes = '("INBOX")'): string {
  return `${tag} XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "${ACCOUNT}" "aps-device-token" "${token}" "aps-subtopic" "com.apple.mobilemail" "mailboxes" ${mailboxes}`;
}

/** Connects through the proxy and logs in; throws unless LOGIN is answered OK. */
export async function loggedIn(port: number, user: string, password: string): Promise<RawImap> {
  const c = await RawImap.connect({ port });
  try {
    const greeting = await c.greeting();
    if (!/^\* OK/.test(greeting)) throw new Error(`greeting: ${greeting.trim()}`);
    const login = await c.command('l', `LOGIN ${user} ${password}`);
    if (!/^l OK/m.test(login)) throw new Error(`login of ${user} failed: ${login.trim()}`);
    return c;
  } catch (err) {
    c.close();
    throw err;
  }
}

let tagCounter = 0;

/**
 * Registers `token` on a logged-in session: 'OK' when the proxy acknowledged it, 'NO' when it refused (e.g. the
 * store was unavailable). Throws on anything else (BAD, a closed connection, no answer in time).
 */
export async function registerOn(c: RawImap, token: string, mailboxes = '("INBOX")', timeoutMs = 30_000): Promise<'OK' | 'NO'> {
  const tag = `x${++tagCounter}`;
  const reply = await c.command(tag, registerCommand('', token, mailboxes).trim(), timeoutMs);
  const m = new RegExp(`(?:^|\\r\\n)${tag} (OK|NO|BAD)`).exec(reply);
  if (m?.[1] === 'OK') return 'OK';
  if (m?.[1] === 'NO') return 'NO';
  throw new Error(`registration answered: ${reply.trim()}`);
}

/** LOGIN, XAPPLEPUSHSERVICE (must be OK), LOGOUT. */
export async function registerDevice(port: number, user: string, password: string, token: string, mailboxes = '("INBOX")'): Promise<void> {
  const c = await loggedIn(port, user, password);
  try {
    const r = await registerOn(c, token, mailboxes);
    if (r !== 'OK') throw new Error(`registration of ${user} answered NO`);
    await c.command('o', 'LOGOUT').catch(() => undefined);
  } finally {
    c.close();
  }
}

/** Pushes the mock received for `token` (GOAWAY-refused streams are not in the list). */
export function pushesTo(mock: MockApns, token: string): RecordedRequest[] {
  return mock.requests.filter((r) => r.deviceToken === token);
}

/** Waits until the mock received at least `n` pushes for `token`. */
export async function waitForPushes(mock: MockApns, token: string, n: number, timeoutMs = 30_000): Promise<RecordedRequest[]> {
  await waitUntil(`${n} push(es) for ${token.slice(0, 8)}… (have ${pushesTo(mock, token).length})`, () => pushesTo(mock, token).length >= n, timeoutMs);
  return pushesTo(mock, token);
}

/** The `m` hints of a push (mailbox MD5s; none for INBOX). */
export function mailboxHints(r: RecordedRequest): string[] {
  const m = (r.body as { aps?: { m?: unknown } } | undefined)?.aps?.m;
  return Array.isArray(m) ? m.map(String) : [];
}

/** Sum of a metric's values whose labels match `labels`. */
export async function metric(registry: Registry, name: string, labels: Record<string, string> = {}): Promise<number> {
  const m = await registry.getSingleMetric(name)?.get();
  if (!m) return 0;
  return m.values
    .filter((v) => Object.entries(labels).every(([k, want]) => String(v.labels[k]) === want))
    .reduce((sum, v) => sum + v.value, 0);
}

/**
 * Records unhandled rejections and uncaught exceptions of this process (where an in-process proxy runs):
 * a fault that crashes the proxy shows up here. `dispose` removes the listeners.
 */
export function crashDetector(): { errors: string[]; dispose(): void } {
  const errors: string[] = [];
  const onRejection = (reason: unknown): void => {
    errors.push(`unhandledRejection: ${reason instanceof Error ? reason.stack ?? reason.message : String(reason)}`);
  };
  const onException = (err: Error): void => {
    errors.push(`uncaughtException: ${err.stack ?? err.message}`);
  };
  process.on('unhandledRejection', onRejection);
  process.on('uncaughtException', onException);
  return {
    errors,
    dispose() {
      process.off('unhandledRejection', onRejection);
      process.off('uncaughtException', onException);
    },
  };
}

/** Writes the watchers' master password file into `dir`; returns its path. */
export async function masterPasswordFile(dir: string, password: string): Promise<string> {
  const file = path.join(dir, 'master.pw');
  await fs.writeFile(file, `${password}\n`, { mode: 0o600 });
  return file;
}
