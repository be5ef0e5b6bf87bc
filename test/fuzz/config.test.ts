/**
 * The configuration loader (src/config/load.ts from options.ts and values.ts) under generated
 * input. Generators come from OPTIONS by value kind, so a new option is covered when it exists.
 * Oracles:
 * - any value for any option, as a flag (both forms), an environment variable or a YAML value
 *   of any type, loads or raises a one-line ConfigError that names the option, never anything
 *   else, and a secret never shows in the message; arbitrary argv and YAML documents likewise;
 * - valid values given in random sources land as their model, by flag > env > file > default,
 *   with the origin of the source that won;
 * - a valid configuration printed by `config check` reads back as the same configuration, and
 *   the printout holds no secret.
 */
import fc from 'fast-check';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { z } from 'zod';
import { selfSignedCertificate } from '../../src/cert/selfsigned.js';
import type { CliIO } from '../../src/cli/args.js';
import { runConfigCheck } from '../../src/cli/config-check.js';
import {
  camelCase,
  COMMANDS,
  ConfigError,
  configOrigins,
  envVarName,
  getOption,
  loadConfig,
  optionNames,
  type Command,
  type OptionName,
} from '../../src/config/index.js';
import type { ValueKind } from '../../src/config/values.js';
import { fuzzAssert, fuzzRuns } from '../helpers/fuzz.js';

// Every load builds the schema of its command afresh, and zod compiles each new object schema
// to a function on first use: that costs more than the parsing it speeds up, once per case.
// Interpreted (zod's jitless mode, same results) the loader runs about twice as fast here.
z.config({ jitless: true });

// ------------------------------------------------------------------------------------------
// Files the generated values point at

let dir: string; // cwd of flags and environment
let conf: string; // where config files are written (their relative paths resolve here)

/** Readable files whose first line is not empty (fine for file and secret-file options). */
const FILES = ['plain.txt', 'with space.pem', 'hash#1.pem', 'ünï.pem', "quote'd.pem", 'colon: x.pem', '- dash.pem', '[br].pem', 'sub/inner.pem'];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'xaps-fuzz-config-'));
  conf = join(dir, 'conf');
  mkdirSync(conf);
  mkdirSync(join(dir, 'sub'));
  mkdirSync(join(dir, 'a dir'));
  for (const f of FILES) writeFileSync(join(dir, f), 'Sekret-in-file\nmore\n');
  writeFileSync(join(dir, 'empty.txt'), '');
  const tls = selfSignedCertificate({ commonName: 'xaps.fuzz' });
  writeFileSync(join(dir, 'cert.pem'), tls.certPem);
  writeFileSync(join(dir, 'key.pem'), tls.keyPem);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

// ------------------------------------------------------------------------------------------
// Valid values with their model

interface Valid {
  /** As a flag or environment value. */
  text: string;
  /** As a YAML value, the way one would write it (a number where it is one). */
  yaml: unknown;
  /** The loaded value; `base` is the directory relative paths resolve against. */
  expect: (base: string) => unknown;
}

const pad = (s: fc.Arbitrary<string>) => fc.tuple(fc.constantFrom('', ' ', '  '), s, fc.constantFrom('', ' ', '\t')).map(([a, v, b]) => a + v + b);
const anyCase = (s: string) => fc.array(fc.boolean(), { minLength: s.length, maxLength: s.length }).map((u) => [...s].map((c, i) => (u[i] ? c.toUpperCase() : c.toLowerCase())).join(''));

const LABEL = /^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,10}[A-Za-z0-9_])?$/;
const hostname = fc
  .tuple(fc.array(fc.stringMatching(LABEL), { minLength: 1, maxLength: 4 }), fc.boolean())
  .map(([labels, dot]) => labels.join('.') + (dot ? '.' : ''))
  .filter((h) => !/^[0-9.]+$/.test(h));
