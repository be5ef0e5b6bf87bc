import { describe, expect, it } from 'vitest';
import { parsePushCommand, PushCommandError } from '../../../src/push/command.js';
import { encodeMailboxName } from '../../../src/push/mutf7.js';
import { renderReply } from '../../../src/push/handler.js';
import type { CommandPart } from '../../../src/imap/tokens.js';

const TOKEN = 'a1'.repeat(32);
const ACCOUNT = '0715A26B-1C2D-4E3F-8A9B-0C1D2E3F4A5B';
const IOS = `A7 XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "${ACCOUNT}" "aps-device-token" "${TOKEN}" "aps-subtopic" "com.apple.mobilemail" "mailboxes" ("INBOX" "Sent Messages" "Work/Projects")\r\n`;

const text = (s: string): CommandPart[] => [{ kind: 'text', data: Buffer.from(s, 'utf8') }];
const parse = (s: string, utf8 = false) => parsePushCommand(text(s), { utf8 });
const reason = (s: string) => {
  try {
    parse(s);
  } catch (err) {
    if (err instanceof PushCommandError) return err.message;
    throw err;
  }
  return 'accepted';
};

describe('XAPPLEPUSHSERVICE parser', () => {
  it('parses the iOS 26 form', () => {
    const r = parse(IOS);
    expect(r).toEqual({
      version: 2,
      accountId: ACCOUNT,
      deviceToken: TOKEN,
      subtopic: 'com.apple.mobilemail',
      mailboxes: [
        { name: 'INBOX', wire: 'INBOX' },
        { name: 'Sent Messages', wire: 'Sent Messages' },
        { name: 'Work/Projects', wire: 'Work/Projects' },
      ],
    });
  });

  it('accepts version 1 (INBOX only), atoms, other key order and case, and unknown keys', () => {
    expect(parse(`a XAPPLEPUSHSERVICE "aps-version" "1" "aps-account-id" "${ACCOUNT}" "aps-device-token" "${TOKEN}" "aps-subtopic" "com.apple.mobilemail"\r\n`).mailboxes).toEqual([
      { name: 'INBOX', wire: 'INBOX' },
    ]);
    const r = parse(`a XAPPLEPUSHSERVICE MAILBOXES (Notes inbox) APS-SUBTOPIC com.apple.mobilemail sender "x@y" aps-device-token ${TOKEN.toUpperCase()} aps-account-id ${ACCOUNT} aps-version 2\r\n`);
    expect(r.deviceToken).toBe(TOKEN);
    expect(r.mailboxes.map((m) => m.name)).toEqual(['INBOX', 'Notes']);
  });

  it('reads literals and decodes modified UTF-7, or takes UTF-8 after ENABLE UTF8=ACCEPT', () => {
    const parts: CommandPart[] = [
      { kind: 'text', data: Buffer.from(`a XAPPLEPUSHSERVICE aps-version {1}\r\n`) },
      { kind: 'literal', data: Buffer.from('2') },
      { kind: 'text', data: Buffer.from(` aps-account-id ${ACCOUNT} aps-device-token ${TOKEN} aps-subtopic com.apple.mobilemail mailboxes ("Entw&APw-rfe" {5+}\r\n`) },
      { kind: 'literal', data: Buffer.from('Notes') },
      { kind: 'text', data: Buffer.from(')\r\n') },
    ];
    const r = parsePushCommand(parts, { utf8: false });
    expect(r.mailboxes.map((m) => m.name)).toEqual(['INBOX', 'Entwürfe', 'Notes']);
    expect(r.mailboxes[1].wire).toBe('Entw&APw-rfe');
    expect(parse(IOS.replace('Sent Messages', 'Entwürfe'), true).mailboxes[1].name).toBe('Entwürfe');
  });

  it.each([
    [`a XAPPLEPUSHSERVICE\r\n`, /missing arguments/],
    [IOS.replace('"aps-version" "2" ', ''), /missing aps-version/],
    [IOS.replace('"aps-version" "2"', '"aps-version" "3"'), /unknown aps-version/],
    [IOS.replace(TOKEN, 'abc'), /not 64 hex/],
    [IOS.replace(TOKEN, 'z'.repeat(64)), /not 64 hex/],
    [IOS.replace(ACCOUNT, 'not-a-uuid'), /not a UUID/],
    [IOS.replace(`"${ACCOUNT}"`, 'NIL'), /must not be NIL/],
    [IOS.replace('("INBOX" "Sent Messages" "Work/Projects")', 'NIL'), /must not be NIL/],
    [IOS.replace('"aps-subtopic"', '"aps-version" "2" "aps-subtopic"'), /duplicate key aps-version/],
    [IOS.replace('"INBOX" "Sent Messages"', Array.from({ length: 101 }, (_, i) => `"m${i}"`).join(' ')), /more than 100/],
    [IOS.replace('"Sent Messages"', '"&Jjo"'), /modified UTF-7/],
    [IOS.replace('"mailboxes" ("INBOX" "Sent Messages" "Work/Projects")', '"mailboxes"'), /key\/value pairs/],
    [IOS.replace('("INBOX"', '("INBOX" ('), /unterminated list|a mailbox name must be a string/],
  ])('rejects malformed input with a reason: %#', (input, expected) => {
    expect(reason(input)).toMatch(expected);
  });

  it('renders the reply iOS parses', () => {
    expect(renderReply('A7', parse(IOS), 'com.apple.mobilemail.push.org.example').toString()).toBe(
      '* XAPPLEPUSHSERVICE "mailbox" "INBOX"\r\n' +
        '* XAPPLEPUSHSERVICE "mailbox" "Sent Messages"\r\n' +
        '* XAPPLEPUSHSERVICE "mailbox" "Work/Projects"\r\n' +
        '* XAPPLEPUSHSERVICE "aps-version" "2" "aps-topic" "com.apple.mobilemail.push.org.example"\r\n' +
        'A7 OK XAPPLEPUSHSERVICE completed.\r\n',
    );
  });

  it('rejects names whose modified UTF-7 decodes to CR, LF, NUL or nothing (fuzz counterexample)', () => {
    // found by test/fuzz/push-command.test.ts: the rule was checked on the wire form only
    expect(reason(IOS.replace('"Sent Messages"', '"&AA0-"'))).toMatch(/CR, LF or NUL/);
    expect(reason(IOS.replace('"Sent Messages"', '"&AAA-"'))).toMatch(/CR, LF or NUL/);
    expect(reason(IOS.replace('"Sent Messages"', '"&A-"'))).toMatch(/must not be empty/);
  });

  it('reads a literal that arrived in several reads, an empty literal and a streamed line (fuzz counterexample)', () => {
    // the session collects one part per framer segment; found by test/fuzz/push-command.test.ts
    const parts: CommandPart[] = [
      { kind: 'text', data: Buffer.from(`a XAPPLEPUSHSERVICE aps-version 2 aps-account-id ${ACCOUNT} aps-device-token ${TOKEN} `) },
      { kind: 'text', data: Buffer.from(`aps-subtopic com.apple.mobilemail sender {0}\r\n`) },
      { kind: 'text', data: Buffer.from(` mailboxes ({5}\r\n`) },
      { kind: 'literal', data: Buffer.from('No') },
      { kind: 'literal', data: Buffer.from('tes') },
      { kind: 'text', data: Buffer.from(' "Work")\r\n') },
    ];
    expect(parsePushCommand(parts, { utf8: false }).mailboxes.map((m) => m.name)).toEqual(['INBOX', 'Notes', 'Work']);
  });

  it('encodes modified UTF-7', () => {
    // round trip and agreement with RFC 3501: test/fuzz/push-command.test.ts
    expect(encodeMailboxName('Entwürfe & Co')).toBe('Entw&APw-rfe &- Co');
  });
});
