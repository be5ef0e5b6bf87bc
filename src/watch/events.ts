/**
 * Events mode (`--watch events`): an HTTP listener that the mail server calls on new mail, so no
 * upstream IMAP connection is needed to notice it.
 *
 *   Dovecot  push_notification Lua driver  deploy/dovecot/xaps-push.lua  POST  (format a)
 *   Dovecot  push_notification OX driver   (built in, INBOX deliveries)   PUT   (format b)
 *   Cyrus    notify_external program       deploy/cyrus/xaps-notify       POST  (format c)
 *
 * (a) {"user","event":"MessageNew"|"MessageAppend","mailbox","uid","uidvalidity",…}
 * (b) {"user","event":"messageNew","folder","imap-uid","imap-uidvalidity",…}
 * (c) Cyrus's RFC 5423 event as notifyd hands it to notify_external, unchanged:
 *     {"event":"MessageNew","uri":"imap://localhost/user/alice/Work;UIDVALIDITY=…/;UID=…","user":…,…}
 *     The URI names the mailbox the way an admin sees it (mboxevent uses the admin namespace:
 *     "user/alice" is alice's INBOX, "user/alice/Work" her Work), percent-encoded UTF-8
 *     (MailboxToURL); a raw modified UTF-7 name is decoded too. Whether "user/alice/Work" is
 *     "Work" or "INBOX/Work" to alice depends on Cyrus' altnamespace: the shim sends it in
 *     X-Xaps-Cyrus-Altnamespace (read from imapd.conf); see InterpretOptions.cyrusAltNamespace.
 * A body may also be a JSON array of such objects (at most MAX_EVENTS_PER_BODY).
 *
 * Only new mail (MessageNew, MessageAppend, any case) makes a MailboxChange (source 'events',
 * changeId `<mailbox>:<uidvalidity>:<uid>`); every other event is acknowledged and dropped.
 *
 * The sender is the mail server, in the middle of a delivery: Dovecot's Lua driver posts
 * synchronously inside the delivery, with `Expect: 100-continue`, and waits ~2 s per event when
 * no `100 Continue` comes. So:
 * - `Expect: 100-continue` is handled explicitly (checkContinue): the secret and Content-Length
 *   are checked first, then `100 Continue` is written (or the refusal, without reading a byte);
 * - the answer (202) is written as soon as the body is parsed; the sink runs afterwards, from a
 *   bounded queue, so a slow consumer never delays a delivery.
 * Requests go to /events (POST or PUT) and carry the shared secret of --events-secret-file, when
 * one is set, in X-Xaps-Secret, `Authorization: Bearer`, or as the Basic password (the OX driver
 * can only put it in its URL); it is compared in constant time (401 otherwise).
 * Hostile input is bounded: body size (413), concurrent requests and queued changes (503),
 * request rate (429), header and body time (408), connections (maxConnections). No input makes
 * the listener throw.
 */
