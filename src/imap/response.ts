/**
 * Classification of server responses by their first line, and capability
 * rewriting on every surface where a server announces capabilities: the greeting,
 * untagged `* CAPABILITY`, and the `[CAPABILITY …]` response code of any status
 * response (tagged OK after LOGIN, say). Pure functions over bytes.
 */

export type Status = 'OK' | 'NO' | 'BAD' | 'BYE' | 'PREAUTH';

export type ResponseHead =
  | { kind: 'continuation' }
  | { kind: 'tagged'; tag: string; status: 'OK' | 'NO' | 'BAD' }
  | { kind: 'status'; status: Status }
  | { kind: 'data'; name: string }
  | { kind: 'unknown' };

const STATUS = new Set(['OK', 'NO', 'BAD', 'BYE', 'PREAUTH']);

export function classifyResponse(line: Buffer): ResponseHead {
  if (line.length === 0) return { kind: 'unknown' };
  if (line[0] === 0x2b /* + */) return { kind: 'continuation' };
  const head = line.toString('latin1', 0, Math.min(line.length, 256));
  const m = /^(\S+) (\S+?)(?: (\S+?))?(?=[ \r\n]|$)/.exec(head);
  if (!m) return { kind: 'unknown' };
  const [, tag, w1, w2] = m;
  const word = w1.toUpperCase();
  if (tag === '*') {
    if (STATUS.has(word)) return { kind: 'status', status: word as Status };
    // `* 12 FETCH …`, `* 3 EXISTS`: the name follows the number
    if (/^\d+$/.test(w1) && w2) return { kind: 'data', name: w2.toUpperCase() };
    return { kind: 'data', name: word };
  }
  if (word === 'OK' || word === 'NO' || word === 'BAD') return { kind: 'tagged', tag, status: word };
  return { kind: 'unknown' };
}

export interface CapabilityPolicy {
  /** Announce XAPPLEPUSHSERVICE. */
  push: boolean;
  /** Announce STARTTLS (the proxy offers it on this client leg). */
  starttls: boolean;
  /** Announce LOGINDISABLED and hide plaintext mechanisms. */
  loginDisabled: boolean;
}

const PLAINTEXT_MECHS = new Set(['AUTH=PLAIN', 'AUTH=LOGIN']);

/**
 * The capability list the client should see. COMPRESS is removed because the
 * proxy would be blind inside a compressed stream; `*-PLUS` SASL mechanisms
 * cannot survive TLS termination; STARTTLS and LOGINDISABLED describe the
 * upstream leg, so they are replaced by what holds for the client leg.
 */
export function rewriteCapabilities(tokens: string[], policy: CapabilityPolicy): string[] {
  const seen = new Set<string>();
  const out: string[] = [];
  for (const token of tokens) {
    const upper = token.toUpperCase();
    if (seen.has(upper)) continue;
    if (upper.startsWith('COMPRESS=')) continue;
    if (upper.startsWith('AUTH=') && upper.endsWith('-PLUS')) continue;
    if (upper === 'STARTTLS' || upper === 'LOGINDISABLED' || upper === 'XAPPLEPUSHSERVICE') continue;
    if (policy.loginDisabled && PLAINTEXT_MECHS.has(upper)) continue;
    seen.add(upper);
    out.push(token);
  }
  if (policy.starttls) out.push('STARTTLS');
  if (policy.loginDisabled) out.push('LOGINDISABLED');
  if (policy.push) out.push('XAPPLEPUSHSERVICE');
  return out;
}

/** Tokens of a capability list as written by the server. */
export function parseCapabilityTokens(text: string): string[] {
  return text.split(' ').filter((t) => t.length > 0);
}

const UNTAGGED_CAPABILITY = /^\* CAPABILITY(?= |\r|\n|$)/i;
const CAPABILITY_CODE = /^(\S+ (?:OK|NO|BAD|BYE|PREAUTH) \[CAPABILITY)([^\]\r\n]*)\]/i;

/**
 * Rewrites the capability list in a complete response line if it has one.
 * Returns the same buffer when the line carries no capabilities or nothing changes.
 */
export function rewriteCapabilityLine(line: Buffer, policy: CapabilityPolicy): Buffer {
  // cheap test first: most lines are not capability lines
  if (line.length < 12 || line.length > 65536) return line;
  const head = line.toString('latin1', 0, Math.min(line.length, 160)).toUpperCase();
  if (!head.includes('CAPABILITY')) return line;
  const text = line.toString('latin1');
  const eol = text.endsWith('\r\n') ? '\r\n' : text.endsWith('\n') ? '\n' : '';
  const body = text.slice(0, text.length - eol.length);

  const untagged = UNTAGGED_CAPABILITY.exec(body);
  if (untagged) {
    const list = rewriteCapabilities(parseCapabilityTokens(body.slice(untagged[0].length)), policy);
    const rewritten = `${body.slice(0, untagged[0].length)} ${list.join(' ')}`;
    return rewritten === body ? line : Buffer.from(rewritten + eol, 'latin1');
  }
  const coded = CAPABILITY_CODE.exec(body);
  if (coded) {
    const list = rewriteCapabilities(parseCapabilityTokens(coded[2]), policy);
    const rewritten = `${coded[1]} ${list.join(' ')}]${body.slice(coded[0].length)}`;
    return rewritten === body ? line : Buffer.from(rewritten + eol, 'latin1');
  }
  return line;
}

/** The capability tokens announced by a line, or null if it announces none. */
export function capabilitiesOf(line: Buffer): string[] | null {
  const body = line.toString('latin1').replace(/\r?\n$/, '');
  const untagged = UNTAGGED_CAPABILITY.exec(body);
  if (untagged) return parseCapabilityTokens(body.slice(untagged[0].length));
  const coded = CAPABILITY_CODE.exec(body);
  if (coded) return parseCapabilityTokens(coded[2]);
  return null;
}