const port = fc.oneof(fc.integer({ min: 1, max: 65535 }), fc.constantFrom(1, 143, 993, 65535));

const hostPortValid: fc.Arbitrary<Valid> = fc
  .tuple(fc.oneof(fc.ipV4().map((h) => ({ h, text: h })), fc.ipV6().map((h) => ({ h, text: `[${h}]` })), hostname.map((h) => ({ h, text: h }))), port, fc.boolean())
  .chain(([host, p, zeros]) =>
    pad(fc.constant(`${host.text}:${zeros ? String(p).padStart(5, '0') : p}`)).map((text) => ({ text, yaml: text.trim(), expect: () => ({ host: host.h, port: p }) })),
  );

const hostNameValid: fc.Arbitrary<Valid> = fc
  .oneof(fc.ipV4(), fc.ipV6(), hostname)
  .chain((h) => pad(fc.constant(h)).map((text) => ({ text, yaml: h, expect: () => h })));

const UNIT_MS: Record<string, number> = { d: 86_400_000, h: 3_600_000, m: 60_000, s: 1000, ms: 1 };
/** `500ms`, `1h30m`, `1.5s`, a bare number of seconds (text, or a YAML number); the model in ms. */
const durationValid = (min: number): fc.Arbitrary<Valid> =>
  fc
    .oneof(
      fc.array(fc.tuple(fc.nat({ max: 500 }), fc.constantFrom('d', 'h', 'm', 's', 'ms'), fc.boolean()), { minLength: 1, maxLength: 4 }).map((parts) => {
        const text = parts.map(([n, u, half]) => `${n}${half && u !== 'ms' ? '.5' : ''}${u}`).join('');
        const ms = parts.reduce((sum, [n, u, half]) => sum + (n + (half && u !== 'ms' ? 0.5 : 0)) * UNIT_MS[u]!, 0);
        return { text, yaml: text, ms };
      }),
      fc.tuple(fc.nat({ max: 100_000 }), fc.boolean(), fc.boolean()).map(([n, half, asNumber]) => {
        const seconds = n + (half ? 0.5 : 0);
        return { text: String(seconds), yaml: asNumber ? seconds : String(seconds), ms: seconds * 1000 };
      }),
    )
    .filter((d) => d.ms >= min)
    .chain((d) => pad(fc.constant(d.text)).map((text) => ({ text, yaml: d.yaml, expect: () => d.ms })));

const booleanValid: fc.Arbitrary<Valid> = fc
  .tuple(fc.boolean(), fc.nat({ max: 3 }))
  .chain(([value, form]) =>
    pad(anyCase((value ? ['true', '1', 'yes', 'on'] : ['false', '0', 'no', 'off'])[form]!)).map((text) => ({
      text,
      yaml: form === 0 ? value : form === 1 ? Number(value) : text.trim(),
      expect: () => value,
    })),
  );

const integerValid = (min: number, max: number): fc.Arbitrary<Valid> =>
  fc
    .tuple(fc.oneof(fc.integer({ min, max }), fc.constantFrom(min, max)), fc.nat({ max: 2 }), fc.boolean())
    .chain(([n, zeros, asNumber]) =>
      pad(fc.constant(n >= 0 ? '0'.repeat(zeros) + String(n) : String(n))).map((text) => ({ text, yaml: asNumber ? n : text.trim(), expect: () => n })),
    );

/** `apns-priority: 10` is a YAML number: one writes it so. */
const enumValid = (values: readonly string[]): fc.Arbitrary<Valid> =>
  fc
    .constantFrom(...values)
    .chain((v) => pad(anyCase(v)).map((text) => ({ text, yaml: /^\d+$/.test(v) ? Number(v) : text.trim(), expect: () => v })));