import http from 'node:http';
import { createHash, timingSafeEqual } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import type { AddressInfo, Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { isIP } from 'node:net';
import type { Registry } from 'prom-client';
import { silentLogger, type Logger } from '../ops/log.js';
import { decodeMailboxName } from '../push/mutf7.js';
import {
  eventsMetrics,
  type EventsFormat,
  type EventsIgnoredReason,
  type EventsMetrics,
  type EventsRequestOutcome,
} from './events-metrics.js';
import type { ChangeSink, MailboxChange } from './types.js';

// ------------------------------------------------------------------------------------------
// Interpreting event bodies (pure; exported for tests)

/** Most events in one body (a JSON array). */
export const MAX_EVENTS_PER_BODY = 100;
const MAX_USER_LENGTH = 256;
const MAX_MAILBOX_LENGTH = 1024;
const MAX_UINT32 = 0xffffffff;

/** A body that cannot be an event: answered 400 with this message. */
export class EventFormatError extends Error {}

export type InterpretedEvent =
  | { kind: 'change'; format: EventsFormat; event: string; user: string; mailbox: string; uidValidity: number; uid: number }
  | { kind: 'ignored'; format: EventsFormat | undefined; event: string; reason: EventsIgnoredReason };

export interface InterpretOptions {
  /**
   * Cyrus `altnamespace`: with it the user sees "Work" for the admin name "user/alice/Work",
   * without it "INBOX/Work". "auto" (default) guesses from the separator in the URI: '/'
   * (unixhierarchysep, Cyrus 3's default, which also turns altnamespace on) -> true; '.'
   * (Debian's imapd.conf, which turns both off) -> false. The xaps-notify shim reads the real
   * setting from imapd.conf and sends it in X-Xaps-Cyrus-Altnamespace, which wins.
   */
  cyrusAltNamespace?: boolean | 'auto';
}

type JsonObject = Record<string, unknown>;

function isObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function hasControl(s: string): boolean {
  // C0, DEL and C1 controls; names and users never contain them.
  return /[\u0000-\u001f\u007f-\u009f]/.test(s);
}

function field(obj: JsonObject, name: string): unknown {
  return Object.prototype.hasOwnProperty.call(obj, name) ? obj[name] : undefined;
}

function text(obj: JsonObject, name: string): string | undefined {
  const v = field(obj, name);
  return typeof v === 'string' ? v : undefined;
}

/** A UID/UIDVALIDITY: a JSON integer or a decimal string ("7", "7.0" from a careless Lua %s), 1..2^32-1. */
function uint32(v: unknown): number | undefined {
  let n: number;
  if (typeof v === 'number') n = v;
  else if (typeof v === 'string' && /^\s*\d{1,10}(\.0+)?\s*$/.test(v)) n = Number(v);
  else return undefined;
  return Number.isInteger(n) && n >= 1 && n <= MAX_UINT32 ? n : undefined;
}

function checkUser(user: string | undefined, what: string): string {
  if (user === undefined || user === '') throw new EventFormatError(`${what}: missing "user"`);
  if (user.length > MAX_USER_LENGTH || hasControl(user)) throw new EventFormatError(`${what}: invalid "user"`);
  return user;
}

function checkMailbox(mailbox: string | undefined, what: string, name: string): string {
  if (mailbox === undefined || mailbox === '') throw new EventFormatError(`${what}: missing "${name}"`);
  if (mailbox.length > MAX_MAILBOX_LENGTH || hasControl(mailbox)) {
    throw new EventFormatError(`${what}: invalid mailbox name in "${name}"`);
  }
  return mailbox.toUpperCase() === 'INBOX' ? 'INBOX' : mailbox;
}

function checkUid(v: unknown, what: string, name: string): number {
  const n = uint32(v);
  if (n === undefined) {
    throw new EventFormatError(`${what}: ${v === undefined ? 'missing' : 'invalid'} "${name}" (expected an integer 1..4294967295)`);
  }
  return n;
}

/** MessageNew / MessageAppend in any spelling (Dovecot Lua and Cyrus: CamelCase; OX: messageNew). */
function isNewMail(event: string): boolean {
  const e = event.toLowerCase();
  return e === 'messagenew' || e === 'messageappend';
}

function detectFormat(obj: JsonObject): EventsFormat | undefined {
  if (field(obj, 'uri') !== undefined) return 'cyrus';
  if (field(obj, 'folder') !== undefined || field(obj, 'imap-uid') !== undefined) return 'dovecot_ox';
  if (field(obj, 'mailbox') !== undefined) return 'dovecot_lua';
  return undefined;
}

/** Interprets one event object; throws EventFormatError for a body that is not an event at all. */
export function interpretEvent(value: unknown, opts: InterpretOptions = {}): InterpretedEvent {
  if (!isObject(value)) throw new EventFormatError('expected a JSON object (or an array of objects)');
  const event = text(value, 'event');
  if (event === undefined || event === '') throw new EventFormatError('missing "event"');
  if (event.length > 64 || hasControl(event)) throw new EventFormatError('invalid "event"');
  const format = detectFormat(value);
  if (!isNewMail(event)) return { kind: 'ignored', format, event, reason: 'event_type' };

  const what = event;
  switch (format) {
    case 'dovecot_lua':
      return {
        kind: 'change',
        format,
        event,
        user: checkUser(text(value, 'user'), what),
        mailbox: checkMailbox(text(value, 'mailbox'), what, 'mailbox'),
        uidValidity: checkUid(field(value, 'uidvalidity') ?? field(value, 'uid_validity'), what, 'uidvalidity'),
        uid: checkUid(field(value, 'uid'), what, 'uid'),
      };
    case 'dovecot_ox':
      return {
        kind: 'change',
        format,
        event,
        user: checkUser(text(value, 'user'), what),
        mailbox: checkMailbox(text(value, 'folder'), what, 'folder'),
        uidValidity: checkUid(field(value, 'imap-uidvalidity'), what, 'imap-uidvalidity'),
        uid: checkUid(field(value, 'imap-uid'), what, 'imap-uid'),
      };
    case 'cyrus':
      return interpretCyrus(value, event, opts);
    default:
      throw new EventFormatError(`${what}: no mailbox (expected "mailbox", "folder" or "uri")`);
  }
}

export interface ParsedImapUrl {
  /** The URL's user (RFC 5092 iuserinfo), if any. */
  urlUser?: string;
  /** The mailbox as written in the URL, decoded to UTF-8. */
  mailbox: string;
  uidValidity?: number;
  uid?: number;
}

function percentDecode(s: string, what: string): Buffer {
  const bytes: number[] = [];
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 0x25) {
      const hex = s.slice(i + 1, i + 3);
      if (!/^[0-9A-Fa-f]{2}$/.test(hex)) throw new EventFormatError(`${what}: bad percent-encoding in the URI`);
      bytes.push(parseInt(hex, 16));
      i += 2;
    } else if (c < 0x80) {
      bytes.push(c);
    } else {
      // A raw non-ASCII character (a lenient sender): keep its UTF-8 bytes.
      const cp = s.codePointAt(i)!;
      const ch = String.fromCodePoint(cp);
      for (const b of Buffer.from(ch, 'utf8')) bytes.push(b);
      i += ch.length - 1;
    }
  }
  return Buffer.from(bytes);
}

