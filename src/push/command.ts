/**
 * XAPPLEPUSHSERVICE as iOS and older clients send it (protocol notes §a):
 *   tag XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "<UUID>"
 *       "aps-device-token" "<64 hex>" "aps-subtopic" "com.apple.mobilemail"
 *       "mailboxes" ("INBOX" "Sent Messages")
 * Keys in any order and case, values as atom, quoted string or literal, unknown
 * keys ignored. Pure: bytes in, a registration request or a reason out.
 */
import { ArgReader, ParseError, valueText, type CommandPart, type Value } from '../imap/tokens.js';
import { decodeMailboxName, MailboxNameError } from './mutf7.js';

export const MAX_MAILBOXES = 100;
export const MAX_MAILBOX_NAME = 1024;

export interface PushRequest {
  version: 1 | 2;
  accountId: string;
  deviceToken: string; // lowercase hex
  subtopic: string;
  /** Mailboxes to push, INBOX first: the UTF-8 name and the form to echo to the client. */
  mailboxes: Array<{ name: string; wire: string }>;
}

export class PushCommandError extends Error {}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const TOKEN = /^[0-9a-f]{64}$/i;
const KNOWN = new Set(['aps-version', 'aps-account-id', 'aps-device-token', 'aps-subtopic', 'mailboxes']);

function scalar(key: string, v: Value): string {
  if (v.kind === 'nil') throw new PushCommandError(`${key} must not be NIL`);
  if (v.kind === 'list') throw new PushCommandError(`${key} must be a string, not a list`);
  return valueText(v)!;
}

function mailboxList(v: Value, utf8: boolean): PushRequest['mailboxes'] {
  if (v.kind === 'nil') throw new PushCommandError('mailboxes must not be NIL');
  if (v.kind !== 'list') throw new PushCommandError('mailboxes must be a parenthesized list');
  if (v.items.length > MAX_MAILBOXES) throw new PushCommandError(`mailboxes has more than ${MAX_MAILBOXES} names`);
  const out: PushRequest['mailboxes'] = [{ name: 'INBOX', wire: 'INBOX' }];
  const seen = new Set(['INBOX']);
  for (const item of v.items) {
    if (item.kind === 'nil') throw new PushCommandError('a mailbox name must not be NIL');
    if (item.kind === 'list') throw new PushCommandError('a mailbox name must be a string');
    const wire = valueText(item)!;
    if (wire.length === 0) throw new PushCommandError('a mailbox name must not be empty');
    if (Buffer.byteLength(wire) > MAX_MAILBOX_NAME) throw new PushCommandError('a mailbox name is too long');
    if (/[\r\n\0]/.test(wire)) throw new PushCommandError('a mailbox name must not contain CR, LF or NUL');
    let name: string;
    try {
      name = utf8 ? wire : decodeMailboxName(wire);
    } catch (err) {
      if (err instanceof MailboxNameError) throw new PushCommandError(err.message);
      throw err;
    }
    // the same rules for the name itself, not only its modified UTF-7 form ("&AA0-" is a CR)
    if (name.length === 0) throw new PushCommandError('a mailbox name must not be empty');
    if (/[\r\n\0]/.test(name)) throw new PushCommandError('a mailbox name must not contain CR, LF or NUL');
    if (name.toUpperCase() === 'INBOX') continue;
    if (seen.has(name)) continue;
    seen.add(name);
    out.push({ name, wire });
  }
  return out;
}

/** Parses a complete XAPPLEPUSHSERVICE command (tag and name included). */
export function parsePushCommand(parts: CommandPart[], opts: { utf8: boolean }): PushRequest {
  let args: Value[];
  try {
    const reader = new ArgReader(parts);
    reader.atom();
    reader.skipSpace();
    reader.atom();
    args = reader.rest();
  } catch (err) {
    if (err instanceof ParseError) throw new PushCommandError(err.message);
    throw err;
  }
  if (args.length === 0) throw new PushCommandError('missing arguments');
  if (args.length % 2 !== 0) throw new PushCommandError('arguments must be key/value pairs');
  const values = new Map<string, Value>();
  for (let i = 0; i < args.length; i += 2) {
    const keyValue = args[i];
    if (keyValue.kind !== 'atom' && keyValue.kind !== 'string') throw new PushCommandError('a key must be a string');
    const key = valueText(keyValue)!.toLowerCase();
    if (!KNOWN.has(key)) continue; // iOS may add keys such as "sender"
    if (values.has(key)) throw new PushCommandError(`duplicate key ${key}`);
    values.set(key, args[i + 1]);
  }
  const need = (key: string) => {
    const v = values.get(key);
    if (!v) throw new PushCommandError(`missing ${key}`);
    return scalar(key, v);
  };
  const versionText = need('aps-version');
  if (versionText !== '1' && versionText !== '2') throw new PushCommandError(`unknown aps-version ${JSON.stringify(versionText.slice(0, 16))}`);
  const version = Number(versionText) as 1 | 2;
  const accountId = need('aps-account-id');
  if (!UUID.test(accountId)) throw new PushCommandError('aps-account-id is not a UUID');
  const deviceToken = need('aps-device-token');
  if (!TOKEN.test(deviceToken)) throw new PushCommandError('aps-device-token is not 64 hex digits');
  const subtopic = need('aps-subtopic');
  if (subtopic.length === 0 || subtopic.length > 256 || /[\s"\\]/.test(subtopic)) {
    throw new PushCommandError('aps-subtopic is not valid');
  }
  const mailboxesValue = values.get('mailboxes');
  let mailboxes = [{ name: 'INBOX', wire: 'INBOX' }];
  if (mailboxesValue) {
    const listed = mailboxList(mailboxesValue, opts.utf8); // validated for either version
    if (version === 2) mailboxes = listed; // version 1 means INBOX only
  }
  return { version, accountId, deviceToken: deviceToken.toLowerCase(), subtopic, mailboxes };
}
