/**
 * Change detection (tracker.ts), response parsing, NOTIFY command building, back-off, login
 * failure classification and credential redaction: the pure parts of the watchers.
 */
import { describe, expect, it } from 'vitest';
import { inspect } from 'node:util';
import { Framer } from '../../../src/imap/framer.js';
import { classifyResponse } from '../../../src/imap/response.js';
import type { CommandPart } from '../../../src/imap/tokens.js';
import { silentLogger } from '../../../src/ops/log.js';
import { Registry } from 'prom-client';
import type { ImapResponse } from '../../../src/watch/imap-connection.js';
import { splitRespText } from '../../../src/watch/imap-connection.js';
import { classifyLoginFailure, MasterCredentials } from '../../../src/watch/login.js';
import { NOTIFY_MAX_NAMES, notifyCommand, planNotify, statusCommand } from '../../../src/watch/notify.js';
import { Backoff } from '../../../src/watch/session.js';
import {
  MailboxTracker,
  normalizeMailboxList,
  parseSelectResponses,
  parseStatusResponse,
} from '../../../src/watch/tracker.js';
import type { MailboxChange, MailboxStatus } from '../../../src/watch/types.js';
import { watchMetrics } from '../../../src/watch/watch-metrics.js';

/** Frames server bytes into responses the way ImapConnection does. */
function responses(wire: string): ImapResponse[] {
  const framer = new Framer({ side: 'server' });
  framer.push(Buffer.from(wire, 'utf8'));
  const out: ImapResponse[] = [];
  let parts: CommandPart[] = [];
  for (let seg = framer.next(); seg; seg = framer.next()) {
    if (seg.type === 'literal') {
      parts.push({ kind: 'literal', data: Buffer.from(seg.data) });
      continue;
    }
    parts.push({ kind: 'text', data: Buffer.from(seg.data) });
    if (seg.literal) continue;
    const first = parts[0]!.data;
    out.push({ parts, head: classifyResponse(first), line: first.toString('latin1').replace(/\r?\n$/, '') });
    parts = [];
  }
  return out;
}

function memoryStates(initial: Record<string, MailboxStatus> = {}) {
  const data: Record<string, MailboxStatus> = { ...initial };
  const writes: Array<[string, MailboxStatus]> = [];
  return {
    data,
    writes,
    async getMailboxStates() {
      return { ...data };
    },
    async setMailboxState(_u: string, mb: string, s: MailboxStatus) {
      data[mb] = s;
      writes.push([mb, s]);
    },
  };
}

function tracker(initial: Record<string, MailboxStatus> = {}) {
  const changes: MailboxChange[] = [];
  const states = memoryStates(initial);
  const metrics = watchMetrics(new Registry());
  const t = new MailboxTracker('alice', { onChange: (c) => changes.push(c), states, log: silentLogger() }, metrics, silentLogger());
  return { t, changes, states, metrics };
}

const S = (uidValidity: number, uidNext: number, messages: number): MailboxStatus => ({ uidValidity, uidNext, messages });

describe('STATUS parsing', () => {
  it('reads atoms, quoted names, literals (Dovecot 2.3 UTF-8) and modified UTF-7', () => {
    const rs = responses(
      '* STATUS INBOX (MESSAGES 2 UIDNEXT 3 UIDVALIDITY 1795437816 UNSEEN 0)\r\n' +
        '* STATUS "Bar Baz" (MESSAGES 0 UIDNEXT 1 UIDVALIDITY 7)\r\n' +
        '* STATUS {9}\r\nEntwürfe (MESSAGES 3 UIDNEXT 4 UNSEEN 3)\r\n' +
        '* STATUS Entw&APw-rfe (MESSAGES 1 UIDNEXT 2 UIDVALIDITY 9)\r\n' +
        '* STATUS inbox (UIDNEXT 5)\r\n',
    );
    expect(rs.map(parseStatusResponse)).toEqual([
      { mailbox: 'INBOX', status: S(1795437816, 3, 2) },
      { mailbox: 'Bar Baz', status: S(7, 1, 0) },
      { mailbox: 'Entwürfe', status: { messages: 3, uidNext: 4 } },
      { mailbox: 'Entwürfe', status: S(9, 2, 1) },
      { mailbox: 'INBOX', status: { uidNext: 5 } },
    ]);
  });

  it('ignores other responses and malformed STATUS lines', () => {
    const rs = responses('* 3 EXISTS\r\n* STATUS\r\n* STATUS INBOX junk\r\n* LIST () "/" Drafts\r\n');
    expect(rs.map(parseStatusResponse)).toEqual([null, null, null, null]);
  });

  it('reads EXAMINE results', () => {
    const rs = responses(
      '* FLAGS (\\Seen)\r\n* 4 EXISTS\r\n* 4 RECENT\r\n* OK [UIDVALIDITY 1795444545] UIDs valid\r\n* OK [UIDNEXT 5] Predicted next UID\r\n',
    );
    expect(parseSelectResponses(rs)).toEqual(S(1795444545, 5, 4));
  });

  it('splits response codes from text', () => {
    expect(splitRespText('[AUTHENTICATIONFAILED] Authentication failed.')).toEqual({
      code: 'AUTHENTICATIONFAILED',
      text: 'Authentication failed.',
    });
    expect(splitRespText('Logged in')).toEqual({ code: null, text: 'Logged in' });
  });
});

