/**
 * Events mode, body formats: the project's Dovecot Lua driver (a), Dovecot's OX driver (b) and
 * Cyrus' RFC 5423 events as the xaps-notify shim forwards them (c), to MailboxChange.
 * Cyrus bodies below are copied from a real Cyrus 3.6.1 (notify_external capture).
 */
import { describe, expect, it } from 'vitest';
import {
  cyrusPersonalMailbox,
  decodeUrlMailbox,
  EventFormatError,
  interpretBody,
  interpretEvent,
  MAX_EVENTS_PER_BODY,
  parseCyrusSwitch,
  parseImapUrl,
  presentedSecret,
  toMailboxChange,
} from '../../../src/watch/events.js';

function change(body: unknown, opts = {}) {
  const [e] = interpretBody(JSON.stringify(body), opts);
  if (!e || e.kind !== 'change') throw new Error(`not a change: ${JSON.stringify(e)}`);
  return toMailboxChange(e, 1000);
}

describe('(a) Dovecot Lua driver (deploy/dovecot/xaps-push.lua)', () => {
  it('MessageNew -> a change keyed <mailbox>:<uidvalidity>:<uid>', () => {
    expect(
      change({ user: 'carol', event: 'MessageNew', mailbox: 'INBOX', uid: 1, uidvalidity: 1795439300, from: 'x', subject: 'y' }),
    ).toEqual({ user: 'carol', mailbox: 'INBOX', changeId: 'INBOX:1795439300:1', detectedAt: 1000, source: 'events' });
  });

  it('MessageAppend, UTF-8 mailbox names and the messages count', () => {
    const c = change({ user: 'bob', event: 'MessageAppend', mailbox: 'Bücher/Neu', uid: 7, uidvalidity: 5, messages: 3 });
    expect(c).toMatchObject({ user: 'bob', mailbox: 'Bücher/Neu', changeId: 'Bücher/Neu:5:7' });
  });

  it('spells INBOX as INBOX whatever the case; accepts uid_validity and "7"/"7.0" strings', () => {
    expect(change({ user: 'a', event: 'messagenew', mailbox: 'inbox', uid: '7.0', uid_validity: '9' })).toMatchObject({
      mailbox: 'INBOX',
      changeId: 'INBOX:9:7',
    });
  });

  it('refuses a new-mail event without what a change needs', () => {
    expect(() => interpretBody('{"event":"MessageNew","mailbox":"INBOX","uid":1,"uidvalidity":1}')).toThrow(/missing "user"/);
    expect(() => interpretBody('{"event":"MessageNew","user":"a","mailbox":"INBOX","uidvalidity":1}')).toThrow(/missing "uid"/);
    expect(() => interpretBody('{"event":"MessageNew","user":"a","mailbox":"INBOX","uid":0,"uidvalidity":1}')).toThrow(/invalid "uid"/);
    expect(() => interpretBody('{"event":"MessageNew","user":"a","mailbox":"INBOX","uid":1.5,"uidvalidity":1}')).toThrow(/invalid "uid"/);
    expect(() => interpretBody('{"event":"MessageNew","user":"a","mailbox":"INBOX","uid":4294967296,"uidvalidity":1}')).toThrow(EventFormatError);
    expect(() => interpretBody('{"event":"MessageNew","user":"a","mailbox":"IN\\nBOX","uid":1,"uidvalidity":1}')).toThrow(/invalid mailbox/);
    expect(() => interpretBody('{"event":"MessageNew","user":"a\\u0000","mailbox":"INBOX","uid":1,"uidvalidity":1}')).toThrow(/invalid "user"/);
    expect(() => interpretBody('{"event":"MessageNew","user":"a","uid":1,"uidvalidity":1}')).toThrow(/no mailbox/);
  });
});

