/** Modified UTF-7 mailbox names (RFC 3501 §5.1.3) to and from UTF-8. */

export class MailboxNameError extends Error {}

export function decodeMailboxName(name: string): string {
  let out = '';
  let i = 0;
  while (i < name.length) {
    const c = name[i];
    const code = name.charCodeAt(i);
    if (code < 0x20 || code > 0x7e) throw new MailboxNameError('mailbox name is not 7-bit modified UTF-7');
    if (c !== '&') {
      out += c;
      i++;
      continue;
    }
    const end = name.indexOf('-', i + 1);
    if (end < 0) throw new MailboxNameError('unterminated modified UTF-7 sequence in mailbox name');
    if (end === i + 1) {
      out += '&';
      i = end + 1;
      continue;
    }
    const b64 = name.slice(i + 1, end).replace(/,/g, '/');
    if (!/^[A-Za-z0-9+/]+$/.test(b64)) throw new MailboxNameError('invalid modified UTF-7 sequence in mailbox name');
    const bytes = Buffer.from(b64, 'base64');
    if (bytes.length % 2 !== 0) throw new MailboxNameError('invalid modified UTF-7 sequence in mailbox name');
    out += bytes.swap16().toString('utf16le');
    i = end + 1;
  }
  return out;
}

export function encodeMailboxName(name: string): string {
  let out = '';
  let pending = '';
  const flush = () => {
    if (!pending) return;
    const bytes = Buffer.from(pending, 'utf16le').swap16();
    out += `&${bytes.toString('base64').replace(/=+$/, '').replace(/\//g, ',')}-`;
    pending = '';
  };
  for (const ch of name) {
    const code = ch.codePointAt(0)!;
    if (code >= 0x20 && code <= 0x7e) {
      flush();
      out += ch === '&' ? '&-' : ch;
    } else {
      pending += ch;
    }
  }
  flush();
  return out;
}
