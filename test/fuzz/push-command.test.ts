/**
 * XAPPLEPUSHSERVICE (src/push/command.ts, handler.ts) and modified UTF-7 (src/push/mutf7.ts)
 * under generated input. Commands go through the client framer in random chunks and are
 * collected segment by segment, as the session does, before they are parsed. Oracles:
 * - a command generated from a model (any key order and case, unknown keys, atoms, quoted
 *   strings and literals of every kind, version 1 or 2, modified UTF-7 or UTF-8 names) parses
 *   to that model, and the reply names every mailbox so that it reads back the same;
 * - arbitrary input is answered with the registration reply or one `tag BAD` line with a
 *   reason, never an exception, and what is registered always satisfies the documented rules;
 * - modified UTF-7 agrees with an independent encoder (RFC 3501 §5.1.3) and round-trips.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { Framer } from '../../src/imap/framer.js';
import { ArgReader, valueText, type CommandPart } from '../../src/imap/tokens.js';
import { silentLogger } from '../../src/ops/log.js';
import { parsePushCommand, PushCommandError, type PushRequest } from '../../src/push/command.js';
import { PushRegistrationHandler, renderReply } from '../../src/push/handler.js';
import { decodeMailboxName, encodeMailboxName, MailboxNameError } from '../../src/push/mutf7.js';
import type { RegistrationInput, RegistrationStore } from '../../src/store/types.js';
import { fuzzAssert, fuzzRuns } from '../helpers/fuzz.js';

// ------------------------------------------------------------------------------------------
// Wire building: text and literals, then framed and collected like the session does

type Chunk = string | { literal: Buffer; mark: Mark };

function render(chunks: readonly Chunk[]): Buffer {
  return Buffer.concat(
    chunks.map((c) => {
      if (typeof c === 'string') return Buffer.from(c, 'utf8');
      const n = c.literal.length;
      const head = { '{}': `{${n}}`, '{+}': `{${n}+}`, '~{}': `~{${n}}`, '~{+}': `~{${n}+}` }[c.mark];
      return Buffer.concat([Buffer.from(`${head}\r\n`), c.literal]);
    }),
  );
}

/**
 * The first complete command in `input`, as the session collects it: one part per framer
 * segment (a literal split across reads is several parts), every synchronizing literal granted.
 * Null when the input ends inside the command.
 */
function collect(input: Buffer, cuts: readonly number[]): CommandPart[] | null {
  const f = new Framer({ side: 'client', maxLine: 64 * 1024 });
  const points = [...new Set(cuts.map((c) => c % (input.length + 1)))].sort((a, b) => a - b);
  const parts: CommandPart[] = [];
  let prev = 0;
  for (const p of [...points, input.length]) {
    if (p > prev) f.push(input.subarray(prev, p));
    prev = Math.max(prev, p);
    for (;;) {
      const seg = f.next();
      if (!seg) {
        if (!f.awaitingContinuation) break;
        f.grantContinuation();
        continue;
      }
      parts.push({ kind: seg.type === 'literal' ? 'literal' : 'text', data: Buffer.from(seg.data) });
      if (seg.type === 'line' && seg.complete && !seg.literal) return parts;
    }
  }
  return null;
}

const MARKS = ['{}', '{+}', '~{}', '~{+}'] as const;
type Mark = (typeof MARKS)[number];
type Form = 'atom' | 'quoted' | 'literal';
const formArb = fc.constantFrom<Form>('atom', 'quoted', 'literal');
const markArb = fc.constantFrom(...MARKS);