describe('MailboxTracker', () => {
  it('emits on a UIDNEXT rise, not on duplicates, expunges or no-change lines', () => {
    const { t, changes } = tracker();
    expect(t.observe('INBOX', S(1, 3, 2), 'notify')).toBe('stored'); // first sight: no baseline
    expect(t.observe('INBOX', S(1, 3, 2), 'notify')).toBe('unchanged');
    expect(t.observe('INBOX', S(1, 4, 3), 'notify')).toBe('changed');
    expect(t.observe('INBOX', { uidNext: 4, messages: 3 }, 'notify')).toBe('unchanged'); // duplicate, partial
    expect(t.observe('INBOX', { messages: 2 }, 'notify')).toBe('unchanged'); // expunge
    expect(t.observe('INBOX', { uidNext: 5, messages: 3 }, 'notify')).toBe('changed');
    expect(changes.map((c) => [c.mailbox, c.changeId, c.source])).toEqual([
      ['INBOX', 'INBOX:1:4', 'notify'],
      ['INBOX', 'INBOX:1:5', 'notify'],
    ]);
  });

  it('emits on a UIDVALIDITY change', () => {
    const { t, changes } = tracker();
    t.observe('Work', S(1, 3, 2), 'idle');
    t.observe('Work', S(2, 1, 0), 'idle');
    expect(changes.map((c) => c.changeId)).toEqual(['Work:2:1']);
  });

  it('asks for a full STATUS when a partial line has no base', () => {
    const { t } = tracker();
    expect(t.observe('INBOX', { uidNext: 3 }, 'notify')).toBe('incomplete');
  });

  it('catch-up compares with the stored state, once, and stores without a push when nothing is stored', async () => {
    const { t, changes, states } = tracker({ INBOX: S(1, 3, 2), Sent: S(5, 9, 8) });
    await t.beginCatchUp(['INBOX', 'Sent', 'Work']);
    t.observe('INBOX', S(1, 5, 4), 'notify'); // mail while away
    t.observe('Sent', S(5, 9, 8), 'notify'); // nothing new
    t.observe('Work', S(7, 4, 3), 'notify'); // never stored: store only
    t.observe('INBOX', S(1, 5, 4), 'notify'); // duplicate after catch-up
    await t.flush();
    expect(changes.map((c) => [c.changeId, c.source])).toEqual([['INBOX:1:5', 'catch-up']]);
    expect(states.data).toEqual({ INBOX: S(1, 5, 4), Sent: S(5, 9, 8), Work: S(7, 4, 3) });
    expect(states.writes.map(([mb]) => mb)).toEqual(['INBOX', 'Work']); // unchanged states are not rewritten
  });

  it('writes the state after emitting the change', async () => {
    const order: string[] = [];
    const states = {
      async getMailboxStates() {
        return { INBOX: S(1, 3, 2) };
      },
      async setMailboxState() {
        order.push('stored');
      },
    };
    const t = new MailboxTracker(
      'alice',
      { onChange: () => order.push('emitted'), states, log: silentLogger() },
      watchMetrics(),
      silentLogger(),
    );
    await t.beginCatchUp(['INBOX']);
    t.observe('INBOX', S(1, 4, 3), 'idle');
    await t.flush();
    expect(order).toEqual(['emitted', 'stored']);
  });

  it('a missing mailbox that appears with mail is a change; empty, it is not', () => {
    const { t, changes } = tracker();
    t.markMissing('New');
    t.observe('New', S(3, 2, 1), 'notify');
    t.markMissing('Empty');
    t.observe('Empty', S(4, 1, 0), 'notify');
    t.observe('Empty', S(4, 2, 1), 'notify');
    expect(changes.map((c) => c.changeId)).toEqual(['New:3:2', 'Empty:4:2']);
  });

  it('keeps going when the store or the sink fails', async () => {
    const states = {
      async getMailboxStates(): Promise<Record<string, MailboxStatus>> {
        throw new Error('store down');
      },
      async setMailboxState() {
        throw new Error('store down');
      },
    };
    const seen: string[] = [];
    const t = new MailboxTracker(
      'alice',
      {
        onChange: (c) => {
          seen.push(c.changeId);
          throw new Error('sink broke');
        },
        states,
        log: silentLogger(),
      },
      watchMetrics(),
      silentLogger(),
    );
    await t.beginCatchUp(['INBOX']);
    t.observe('INBOX', S(1, 2, 1), 'notify');
    t.observe('INBOX', S(1, 3, 2), 'notify');
    await t.flush();
    expect(seen).toEqual(['INBOX:1:3']);
  });

  it('counts changes by source', async () => {
    const registry = new Registry();
    const metrics = watchMetrics(registry);
    expect(watchMetrics(registry)).toBe(metrics);
    const t = new MailboxTracker('a', { onChange: () => undefined, states: memoryStates(), log: silentLogger() }, metrics, silentLogger());
    t.observe('INBOX', S(1, 1, 0), 'poll');
    t.observe('INBOX', S(1, 2, 1), 'poll');
    const text = await registry.metrics();
    expect(text).toContain('xaps_watch_changes_total{source="poll"} 1');
    expect(text).toContain('xaps_watch_changes_total{source="catch-up"} 0');
    expect(text).toContain('xaps_watcher_login_failures_total{reason="authentication"} 0');
    expect(text).toContain('xaps_watchers{mode="notify"} 0');
  });
});

