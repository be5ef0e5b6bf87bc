/**
 * Parsing of one complete, already framed IMAP command into values
 * (atoms, strings, NIL, parenthesized lists). Used only for the few commands the
 * proxy must understand (LOGIN, AUTHENTICATE, ID, XAPPLEPUSHSERVICE); everything
 * else is relayed without being parsed.
 */

/** A framed command: its line pieces and literal payloads, in order. */
export type CommandPart = { kind: 'text'; data: Buffer } | { kind: 'literal'; data: Buffer };

export type Value =
  | { kind: 'atom'; text: string }
  | { kind: 'string'; bytes: Buffer; form: 'quoted' | 'literal' }
  | { kind: 'nil' }
  | { kind: 'list'; items: Value[] };

export class ParseError extends Error {}

const SP = 0x20;
const DQUOTE = 0x22;
const BACKSLASH = 0x5c;
const LPAREN = 0x28;
const RPAREN = 0x29;
const CR = 0x0d;
const LF = 0x0a;
const LBRACE = 0x7b;
const TILDE = 0x7e;

function isAtomChar(c: number): boolean {
  return c > 0x20 && c < 0x7f && c !== LPAREN && c !== RPAREN && c !== DQUOTE && c !== LBRACE;
}

/** The text of a value as a JS string (UTF-8 for strings), or null for NIL and lists. */
export function valueText(v: Value): string | null {
  if (v.kind === 'atom') return v.text;
  if (v.kind === 'string') return v.bytes.toString('utf8');
  return null;
}

/**
 * The session collects a command segment by segment: a literal that arrived in several reads
 * comes as several literal parts, and an over-long line the framer streamed as several text
 * parts. Each is joined back into one part here, so a literal is the one part after its line.
 */
function joinParts(parts: readonly CommandPart[]): CommandPart[] {
  const groups: Array<{ kind: CommandPart['kind']; data: Buffer[] }> = [];
  for (const part of parts) {
    const last = groups[groups.length - 1];
    const tail = last?.data[last.data.length - 1];
    if (last && last.kind === part.kind && (part.kind === 'literal' || (tail && tail[tail.length - 1] !== LF))) {
      last.data.push(part.data);
    } else {
      groups.push({ kind: part.kind, data: [part.data] });
    }
  }
  return groups.map((g) => ({ kind: g.kind, data: g.data.length === 1 ? g.data[0]! : Buffer.concat(g.data) }));
}

export class ArgReader {
  private partIndex = 0;
  private pos = 0;
  private readonly parts: CommandPart[];

  constructor(parts: readonly CommandPart[]) {
    this.parts = joinParts(parts);
  }

  private get text(): Buffer | null {
    const part = this.parts[this.partIndex];
    return part && part.kind === 'text' ? part.data : null;
  }

  private peek(): number {
    const t = this.text;
    if (!t || this.pos >= t.length) return -1;
    return t[this.pos];
  }

  /** True when only the line ending is left. */
  atEnd(): boolean {
    const c = this.peek();
    return c === -1 || c === CR || c === LF;
  }

  skipSpace(): boolean {
    let skipped = false;
    while (this.peek() === SP) {
      this.pos++;
      skipped = true;
    }
    return skipped;
  }

  /** Reads the next word made of atom characters (tags, command names, keys). */
  atom(): string {
    const t = this.text;
    if (!t) throw new ParseError('expected an atom');
    const start = this.pos;
    while (this.pos < t.length && isAtomChar(t[this.pos])) this.pos++;
    if (this.pos === start) throw new ParseError('expected an atom');
    return t.toString('latin1', start, this.pos);
  }

  /** Reads one value: atom, NIL, quoted string, literal, or a parenthesized list. */
  value(depth = 0): Value {
    if (depth > 8) throw new ParseError('lists nested too deeply');
    const c = this.peek();
    if (c === -1 || c === CR || c === LF) throw new ParseError('missing argument');
    if (c === DQUOTE) return this.quoted();
    if (c === LPAREN) return this.list(depth);
    if (c === LBRACE || c === TILDE) return this.literal();
    const text = this.atom();
    if (text.toUpperCase() === 'NIL') return { kind: 'nil' };
    return { kind: 'atom', text };
  }

  private quoted(): Value {
    const t = this.text!;
    this.pos++; // opening quote
    let runStart = this.pos;
    const chunks: Buffer[] = [];
    while (this.pos < t.length) {
      const c = t[this.pos];
      if (c === DQUOTE) {
        chunks.push(t.subarray(runStart, this.pos));
        this.pos++;
        return { kind: 'string', bytes: Buffer.concat(chunks), form: 'quoted' };
      }
      if (c === CR || c === LF) break;
      if (c === BACKSLASH) {
        const n = t[this.pos + 1];
        if (n !== DQUOTE && n !== BACKSLASH) throw new ParseError('invalid escape in quoted string');
        chunks.push(t.subarray(runStart, this.pos));
        chunks.push(Buffer.from([n]));
        this.pos += 2;
        runStart = this.pos;
        continue;
      }
      this.pos++;
    }
    throw new ParseError('unterminated quoted string');
  }

  private literal(): Value {
    const t = this.text!;
    const m = /^~?\{(\d{1,15})\+?\}\r?\n$/.exec(t.toString('latin1', this.pos));
    if (!m) throw new ParseError('malformed literal');
    const size = Number(m[1]);
    const next = this.parts[this.partIndex + 1];
    if (size === 0 && next?.kind !== 'literal') {
      // `{0}`: the framer emits no literal segment, the command goes on with the next line
      this.partIndex += 1;
      this.pos = 0;
      return { kind: 'string', bytes: Buffer.alloc(0), form: 'literal' };
    }
    if (!next || next.kind !== 'literal' || next.data.length !== size) {
      throw new ParseError('literal data missing');
    }
    this.partIndex += 2;
    this.pos = 0;
    return { kind: 'string', bytes: next.data, form: 'literal' };
  }

  private list(depth: number): Value {
    this.pos++; // (
    const items: Value[] = [];
    for (;;) {
      const hadSpace = this.skipSpace();
      const c = this.peek();
      if (c === RPAREN) {
        this.pos++;
        return { kind: 'list', items };
      }
      if (c === -1 || c === CR || c === LF) throw new ParseError('unterminated list');
      if (items.length > 0 && !hadSpace) throw new ParseError('expected a space between list items');
      items.push(this.value(depth + 1));
      if (items.length > 10_000) throw new ParseError('list too long');
    }
  }

  /** Reads values separated by spaces up to the end of the command. */
  rest(): Value[] {
    const values: Value[] = [];
    for (;;) {
      const hadSpace = this.skipSpace();
      if (this.atEnd()) return values;
      if (values.length > 0 && !hadSpace) throw new ParseError('expected a space between arguments');
      values.push(this.value());
    }
  }
}

/** Tag and command name of a command's first line, or null when it has none. */
export function commandHead(line: Buffer): { tag: string; name: string } | null {
  const limit = Math.min(line.length, 1024);
  const sp1 = line.indexOf(SP);
  if (sp1 <= 0 || sp1 >= limit) return null;
  let end = sp1 + 1;
  while (end < limit && line[end] !== SP && line[end] !== CR && line[end] !== LF) end++;
  if (end === sp1 + 1) return null;
  return {
    tag: line.toString('latin1', 0, sp1),
    name: line.toString('latin1', sp1 + 1, end).toUpperCase(),
  };
}

/** Quotes a string for IMAP output (quoted form; callers ensure no CR/LF). */
export function quote(s: string): string {
  return `"${s.replace(/[\\"]/g, (c) => `\\${c}`)}"`;
}