const ATOM = /^[\x21-\x7e]+$/;
/** `s` written as an atom, a quoted string or a literal; falls back to the next form that can carry it. */
function str(s: string, form: Form, mark: Mark): Chunk[] {
  const atomOk = ATOM.test(s) && !/[()"{]/.test(s) && s[0] !== '~' && s.toUpperCase() !== 'NIL';
  if (form === 'atom' && atomOk) return [s];
  if (form !== 'literal' && !/[\r\n\0]/.test(s)) return [`"${s.replace(/[\\"]/g, (c) => `\\${c}`)}"`];
  return [{ literal: Buffer.from(s, 'utf8'), mark }];
}

/** A string with the form it is written in. */
const written = (s: fc.Arbitrary<string>) => fc.tuple(s, formArb, markArb).map(([v, form, mark]) => str(v, form, mark));

function join(items: readonly Chunk[][], sep = ' '): Chunk[] {
  const out: Chunk[] = [];
  items.forEach((item, i) => {
    if (i > 0) out.push(sep);
    out.push(...item);
  });
  return out;
}

const randomCase = (s: string) =>
  fc.array(fc.boolean(), { minLength: s.length, maxLength: s.length }).map((up) => [...s].map((c, i) => (up[i] ? c.toUpperCase() : c.toLowerCase())).join(''));

// ------------------------------------------------------------------------------------------
// Modified UTF-7, written here independently of src/push/mutf7.ts (RFC 3501 §5.1.3):
// printable US-ASCII stands for itself ("&" as "&-"), every run of other UTF-16 code units is
// "&" + their big-endian bytes in base64 with "," for "/" and no padding + "-".

function referenceEncode(name: string): string {
  let out = '';
  let run: number[] = [];
  const flush = () => {
    if (run.length === 0) return;
    const bytes = Buffer.alloc(run.length * 2);
    run.forEach((unit, i) => bytes.writeUInt16BE(unit, i * 2));
    out += `&${bytes.toString('base64').replace(/=+$/, '').split('/').join(',')}-`;
    run = [];
  };
  for (let i = 0; i < name.length; i++) {
    const unit = name.charCodeAt(i);
    if (unit >= 0x20 && unit <= 0x7e) {
      flush();
      out += unit === 0x26 ? '&-' : name[i];
    } else {
      run.push(unit);
    }
  }
  flush();
  return out;
}

// ------------------------------------------------------------------------------------------
// A model of valid commands

const hex = (n: number) => fc.string({ unit: fc.constantFrom(...'0123456789abcdefABCDEF'), minLength: n, maxLength: n });
const uuid = fc.tuple(hex(8), hex(4), hex(4), hex(4), hex(12)).map((p) => p.join('-'));
const subtopic = fc.oneof(
  fc.constantFrom('com.apple.mobilemail', 'com.apple.mail.push'),
  fc.string({ unit: fc.constantFrom(...'abcXYZ019._-+:/*%]()é€'), minLength: 1, maxLength: 256 }),
);

/** Mailbox names: plain, with "&", non-ASCII (BMP and beyond), controls other than CR/LF/NUL, and INBOX spelled any way. */
const mailboxName = fc
  .oneof(
    fc.constantFrom('INBOX', 'inbox', 'Inbox', 'Sent Messages', 'Entwürfe', 'A&B', '&', 'Ordner/Unterordner', '日本語', 'x🙂y', 'tab\there', 'NIL', '~x', '{5}', '"q"', 'b\\s'),
    fc.string({ unit: 'grapheme', minLength: 1, maxLength: 20 }),
    fc.string({ unit: fc.constantFrom('a', 'Z', ' ', '&', '-', '/', '.', 'ü', '€', '\u{1F600}', '\u0001', '(', ')'), minLength: 1, maxLength: 30 }),
  )
  // valid names only: not empty, no CR/LF/NUL, not the dotless ı that upper-cases to INBOX's I
  .filter((s) => s.length > 0 && !/[\r\n\0\u0131]/.test(s) && Buffer.byteLength(referenceEncode(s)) <= 1024 && Buffer.byteLength(s) <= 1024);

interface CommandModel {
  tag: string;
  name: string;
  utf8: boolean;
  version: 1 | 2;
  accountId: string;
  deviceToken: string;
  subtopic: string;
  mailboxes: string[] | null;
  /** key/value pairs in the order they are written, unknown keys included. */
  pairs: Chunk[][];
  eol: '\r\n' | '\n';
}

/** An arbitrary value for an unknown key: strings, NIL, and lists nested up to three deep. */
const anyValue: fc.Arbitrary<Chunk[]> = fc.letrec<{ value: Chunk[] }>((tie) => ({
  value: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    written(fc.string({ maxLength: 12 }).filter((s) => s.length > 0)),
    fc.constant<Chunk[]>(['NIL']),
    fc.array(tie('value'), { maxLength: 4 }).map((items): Chunk[] => ['(', ...join(items), ')']),
  ),
})).value;

const unknownKey = fc
  .oneof(fc.constantFrom('sender', 'aps-extra', 'x-client', 'APS-VERSION2', 'mailbox'), fc.stringMatching(/^[a-z][a-z0-9-]{0,12}$/))
  .filter((k) => !['aps-version', 'aps-account-id', 'aps-device-token', 'aps-subtopic', 'mailboxes'].includes(k.toLowerCase()));

/**
 * Valid commands; `oddItems` adds further (raw, possibly invalid) entries to the mailbox list of
 * a version 2 command, for the arbitrary-input property.
 */
