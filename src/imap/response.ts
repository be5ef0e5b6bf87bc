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

const SP = 0x20;
const CR = 0x0d;
const LF = 0x0a;
/** How far into a line the head is looked for. */
const HEAD_SCAN = 256;

/** Whitespace as a regular expression's `\s` sees a latin1-decoded byte. */
function isSpaceByte(c: number): boolean {
  return c === SP || (c >= 0x09 && c <= 0x0d) || c === 0xa0;
}

/** End of the word starting at `from` (exclusive), or -1 when it is empty or ends in other whitespace than SP/CR/LF. */
function wordEnd(line: Buffer, from: number, limit: number): number {
  let i = from;
  while (i < limit && !isSpaceByte(line[i])) i++;
  if (i === from) return -1;
  if (i < limit && line[i] !== SP && line[i] !== CR && line[i] !== LF) return -1;
  return i;
}

function isDigits(line: Buffer, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (line[i] < 0x30 || line[i] > 0x39) return false;
  return true;
}

/** The status word (any case) between `from` and `to`, or null. */
function statusWord(line: Buffer, from: number, to: number): Status | null {
  const n = to - from;
  if (n !== 2 && n !== 3 && n !== 7) return null;
  const word = line.toString('latin1', from, to).toUpperCase();
  return word === 'OK' || word === 'NO' || word === 'BAD' || word === 'BYE' || word === 'PREAUTH' ? word : null;
}

/**
 * What a response line is, from its first words: `tag SP word [SP word]`, each word ending at SP, CR, LF or the
 * end of the first HEAD_SCAN bytes; any other whitespace, or a missing word, makes it unknown.
 */
export function classifyResponse(line: Buffer): ResponseHead {
  if (line.length === 0) return UNKNOWN;
  if (line[0] === 0x2b /* + */) return CONTINUATION;
  const limit = Math.min(line.length, HEAD_SCAN);
  let tagEnd = 0;
  while (tagEnd < limit && !isSpaceByte(line[tagEnd])) tagEnd++;
  if (tagEnd === 0 || tagEnd >= limit || line[tagEnd] !== SP) return UNKNOWN;
  const w1Start = tagEnd + 1;
  const w1End = wordEnd(line, w1Start, limit);
  if (w1End < 0) return UNKNOWN;
  if (tagEnd === 1 && line[0] === 0x2a /* * */) {
    if (isDigits(line, w1Start, w1End)) {
      // `* 12 FETCH …`, `* 3 EXISTS`: the name follows the number
      const w2End = w1End < limit && line[w1End] === SP ? wordEnd(line, w1End + 1, limit) : -1;
      if (w2End > 0) return { kind: 'data', name: line.toString('latin1', w1End + 1, w2End).toUpperCase() };
      return { kind: 'data', name: line.toString('latin1', w1Start, w1End) };
    }
    const status = statusWord(line, w1Start, w1End);
    if (status) return { kind: 'status', status };
    return { kind: 'data', name: line.toString('latin1', w1Start, w1End).toUpperCase() };
  }
  const status = statusWord(line, w1Start, w1End);
  if (status === 'OK' || status === 'NO' || status === 'BAD') return { kind: 'tagged', tag: line.toString('latin1', 0, tagEnd), status };
  return UNKNOWN;
}

const UNKNOWN: ResponseHead = Object.freeze({ kind: 'unknown' });
const CONTINUATION: ResponseHead = Object.freeze({ kind: 'continuation' });

/**
 * `* <number> …` (EXISTS, EXPUNGE, FETCH, RECENT): the bulk of what a server sends, and nothing the proxy
 * looks into. A cheaper test than classifyResponse for the relay's per-line path.
 */
export function isNumberedData(line: Buffer): boolean {
  return line.length > 3 && line[0] === 0x2a && line[1] === SP && line[2] >= 0x30 && line[2] <= 0x39;
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