const utf8Strict = new TextDecoder('utf-8', { fatal: true });

/**
 * A mailbox name from a URL path: percent-decoded UTF-8 (what Cyrus writes), or modified UTF-7
 * when the decoded name is 7-bit and holds a valid `&…-` sequence (a server that puts the IMAP
 * name into the URL as is).
 */
export function decodeUrlMailbox(path: string, what = 'uri'): string {
  let name: string;
  try {
    name = utf8Strict.decode(percentDecode(path, what));
  } catch (err) {
    if (err instanceof EventFormatError) throw err;
    throw new EventFormatError(`${what}: the mailbox in the URI is not UTF-8`);
  }
  if (/^[\x20-\x7e]*$/.test(name) && /&[A-Za-z0-9+,]+-/.test(name)) {
    try {
      return decodeMailboxName(name);
    } catch {
      /* not modified UTF-7 after all: a literal name */
    }
  }
  return name;
}

/** Parses `imap://[user@]host[:port]/<mailbox>[;UIDVALIDITY=n][/;UID=n]…` (RFC 5092). */
export function parseImapUrl(uri: string, what = 'uri'): ParsedImapUrl {
  if (uri.length > 4096) throw new EventFormatError(`${what}: "uri" too long`);
  const m = /^imap:\/\/([^/]*)\/(.*)$/is.exec(uri);
  if (!m) throw new EventFormatError(`${what}: "uri" is not an imap:// URL with a mailbox`);
  const authority = m[1]!;
  const rest = m[2]!;
  let urlUser: string | undefined;
  const at = authority.lastIndexOf('@');
  if (at >= 0) {
    const info = authority.slice(0, at).replace(/;AUTH=.*$/i, '');
    let u: string;
    try {
      u = utf8Strict.decode(percentDecode(info, what));
    } catch (err) {
      if (err instanceof EventFormatError) throw err;
      throw new EventFormatError(`${what}: the user in the URI is not UTF-8`); // a TypeError would escape the listener
    }
    if (u !== '') urlUser = u;
  }
  // Parameters follow ';' (Cyrus percent-encodes ';' inside names); "/;UID=n" starts the message part.
  const parts = rest.split(';');
  let mailboxPart = parts[0]!;
  if (mailboxPart.endsWith('/')) mailboxPart = mailboxPart.slice(0, -1);
  let uidValidity: number | undefined;
  let uid: number | undefined;
  for (const raw of parts.slice(1)) {
    const p = raw.replace(/\/$/, '');
    const eq = p.indexOf('=');
    if (eq < 0) continue;
    const key = p.slice(0, eq).toUpperCase();
    const val = p.slice(eq + 1);
    if (key === 'UIDVALIDITY') uidValidity = uint32(val);
    else if (key === 'UID') uid = uint32(val);
  }
  const mailbox = decodeUrlMailbox(mailboxPart, what);
  return {
    ...(urlUser !== undefined ? { urlUser } : {}),
    mailbox,
    ...(uidValidity !== undefined ? { uidValidity } : {}),
    ...(uid !== undefined ? { uid } : {}),
  };
}

/**
 * Maps a Cyrus admin-namespace name to (owner, the owner's own name for it):
 * "user/alice" -> (alice, INBOX); "user/alice/Work" -> (alice, Work, or INBOX/Work without
 * altnamespace); with virtdomains "user/alice/Work@example.org" -> (alice@example.org, Work).
 * The separator is '/' (unixhierarchysep) or '.'. Anything else is not a personal mailbox.
 */
export function cyrusPersonalMailbox(
  adminName: string,
  altNamespace: boolean | 'auto' = 'auto',
): { owner: string; mailbox: string } | undefined {
  const m = /^user([./])(.+)$/s.exec(adminName); // s: a name may hold U+2028/U+2029
  if (!m) return undefined;
  const sep = m[1]!;
  const alt = altNamespace === 'auto' ? sep === '/' : altNamespace;
  let rest = m[2]!;
  let domain: string | undefined;
  const at = rest.lastIndexOf('@');
  if (at > 0 && !rest.slice(at).includes(sep)) {
    domain = rest.slice(at + 1);
    rest = rest.slice(0, at);
  }
  const cut = rest.indexOf(sep);
  const local = cut < 0 ? rest : rest.slice(0, cut);
  const sub = cut < 0 ? '' : rest.slice(cut + 1);
  if (local === '') return undefined;
  const owner = domain ? `${local}@${domain}` : local;
  if (sub === '') return { owner, mailbox: 'INBOX' };
  return { owner, mailbox: alt ? sub : `INBOX${sep}${sub}` };
}