const commandModelWith = (oddItems: fc.Arbitrary<Array<[number, Chunk[]]>>): fc.Arbitrary<CommandModel> => fc
  .record({
    odd: oddItems,
    tag: fc.stringMatching(/^[A-Za-z0-9.]{1,8}$/),
    name: randomCase('XAPPLEPUSHSERVICE'),
    utf8: fc.boolean(),
    version: fc.constantFrom<1 | 2>(1, 2, 2),
    versionForm: fc.tuple(formArb, markArb),
    accountId: uuid,
    deviceToken: hex(64),
    subtopic,
    mailboxes: fc.option(fc.array(mailboxName, { maxLength: 12 }).chain((names) => (names.length ? fc.shuffledSubarray([...names, ...names.slice(0, 2)], { minLength: 1 }) : fc.constant<string[]>([]))), {
      nil: null,
    }),
    forms: fc.array(fc.tuple(formArb, markArb), { minLength: 120, maxLength: 120 }),
    keyCase: fc.tuple(randomCase('aps-version'), randomCase('aps-account-id'), randomCase('aps-device-token'), randomCase('aps-subtopic'), randomCase('mailboxes')),
    unknown: fc.array(fc.tuple(unknownKey, formArb, markArb, anyValue), { maxLength: 3 }),
    order: fc.array(fc.nat(), { minLength: 8, maxLength: 8 }),
    eol: fc.constantFrom<'\r\n' | '\n'>('\r\n', '\n'),
  })
  .map((g): CommandModel => {
    let f = 0;
    const next = () => g.forms[f++ % g.forms.length]!;
    const s = (v: string) => {
      const [form, mark] = next();
      return str(v, form, mark);
    };
    const [kv, ka, kt, ks, km] = g.keyCase;
    const pairs: Chunk[][] = [
      [...s(kv), ' ', ...str(String(g.version), g.versionForm[0], g.versionForm[1])],
      [...s(ka), ' ', ...s(g.accountId)],
      [...s(kt), ' ', ...s(g.deviceToken)],
      [...s(ks), ' ', ...s(g.subtopic)],
    ];
    if (g.mailboxes) {
      const items = g.mailboxes.map((n) => s(g.utf8 ? n : encodeMailboxName(n)));
      for (const [at, item] of g.odd) items.splice(at % (items.length + 1), 0, item);
      pairs.push([...s(km), ' (', ...join(items), ')']);
    }
    for (const [key, form, mark, value] of g.unknown) pairs.push([...str(key, form, mark), ' ', ...value]);
    // a deterministic shuffle driven by the generated numbers
    const keyed = pairs.map((p, i) => ({ p, k: g.order[i % g.order.length]! * 16 + i }));
    keyed.sort((a, b) => a.k - b.k);
    return {
      tag: g.tag,
      name: g.name,
      utf8: g.utf8,
      version: g.version,
      accountId: g.accountId,
      deviceToken: g.deviceToken,
      subtopic: g.subtopic,
      mailboxes: g.mailboxes,
      pairs: keyed.map((x) => x.p),
      eol: g.eol,
    };
  });

const commandModel = commandModelWith(fc.constant([]));

/** What the parser must return for a model. */
function expectedRequest(m: CommandModel): PushRequest {
  const mailboxes = [{ name: 'INBOX', wire: 'INBOX' }];
  if (m.version === 2 && m.mailboxes) {
    const seen = new Set(['INBOX']);
    for (const name of m.mailboxes) {
      const canonical = /^inbox$/i.test(name) ? 'INBOX' : name;
      if (seen.has(canonical)) continue;
      seen.add(canonical);
      mailboxes.push({ name, wire: m.utf8 ? name : referenceEncode(name) });
    }
  }
  return { version: m.version, accountId: m.accountId, deviceToken: m.deviceToken.toLowerCase(), subtopic: m.subtopic, mailboxes };
}

function commandBytes(m: CommandModel): Buffer {
  return render([`${m.tag} ${m.name} `, ...join(m.pairs), m.eol]);
}

// ------------------------------------------------------------------------------------------
// Arbitrary input

const soupToken = fc.oneof(
  fc.constantFrom(
    '"aps-version"', 'aps-version', '1', '2', '"2"', '3', '"aps-account-id"', '0715A26B-1C2D-4E3F-8A9B-0C1D2E3F4A5B', 'aps-device-token',
    'a1'.repeat(32), 'aps-subtopic', 'com.apple.mobilemail', 'mailboxes', '(', ')', '("INBOX" "Sent")', '"INBOX"', 'NIL', '{5}\r\nabcde', '{0}\r\n',
    '~{3+}\r\nabc', '{2}\r\n\r\n', '"&AAA-"', '"&AA0-"', '&A-', '&AGE-', '&Jjo', '"&-"', '"a\\"b"', '"a\\b"', '\\', '"unterminated', '((((((((((x))))))))))', '""', '{1}\r\n\0',
  ),
  fc.string({ maxLength: 12 }),
  fc.uint8Array({ maxLength: 12 }).map((a) => Buffer.from(a).toString('latin1')),
  fc.nat({ max: 300 }).map((n) => `{${n}+}\r\n${'m'.repeat(n)}`),
);

