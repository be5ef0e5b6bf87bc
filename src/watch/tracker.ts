/**
 * Change detection shared by the NOTIFY and IDLE watchers: what STATUS-like observations
 * (STATUS responses, NOTIFY events, EXAMINE results) mean for one user's mailboxes.
 *
 * - A change is new mail: UIDNEXT rose (same UIDVALIDITY) or UIDVALIDITY changed. Repeated
 *   and no-change lines (Dovecot sends both) and expunges emit nothing.
 * - Catch-up: after each (re)connect the first observation of each mailbox is compared with
 *   the state store (`getMailboxStates`), so mail that arrived while nobody watched (upstream
 *   down, proxy restarted, lease handed over) is pushed once, with source `catch-up`. With no
 *   stored state there is nothing to compare: the state is only stored.
 * - A mailbox found missing (NO to STATUS/EXAMINE) that later appears with mail is a change.
 * - The state is written after the change's push is done with (when the sink returns a promise:
 *   the dispatcher's notifyAndWait), so that a crash before the push re-pushes from the catch-up
 *   rather than loses; in observation order, and only when it differs from what the store holds.
 */
import type { Logger } from '../ops/log.js';
import { decodeMailboxName } from '../push/mutf7.js';
import { ArgReader, ParseError, valueText, type Value } from '../imap/tokens.js';
import type { ImapResponse } from './imap-connection.js';
import type { ChangeSource, MailboxChange, MailboxStatus, WatcherContext } from './types.js';
import type { WatchMetrics } from './watch-metrics.js';

/** "inbox" in any case is INBOX (RFC 3501 §5.1). */
export function normalizeMailbox(name: string): string {
  return name.toUpperCase() === 'INBOX' ? 'INBOX' : name;
}

/** Watched names without duplicates, INBOX first, order kept otherwise. */
export function normalizeMailboxList(names: string[]): string[] {
  const seen = new Set<string>();
  const out: string[] = [];
  for (const raw of names) {
    const n = normalizeMailbox(raw);
    if (n === '' || seen.has(n)) continue;
    seen.add(n);
    out.push(n);
  }
  const i = out.indexOf('INBOX');
  if (i > 0) out.unshift(...out.splice(i, 1));
  return out;
}

/** A mailbox name as the server sent it (modified UTF-7) → UTF-8. */
export function decodeServerMailbox(v: Value): string | null {
  const text = valueText(v);
  if (text === null) return null;
  try {
    return normalizeMailbox(decodeMailboxName(text));
  } catch {
    return normalizeMailbox(text); // not mUTF-7 (UTF8=ACCEPT servers, odd names): as sent
  }
}

function num(v: Value | undefined): number | undefined {
  if (!v || v.kind !== 'atom' || !/^\d{1,15}$/.test(v.text)) return undefined;
  return Number(v.text);
}

/** `* STATUS <mailbox> (MESSAGES n UIDNEXT n UIDVALIDITY n …)` → its mailbox and the items present. */
export function parseStatusResponse(r: ImapResponse): { mailbox: string; status: Partial<MailboxStatus> } | null {
  if (r.head.kind !== 'data' || r.head.name !== 'STATUS') return null;
  try {
    const reader = new ArgReader(r.parts);
    reader.atom(); // *
    reader.skipSpace();
    reader.atom(); // STATUS
    reader.skipSpace();
    const mailbox = decodeServerMailbox(reader.value());
    reader.skipSpace();
    const list = reader.value();
    if (mailbox === null || list.kind !== 'list') return null;
    const status: Partial<MailboxStatus> = {};
    for (let i = 0; i + 1 < list.items.length; i += 2) {
      const key = list.items[i]!;
      if (key.kind !== 'atom') continue;
      const value = num(list.items[i + 1]);
      if (value === undefined) continue;
      switch (key.text.toUpperCase()) {
        case 'MESSAGES':
          status.messages = value;
          break;
        case 'UIDNEXT':
          status.uidNext = value;
          break;
        case 'UIDVALIDITY':
          status.uidValidity = value;
          break;
      }
    }
    return { mailbox, status };
  } catch (err) {
    if (err instanceof ParseError) return null;
    throw err;
  }
}