function interpretCyrus(value: JsonObject, event: string, opts: InterpretOptions): InterpretedEvent {
  const what = event;
  const uri = text(value, 'uri');
  if (uri === undefined) throw new EventFormatError(`${what}: "uri" must be a string`);
  const url = parseImapUrl(uri, what);
  let user: string | undefined;
  let mailbox: string;
  const personal = cyrusPersonalMailbox(url.mailbox, opts.cyrusAltNamespace ?? 'auto');
  if (personal) {
    user = personal.owner;
    mailbox = personal.mailbox;
  } else if (url.urlUser !== undefined) {
    // RFC 5423 style: imap://alice@host/INBOX — the name is already the user's own.
    user = url.urlUser;
    mailbox = url.mailbox;
  } else {
    // A shared or top-level mailbox ("shared/x"): no owner whose devices would want it.
    return { kind: 'ignored', format: 'cyrus', event, reason: 'not_personal' };
  }
  if (user === undefined || user === '') user = text(value, 'user');
  let uid = url.uid;
  if (uid === undefined) {
    const next = uint32(field(value, 'uidnext'));
    if (next !== undefined && next > 1) uid = next - 1;
  }
  return {
    kind: 'change',
    format: 'cyrus',
    event,
    user: checkUser(user, what),
    mailbox: checkMailbox(mailbox, what, 'uri'),
    uidValidity: checkUid(url.uidValidity ?? field(value, 'uidvalidity'), what, 'uri UIDVALIDITY'),
    uid: checkUid(uid, what, 'uri UID'),
  };
}

/** Interprets a whole body (bytes): throws EventFormatError (-> 400) when it is not JSON events. */
export function interpretBody(body: Buffer | string, opts: InterpretOptions = {}): InterpretedEvent[] {
  const textBody = typeof body === 'string' ? body : body.toString('utf8');
  if (textBody.trim() === '') throw new EventFormatError('empty body');
  let value: unknown;
  try {
    value = JSON.parse(textBody);
  } catch (err) {
    throw new EventFormatError(`malformed JSON: ${(err as Error).message.slice(0, 200)}`);
  }
  if (Array.isArray(value)) {
    if (value.length === 0) throw new EventFormatError('empty array');
    if (value.length > MAX_EVENTS_PER_BODY) throw new EventFormatError(`more than ${MAX_EVENTS_PER_BODY} events in one body`);
    return value.map((v, i) => {
      try {
        return interpretEvent(v, opts);
      } catch (err) {
        if (err instanceof EventFormatError) throw new EventFormatError(`event ${i}: ${err.message}`);
        throw err;
      }
    });
  }
  return [interpretEvent(value, opts)];
}

/** The MailboxChange for an interpreted new-mail event. */
export function toMailboxChange(
  e: Extract<InterpretedEvent, { kind: 'change' }>,
  detectedAt: number,
): MailboxChange {
  return {
    user: e.user,
    mailbox: e.mailbox,
    changeId: `${e.mailbox}:${e.uidValidity}:${e.uid}`,
    detectedAt,
    source: 'events',
  };
}

// ------------------------------------------------------------------------------------------
// Shared secret

/** Reads the events secret file: its first line, trimmed; rejects an empty one. */
export async function readEventsSecret(file: string): Promise<string> {
  const content = await readFile(file, 'utf8');
  const secret = (content.split(/\r?\n/, 1)[0] ?? '').trim();
  if (secret === '') throw new Error(`${file}: the events secret is empty`);
  return secret;
}

function sha256(s: string | Buffer): Buffer {
  return createHash('sha256').update(s).digest();
}