const soup = fc.array(fc.tuple(soupToken, fc.constantFrom(' ', ' ', '')), { maxLength: 24 }).map((ts) => ts.map(([t, sep]) => t + sep).join(''));

/** A valid command's arguments with a few of its pieces replaced, removed, or with soup put in between. */
const mutated = fc
  .tuple(
    commandModel,
    fc.array(fc.tuple(fc.nat(), fc.constantFrom('replace', 'insert', 'delete'), soupToken), { minLength: 1, maxLength: 3 }),
  )
  .map(([m, edits]) => {
    const chunks: Chunk[] = join(m.pairs);
    const isSeparator = (c: Chunk) => typeof c === 'string' && /^[ ()]*$/.test(c);
    for (const [at, op, token] of edits) {
      // edit values, keys and names; separators stay (else nearly everything is "expected a space")
      const values = chunks.map((c, i) => (isSeparator(c) ? -1 : i)).filter((i) => i >= 0);
      const i = values.length ? values[at % values.length]! : 0;
      if (op === 'insert') chunks.splice(i, 0, token, ' ');
      else if (op === 'replace') chunks.splice(i, 1, token);
      else if (chunks.length) chunks.splice(i, 1);
    }
    return render(chunks).toString('latin1');
  });

/** Odd mailbox names: arbitrary text, modified UTF-7 lookalikes, literals of any bytes. */
const oddName = fc.oneof(
  written(fc.string({ maxLength: 10 })),
  written(fc.string({ unit: fc.constantFrom(...'AZaz09+,/&-= '), maxLength: 10 }).map((x) => `&${x}`)),
  written(fc.constantFrom('&AAA-', '&AA0-', '&AAo-', '&A-', '&AGE-', '&2D3eAA-', '&-', 'INBOX', '&AEkATgBCAE8AWA-', '\u0000')),
  fc.tuple(fc.uint8Array({ maxLength: 10 }), markArb).map(([a, mark]): Chunk[] => [{ literal: Buffer.from(a), mark }]),
);
const oddNames = commandModelWith(fc.array(fc.tuple(fc.nat(), oddName), { minLength: 1, maxLength: 3 })).map((m) =>
  render(join(m.pairs)).toString('latin1'),
);

/** A store that keeps what it is handed. */
function memoryStore(): { store: RegistrationStore; upserts: RegistrationInput[] } {
  const upserts: RegistrationInput[] = [];
  const store = {
    async upsert(input: RegistrationInput) {
      upserts.push(input);
      return { created: true, registration: { ...input, updatedAt: 0 } };
    },
  } as unknown as RegistrationStore;
  return { store, upserts };
}

// ------------------------------------------------------------------------------------------