/** What SELECT/EXAMINE told: `* n EXISTS`, `* OK [UIDVALIDITY n]`, `* OK [UIDNEXT n]`. */
export function parseSelectResponses(untagged: ImapResponse[]): Partial<MailboxStatus> {
  const status: Partial<MailboxStatus> = {};
  for (const r of untagged) {
    const exists = /^\* (\d{1,15}) EXISTS\b/i.exec(r.line);
    if (exists) {
      status.messages = Number(exists[1]);
      continue;
    }
    const code = /^\* OK \[(UIDVALIDITY|UIDNEXT) (\d{1,15})\]/i.exec(r.line);
    if (code) {
      if (code[1]!.toUpperCase() === 'UIDVALIDITY') status.uidValidity = Number(code[2]);
      else status.uidNext = Number(code[2]);
    }
  }
  return status;
}

/** The EXISTS count of a `* n EXISTS` response, or null. */
export function existsCount(r: ImapResponse): number | null {
  if (r.head.kind !== 'data' || r.head.name !== 'EXISTS') return null;
  const m = /^\* (\d{1,15}) EXISTS\b/i.exec(r.line);
  return m ? Number(m[1]) : null;
}

function same(a: MailboxStatus | null | undefined, b: MailboxStatus): boolean {
  return !!a && a.uidValidity === b.uidValidity && a.uidNext === b.uidNext && a.messages === b.messages;
}

export type ObserveResult = 'changed' | 'unchanged' | 'stored' | 'incomplete';

export class MailboxTracker {
  /** Last status observed by this process (merging base for partial lines). */
  private last = new Map<string, MailboxStatus>();
  /** What the store holds, as far as we know (undefined: unknown). */
  private stored = new Map<string, MailboxStatus | null>();
  /** Mailboxes whose next observation is a catch-up, with the baseline (null: none). */
  private catchUp = new Map<string, MailboxStatus | null>();
  /** Mailboxes found not to exist. */
  private missing = new Set<string>();
  private writes: Promise<void> = Promise.resolve();
  /** Per mailbox, the push its newest emitted change still waits for (cleared once settled). */
  private unpushed = new Map<string, PendingPush>();
  /** Resolved by flush() (the watcher stops): writes still waiting for their push are dropped. */
  private stopWaiting: () => void = () => undefined;
  private readonly stopped = new Promise<false>((resolve) => {
    this.stopWaiting = () => resolve(false);
  });

  constructor(
    readonly user: string,
    private readonly ctx: WatcherContext,
    private readonly metrics: WatchMetrics,
    private readonly log: Logger,
  ) {}

