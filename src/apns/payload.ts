/**
 * What a Mail push looks like on the wire (protocol notes §a "On the device", §b "APNs for Mail"):
 *
 *   body     {"aps":{"account-id":"<accountId>"}}                       INBOX only, or a version-1 registration
 *            {"aps":{"account-id":"<accountId>","m":["<md5>",…]}}      version 2 and some changed mailbox is not INBOX
 *   headers  apns-topic (the certificate's topic), apns-push-type, apns-priority,
 *            apns-expiration (UNIX seconds; 0 = deliver now or never), apns-collapse-id = account id
 *
 * With `m`, iOS refreshes exactly the listed mailboxes, so when INBOX changed together with other mailboxes its md5
 * is listed too. Hashes are the stored MailboxRef md5s (what the device keyed the confirmed mailboxes by).
 */
import { mailboxRef } from '../store/common.js';
import type { MailboxRef, Registration } from '../store/types.js';
import type { ApnsNotification, PushType } from './types.js';

/** APNs refuses bodies above this many bytes. */
export const MAX_PAYLOAD_BYTES = 4096;
/** APNs refuses longer apns-collapse-id values (BadCollapseId). */
export const MAX_COLLAPSE_ID_BYTES = 64;

export function isInbox(name: string): boolean {
  return name.length === 5 && name.toUpperCase() === 'INBOX';
}

/** The key under which a mailbox name is compared: INBOX case-insensitively, everything else exactly. */
export function mailboxKey(name: string): string {
  return isInbox(name) ? 'INBOX' : name;
}

/** The registration's MailboxRef for a changed mailbox (UTF-8 name), or undefined when the device does not push it. */
export function matchMailbox(reg: Pick<Registration, 'mailboxes'>, mailbox: string): MailboxRef | undefined {
  const key = mailboxKey(mailbox);
  return reg.mailboxes.find((m) => mailboxKey(m.name) === key);
}

/**
 * The ref to put in `m` for a mailbox named by an operator (test-push): the registration's own ref when it has one,
 * else the MD5 of the name.
 */
export function refForName(reg: Pick<Registration, 'mailboxes'>, name: string): MailboxRef {
  return matchMailbox(reg, name) ?? mailboxRef(isInbox(name) ? 'INBOX' : name);
}

/** Whether a push for these changed mailboxes carries `m`. */
export function wantsMailboxList(reg: Pick<Registration, 'version'>, changed: readonly MailboxRef[]): boolean {
  return reg.version === 2 && changed.some((m) => !isInbox(m.name));
}

/** The JSON body (≤ 4096 bytes: an `m` that would not fit is shortened, which never happens with real mailboxes). */
export function buildPayload(reg: Pick<Registration, 'accountId' | 'version'>, changed: readonly MailboxRef[]): string {
  const aps: { 'account-id': string; m?: string[] } = { 'account-id': reg.accountId };
  if (wantsMailboxList(reg, changed)) {
    const m: string[] = [];
    const seen = new Set<string>();
    for (const ref of changed) {
      const h = ref.md5.toLowerCase();
      if (!seen.has(h)) {
        seen.add(h);
        m.push(h);
      }
    }
    aps.m = m;
  }
  let body = JSON.stringify({ aps });
  while (Buffer.byteLength(body, 'utf8') > MAX_PAYLOAD_BYTES && aps.m && aps.m.length > 1) {
    aps.m = aps.m.slice(0, Math.max(1, Math.floor(aps.m.length * 0.9)));
    body = JSON.stringify({ aps });
  }
  return body;
}

export interface NotificationOptions {
  topic: string;
  pushType: PushType;
  priority: 5 | 10;
  /** How long APNs keeps an undelivered push; 0 = deliver now or never. */
  expirationMs: number;
  /** ms since epoch. */
  now: number;
}

/** apns-expiration: UNIX seconds of now + expirationMs, or 0. */
export function expirationSeconds(now: number, expirationMs: number): number {
  return expirationMs > 0 ? Math.floor((now + expirationMs) / 1000) : 0;
}

export function buildNotification(
  reg: Pick<Registration, 'deviceToken' | 'accountId' | 'version'>,
  changed: readonly MailboxRef[],
  opts: NotificationOptions,
): ApnsNotification {
  const n: ApnsNotification = {
    deviceToken: reg.deviceToken,
    topic: opts.topic,
    pushType: opts.pushType,
    priority: opts.priority,
    expiration: expirationSeconds(opts.now, opts.expirationMs),
    payload: buildPayload(reg, changed),
  };
  if (reg.accountId !== '' && Buffer.byteLength(reg.accountId, 'utf8') <= MAX_COLLAPSE_ID_BYTES) n.collapseId = reg.accountId;
  return n;
}