describe('XAPPLEPUSHSERVICE properties', () => {
  it('parses a generated valid command to the model it was generated from, however it is chunked', () => {
    const prop = fc.property(commandModel, fc.array(fc.nat(), { maxLength: 12 }), (m, cuts) => {
      const parts = collect(commandBytes(m), cuts);
      expect(parts).not.toBeNull();
      const got = parsePushCommand(parts!, { utf8: m.utf8 });
      const want = expectedRequest(m);
      expect(got).toEqual(want);
      // the reply names each mailbox as a quoted string that reads back as its wire form
      const reply = renderReply(m.tag, got, 'com.apple.mobilemail.push.example').toString('utf8');
      const lines = reply.split('\r\n');
      expect(lines.pop()).toBe('');
      expect(lines.at(-1)).toBe(`${m.tag} OK XAPPLEPUSHSERVICE completed.`);
      const named = lines
        .filter((l) => l.startsWith('* XAPPLEPUSHSERVICE "mailbox" '))
        .map((l) => {
          const r = new ArgReader([{ kind: 'text', data: Buffer.from(`${l}\r\n`, 'utf8') }]);
          r.atom();
          r.skipSpace();
          r.atom();
          const values = r.rest();
          expect(values).toHaveLength(2);
          return valueText(values[1]!);
        });
      expect(named).toEqual(m.version === 2 ? want.mailboxes.map((x) => x.wire) : []);
    });
    fuzzAssert(prop, fuzzRuns(400));
  });

  it('answers arbitrary input with the registration or one BAD line with a reason, never an exception', async () => {
    const prop = fc.asyncProperty(
      fc.stringMatching(/^[A-Za-z0-9]{1,6}$/),
      fc.oneof(soup, mutated, oddNames),
      fc.boolean(),
      fc.array(fc.nat(), { maxLength: 6 }),
      async (tag, tail, utf8, cuts) => {
        const parts = collect(Buffer.concat([Buffer.from(`${tag} XAPPLEPUSHSERVICE `), Buffer.from(tail, 'latin1'), Buffer.from('\r\n')]), cuts);
        if (!parts) return; // the input announced a literal it never sent: the session is still waiting
        const { store, upserts } = memoryStore();
        const handler = new PushRegistrationHandler(() => 'com.apple.mobilemail.push.example', store, silentLogger());
        const reply = (await handler.handle({ tag, parts, user: 'alice', authenticated: true, utf8, sessionId: 's1' })).toString('utf8');
        const lines = reply.split('\r\n');
        expect(lines.pop()).toBe('');
        for (const l of lines) expect(l).not.toMatch(/[\r\n\0]/);
        if (upserts.length === 0) {
          expect(lines).toHaveLength(1);
          expect(lines[0]).toMatch(new RegExp(`^${tag} BAD XAPPLEPUSHSERVICE: \\S`));
          return;
        }
        expect(lines.at(-1)).toBe(`${tag} OK XAPPLEPUSHSERVICE completed.`);
        const [r] = upserts;
        // what is registered obeys the rules, whatever came in
        expect(r!.deviceToken).toMatch(/^[0-9a-f]{64}$/);
        expect(r!.accountId).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i);
        expect([1, 2]).toContain(r!.version);
        expect(r!.subtopic).toMatch(/^[^\s"\\]{1,256}$/u);
        const names = r!.mailboxes.map((x) => x.name);
        expect(names[0]).toBe('INBOX');
        expect(new Set(names).size).toBe(names.length);
        expect(names.length).toBeLessThanOrEqual(101);
        if (r!.version === 1) expect(names).toEqual(['INBOX']);
        for (const n of names.slice(1)) {
          expect(n.length).toBeGreaterThan(0);
          expect(n).not.toMatch(/[\r\n\0]/);
          expect(n.toUpperCase()).not.toBe('INBOX');
        }
      },
    );
    await fuzzAssert(prop, fuzzRuns(400));
  });

  it('never throws anything but PushCommandError from the parser', () => {
    const prop = fc.property(fc.string({ maxLength: 400 }), fc.boolean(), (tail, utf8) => {
      try {
        parsePushCommand([{ kind: 'text', data: Buffer.from(`a XAPPLEPUSHSERVICE ${tail}\r\n`, 'utf8') }], { utf8 });
      } catch (err) {
        if (!(err instanceof PushCommandError)) throw err;
        expect(err.message).not.toMatch(/[\r\n]/);
      }
    });
    fuzzAssert(prop, fuzzRuns(300));
  });
});

describe('modified UTF-7 properties', () => {
  it('encodes like the RFC 3501 reference and decodes back to the same string', () => {
    const prop = fc.property(fc.oneof(fc.string({ unit: 'binary', maxLength: 40 }), fc.string({ unit: 'grapheme', maxLength: 40 }), fc.string({ maxLength: 40 })), (s) => {
      const wire = encodeMailboxName(s);
      expect(wire).toBe(referenceEncode(s));
      expect(wire).toMatch(/^(?:[\x20-\x25\x27-\x7e]|&-|&[A-Za-z0-9+,]+-)*$/);
      expect(decodeMailboxName(wire)).toBe(s);
    });
    fuzzAssert(prop, fuzzRuns(500));
  });

  it('decodes arbitrary names to a string or refuses them with MailboxNameError', () => {
    const b64ish = fc.string({ unit: fc.constantFrom(...'AZaz09+,/&-=_ '), maxLength: 12 }).map((s) => `&${s}`);
    const prop = fc.property(fc.array(fc.oneof(fc.string({ maxLength: 8 }), b64ish, fc.constantFrom('&-', '&', '-', '&AAA-', '&A-', '&2D3eAA-')), { maxLength: 6 }), (pieces) => {
      const name = pieces.join('');
      try {
        const decoded = decodeMailboxName(name);
        expect(typeof decoded).toBe('string');
      } catch (err) {
        if (!(err instanceof MailboxNameError)) throw err;
      }
    });
    fuzzAssert(prop, fuzzRuns(500));
  });
});
