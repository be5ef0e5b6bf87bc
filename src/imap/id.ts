/**
 * The ID command (RFC 2971): the proxy's own first ID that tells Dovecot the real
 * client address, and the removal of `x-*` keys from the ID commands of clients,
 * which must not be able to claim another address.
 */
import { ArgReader, ParseError, quote, valueText, type CommandPart, type Value } from './tokens.js';

export interface ForwardedAddress {
  clientIp: string;
  clientPort: number;
  localIp: string;
  localPort: number;
  sessionId: string;
}

export const PROXY_ID_TAG = 'I';

/** `I ID (...)`: Dovecot trusts these keys from login_trusted_networks, in the first ID only. */
export function proxyIdCommand(a: ForwardedAddress): Buffer {
  const pairs: Array<[string, string]> = [
    ['x-originating-ip', a.clientIp],
    ['x-originating-port', String(a.clientPort)],
    ['x-connected-ip', a.localIp],
    ['x-connected-port', String(a.localPort)],
    ['x-session-ext-id', a.sessionId],
  ];
  const list = pairs.map(([k, v]) => `${quote(k)} ${quote(v)}`).join(' ');
  return Buffer.from(`${PROXY_ID_TAG} ID (${list})\r\n`, 'latin1');
}

function renderValue(v: Value): string {
  if (v.kind === 'nil') return 'NIL';
  const text = valueText(v) ?? '';
  return /[\r\n]/.test(text) ? 'NIL' : quote(text);
}

/**
 * A client's ID command without its `x-*` pairs. Returns null when the command is
 * unchanged (no such pair) or cannot be parsed (it is then relayed as it came, and
 * Dovecot ignores `x-*` keys after the proxy's own first ID anyway).
 */
export function stripForwardingKeys(tag: string, parts: CommandPart[]): Buffer | null {
  try {
    const reader = new ArgReader(parts);
    reader.atom(); // tag
    reader.skipSpace();
    reader.atom(); // ID
    const args = reader.rest();
    if (args.length !== 1 || args[0].kind !== 'list') return null;
    const items = args[0].items;
    if (items.length % 2 !== 0) return null;
    const kept: string[] = [];
    let stripped = false;
    for (let i = 0; i < items.length; i += 2) {
      const key = valueText(items[i]);
      if (key === null) return null;
      if (key.toLowerCase().startsWith('x-')) {
        stripped = true;
        continue;
      }
      kept.push(`${quote(key)} ${renderValue(items[i + 1])}`);
    }
    if (!stripped) return null;
    const list = kept.length === 0 ? 'NIL' : `(${kept.join(' ')})`;
    return Buffer.from(`${tag} ID ${list}\r\n`, 'utf8');
  } catch (err) {
    if (err instanceof ParseError) return null;
    throw err;
  }
}