/** Free text: anything but blank, one line (the printed configuration must read back). */
const freeText = fc
  .oneof(
    fc.string({ unit: 'grapheme', minLength: 1, maxLength: 20 }),
    fc.constantFrom('alice', 'yes', 'null', '~', '123', '0x1F', '1e3', '.inf', '#hash', 'a: b', '- x', '[x]', '{y}', '*', '&a', '!tag', '"q"', "'s'", '%', '@', '`'),
    fc.constantFrom('a\u2028b', 'a\u0085b', 'a\tb', 'nul\u0000x', 'bell\u0007', 'a #b', ' # x'),
  )
  .filter((s) => s.trim() !== '' && !/[\r\n]/.test(s));
const textValid: fc.Arbitrary<Valid> = pad(freeText).map((text) => ({ text, yaml: text.trim(), expect: () => text.trim() }));
/** Secret text carries a marker, so that the tests can tell it never shows. */
const secretTextValid: fc.Arbitrary<Valid> = pad(freeText.map((t) => `Sekret-${t}`)).map((text) => ({ text, yaml: text.trim(), expect: () => text.trim() }));

/** Text options with a check of their own: what each accepts. */
const CHECKED: Partial<Record<OptionName, fc.Arbitrary<string>>> = {
  'apns-topic': fc
    .tuple(fc.constantFrom('com.apple.mobilemail.push.', 'com.apple.mail.'), fc.stringMatching(/^[A-Za-z0-9.-]{1,20}$/))
    .map(([p, s]) => p + s),
  'apns-endpoint': fc.oneof(
    fc.constantFrom('production', 'sandbox'),
    fc.tuple(hostname, fc.option(port, { nil: undefined }), fc.boolean()).map(([h, p, slash]) => `https://${h}${p ? `:${p}` : ''}${slash ? '/' : ''}`),
  ),
  'cert-service-url': fc
    .tuple(fc.constantFrom('http', 'https'), hostname, fc.stringMatching(/^(\/[A-Za-z0-9._~-]{0,8}){0,3}$/))
    .map(([s, h, p]) => `${s}://${h}${p}`),
};

/**
 * A fixture file, relative (resolved against the source's base: cwd, or the config file's
 * directory, where the fixtures are one level up) or absolute (`@ABS:`, see materialize).
 */
const fileValid = (names: readonly string[]): fc.Arbitrary<Valid> =>
  fc.tuple(fc.constantFrom(...names), fc.constantFrom('', './', '@ABS:')).map(([name, form]): Valid => {
    if (form === '@ABS:') return { text: `@ABS:${name}`, yaml: `@ABS:${name}`, expect: () => undefined };
    return { text: form + name, yaml: `../${name}`, expect: (base: string) => resolve(base, base === conf ? `../${name}` : form + name) };
  });

/** Directories need not exist; existing ones are fine too. */
const directoryValid: fc.Arbitrary<Valid> = pad(fc.constantFrom('state', 'a dir', 'sub', 'new/deeper', '/var/lib/xaps-fuzz', '../up', 'ünï dir')).map((text) => ({
  text,
  yaml: text.trim(),
  expect: (base: string) => resolve(base, text.trim()),
}));

const redisValid: fc.Arbitrary<Valid> = fc
  .oneof(
    fc.tuple(fc.constantFrom('redis', 'rediss'), fc.option(fc.constantFrom(':Sekret-pw@', 'user:Sekret-pw@'), { nil: '' }), hostname, fc.option(port, { nil: undefined }), fc.option(fc.nat({ max: 15 }), { nil: undefined })).map(
      ([s, auth, h, p, db]) => `${s}://${auth}${h}${p ? `:${p}` : ''}${db !== undefined ? `/${db}` : ''}`,
    ),
    fc.tuple(fc.array(hostname, { minLength: 1, maxLength: 3 }), fc.stringMatching(/^[a-z]{1,8}$/)).map(([hs, m]) => `redis+sentinel://${hs.join(',')}/${m}`),
    fc.array(hostname, { minLength: 1, maxLength: 3 }).map((hs) => `rediss+cluster://:Sekret-pw@${hs.join(',')}`),
  )
  .chain((u) => pad(fc.constant(u)).map((text) => ({ text, yaml: u, expect: () => u })));