describe('(b) Dovecot OX driver', () => {
  it('messageNew (lowercase m), folder, imap-uid, imap-uidvalidity', () => {
    const body = {
      user: 'alice',
      event: 'messageNew',
      folder: 'INBOX',
      'imap-uidvalidity': 1795437816,
      'imap-uid': 5,
      from: 'Sender <s@example.org>',
      subject: 'hi',
      snippet: '…',
      unseen: 5,
    };
    expect(change(body)).toEqual({ user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1795437816:5', detectedAt: 1000, source: 'events' });
  });
});

describe('(c) Cyrus events (notify_external via xaps-notify)', () => {
  const cyrus = (uri: string, extra: Record<string, unknown> = {}) => ({
    event: 'MessageNew',
    timestamp: '2026-11-23T14:39:01.778Z',
    mailboxID: '9qappwgk2c8v8mreqpdqvk5o',
    uri,
    pid: 30204,
    user: 'alice',
    'vnd.cmu.mbtype': 'e',
    serverFQDN: 'localhost',
    'vnd.cmu.mailboxACL': 'alice\tlrswipkxtecdan\t',
    ...extra,
  });

  it('user/alice is alice\'s INBOX; user/alice/Work her Work (unixhierarchysep + altnamespace)', () => {
    expect(change(cyrus('imap://localhost/user/alice;UIDVALIDITY=1795444742/;UID=1'))).toEqual({
      user: 'alice',
      mailbox: 'INBOX',
      changeId: 'INBOX:1795444742:1',
      detectedAt: 1000,
      source: 'events',
    });
    expect(change(cyrus('imap://localhost/user/alice/Work;UIDVALIDITY=1795444742/;UID=1'))).toMatchObject({
      mailbox: 'Work',
      changeId: 'Work:1795444742:1',
    });
  });

  it('percent-encoded UTF-8 names (what Cyrus writes) and raw modified UTF-7 names', () => {
    expect(change(cyrus('imap://localhost/user/alice/B%C3%BCcher/Neu;UIDVALIDITY=3/;UID=2'))).toMatchObject({
      mailbox: 'Bücher/Neu',
      changeId: 'Bücher/Neu:3:2',
    });
    expect(change(cyrus('imap://localhost/user/alice/B&APw-cher/Neu;UIDVALIDITY=3/;UID=2'))).toMatchObject({ mailbox: 'Bücher/Neu' });
    expect(change(cyrus('imap://localhost/user/alice/B%26APw-cher;UIDVALIDITY=3/;UID=2'))).toMatchObject({ mailbox: 'Bücher' });
    // A literal '&' that is not modified UTF-7 stays as it is; so does an escaped ';'.
    expect(change(cyrus('imap://localhost/user/alice/Tom%26Jerry%3B;UIDVALIDITY=3/;UID=2'))).toMatchObject({ mailbox: 'Tom&Jerry;' });
  });

  it('without altnamespace, and with the "." separator (Debian imapd.conf), names are under INBOX', () => {
    expect(change(cyrus('imap://localhost/user.alice.Work;UIDVALIDITY=3/;UID=2'))).toMatchObject({ user: 'alice', mailbox: 'INBOX.Work' });
    expect(change(cyrus('imap://localhost/user.alice;UIDVALIDITY=3/;UID=2'))).toMatchObject({ mailbox: 'INBOX' });
    expect(change(cyrus('imap://localhost/user/alice/Work;UIDVALIDITY=3/;UID=2'), { cyrusAltNamespace: false })).toMatchObject({
      mailbox: 'INBOX/Work',
    });
    expect(change(cyrus('imap://localhost/user.alice.Work;UIDVALIDITY=3/;UID=2'), { cyrusAltNamespace: true })).toMatchObject({
      mailbox: 'Work',
    });
  });

  it('virtual domains: user/alice/Work@example.org belongs to alice@example.org', () => {
    expect(change(cyrus('imap://localhost/user/alice/Work@example.org;UIDVALIDITY=3/;UID=2'))).toMatchObject({
      user: 'alice@example.org',
      mailbox: 'Work',
    });
    expect(change(cyrus('imap://localhost/user/alice@example.org;UIDVALIDITY=3/;UID=2'))).toMatchObject({
      user: 'alice@example.org',
      mailbox: 'INBOX',
    });
  });

  it('RFC 5423 style URIs with a user: the name is already the user\'s own', () => {
    expect(change(cyrus('imap://joe@example.com/INBOX;UIDVALIDITY=123/;UID=4', { user: 'joe' }))).toMatchObject({
      user: 'joe',
      mailbox: 'INBOX',
      changeId: 'INBOX:123:4',
    });
  });

  it('falls back to uidnext-1 when the URI has no UID; MessageAppend counts', () => {
    expect(change(cyrus('imap://localhost/user/alice;UIDVALIDITY=3', { event: 'MessageAppend', uidnext: 9 }))).toMatchObject({
      changeId: 'INBOX:3:8',
    });
  });

  it('shared mailboxes and non-new-mail events are acknowledged and ignored', () => {
    expect(interpretEvent(cyrus('imap://localhost/shared/lists;UIDVALIDITY=3/;UID=2'))).toMatchObject({
      kind: 'ignored',
      reason: 'not_personal',
    });
    for (const event of ['MailboxModseq', 'MailboxCreate', 'MessageExpunge', 'FlagsSet', 'MessageRead', 'vnd.cmu.MessageCopy']) {
      expect(interpretEvent(cyrus('imap://localhost/user/alice;UIDVALIDITY=3', { event, user: '' }))).toMatchObject({
        kind: 'ignored',
        format: 'cyrus',
        reason: 'event_type',
      });
    }
  });

  it('refuses URIs it cannot read', () => {
    expect(() => interpretEvent(cyrus('http://localhost/user/alice;UIDVALIDITY=3/;UID=1'))).toThrow(/imap:\/\//);
    expect(() => interpretEvent(cyrus('imap://localhost/user/alice/%ZZ;UIDVALIDITY=3/;UID=1'))).toThrow(/percent/);
    expect(() => interpretEvent(cyrus('imap://localhost/user/alice/%FF;UIDVALIDITY=3/;UID=1'))).toThrow(/UTF-8/);
    expect(() => interpretEvent(cyrus('imap://localhost/user/alice;UIDVALIDITY=3'))).toThrow(/UID/);
    expect(() => interpretEvent(cyrus('imap://localhost/user/alice/;UID=1'))).toThrow(/UIDVALIDITY/);
    expect(() => interpretEvent({ event: 'MessageNew', uri: 5 })).toThrow(/"uri" must be a string/);
  });

  it('helpers', () => {
    expect(parseImapUrl('imap://u%40x;AUTH=*@host:143/a/b/;UID=3')).toEqual({ urlUser: 'u@x', mailbox: 'a/b', uid: 3 });
    expect(decodeUrlMailbox('&ZeVnLIqe-')).toBe('日本語');
    expect(cyrusPersonalMailbox('user/bob/A/B')).toEqual({ owner: 'bob', mailbox: 'A/B' });
    expect(cyrusPersonalMailbox('user/')).toBeUndefined();
    expect(cyrusPersonalMailbox('DELETED/user/bob')).toBeUndefined();
    expect(parseCyrusSwitch(' Yes ')).toBe(true);
    expect(parseCyrusSwitch('0')).toBe(false);
    expect(parseCyrusSwitch('maybe')).toBeUndefined();
  });
});

describe('bodies', () => {
  it('ignores events that are not new mail, in any format', () => {
    for (const event of ['FlagsSet', 'FlagsClear', 'MessageExpunge', 'MessageRead', 'MailboxCreate', 'whatever']) {
      expect(interpretBody(JSON.stringify({ event, user: 'a', mailbox: 'INBOX' }))).toEqual([
        { kind: 'ignored', format: 'dovecot_lua', event, reason: 'event_type' },
      ]);
    }
  });

  it('takes an array of events (at most MAX_EVENTS_PER_BODY)', () => {
    const ev = (uid: number) => ({ user: 'a', event: 'MessageNew', mailbox: 'INBOX', uid, uidvalidity: 1 });
    expect(interpretBody(JSON.stringify([ev(1), { event: 'FlagsSet' }, ev(2)])).map((e) => e.kind)).toEqual(['change', 'ignored', 'change']);
    expect(() => interpretBody(JSON.stringify(Array.from({ length: MAX_EVENTS_PER_BODY + 1 }, (_, i) => ev(i + 1))))).toThrow(/more than/);
    expect(() => interpretBody('[]')).toThrow(/empty array/);
    expect(() => interpretBody(JSON.stringify([ev(1), { event: 'MessageNew' }]))).toThrow(/^event 1: /);
  });

  it('says why a body is not an event', () => {
    expect(() => interpretBody('')).toThrow(/empty body/);
    expect(() => interpretBody('{"event":')).toThrow(/malformed JSON/);
    expect(() => interpretBody('"MessageNew"')).toThrow(/expected a JSON object/);
    expect(() => interpretBody('null')).toThrow(/expected a JSON object/);
    expect(() => interpretBody('{"user":"a"}')).toThrow(/missing "event"/);
    expect(() => interpretBody('{"event":7}')).toThrow(/missing "event"/);
    expect(() => interpretBody(`{"event":"${'x'.repeat(65)}"}`)).toThrow(/invalid "event"/);
    // __proto__ and friends are plain keys, not inherited values
    expect(() => interpretBody('{"__proto__":{"event":"MessageNew"}}')).toThrow(/missing "event"/);
  });
});

describe('presented secret', () => {
  it('X-Xaps-Secret, Bearer, and the password of Basic (the OX driver URL user:pass@)', () => {
    expect(presentedSecret({ 'x-xaps-secret': ' s1 ' })).toBe('s1');
    expect(presentedSecret({ authorization: 'Bearer s2' })).toBe('s2');
    expect(presentedSecret({ authorization: 'bearer   s2  ' })).toBe('s2');
    expect(presentedSecret({ authorization: `Basic ${Buffer.from('dovecot:s3:x').toString('base64')}` })).toBe('s3:x');
    expect(presentedSecret({ authorization: 'Basic !!!' })).toBeUndefined();
    expect(presentedSecret({ authorization: 'Digest x' })).toBeUndefined();
    expect(presentedSecret({})).toBeUndefined();
  });
});