describe('NOTIFY commands', () => {
  it('orders INBOX first and drops duplicates', () => {
    expect(normalizeMailboxList(['Work', 'inbox', 'Work', 'Sent', 'INBOX'])).toEqual(['INBOX', 'Work', 'Sent']);
  });

  it('sends modified UTF-7, plus the UTF-8 form Dovecot 2.3 matches, as a literal', () => {
    expect(notifyCommand(['INBOX', 'Work/Projects', 'Bar "Baz"'])).toEqual([
      'NOTIFY SET STATUS (mailboxes ("INBOX" "Work/Projects" "Bar \\"Baz\\"") (MessageNew MessageExpunge))',
    ]);
    expect(notifyCommand(['INBOX', 'Entwürfe'])).toEqual([
      'NOTIFY SET STATUS (mailboxes ("INBOX" "Entw&APw-rfe" ',
      { literal: Buffer.from('Entwürfe', 'utf8') },
      ') (MessageNew MessageExpunge))',
    ]);
    expect(notifyCommand(['R&D'])).toEqual(['NOTIFY SET STATUS (mailboxes ("R&-D" "R&D") (MessageNew MessageExpunge))']);
    expect(notifyCommand(['Entwürfe'], false)).toEqual(['NOTIFY SET STATUS (mailboxes ("Entw&APw-rfe") (MessageNew MessageExpunge))']);
    expect(notifyCommand([])).toEqual(['NOTIFY NONE']);
    expect(statusCommand('Entwürfe')).toBe('STATUS "Entw&APw-rfe" (MESSAGES UIDNEXT UIDVALIDITY)');
  });

  it('puts at most 100 names in one NOTIFY and polls the rest', () => {
    const many = Array.from({ length: 120 }, (_, i) => `box${i}`);
    const plan = planNotify(many, true);
    expect(plan.notified).toHaveLength(NOTIFY_MAX_NAMES);
    expect(plan.overflow).toEqual(many.slice(100));
    const utf8 = Array.from({ length: 60 }, (_, i) => `Entwürfe${i}`); // two names each
    const p2 = planNotify(utf8, true);
    expect(p2.notified).toHaveLength(50);
    expect(p2.overflow).toHaveLength(10);
    expect(planNotify(utf8, false).notified).toHaveLength(60);
  });
});

describe('Backoff', () => {
  it('doubles from the initial delay up to the maximum, with ±25 % jitter, and resets', () => {
    const low = new Backoff({ initialMs: 1000, maxMs: 300_000 }, () => 0);
    const high = new Backoff({ initialMs: 1000, maxMs: 300_000 }, () => 1);
    const lows = Array.from({ length: 12 }, () => low.next());
    const highs = Array.from({ length: 12 }, () => high.next());
    expect(lows.slice(0, 4)).toEqual([750, 1500, 3000, 6000]);
    expect(highs.slice(0, 3)).toEqual([1250, 2500, 5000]);
    expect(Math.max(...highs)).toBe(300_000);
    expect(lows[11]).toBe(225_000);
    low.reset();
    expect(low.next()).toBe(750);
  });
});

describe('master login helpers', () => {
  it('classifies Dovecot and Cyrus refusals', () => {
    expect(classifyLoginFailure('AUTHENTICATIONFAILED', 'Authentication failed.')).toBe('authentication');
    expect(classifyLoginFailure('AUTHORIZATIONFAILED', 'Authorization failed')).toBe('authorization');
    expect(classifyLoginFailure(null, 'Invalid user')).toBe('authorization'); // Cyrus, "alice*master"
    expect(classifyLoginFailure(null, 'authentication failure')).toBe('authentication'); // Cyrus, wrong password
    expect(classifyLoginFailure('PRIVACYREQUIRED', 'Plaintext authentication disallowed')).toBe('privacy');
    expect(classifyLoginFailure('UNAVAILABLE', 'Try later')).toBe('unavailable');
    expect(classifyLoginFailure(null, 'nope')).toBe('other');
  });

  it('never renders the master password', () => {
    const creds = new MasterCredentials({ user: 'master', password: 'Sup3r-Secret-pw' });
    const renderings = [JSON.stringify(creds), inspect(creds), String(creds), `${creds}`, JSON.stringify({ creds })];
    for (const r of renderings) expect(r).not.toContain('Sup3r-Secret-pw');
    expect(Object.keys(creds)).not.toContain('password');
    expect(creds.revealPassword()).toBe('Sup3r-Secret-pw');
  });
});
