/**
 * NOTIFY watcher (RFC 5465): one upstream connection per user, logged in with the master
 * user, no mailbox selected (a selected mailbox got no events on Dovecot 2.3), and
 *
 *   NOTIFY SET STATUS (mailboxes ("INBOX" "Work/Projects" …) (MessageNew MessageExpunge))
 *
 * The `STATUS` option makes the server send a snapshot of every watched mailbox first: that
 * snapshot is the catch-up after each (re)connect, compared with the stored states. Then
 * Dovecot sends an unsolicited `* STATUS` about 0.5 s after each delivery — sometimes twice,
 * sometimes without unchanged items — which the tracker dedupes on (UIDVALIDITY, UIDNEXT,
 * MESSAGES) and turns into a change when UIDNEXT rises or UIDVALIDITY changes.
 *
 * - Dovecot 2.3.19 matches NOTIFY names WITHOUT decoding modified UTF-7 (cmd-notify.c takes
 *   the astring as the internal UTF-8 name), and reports such mailboxes by their raw UTF-8
 *   name, in a literal. So a name that mUTF-7 changes ("Entwürfe" → "Entw&APw-rfe") is sent
 *   in both forms, the UTF-8 one as a literal: a server that decodes mUTF-7 matches the first,
 *   Dovecot 2.3 the second, and a name matching nothing is ignored. A server that refuses the
 *   8-bit form gets the mUTF-7 names only. STATUS lines are read in either form.
 * - Mailboxes that do not exist get no snapshot line: an explicit STATUS confirms it (NO), and
 *   they are retried every pollIntervalMs. The `mailboxes` filter is by name, so Dovecot also
 *   reports them once a delivery creates them; renamed or deleted ones simply fall silent.
 * - Dovecot refuses more than 100 names per NOTIFY (`NO [NOTIFICATIONOVERFLOW]`): the first
 *   100 names (INBOX first; two per non-ASCII mailbox) are NOTIFY'd, the rest polled with STATUS every pollIntervalMs on the
 *   same connection. Registrations are capped at 100 mailboxes anyway.
 * - An untagged `[NOTIFICATIONOVERFLOW]` means events were lost and NOTIFY is off (RFC 5465
 *   §5.8): NOTIFY SET STATUS again, whose snapshot re-syncs every mailbox.
 * - setMailboxes re-issues NOTIFY SET STATUS (each SET replaces the last), after NOTIFY NONE:
 *   Dovecot 2.3.19 reports a replaced SET's events only at its ~30 s mailbox check (measured by
 *   the soak: pushes ~30 s late after a device changed its mailboxes). A mailbox new to the set
 *   is compared with its stored state first.
 * - Cyrus 3.6 has no NOTIFY: without the capability the watcher fails (and retries slowly);
 *   use the IDLE watcher there.
 */
import { quote } from '../imap/tokens.js';
import { encodeMailboxName } from '../push/mutf7.js';
import {
  ImapCommandError,
  untaggedStatus,
  type CommandChunk,
  type ImapConnection,
  type ImapResponse,
} from './imap-connection.js';
import { WatchSession, type WatcherConnectionSettings } from './session.js';
import { MailboxTracker, normalizeMailboxList, parseStatusResponse } from './tracker.js';
import type { UserWatcher, WatcherContext, WatcherFactory } from './types.js';
import { watchMetrics, type WatchMetrics } from './watch-metrics.js';

/** Most mailbox names Dovecot accepts in one NOTIFY command. */
export const NOTIFY_MAX_NAMES = 100;

export interface NotifyWatcherOptions extends WatcherConnectionSettings {
  /** How often missing mailboxes and those beyond the 100 NOTIFY names are checked with STATUS (ms). Default 60 s. */
  pollIntervalMs?: number;
}

export class NotifyUnsupportedError extends Error {}

/** `STATUS "name" (MESSAGES UIDNEXT UIDVALIDITY)` */
export function statusCommand(mailbox: string): string {
  return `STATUS ${quote(encodeMailboxName(mailbox))} (MESSAGES UIDNEXT UIDVALIDITY)`;
}

/** The names NOTIFY gets for a mailbox: its mUTF-7 form, plus the UTF-8 form when it differs (Dovecot 2.3). */
function notifyNames(mailbox: string, utf8Names: boolean): CommandChunk[][] {
  const mutf7 = encodeMailboxName(mailbox);
  const forms: CommandChunk[][] = [[quote(mutf7)]];
  if (utf8Names && mutf7 !== mailbox) {
    forms.push(/^[\x20-\x7e]*$/.test(mailbox) ? [quote(mailbox)] : [{ literal: Buffer.from(mailbox, 'utf8') }]);
  }
  return forms;
}

/** Which mailboxes fit into one NOTIFY (at most NOTIFY_MAX_NAMES names), in order; the rest are polled. */
export function planNotify(mailboxes: string[], utf8Names: boolean): { notified: string[]; overflow: string[] } {
  const notified: string[] = [];
  const overflow: string[] = [];
  let names = 0;
  for (const mb of mailboxes) {
    const n = notifyNames(mb, utf8Names).length;
    if (overflow.length === 0 && names + n <= NOTIFY_MAX_NAMES) {
      notified.push(mb);
      names += n;
    } else {
      overflow.push(mb);
    }
  }
  return { notified, overflow };
}