const SECRET_FILES = FILES; // every fixture file has a non-empty first line

/** A valid-value generator for every kind; `Record` makes a new kind a type error until it has one. */
const BY_KIND: Record<ValueKind, (name: OptionName) => fc.Arbitrary<Valid> | undefined> = {
  'host-port': () => hostPortValid,
  'host-name': () => hostNameValid,
  duration: (name) => durationValid(getOption(name)!.type.limits?.min ?? 1),
  boolean: () => booleanValid,
  integer: (name) => integerValid(getOption(name)!.type.limits!.min, getOption(name)!.type.limits!.max!),
  enum: (name) => enumValid(getOption(name)!.type.values!),
  text: (name) => (getOption(name)!.secret ? secretTextValid : textValid),
  'checked-text': (name) => CHECKED[name]?.chain((v) => pad(fc.constant(v)).map((text) => ({ text, yaml: v, expect: () => v }))),
  file: () => fileValid(FILES),
  'secret-file': () => fileValid(SECRET_FILES),
  directory: () => directoryValid,
  'redis-url': () => redisValid,
};

/** Options whose valid values depend on other options (RULES): generated together, below. */
const RULED = new Set<string>([
  'listen', 'listen-tls', 'tls-cert', 'tls-key', 'apns-cert', 'apns-key', 'apns-p12', 'cert-vendor-cert', 'cert-vendor-key', 'cert-apple-id', 'cert-password-file',
]);

const VALID = new Map<OptionName, fc.Arbitrary<Valid>>();
for (const name of optionNames()) {
  const gen = BY_KIND[getOption(name)!.type.kind](name);
  if (gen) VALID.set(name, gen);
}

/** `@ABS:name` stands for the absolute path of fixture `name` (known only once the directory exists). */
function materialize(v: Valid): Valid {
  if (!v.text.startsWith('@ABS:')) return v;
  const abs = join(dir, v.text.slice('@ABS:'.length));
  return { text: abs, yaml: abs, expect: () => abs };
}

// ------------------------------------------------------------------------------------------
// Putting values into sources

type Source = 'flag' | 'flag=' | 'env' | 'file';
interface Assignment {
  name: OptionName;
  source: Source;
  text: string;
  yaml: unknown;
}

interface Input {
  argv: string[];
  env: Record<string, string>;
  cwd: string;
}

let fileCounter = 0;
/** argv, environment and (when any value goes there) a config file for the assignments, in order. */
function sources(assignments: readonly Assignment[], prefix: readonly string[] = [], configVia: 'flag' | 'env' = 'flag'): Input {
  const argv = [...prefix];
  const env: Record<string, string> = {};
  const file: Record<string, unknown> = {};
  for (const a of assignments) {
    const spec = getOption(a.name)!;
    if (a.source === 'env') env[envVarName(a.name)] = a.text;
    else if (a.source === 'file') file[a.name] = a.yaml;
    else if (spec.type.arity === 'switch' && a.source === 'flag' && /^\s*(true|1|yes|on)\s*$/i.test(a.text)) argv.push(`--${a.name}`);
    else if (a.source === 'flag=' || spec.type.arity === 'switch' || (a.text.startsWith('--') && a.text.length > 2)) argv.push(`--${a.name}=${a.text}`);
    else argv.push(`--${a.name}`, a.text);
  }
  if (Object.keys(file).length > 0) {
    const path = join(conf, `c${fileCounter++ % 8}.yaml`);
    writeFileSync(path, stringify(file));
    if (configVia === 'env') env.XAPS_CONFIG = path;
    else argv.push('--config', path);
  }
  return { argv, env, cwd: dir };
}

