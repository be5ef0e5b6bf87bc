/**
 * Contracts of mailbox watching (src/watch/): event sources find out that mail
 * arrived in a user's mailbox; the supervisor decides which users this instance
 * watches; the push dispatcher turns changes into pushes.
 *
 *   notify / idle watchers ─┐
 *   events HTTP listener ───┼─> ChangeSink ─> dispatcher.notify()
 *   catch-up after connect ─┘
 */
import type { Logger } from '../ops/log.js';

/** What STATUS says about a mailbox. */
export interface MailboxStatus {
  uidValidity: number;
  uidNext: number;
  messages: number;
}

export type ChangeSource = 'notify' | 'idle' | 'poll' | 'events' | 'catch-up';

/** New mail in one mailbox of one user. */
export interface MailboxChange {
  user: string;
  /** Mailbox name in UTF-8 (INBOX as "INBOX"). */
  mailbox: string;
  /**
   * Identifies the change across instances so that a hand-over pushes it once:
   * `<mailbox>:<uidvalidity>:<uidnext>` from STATUS, `<mailbox>:<uidvalidity>:<uid>` from events.
   */
  changeId: string;
  /** When it was noticed (ms since epoch), for push latency. */
  detectedAt: number;
  source: ChangeSource;
}

/**
 * Takes a change. A returned promise resolves once the change's push is done with (the tracker stores the mailbox
 * state only then); anything else returned is ignored.
 */
export type ChangeSink = (change: MailboxChange) => unknown;

/** The last status seen per mailbox, kept in the registration store so that restarts miss nothing. */
export interface MailboxStateStore {
  getMailboxStates(user: string): Promise<Record<string, MailboxStatus>>;
  setMailboxState(user: string, mailbox: string, status: MailboxStatus): Promise<void>;
}

/** Watches one user's registered mailboxes upstream (one or more connections). */
export interface UserWatcher {
  readonly user: string;
  /** Replaces the watched mailboxes (UTF-8 names; INBOX included by the caller). */
  setMailboxes(mailboxes: string[]): void;
  /** Connected and watching (for health and metrics). */
  readonly connected: boolean;
  stop(): Promise<void>;
}

export interface WatcherContext {
  onChange: ChangeSink;
  states: MailboxStateStore;
  log: Logger;
}

/** Creates per-user watchers of one kind (NOTIFY or IDLE). */
export interface WatcherFactory {
  readonly mode: 'notify' | 'idle';
  start(user: string, mailboxes: string[], ctx: WatcherContext): UserWatcher;
}

/**
 * Which instance watches which user. Redis leases expire unless renewed, so when
 * an instance dies the others take its users over; the embedded store always
 * grants (one instance).
 */
export interface LeaseManager {
  readonly instanceId: string;
  /** Takes the lease if free (or already ours). */
  acquire(user: string): Promise<boolean>;
  /** Renews ours; returns the users whose lease was lost. */
  renew(users: string[]): Promise<string[]>;
  release(user: string): Promise<void>;
}