/** The NOTIFY command for these UTF-8 names (`NOTIFY NONE` for none). */
export function notifyCommand(mailboxes: string[], utf8Names = true): CommandChunk[] {
  if (mailboxes.length === 0) return ['NOTIFY NONE'];
  const out: CommandChunk[] = ['NOTIFY SET STATUS (mailboxes ('];
  let first = true;
  for (const mb of mailboxes) {
    for (const form of notifyNames(mb, utf8Names)) {
      if (!first) out.push(' ');
      first = false;
      out.push(...form);
    }
  }
  out.push(') (MessageNew MessageExpunge))');
  // join adjacent text so that the command is as few writes as possible
  const joined: CommandChunk[] = [];
  for (const c of out) {
    const last = joined[joined.length - 1];
    if (typeof c === 'string' && typeof last === 'string') joined[joined.length - 1] = last + c;
    else joined.push(c);
  }
  return joined;
}

export class NotifyUserWatcher extends WatchSession implements UserWatcher {
  private mailboxes: string[];
  private readonly tracker: MailboxTracker;
  /** Serializes reconfigurations on the current connection. */
  private ops: Promise<void> = Promise.resolve();
  private pollTimer: NodeJS.Timeout | undefined;
  private resyncing = false;
  private pollQueued = false;
  /** The list the current connection's NOTIFY was last set up with. */
  private applied: string[] = [];

  constructor(
    user: string,
    mailboxes: string[],
    ctx: WatcherContext,
    private readonly opts: NotifyWatcherOptions,
    metrics: WatchMetrics,
    private readonly onStopped: (w: NotifyUserWatcher) => void,
  ) {
    const log = ctx.log.child({ user, watch: 'notify' });
    super(user, opts, 'notify', metrics, log);
    this.mailboxes = normalizeMailboxList(mailboxes);
    this.tracker = new MailboxTracker(user, ctx, metrics, log);
  }

  /** Send UTF-8 forms too (off once the server refused them). */
  private utf8Names = true;

  private get plan(): { notified: string[]; overflow: string[] } {
    return planNotify(this.mailboxes, this.utf8Names);
  }

  setMailboxes(mailboxes: string[]): void {
    const next = normalizeMailboxList(mailboxes);
    if (next.length === this.mailboxes.length && next.every((m, i) => m === this.mailboxes[i])) return;
    for (const m of this.mailboxes) if (!next.includes(m)) this.tracker.forget(m);
    this.mailboxes = next;
    const conn = this.conn;
    // not set up yet: session() applies the newest list before it reports ready
    if (conn && this.ready) this.enqueue(conn, () => this.sync(conn, false));
  }

  /** Resolves once the reconfigurations queued so far (setMailboxes) were sent and answered. */
  async settled(): Promise<void> {
    await this.ops;
  }

  override async stop(): Promise<void> {
    clearInterval(this.pollTimer);
    await super.stop();
    await this.tracker.flush();
    this.onStopped(this);
  }

  protected async session(conn: ImapConnection): Promise<void> {
    if (!conn.hasCapability('NOTIFY')) {
      throw new NotifyUnsupportedError('the upstream does not offer NOTIFY (Cyrus 3.6 has none): use --watch idle');
    }
    this.ops = Promise.resolve();
    this.pollQueued = false;
    await this.sync(conn, true);
    while (this.applied !== this.mailboxes) await this.sync(conn, false); // changed meanwhile
    this.throwIfStopped();
    this.markReady();
    const interval = this.opts.pollIntervalMs ?? 60_000;
    this.pollTimer = setInterval(() => {
      if (this.pollQueued) return; // the last round is still waiting or running
      this.pollQueued = true;
      this.enqueue(conn, () => this.poll(conn).finally(() => (this.pollQueued = false)));
    }, interval);
    this.pollTimer.unref();
    try {
      throw await conn.whenClosed();
    } finally {
      clearInterval(this.pollTimer);
    }
  }

  protected onUntagged(r: ImapResponse): void {
    const st = parseStatusResponse(r);
    if (st) {
      if (!this.mailboxes.includes(st.mailbox)) return;
      const result = this.tracker.observe(st.mailbox, st.status, 'notify');
      if (result === 'incomplete' && this.conn) {
        const conn = this.conn;
        this.enqueue(conn, async () => {
          await this.statusOf(conn, st.mailbox);
        });
      }
      return;
    }
    const s = untaggedStatus(r);
    if (s && s.code && /^NOTIFICATIONOVERFLOW\b/i.test(s.code) && this.conn && !this.resyncing) {
      this.log.warn('upstream lost NOTIFY events (NOTIFICATIONOVERFLOW); re-syncing every mailbox');
      this.resyncing = true;
      const conn = this.conn;
      this.enqueue(conn, async () => {
        try {
          await this.applyNotify(conn);
        } finally {
          this.resyncing = false;
        }
      });
    }
  }