const DEFAULTS = new Map<Command, Record<string, unknown>>();
/** What a command's options are when nothing sets them (serve: with the two it requires). */
function defaultsOf(command: Command): Record<string, unknown> {
  let d = DEFAULTS.get(command);
  if (!d) {
    d = loadConfig({ argv: baseArgv(command, new Set()), env: {}, cwd: dir, command }) as unknown as Record<string, unknown>;
    DEFAULTS.set(command, d);
  }
  return d;
}

/** The ConfigError `fn` throws, or null when it returns; anything else thrown fails the property. */
function configError(fn: () => unknown): ConfigError | null {
  try {
    fn();
    return null;
  } catch (err) {
    if (err instanceof ConfigError) return err;
    throw err;
  }
}

const sourceArb = fc.constantFrom<Source>('flag', 'flag=', 'env', 'file');
const commandArb = fc.oneof({ weight: 5, arbitrary: fc.constant<Command>('serve') }, { weight: 1, arbitrary: fc.constantFrom(...COMMANDS) });

/** Minimal valid serve flags, leaving out the options being fuzzed. */
function baseArgv(command: Command, without: ReadonlySet<string>): string[] {
  if (command !== 'serve') return [];
  const out: string[] = [];
  if (!without.has('listen') && !without.has('listen-tls')) out.push('--listen', '127.0.0.1:1143');
  if (!without.has('upstream')) out.push('--upstream', 'imap.example.net:143');
  return out;
}

// ------------------------------------------------------------------------------------------
// Arbitrary values

/** Strings anywhere near what options take, and anything at all. */
const garbageText = fc.oneof(
  fc.string({ maxLength: 30 }),
  fc.string({ unit: 'binary', maxLength: 20 }),
  fc.constantFrom(
    '', ' ', '-1', '0', '1e3', 'NaN', '0x10', '99999999999999999999', '[::1]', ':0', 'host:', 'host:65536', '[::1:143', '1.2.3.4.5:1', '30x', '1h-5m', '.5s',
    'redis://', 'redis://u@h', 'redis://:Sekret-pw@bad host', 'rediss+cluster://:Sekret-pw@', 'https://', 'com.apple', 'yes please', 'TRUE!', '--', '--x', '\u0000', 'a\nb', '\r\n',
    'plain.txt/inside', 'empty.txt', 'sub', 'a dir', 'missing.pem',
  ),
  fc.constantFrom(...VALID.values()).chain((g) => g).map((v) => v.text),
  fc.tuple(fc.constantFrom(...VALID.values()).chain((g) => g), fc.nat(), fc.string({ maxLength: 2 })).map(([v, at, s]) => {
    const i = at % (v.text.length + 1);
    return v.text.slice(0, i) + s + v.text.slice(i + (at % 2));
  }),
);
/** YAML values of any type. */
const garbageYaml = fc.oneof(garbageText, fc.jsonValue({ maxDepth: 2 }), fc.constantFrom<unknown>(null, true, false, 0, -1, 1.5, 1e21, [], {}, ['Sekret-pw'], { a: 1 }));

// ------------------------------------------------------------------------------------------