/** The secret a request presents: X-Xaps-Secret, Authorization: Bearer, or the password of Basic (OX url with user:pass@). */
export function presentedSecret(headers: http.IncomingHttpHeaders): string | undefined {
  const x = headers['x-xaps-secret'];
  if (typeof x === 'string') return x.trim();
  if (Array.isArray(x)) return undefined;
  const auth = headers.authorization;
  if (typeof auth !== 'string') return undefined;
  const bearer = /^\s*Bearer\s+(\S+)\s*$/i.exec(auth);
  if (bearer) return bearer[1];
  const basic = /^\s*Basic\s+([A-Za-z0-9+/=]+)\s*$/i.exec(auth);
  if (basic) {
    const decoded = Buffer.from(basic[1]!, 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    return colon >= 0 ? decoded.slice(colon + 1) : undefined;
  }
  return undefined;
}

// ------------------------------------------------------------------------------------------
// The listener

export interface EventsListenerOptions {
  onChange: ChangeSink;
  /** Where to listen (default 127.0.0.1:8425, the --events-listen default); port 0 picks one. */
  listen?: { host: string; port: number };
  /** Shared secret every request must present (X-Xaps-Secret or Authorization); unset: none. */
  secret?: string;
  log?: Logger;
  registry?: Registry;
  /** Alternatively the metrics themselves (tests). */
  metrics?: EventsMetrics;
  /** Paths that take events (default ["/events"]); a trailing slash and a query are ignored. */
  paths?: string[];
  /** Largest body (default 64 KiB): 413 above. */
  maxBodyBytes?: number;
  /** Requests being received or answered at once (default 64): 503 above. */
  maxConcurrent?: number;
  /** Open connections (default 256): more are closed at once. */
  maxConnections?: number;
  /** Sustained requests per second (default 1000) and burst (default 2000): 429 above. */
  ratePerSecond?: number;
  rateBurst?: number;
  /** Changes accepted but not yet handed to onChange (default 10 000): 503 above. */
  maxQueuedChanges?: number;
  /** Time to receive the request headers (default 5 s). */
  headersTimeoutMs?: number;
  /** Time to receive the body once the headers are in (default 5 s): 408. */
  bodyTimeoutMs?: number;
  /** Idle keep-alive connections are closed after this (default 5 s). */
  keepAliveTimeoutMs?: number;
  /** See InterpretOptions.cyrusAltNamespace (default "auto"; a request's X-Xaps-Cyrus-Altnamespace wins). */
  cyrusAltNamespace?: boolean | 'auto';
  /** ms since epoch (default Date.now). */
  clock?: () => number;
}

/** Running totals (health, tests). */
export interface EventsListenerCounters {
  requests: number;
  accepted: number;
  rejected: number;
  /** 100 Continue answers written. */
  continues: number;
  changes: number;
  ignored: number;
}

interface Refusal {
  status: number;
  outcome: EventsRequestOutcome;
  message: string;
  headers?: Record<string, string>;
}

const DEFAULTS = {
  maxBodyBytes: 64 * 1024,
  maxConcurrent: 64,
  maxConnections: 256,
  ratePerSecond: 1000,
  rateBurst: 2000,
  maxQueuedChanges: 10_000,
  headersTimeoutMs: 5000,
  bodyTimeoutMs: 5000,
  keepAliveTimeoutMs: 5000,
};

function normalizePath(url: string | undefined): string {
  let p = (url ?? '').split('?', 1)[0]!.split('#', 1)[0]!;
  if (p.length > 1 && p.endsWith('/')) p = p.replace(/\/+$/, '');
  return p === '' ? '/' : p;
}

export class EventsListener {
  private readonly onChange: ChangeSink;
  private readonly log: Logger;
  private readonly metrics: EventsMetrics;
  private readonly secretHash: Buffer | undefined;
  private readonly paths: Set<string>;
  private readonly opts: typeof DEFAULTS;
  private readonly listenAddr: { host: string; port: number };
  private readonly interpretOpts: InterpretOptions;
  private readonly clock: () => number;
  private server: http.Server | undefined;
  private address: { host: string; port: number } | undefined;
  private inFlight = 0;
  private tokens: number;
  private tokensAt: number;
  private queue: MailboxChange[] = [];
  private drainScheduled = false;
  private readonly lastWarn = new Map<string, number>();
  private readonly sockets = new Set<Socket>();
  /** Connections answered with `Connection: close`: nothing more is read from them (RFC 9112 §9.6). */
  private readonly closing = new WeakSet<object>();
  readonly counters: EventsListenerCounters = { requests: 0, accepted: 0, rejected: 0, continues: 0, changes: 0, ignored: 0 };

  constructor(options: EventsListenerOptions) {
    this.onChange = options.onChange;
    this.log = options.log ?? silentLogger();
    this.metrics = options.metrics ?? eventsMetrics(options.registry);
    if (options.secret !== undefined && options.secret.trim() === '') throw new Error('events secret must not be empty');
    this.secretHash = options.secret !== undefined ? sha256(options.secret.trim()) : undefined;
    this.paths = new Set((options.paths ?? ['/events']).map((p) => normalizePath(p)));
    this.opts = {
      maxBodyBytes: options.maxBodyBytes ?? DEFAULTS.maxBodyBytes,
      maxConcurrent: options.maxConcurrent ?? DEFAULTS.maxConcurrent,
      maxConnections: options.maxConnections ?? DEFAULTS.maxConnections,
      ratePerSecond: options.ratePerSecond ?? DEFAULTS.ratePerSecond,
      rateBurst: options.rateBurst ?? DEFAULTS.rateBurst,
      maxQueuedChanges: options.maxQueuedChanges ?? DEFAULTS.maxQueuedChanges,
      headersTimeoutMs: options.headersTimeoutMs ?? DEFAULTS.headersTimeoutMs,
      bodyTimeoutMs: options.bodyTimeoutMs ?? DEFAULTS.bodyTimeoutMs,
      keepAliveTimeoutMs: options.keepAliveTimeoutMs ?? DEFAULTS.keepAliveTimeoutMs,
    };
    this.listenAddr = options.listen ?? { host: '127.0.0.1', port: 8425 };
    this.interpretOpts = { cyrusAltNamespace: options.cyrusAltNamespace ?? 'auto' };
    this.clock = options.clock ?? Date.now;
    this.tokens = this.opts.rateBurst;
    this.tokensAt = this.clock();
  }

  /** Starts listening; resolves with the bound address. */
  async start(): Promise<{ host: string; port: number }> {
    if (this.server) throw new Error('events listener already started');
    const server = http.createServer({
      maxHeaderSize: 16 * 1024,
      requestTimeout: this.opts.headersTimeoutMs + this.opts.bodyTimeoutMs,
      headersTimeout: this.opts.headersTimeoutMs,
      keepAliveTimeout: this.opts.keepAliveTimeoutMs,
      connectionsCheckingInterval: Math.max(100, Math.min(1000, Math.floor(this.opts.headersTimeoutMs / 4))),
    });
    server.maxConnections = this.opts.maxConnections;
    server.maxHeadersCount = 64;
    // Backstop for a socket that stays silent (Node's headers/request timeouts and ours act first).
    server.setTimeout(this.opts.headersTimeoutMs + this.opts.bodyTimeoutMs + this.opts.keepAliveTimeoutMs, (socket) => socket.destroy());
    server.on('request', (req, res) => this.handle(req, res, false));
    server.on('checkContinue', (req, res) => this.handle(req, res, true));
    server.on('clientError', (err: NodeJS.ErrnoException, socket) => this.onClientError(err, socket));
    server.on('connection', (socket: Socket) => {
      this.sockets.add(socket);
      socket.on('close', () => this.sockets.delete(socket));
      socket.on('error', () => undefined);
    });
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error) => reject(err);
      server.once('error', onError);
      server.listen(this.listenAddr.port, this.listenAddr.host, () => {
        server.off('error', onError);
        resolve();
      });
    }).catch((err: unknown) => {
      this.server = undefined;
      throw err;
    });
    server.on('error', (err) => this.log.error({ err }, 'events listener error'));
    const a = server.address() as AddressInfo;
    this.address = { host: a.address, port: a.port };
    if (this.secretHash === undefined && !isLoopback(a.address)) {
      this.log.warn({ listen: `${a.address}:${a.port}` }, 'events listener without a shared secret on a non-loopback address: anyone who reaches it can trigger pushes (set --events-secret-file)');
    }
    this.log.info({ listen: `${a.address}:${a.port}`, secret: this.secretHash !== undefined }, 'events listener started');
    return { ...this.address };
  }

  /** The bound address (after start). */
  get boundAddress(): { host: string; port: number } | undefined {
    return this.address ? { ...this.address } : undefined;
  }

  /** The URL to configure in the event source (after start), e.g. http://127.0.0.1:8425/events. */
  get url(): string | undefined {
    if (!this.address) return undefined;
    const host = isIP(this.address.host) === 6 ? `[${this.address.host}]` : this.address.host;
    const path = [...this.paths][0] ?? '/events';
    return `http://${host}:${this.address.port}${path}`;
  }

  /** Stops listening, lets requests in progress finish (up to `graceMs`), then hands queued changes to the sink. */
  async stop(graceMs = 2000): Promise<void> {
    const server = this.server;
    if (!server) return;
    this.server = undefined;
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    server.closeIdleConnections();
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([closed, new Promise<void>((r) => (timer = setTimeout(r, graceMs)))]);
    if (timer) clearTimeout(timer);
    server.closeAllConnections();
    for (const s of this.sockets) s.destroy();
    await closed;
    this.drain();
    this.address = undefined;
  }

  // ---------------------------------------------------------------------------------------

  private takeToken(): boolean {
    const now = this.clock();
    const elapsed = Math.max(0, now - this.tokensAt);
    this.tokensAt = now;
    this.tokens = Math.min(this.opts.rateBurst, this.tokens + (elapsed * this.opts.ratePerSecond) / 1000);
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }

  private checkSecret(req: http.IncomingMessage): boolean {
    if (this.secretHash === undefined) return true;
    const presented = presentedSecret(req.headers);
    if (presented === undefined) return false;
    return timingSafeEqual(sha256(presented), this.secretHash);
  }

  /** Everything that can be decided from the request line and headers. */
  private precheck(req: http.IncomingMessage): Refusal | undefined {
    if (!this.takeToken()) {
      return { status: 429, outcome: 'rate_limited', message: 'too many requests', headers: { 'Retry-After': '1' } };
    }
    if (!this.paths.has(normalizePath(req.url))) return { status: 404, outcome: 'not_found', message: 'not found' };
    if (req.method !== 'POST' && req.method !== 'PUT') {
      return { status: 405, outcome: 'method_not_allowed', message: 'use POST or PUT', headers: { Allow: 'POST, PUT' } };
    }
    if (this.inFlight > this.opts.maxConcurrent) {
      return { status: 503, outcome: 'overloaded', message: 'too many requests in progress', headers: { 'Retry-After': '1' } };
    }
    if (this.queue.length >= this.opts.maxQueuedChanges) {
      return { status: 503, outcome: 'overloaded', message: 'too many changes queued', headers: { 'Retry-After': '1' } };
    }
    if (!this.checkSecret(req)) {
      return { status: 401, outcome: 'unauthorized', message: 'missing or wrong secret', headers: { 'WWW-Authenticate': 'Bearer realm="xaps-proxy events"' } };
    }
    const cl = req.headers['content-length'];
    if (cl !== undefined) {
      if (!/^\d{1,15}$/.test(cl)) return { status: 400, outcome: 'bad_request', message: 'invalid Content-Length' };
      if (Number(cl) > this.opts.maxBodyBytes) {
        return { status: 413, outcome: 'too_large', message: `body larger than ${this.opts.maxBodyBytes} bytes` };
      }
      if (Number(cl) === 0) return { status: 400, outcome: 'bad_request', message: 'empty body' };
    } else if (req.headers['transfer-encoding'] === undefined) {
      return { status: 411, outcome: 'bad_request', message: 'Content-Length required' };
    }
    return undefined;
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse, expectContinue: boolean): void {
    if (req.socket && this.closing.has(req.socket)) {
      // pipelined behind a request answered with `Connection: close`: not processed, not answered
      req.resume();
      return;
    }
    const startedAt = process.hrtime.bigint();
    this.counters.requests++;
    this.inFlight++;
    this.metrics.inFlight.inc();
    let done = false;
    let bodyTimer: NodeJS.Timeout | undefined;
    const finish = (status: number, outcome: EventsRequestOutcome, payload: Record<string, unknown>, extra: { close?: boolean; headers?: Record<string, string> } = {}) => {
      if (done) return;
      done = true;
      if (bodyTimer) clearTimeout(bodyTimer);
      this.inFlight--;
      this.metrics.inFlight.dec();
      this.metrics.requests.inc({ outcome });
      if (outcome === 'accepted') this.counters.accepted++;
      else this.counters.rejected++;
      if (res.headersSent || res.writableEnded || res.destroyed) return;
      const body = JSON.stringify(payload);
      try {
        const headers: Record<string, string | number> = {
          'Content-Type': 'application/json',
          'Content-Length': Buffer.byteLength(body),
          'Cache-Control': 'no-store',
          ...(extra.headers ?? {}),
        };
        if (extra.close) {
          headers.Connection = 'close';
          if (req.socket) this.closing.add(req.socket);
        }
        res.writeHead(status, headers);
        res.end(body);
      } catch (err) {
        this.log.debug({ err }, 'events: could not write the answer');
        req.socket?.destroy();
        return;
      }
      this.metrics.answerDuration.observe(Number(process.hrtime.bigint() - startedAt) / 1e9);
      if (extra.close) {
        // The rest of the body is not read: make sure the connection goes away.
        res.once('finish', () => {
          const sock = req.socket;
          setTimeout(() => sock?.destroy(), 1000).unref();
        });
      }
    };
    const refuse = (r: Refusal, bodyUnread: boolean) => {
      this.warnThrottled(r.outcome, r.message, req);
      finish(r.status, r.outcome, { ok: false, error: r.message }, { close: bodyUnread, ...(r.headers ? { headers: r.headers } : {}) });
    };

    try {
      req.on('error', () => finish(400, 'aborted', { ok: false, error: 'request aborted' }, { close: true }));
      res.on('close', () => {
        if (!done) finish(499, 'aborted', { ok: false, error: 'connection closed' }, { close: true });
      });
      const refusal = this.precheck(req);
      if (refusal) {
        refuse(refusal, true);
        req.resume();
        return;
      }
      if (expectContinue) {
        res.writeContinue();
        this.counters.continues++;
        this.metrics.continues.inc();
      }
      const chunks: Buffer[] = [];
      let size = 0;
      bodyTimer = setTimeout(() => {
        refuse({ status: 408, outcome: 'timeout', message: `body not received within ${this.opts.bodyTimeoutMs} ms` }, true);
      }, this.opts.bodyTimeoutMs);
      bodyTimer.unref();
      req.on('data', (chunk: Buffer) => {
        if (done) return;
        size += chunk.length;
        if (size > this.opts.maxBodyBytes) {
          chunks.length = 0;
          refuse({ status: 413, outcome: 'too_large', message: `body larger than ${this.opts.maxBodyBytes} bytes` }, true);
          return;
        }
        chunks.push(chunk);
      });
      req.on('end', () => {
        if (done) return;
        this.accept(Buffer.concat(chunks, size), this.requestInterpretOptions(req), finish, refuse);
      });
    } catch (err) {
      this.log.error({ err }, 'events: unexpected error handling a request');
      finish(500, 'bad_request', { ok: false, error: 'internal error' }, { close: true });
    }
  }

  /** X-Xaps-Cyrus-Altnamespace: yes|no (from the xaps-notify shim, read from imapd.conf) overrides the default. */
  private requestInterpretOptions(req: http.IncomingMessage): InterpretOptions {
    const h = req.headers['x-xaps-cyrus-altnamespace'];
    if (typeof h === 'string') {
      const v = parseCyrusSwitch(h);
      if (v !== undefined) return { ...this.interpretOpts, cyrusAltNamespace: v };
    }
    return this.interpretOpts;
  }

  private accept(
    body: Buffer,
    interpretOpts: InterpretOptions,
    finish: (status: number, outcome: EventsRequestOutcome, payload: Record<string, unknown>) => void,
    refuse: (r: Refusal, bodyUnread: boolean) => void,
  ): void {
    let events: InterpretedEvent[];
    try {
      events = interpretBody(body, interpretOpts);
    } catch (err) {
      if (err instanceof EventFormatError) {
        refuse({ status: 400, outcome: 'bad_request', message: err.message }, false);
        return;
      }
      throw err;
    }
    const now = this.clock();
    let changes = 0;
    for (const e of events) {
      if (e.kind === 'change') {
        changes++;
        this.counters.changes++;
        this.metrics.changes.inc({ format: e.format });
        this.queue.push(toMailboxChange(e, now));
        this.log.debug({ user: e.user, mailbox: e.mailbox, event: e.event, format: e.format, uid: e.uid }, 'events: new mail');
      } else {
        this.counters.ignored++;
        this.metrics.ignored.inc({ reason: e.reason });
        this.log.trace({ event: e.event, format: e.format, reason: e.reason }, 'events: ignored');
      }
    }
    // Answer first: the sink runs after this turn of the event loop.
    finish(202, 'accepted', { ok: true, changes, ignored: events.length - changes });
    if (changes > 0) this.scheduleDrain();
  }

  private scheduleDrain(): void {
    if (this.drainScheduled) return;
    this.drainScheduled = true;
    setImmediate(() => {
      this.drainScheduled = false;
      this.drain();
    });
  }

  private drain(): void {
    const batch = this.queue;
    this.queue = [];
    for (const change of batch) {
      try {
        this.onChange(change);
      } catch (err) {
        this.metrics.ignored.inc({ reason: 'sink_error' });
        this.log.error({ err, user: change.user, mailbox: change.mailbox }, 'events: the change sink threw');
      }
    }
  }

  private onClientError(err: NodeJS.ErrnoException, socket: Duplex): void {
    if (this.closing.has(socket)) {
      // bytes after a request answered with `Connection: close`: no second answer, just close
      if (!socket.destroyed) socket.end();
      return;
    }
    let status = 400;
    let outcome: EventsRequestOutcome = 'bad_request';
    if (err.code === 'ERR_HTTP_REQUEST_TIMEOUT') {
      status = 408;
      outcome = 'timeout';
    } else if (err.code === 'HPE_HEADER_OVERFLOW') {
      status = 431;
      outcome = 'too_large';
    } else if (err.code === 'ECONNRESET' || !socket.writable) {
      this.metrics.requests.inc({ outcome: 'aborted' });
      socket.destroy();
      return;
    }
    this.metrics.requests.inc({ outcome });
    this.counters.rejected++;
    try {
      const reason = http.STATUS_CODES[status] ?? 'Bad Request';
      socket.end(`HTTP/1.1 ${status} ${reason}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
    } catch {
      /* socket gone */
    }
    setTimeout(() => socket.destroy(), 1000).unref();
  }

  private warnThrottled(outcome: EventsRequestOutcome, message: string, req: http.IncomingMessage): void {
    const now = this.clock();
    const key = outcome;
    const last = this.lastWarn.get(key);
    const fields = { outcome, reason: message, remote: req.socket?.remoteAddress, method: req.method };
    if (outcome === 'not_found' || outcome === 'method_not_allowed' || (last !== undefined && now - last < 60_000)) {
      this.log.debug(fields, 'events: request refused');
      return;
    }
    this.lastWarn.set(key, now);
    this.log.warn(fields, 'events: request refused (further ones for a minute at debug level)');
  }
}

/** A Cyrus imapd.conf switch value (yes/no, on/off, true/false, 1/0, t/f). */
export function parseCyrusSwitch(v: string): boolean | undefined {
  const s = v.trim().toLowerCase();
  if (['1', 'yes', 'on', 'true', 't', 'y'].includes(s)) return true;
  if (['0', 'no', 'off', 'false', 'f', 'n'].includes(s)) return false;
  return undefined;
}

function isLoopback(host: string): boolean {
  return /^127\./.test(host) || host === '::1' || host === '::ffff:127.0.0.1' || host === 'localhost';
}

/** Options of the listener from the `serve` config (--events-listen, --events-secret-file). */
export async function eventsListenerOptionsFromConfig(
  config: { eventsListen: { host: string; port: number }; eventsSecretFile?: string | undefined },
  deps: { onChange: ChangeSink; log?: Logger; registry?: Registry },
): Promise<EventsListenerOptions> {
  return {
    onChange: deps.onChange,
    listen: { host: config.eventsListen.host, port: config.eventsListen.port },
    ...(config.eventsSecretFile ? { secret: await readEventsSecret(config.eventsSecretFile) } : {}),
    ...(deps.log ? { log: deps.log } : {}),
    ...(deps.registry ? { registry: deps.registry } : {}),
  };
}