  /** Runs `op` after the previous ones; a failure closes the connection (the loop reconnects). */
  private enqueue(conn: ImapConnection, op: () => Promise<void>): void {
    this.ops = this.ops
      .then(async () => {
        if (conn.closed) return;
        await op();
      })
      .catch((err: Error) => {
        if (!conn.closed) {
          this.log.warn({ err: err.message }, 'NOTIFY watcher command failed; reconnecting');
          conn.close(`watcher command failed: ${err.message}`);
        }
      });
  }

  /**
   * Applies the current list: catch-up baselines for the mailboxes new to it (all of them
   * after a reconnect), then NOTIFY SET STATUS.
   */
  private async sync(conn: ImapConnection, reconnected: boolean): Promise<void> {
    const list = this.mailboxes;
    const added = reconnected ? list : list.filter((m) => !this.applied.includes(m));
    if (added.length > 0) await this.tracker.beginCatchUp(added);
    this.applied = list;
    if (!reconnected) {
      // Dovecot 2.3.19 sends no immediate events on a connection whose NOTIFY SET was replaced by another one (only
      // its ~30 s mailbox check reports then); NOTIFY NONE first keeps them immediate. The new SET's snapshot
      // catches whatever arrived in between.
      const none = await conn.command(notifyCommand([]));
      if (none.status !== 'OK') throw new ImapCommandError('NOTIFY', none);
    }
    await this.applyNotify(conn);
  }

  /** NOTIFY SET STATUS for the watched names, then STATUS for those the snapshot missed, and for the overflow. */
  private async applyNotify(conn: ImapConnection): Promise<void> {
    let { notified, overflow } = this.plan;
    let r = await conn.command(notifyCommand(notified, this.utf8Names));
    if (r.status !== 'OK' && this.utf8Names && notified.some((m) => encodeMailboxName(m) !== m)) {
      // the server may refuse 8-bit names: modified UTF-7 only, as RFC 5465 has it
      this.log.info({ answer: `${r.status} ${r.text}` }, 'upstream refused UTF-8 mailbox names in NOTIFY; using modified UTF-7 only');
      this.utf8Names = false;
      ({ notified, overflow } = this.plan);
      r = await conn.command(notifyCommand(notified, false));
    }
    if (r.status !== 'OK') throw new ImapCommandError('NOTIFY', r);
    const seen = new Set<string>();
    for (const u of r.untagged) {
      const st = parseStatusResponse(u);
      if (st) seen.add(st.mailbox);
    }
    for (const mb of notified) if (!seen.has(mb)) await this.statusOf(conn, mb);
    for (const mb of overflow) await this.statusOf(conn, mb);
  }

  /** Missing mailboxes and the overflow, every pollIntervalMs. */
  private async poll(conn: ImapConnection): Promise<void> {
    const { notified } = this.plan;
    for (const mb of this.mailboxes) {
      if (this.tracker.isMissing(mb) || !notified.includes(mb)) await this.statusOf(conn, mb);
    }
  }

  /** STATUS one mailbox (its answer is observed in onUntagged); NO: missing for now. */
  private async statusOf(conn: ImapConnection, mailbox: string): Promise<void> {
    const r = await conn.command(statusCommand(mailbox));
    if (r.status === 'OK') {
      const lines = r.untagged.map(parseStatusResponse).filter((x) => x !== null);
      if (!lines.some((l) => l.mailbox === mailbox) && lines.length === 1) {
        // the server spelled the name its own way (onUntagged ignored it): it answers for ours
        if (this.tracker.observe(mailbox, lines[0]!.status, 'notify') === 'incomplete') this.tracker.markMissing(mailbox);
      }
      return;
    }
    if (r.status === 'NO') {
      if (!this.tracker.isMissing(mailbox)) this.log.info({ mailbox }, 'watched mailbox does not exist (yet); retrying later');
      this.tracker.markMissing(mailbox);
      return;
    }
    throw new ImapCommandError('STATUS', r);
  }
}

export class NotifyWatcherFactory implements WatcherFactory {
  readonly mode = 'notify' as const;
  private readonly watchers = new Set<NotifyUserWatcher>();
  private readonly metrics: WatchMetrics;
  private readonly removeSource: () => void;

  constructor(private readonly opts: NotifyWatcherOptions) {
    this.metrics = watchMetrics(opts.registry);
    this.removeSource = this.metrics.addSource('notify', () => {
      let users = 0;
      let connections = 0;
      for (const w of this.watchers) {
        if (w.connected) users++;
        if (w.open) connections++;
      }
      return { users, connections };
    });
  }

  start(user: string, mailboxes: string[], ctx: WatcherContext): UserWatcher {
    const w = new NotifyUserWatcher(user, mailboxes, ctx, this.opts, this.metrics, (x) => this.watchers.delete(x));
    this.watchers.add(w);
    w.start();
    return w;
  }

  /** Stops every watcher and unregisters the gauges' source. */
  async close(): Promise<void> {
    await Promise.all([...this.watchers].map((w) => w.stop()));
    this.removeSource();
  }
}