  /**
   * After a (re)connect, before the first observations: loads the stored states and makes
   * the next observation of each of `mailboxes` a catch-up against them. A newer state this
   * tracker observed itself wins over the stored one: the store lags behind a change whose push
   * is still out (written only once it is done), and that change was already emitted.
   */
  async beginCatchUp(mailboxes: string[]): Promise<void> {
    let states: Record<string, MailboxStatus> | null = null;
    try {
      states = await this.ctx.states.getMailboxStates(this.user);
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, 'cannot read stored mailbox states; comparing with memory');
    }
    for (const mb of mailboxes) {
      const stored = states ? (states[mb] ?? null) : undefined;
      if (stored !== undefined) this.stored.set(mb, stored);
      const last = this.last.get(mb);
      const seen = stored && last && last.uidValidity === stored.uidValidity && last.uidNext > stored.uidNext ? last : undefined;
      this.catchUp.set(mb, seen ?? stored ?? last ?? null);
    }
  }

  /** The mailbox does not exist (now): its next appearance with mail is a change. */
  markMissing(mailbox: string): void {
    this.catchUp.delete(mailbox);
    this.last.delete(mailbox);
    this.missing.add(mailbox);
  }

  isMissing(mailbox: string): boolean {
    return this.missing.has(mailbox);
  }

  /** No longer watched: drop what is kept in memory (the stored state stays). */
  forget(mailbox: string): void {
    this.last.delete(mailbox);
    this.stored.delete(mailbox);
    this.catchUp.delete(mailbox);
    this.missing.delete(mailbox);
  }

  /** Last status observed (for tests and diagnostics). */
  lastStatus(mailbox: string): MailboxStatus | undefined {
    return this.last.get(mailbox);
  }

  /**
   * One observation of `mailbox`. Items missing from a partial line are taken from the last
   * observation; without one the result is 'incomplete' (ask STATUS for all three).
   */
  observe(mailbox: string, partial: Partial<MailboxStatus>, liveSource: ChangeSource): ObserveResult {
    const last = this.last.get(mailbox);
    const uidValidity = partial.uidValidity ?? last?.uidValidity;
    const uidNext = partial.uidNext ?? last?.uidNext;
    const messages = partial.messages ?? last?.messages;
    if (uidValidity === undefined || uidNext === undefined || messages === undefined) return 'incomplete';
    const status: MailboxStatus = { uidValidity, uidNext, messages };

    const isCatchUp = this.catchUp.has(mailbox);
    const wasMissing = this.missing.has(mailbox);
    let base: MailboxStatus | null;
    if (isCatchUp) base = this.catchUp.get(mailbox) ?? null;
    else base = last ?? (wasMissing ? (this.stored.get(mailbox) ?? null) : null);
    this.catchUp.delete(mailbox);
    this.missing.delete(mailbox);

    const newer = (b: MailboxStatus) => status.uidValidity !== b.uidValidity || status.uidNext > b.uidNext;
    let changed: boolean;
    // (re)appeared (created by a delivery, renamed back): a change if it holds mail we did not know
    if (wasMissing) changed = status.uidNext > 1 && (!base || newer(base));
    else if (base) changed = newer(base);
    else changed = false; // first sight, nothing to compare with: store only

    this.last.set(mailbox, status);
    const pushed = changed ? this.emit(mailbox, status, isCatchUp ? 'catch-up' : liveSource) : undefined;
    const known = this.stored.get(mailbox);
    if (!same(known, status)) this.persist(mailbox, status, pushed);
    if (changed) return 'changed';
    return base ? 'unchanged' : 'stored';
  }

  /**
   * Resolves when the state writes queued so far are done. For the watcher's stop: writes still waiting for their
   * change's push are dropped (the state stays behind the mail; the next start pushes it again).
   */
  flush(): Promise<void> {
    this.stopWaiting();
    return this.writes;
  }

  /** Emits the change; returns when its push is done with, if the sink tells. */
  private emit(mailbox: string, status: MailboxStatus, source: ChangeSource): Promise<unknown> | undefined {
    const change: MailboxChange = {
      user: this.user,
      mailbox,
      changeId: `${mailbox}:${status.uidValidity}:${status.uidNext}`,
      detectedAt: Date.now(),
      source,
    };
    this.metrics.changes.inc({ source });
    this.log.debug({ mailbox, source, changeId: change.changeId }, 'new mail');
    try {
      const pushed = this.ctx.onChange(change);
      return pushed instanceof Promise ? pushed : undefined;
    } catch (err) {
      this.log.error({ err: (err as Error).message }, 'change sink failed');
      return undefined;
    }
  }

  private persist(mailbox: string, status: MailboxStatus, pushed: Promise<unknown> | undefined): void {
    this.stored.set(mailbox, status);
    // A later state of the same mailbox (an expunge while the push is out) includes the unpushed UIDNEXT:
    // it must wait for that push too, or a stop would store it and the restart would never push the mail.
    const gate = pushed ? this.track(mailbox, pushed) : this.unpushed.get(mailbox);
    this.writes = this.writes.then(async () => {
      const go = gate && !gate.settled ? await Promise.race([gate.done, this.stopped]) : true;
      if (!go) {
        if (same(this.stored.get(mailbox), status)) this.stored.delete(mailbox);
        return;
      }
      try {
        await this.ctx.states.setMailboxState(this.user, mailbox, status);
      } catch (err) {
        if (same(this.stored.get(mailbox), status)) this.stored.delete(mailbox); // unknown again: retried next time
        this.log.warn({ mailbox, err: (err as Error).message }, 'cannot store mailbox state');
      }
    });
  }

  private track(mailbox: string, pushed: Promise<unknown>): PendingPush {
    const pending: PendingPush = {
      settled: false,
      done: pushed.then(
        () => true,
        () => true,
      ),
    };
    // settled is recorded as it happens, so a stop after the push was answered does not drop the write
    void pending.done.then(() => {
      pending.settled = true;
      if (this.unpushed.get(mailbox) === pending) this.unpushed.delete(mailbox);
    });
    this.unpushed.set(mailbox, pending);
    return pending;
  }

}

interface PendingPush {
  settled: boolean;
  readonly done: Promise<true>;
}
