/**
 * Registration store model: what an iPhone sent in XAPPLEPUSHSERVICE, keyed by (user, device token).
 * See shared/docs/protocol-notes.md (a) "Identity": a re-added account keeps its token but gets a new
 * aps-account-id, so the row for (user, token) is replaced; the same token under two users is two rows.
 */
import type { MailboxStateStore, MailboxStatus } from '../watch/types.js';

export type { MailboxStateStore, MailboxStatus };

/** A pushed mailbox as confirmed to the device. */
export interface MailboxRef {
  /** Decoded mailbox name (UTF-8). */
  name: string;
  /** Lowercase hex MD5 of the UTF-8 bytes of `name` (what iOS keys `aps.m` entries by). */
  md5: string;
}

export interface Registration {
  /** Authenticated upstream username. */
  user: string;
  /** 64 lowercase hex digits. */
  deviceToken: string;
  /** aps-account-id (UUID as the device sent it). */
  accountId: string;
  /** e.g. com.apple.mobilemail */
  subtopic: string;
  /** Pushed mailboxes; INBOX always included by the caller. */
  mailboxes: MailboxRef[];
  version: 1 | 2;
  /** ms since epoch, set on first insert of (user, deviceToken), kept on updates. */
  firstSeen: number;
  /** ms since epoch, set on every upsert. */
  lastSeen: number;
}

/** What a caller hands to `upsert`; `now` (ms since epoch) defaults to the store's clock. */
export type RegistrationInput = Omit<Registration, 'firstSeen' | 'lastSeen'> & { now?: number };

/**
 * Every store also keeps the watchers' last seen STATUS per mailbox (MailboxStateStore, src/watch/types.ts), next to
 * the user's registrations:
 *   - getMailboxStates(user): mailbox name -> last status stored ({} when none);
 *   - setMailboxState(user, mailbox, status): resolves once durably stored (like upsert; rejects StoreUnavailableError,
 *     TypeError for malformed input). A no-op for a user without stored registrations, so that a watcher racing the
 *     removal of the last registration cannot leave orphaned state behind;
 *   - the states of a user are dropped with the user's last registration (remove, purgeExpired, compaction).
 */
export interface RegistrationStore extends MailboxStateStore {
  readonly kind: 'redis' | 'embedded';
  /** Insert or replace by (user, deviceToken). Resolves ONLY once durably stored; rejects (StoreUnavailableError) otherwise. */
  upsert(input: RegistrationInput): Promise<{ created: boolean; registration: Registration }>;
  /** null if absent or expired. */
  get(user: string, deviceToken: string): Promise<Registration | null>;
  /** Live registrations of one user, sorted by device token. */
  listByUser(user: string): Promise<Registration[]>;
  /** Users with >= 1 live registration, sorted. */
  listUsers(): Promise<string[]>;
  /** Every live registration, sorted by user then token (admin CLI; O(n)). */
  listAll(): Promise<Registration[]>;
  /**
   * Remove; with `unlessSeenAfter` (ms), remove only if lastSeen <= that time (APNs 410 semantics).
   * Returns whether a live registration was removed.
   */
  remove(user: string, deviceToken: string, opts?: { unlessSeenAfter?: number }): Promise<boolean>;
  /** Physically remove registrations expired at `now` (default: the store's clock); returns how many. */
  purgeExpired(now?: number): Promise<number>;
  /** Live users and registrations. */
  counts(): Promise<{ users: number; registrations: number }>;
  /** Rejects when the store cannot serve (Redis unreachable, embedded journal failed). */
  ping(): Promise<void>;
  close(): Promise<void>;
}

/** The store cannot take writes right now (Redis down, disk error). */
export class StoreUnavailableError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'StoreUnavailableError';
  }
}

/** Embedded store files are damaged: the message names the file and the byte offset. */
export class StoreCorruptError extends Error {
  readonly file: string | undefined;
  readonly offset: number | undefined;
  constructor(message: string, details: { file?: string; offset?: number; cause?: unknown } = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = 'StoreCorruptError';
    this.file = details.file;
    this.offset = details.offset;
  }
}

/** The embedded data directory is in use by another process (or another store in this one). */
export class StoreLockedError extends Error {
  readonly lockFile: string;
  readonly pid: number | undefined;
  constructor(message: string, details: { lockFile: string; pid?: number }) {
    super(message);
    this.name = 'StoreLockedError';
    this.lockFile = details.lockFile;
    this.pid = details.pid;
  }
}

/** 30 days. */
export const DEFAULT_TTL_MS = 30 * 24 * 60 * 60 * 1000;

function isCount(n: unknown): n is number {
  return typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;
}

/**
 * A stored mailbox status (JSON already decoded) as a fresh MailboxStatus; null when it does not have the shape of
 * one. Unknown extra fields are ignored (forward compatibility).
 */
export function parseMailboxStatus(v: unknown): MailboxStatus | null {
  if (v === null || typeof v !== 'object') return null;
  const o = v as Record<string, unknown>;
  if (!isCount(o.uidValidity) || !isCount(o.uidNext) || !isCount(o.messages)) return null;
  return { uidValidity: o.uidValidity, uidNext: o.uidNext, messages: o.messages };
}

/** Checks setMailboxState's arguments (TypeError) and returns a copy of the status with only its own fields. */
export function checkMailboxStateInput(user: unknown, mailbox: unknown, status: unknown): MailboxStatus {
  if (typeof user !== 'string' || user.length === 0) throw new TypeError('mailbox state user must be a non-empty string');
  if (typeof mailbox !== 'string' || mailbox.length === 0) throw new TypeError('mailbox state mailbox must be a non-empty string');
  const s = parseMailboxStatus(status);
  if (!s) throw new TypeError('mailbox status must be {uidValidity, uidNext, messages}, non-negative integers');
  return s;
}

/**
 * The result of getMailboxStates: a null-prototype record, so that a mailbox named like an Object.prototype member
 * ("constructor", "toString", "__proto__") reads as absent or as its own entry, never as an inherited value.
 */
export function mailboxStateRecord(entries: Iterable<readonly [string, MailboxStatus]>): Record<string, MailboxStatus> {
  const out = Object.create(null) as Record<string, MailboxStatus>;
  for (const [mailbox, status] of entries) {
    Object.defineProperty(out, mailbox, { value: status, enumerable: true, writable: true, configurable: true });
  }
  return out;
}

export function sameMailboxStatus(a: MailboxStatus, b: MailboxStatus): boolean {
  return a.uidValidity === b.uidValidity && a.uidNext === b.uidNext && a.messages === b.messages;
}