describe('config loader properties', () => {
  it('loads or raises a one-line ConfigError naming the option, for any value of any option from any source', () => {
    const prop = fc.property(
      commandArb,
      fc.constantFrom(...optionNames()),
      sourceArb,
      fc.boolean(),
      fc.oneof(garbageText.map((t) => ({ text: t, yaml: t as unknown })), garbageYaml.map((y) => ({ text: typeof y === 'string' ? y : JSON.stringify(y), yaml: y }))),
      (command, name, source, viaEnvConfig, value) => {
        const assignment: Assignment = { name, source, text: value.text, yaml: value.yaml };
        const input = sources([assignment], baseArgv(command, new Set([name])), viaEnvConfig ? 'env' : 'flag');
        const err = configError(() => loadConfig({ ...input, command }));
        if (!err) return;
        expect(err.message).not.toMatch(/[\r\n]/);
        expect(err.message).not.toContain('Sekret-in-file'); // a secret file's content
        // a secret text is never shown, nor a URL's password
        const spec = getOption(name)!;
        if (spec.secret && (spec.type.kind === 'text' || /:Sekret[^@]*@/.test(value.text))) expect(err.message).not.toContain('Sekret');
        expect(err.option).toBeDefined();
        expect(err.message.startsWith(`--${err.option}:`) || err.message.includes(`"${err.option}"`)).toBe(true);
        expect(err.message.includes(`--${name}`) || err.message.includes(`"${name}"`)).toBe(true);
      },
    );
    fuzzAssert(prop, fuzzRuns(300));
  });

  it('loads or raises a ConfigError for arbitrary command lines and config files', () => {
    const token = fc.oneof(
      fc.constantFrom(...optionNames()).map((n) => `--${n}`),
      fc.tuple(fc.constantFrom(...optionNames()), garbageText).map(([n, v]) => `--${n}=${v}`),
      garbageText,
      fc.constantFrom('--', '-', '-x', '--=', '--=x', '--nope', '---listen', '--Listen', 'serve'),
    );
    const yamlDoc = fc.oneof(
      fc.dictionary(fc.oneof(fc.constantFrom(...optionNames()), fc.string({ maxLength: 8 })), garbageYaml, { maxKeys: 4 }).map((o) => stringify(o)),
      fc.jsonValue({ maxDepth: 2 }).map((v) => stringify(v)),
      fc.array(fc.constantFrom('listen: 1.2.3.4:5\n', 'upstream:', ' x: y\n', '- a\n', '{', '}', '[', ']', ': ', '"', "'", '#', '&a ', '*a ', '!!binary ', '\t', '\n', 'listen: [\n', '? k\n', '---\n', '...\n'), { maxLength: 10 }).map((p) => p.join('')),
      fc.string({ maxLength: 60 }),
    );
    const prop = fc.property(commandArb, fc.array(token, { maxLength: 8 }), fc.option(yamlDoc, { nil: undefined }), (command, argv, doc) => {
      const full = [...argv];
      if (doc !== undefined) {
        const path = join(conf, `doc${fileCounter++ % 8}.yaml`);
        writeFileSync(path, doc);
        full.push('--config', path);
      }
      const err = configError(() => loadConfig({ argv: full, env: {}, cwd: dir, command }));
      if (err) expect(err.message).not.toMatch(/[\r\n]/);
    });
    fuzzAssert(prop, fuzzRuns(300));
  });

  /** serve's options whose valid values stand on their own (not in RULES), plus the required two. */
  const free = (command: Command) => optionNames(command).filter((n) => n !== 'config' && !RULED.has(n) && VALID.has(n));

  it('takes valid values from flag > env > file > default, as their model, with the origin that won', () => {
    const prop = fc.property(
      commandArb.chain((command) => {
        const names = command === 'serve' ? [...free(command), 'listen' as OptionName] : free(command);
        const perOption = names.map((name) =>
          fc.record({
            name: fc.constant(name),
            flag: fc.option(fc.tuple(VALID.get(name)!, fc.constantFrom<Source>('flag', 'flag=')), { nil: undefined }),
            env: fc.option(fc.oneof({ weight: 6, arbitrary: VALID.get(name)! }, { weight: 1, arbitrary: fc.constant<Valid | 'blank'>('blank') }), { nil: undefined }),
            file: fc.option(fc.oneof({ weight: 6, arbitrary: VALID.get(name)! }, { weight: 1, arbitrary: fc.constant<Valid | 'null'>('null') }), { nil: undefined }),
          }),
        );
        return fc.tuple(fc.constant(command), fc.shuffledSubarray(perOption.map((a, i) => ({ a, i })), { minLength: 0 }).chain((picked) => fc.tuple(...picked.map((p) => p.a))));
      }),
      fc.boolean(),
      ([command, picks], viaEnvConfig) => {
        const assignments: Assignment[] = [];
        const want = new Map<OptionName, { value: unknown; kind: string }>();
        for (const p of picks) {
          const flag = p.flag ? { ...materialize(p.flag[0]), source: p.flag[1] } : undefined;
          const env = p.env && p.env !== 'blank' ? materialize(p.env) : undefined;
          const file = p.file && p.file !== 'null' ? materialize(p.file) : undefined;
          if (p.file) assignments.push({ name: p.name, source: 'file', text: '', yaml: p.file === 'null' ? null : file!.yaml });
          if (p.env) assignments.push({ name: p.name, source: 'env', text: p.env === 'blank' ? ' \t ' : env!.text, yaml: null });
          if (flag) assignments.push({ name: p.name, source: flag.source, text: flag.text, yaml: null });
          const winner = flag ? { v: flag, base: dir, kind: 'flag' } : env ? { v: env, base: dir, kind: 'env' } : file ? { v: file, base: conf, kind: 'file' } : undefined;
          if (winner) want.set(p.name, { value: winner.v.expect(winner.base), kind: winner.kind });
        }
        // serve's required options, unless generated values set them
        const prefix: string[] = [];
        if (command === 'serve' && !want.has('upstream')) prefix.push('--upstream', 'imap.example.net:143');
        if (command === 'serve' && !want.has('listen')) prefix.push('--listen', '127.0.0.1:1143');
        const input = sources(assignments, prefix, viaEnvConfig ? 'env' : 'flag');
        const config = loadConfig({ ...input, command }) as unknown as Record<string, unknown>;
        const defaults = defaultsOf(command);
        const origins = configOrigins(config);
        const got: Record<string, unknown> = {};
        const expected: Record<string, unknown> = {};
        for (const name of optionNames(command)) {
          if (name === 'config') continue;
          const w = want.get(name);
          if (w) {
            got[name] = { value: config[camelCase(name)], from: origins.get(name)?.kind };
            expected[name] = { value: w.value, from: w.kind };
          } else if (!['listen', 'upstream'].includes(name)) {
            got[name] = config[camelCase(name)];
            expected[name] = defaults[camelCase(name)];
          }
        }
        expect(got).toEqual(expected);
      },
    );
    // a load and often a config file per case: half the fuzz count
    fuzzAssert(prop, fuzzRuns(150, 0.5));
  });

  /** The options that constrain each other, in combinations RULES accept. */
  const ruled = fc.record({
    listeners: fc.constantFrom('plain', 'tls', 'both'),
    tlsWithPlain: fc.boolean(),
    listen: hostPortValid,
    listenTls: hostPortValid,
    apns: fc.constantFrom('none', 'cert', 'cert+key', 'p12'),
    vendor: fc.boolean(),
    appleId: textValid,
    pick: fc.constantFrom(...FILES),
  });

  it('prints a valid configuration with config check so that it reads back the same, secrets masked', () => {
    const names = free('serve').filter((n) => n !== 'listen');
    const prop = fc.property(
      ruled,
      fc.shuffledSubarray(names).chain((picked) => fc.tuple(...picked.map((name) => fc.tuple(fc.constant(name), VALID.get(name)!, sourceArb)))),
      fc.boolean(),
      (r, picks, viaEnvConfig) => {
        const assignments: Assignment[] = [];
        const want = new Map<OptionName, unknown>();
        const add = (name: OptionName, v: Valid, source: Source = 'flag') => {
          const m = materialize(v);
          assignments.push({ name, source, text: m.text, yaml: m.yaml });
          want.set(name, m.expect(source === 'file' ? conf : dir));
        };
        const fixture = (f: string): Valid => ({ text: join(dir, f), yaml: join(dir, f), expect: () => join(dir, f) });
        if (r.listeners === 'both' && JSON.stringify(r.listen.expect(dir)) === JSON.stringify(r.listenTls.expect(dir))) return; // RULES: not one address twice
        if (r.listeners !== 'tls') add('listen', r.listen);
        if (r.listeners !== 'plain') add('listen-tls', r.listenTls);
        if (r.listeners !== 'plain' || r.tlsWithPlain) {
          add('tls-cert', fixture('cert.pem'));
          add('tls-key', fixture('key.pem'));
        }
        const apns = r.vendor && r.apns === 'none' ? 'cert' : r.apns;
        if (apns === 'cert' || apns === 'cert+key') add('apns-cert', fixture(r.pick));
        if (apns === 'cert+key') add('apns-key', fixture(r.pick));
        if (apns === 'p12') add('apns-p12', fixture(r.pick));
        if (r.vendor) {
          add('cert-vendor-cert', fixture(r.pick));
          add('cert-vendor-key', fixture(r.pick));
          add('cert-apple-id', r.appleId);
          add('cert-password-file', fixture(r.pick));
        }
        for (const [name, v, source] of picks) {
          if (name === 'upstream-ca') add(name, fixture('cert.pem'), source); // config check reads it as PEM
          else add(name, v, source);
        }
        if (!want.has('upstream')) add('upstream', { text: 'imap.example.net:143', yaml: 'imap.example.net:143', expect: () => ({ host: 'imap.example.net', port: 143 }) });
        const input = sources(assignments, [], viaEnvConfig ? 'env' : 'flag');
        let out = '';
        let errText = '';
        const io: CliIO = { stdout: { write: (s: string) => (out += s) }, stderr: { write: (s: string) => (errText += s) }, env: input.env, cwd: input.cwd };
        const code = runConfigCheck(input.argv, io);
        expect({ code, errText: code === 0 ? '' : errText }).toEqual({ code: 0, errText: '' });
        expect(out.endsWith('configuration OK\n')).toBe(true);
        for (const a of assignments) {
          const secretText = a.text.match(/Sekret[\w-]*/)?.[0];
          if (secretText && getOption(a.name)!.secret) expect(out + errText).not.toContain(secretText);
        }
        const printed = out.slice(0, -'configuration OK\n'.length);
        const path = join(conf, `printed${fileCounter++ % 8}.yaml`);
        writeFileSync(path, printed);
        // read back, the printout is the generated configuration (secrets are masked in it)
        const again = loadConfig({ argv: ['--config', path], env: {}, cwd: '/' }) as unknown as Record<string, unknown>;
        const defaults = defaultsOf('serve');
        const got: Record<string, unknown> = {};
        const expected: Record<string, unknown> = {};
        for (const name of optionNames('serve')) {
          if (name === 'config' || getOption(name)!.secret) continue;
          got[name] = again[camelCase(name)];
          expected[name] = want.has(name) ? want.get(name) : name === 'listen' ? undefined : defaults[camelCase(name)];
        }
        expect(got).toEqual(expected);
      },
    );
    // config check, a TLS context, a printout, a file and a second load per case: a fifth of the fuzz count
    fuzzAssert(prop, fuzzRuns(100, 0.2));
  });
});

describe('counterexamples the config properties found', () => {
  it('reads an enum written as a YAML number (`apns-priority: 10`)', () => {
    const path = join(conf, 'priority.yaml');
    writeFileSync(path, 'apns-priority: 10\n');
    expect(loadConfig({ argv: [...baseArgv('serve', new Set()), '--config', path], env: {}, cwd: dir }).apnsPriority).toBe('10');
  });

  it('refuses a text value of two lines, which config check cannot print back as one YAML line', () => {
    const err = configError(() => loadConfig({ argv: [...baseArgv('serve', new Set()), '--instance-id', 'a\nb #x'], env: {}, cwd: dir }));
    expect(err?.message).toBe('--instance-id: must be a single line, got "a\\nb #x" (from the command line)');
  });
});
