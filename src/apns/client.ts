/**
 * The wire to APNs: HTTP/2 over TLS on Node's built-in `node:http2` (see
 * docs/protocol-notes.md (b) for why not undici). One request per notification,
 * answered with APNs's status and reason; what an answer means is the dispatcher's.
 *
 * - A pool of `connections` sessions, opened on first use and kept open (APNs treats
 *   connection churn as abuse). Requests go to the least busy ready session; each
 *   session takes at most the server's SETTINGS_MAX_CONCURRENT_STREAMS (capped at
 *   1000), beyond that requests wait in a FIFO here.
 * - A session is taken out of the pool at once on `goaway`, `error`, `close`,
 *   `frameError` and `timeout`; its in-flight streams finish if they can. Streams
 *   APNs refused unprocessed (above a GOAWAY's lastStreamID, REFUSED_STREAM, or never
 *   sent) are re-sent on another session: not a failure, counted in a metric.
 * - Sessions that heard nothing for a while are PINGed; an unanswered PING destroys
 *   the session (a new one is opened on demand).
 * - Failed connects, and GOAWAYs carrying an error (anything but NO_ERROR with no
 *   reason, Shutdown or IdleTimeout), back off exponentially with jitter; while
 *   backing off with no session left, sends fail at once with the last error (the
 *   dispatcher retries later), so APNs is never hammered. The first answer resets it.
 * - Every request has a deadline (requestTimeoutMs from send(), queueing included):
 *   past it the stream is reset (CANCEL) and the send rejects with 'timeout'. RSTs
 *   are rate-limited per session (servers kill connections that reset too many
 *   streams, CVE-2023-44487); beyond the budget the stalled session is retired and
 *   destroyed once its requests have timed out.
 *
 * Nothing the network does throws out of an event handler: every path ends in a
 * settled promise or a log line. Full device tokens are never logged.
 */
import http2, {
  type ClientHttp2Session,
  type ClientHttp2Stream,
  type IncomingHttpHeaders,
  type OutgoingHttpHeaders,
  type SecureClientSessionOptions,
  type Settings,
} from 'node:http2';
import { createSecureContext, rootCertificates } from 'node:tls';
import { performance } from 'node:perf_hooks';
import type { Registry } from 'prom-client';
import { silentLogger, type Logger } from '../ops/log.js';
import {
  ApnsTransportError,
  type ApnsCredentials,
  type ApnsNotification,
  type ApnsResponse,
  type ApnsTransport,
  type TransportErrorKind,
} from './types.js';
import { ProviderTokenCache } from './jwt.js';
import { apnsClientMetrics, goawayReasonLabel, type ApnsClientMetrics, type RequestOutcome, type SessionCounts } from './client-metrics.js';

const { NGHTTP2_CANCEL, NGHTTP2_NO_ERROR, NGHTTP2_REFUSED_STREAM } = http2.constants;

export const APNS_PRODUCTION_URL = 'https://api.push.apple.com:443';
export const APNS_SANDBOX_URL = 'https://api.sandbox.push.apple.com:443';

/** Streams per session even if the server allows more (Apple advertises 1000). */
export const MAX_STREAMS_PER_SESSION = 1000;
/** A request refused unprocessed more often than this fails with 'reset'. */
export const MAX_REFUSED_RETRIES = 5;
/**
 * RST_STREAMs (timed-out requests) per session: a burst, then a rate. Servers kill
 * connections that reset streams faster (nghttp2's default: 1000 burst, 33/s).
 */
export const RESET_BURST = 500;
export const RESET_RATE_PER_SECOND = 20;
/** Response bodies are tiny JSON; anything beyond this is not kept. */
const MAX_BODY_BYTES = 16 * 1024;

/** GOAWAY reasons that only mean "this connection ends": reconnect at once. */
const GRACEFUL_GOAWAY_REASONS = new Set(['Shutdown', 'IdleTimeout']);

const kClient = Symbol('apnsClient');
const kRequest = Symbol('apnsRequest');
type TaggedStream = ClientHttp2Stream & { [kClient]?: Http2ApnsClient; [kRequest]?: PendingRequest };

export interface Http2ApnsClientOptions {
  /** 'production' (what Mail uses), 'sandbox', or an https URL (a mock). */
  endpoint: 'production' | 'sandbox' | string;
  credentials: ApnsCredentials;
  /** PEM CA(s) trusted for the server certificate, in addition to the system roots. */
  ca?: string;
  /** Sessions kept open (default 2). */
  connections?: number;
  /** Deadline of one send, queueing included (default 15 000 ms). */
  requestTimeoutMs?: number;
  /** PING a session that heard nothing for this long (default 60 000 ms; 0: never). */
  pingIntervalMs?: number;
  /** Destroy a session whose PING is not answered within this (default 10 000 ms). */
  pingTimeoutMs?: number;
  /** TCP + TLS + the server's SETTINGS within this (default 10 000 ms). */
  connectTimeoutMs?: number;
  /** Back-off between failed connects (default 500 ms doubling up to 30 000 ms, with jitter). */
  reconnectBackoff?: { initialMs?: number; maxMs?: number };
  /** How long close() lets in-flight requests finish before destroying sessions (default 3 000 ms). */
  closeGraceMs?: number;
  registry?: Registry;
  log?: Logger;
}

/** Counts for diagnostics and tests. */
export interface Http2ApnsClientStats {
  /** send() calls not yet settled. */
  pending: number;
  /** Requests waiting for a free stream. */
  queued: number;
  /** Streams open on any session. */
  inFlight: number;
  sessions: SessionCounts;
  /** Sessions opened since the client was created. */
  sessionsOpened: number;
  /** Consecutive failed connects (0 once one succeeds). */
  connectFailures: number;
}

/** The https origin for an endpoint option. */
export function resolveEndpoint(endpoint: string): URL {
  const raw = endpoint === 'production' ? APNS_PRODUCTION_URL : endpoint === 'sandbox' ? APNS_SANDBOX_URL : endpoint;
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new Error(`APNs endpoint is not production, sandbox or an https URL: ${endpoint}`);
  }
  if (url.protocol !== 'https:') throw new Error(`APNs endpoint must be https: ${endpoint}`);
  return new URL(url.origin);
}

/** Retry-After (delta seconds or HTTP date) in ms, or undefined when absent or unreadable. */
export function parseRetryAfter(value: string | string[] | undefined, now: number = Date.now()): number | undefined {
  const v = (Array.isArray(value) ? value[0] : value)?.trim();
  if (!v) return undefined;
  if (/^\d+$/.test(v)) return Number(v) * 1000;
  const at = Date.parse(v);
  if (Number.isNaN(at)) return undefined;
  return Math.max(0, at - now);
}

/** `reason` and `timestamp` (ms) of an APNs JSON error body; {} for anything else. */
export function parseErrorBody(body: string): { reason?: string; timestamp?: number } {
  if (!body) return {};
  let parsed: unknown;
  try {
    parsed = JSON.parse(body);
  } catch {
    return {};
  }
  if (!parsed || typeof parsed !== 'object') return {};
  const { reason, timestamp } = parsed as { reason?: unknown; timestamp?: unknown };
  const out: { reason?: string; timestamp?: number } = {};
  if (typeof reason === 'string' && reason) out.reason = reason;
  if (typeof timestamp === 'number' && Number.isFinite(timestamp)) out.timestamp = timestamp;
  else if (typeof timestamp === 'string' && /^\d+$/.test(timestamp)) out.timestamp = Number(timestamp);
  return out;
}

const TLS_VERIFY_CODES = new Set([
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'CERT_HAS_EXPIRED',
  'CERT_NOT_YET_VALID',
  'CERT_SIGNATURE_FAILURE',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'CERT_REVOKED',
  'HOSTNAME_MISMATCH',
]);

/** 'tls' for handshake/certificate problems, 'connect' for everything else. */
export function classifyConnectError(err: unknown): 'tls' | 'connect' {
  const e = err as { code?: unknown; library?: unknown; reason?: unknown } | null;
  const code = typeof e?.code === 'string' ? e.code : '';
  if (code.startsWith('ERR_SSL_') || code.startsWith('ERR_TLS_') || TLS_VERIFY_CODES.has(code)) return 'tls';
  if (typeof e?.library === 'string' && /ssl|tls/i.test(e.library)) return 'tls';
  // TCP was up, the peer hung up mid-handshake: how a server refusing our certificate
  // without an alert looks (Node's own TLS server does exactly that).
  if (err instanceof Error && /before secure TLS connection was established/.test(err.message)) return 'tls';
  return 'connect';
}

function errorMessage(err: unknown): string {
  if (err instanceof Error) {
    const code = (err as NodeJS.ErrnoException).code;
    return code && !err.message.includes(code) ? `${code}: ${err.message}` : err.message;
  }
  return String(err);
}

// ------------------------------------------------------------------ requests ---

interface PendingRequest {
  readonly notification: ApnsNotification;
  readonly resolve: (response: ApnsResponse) => void;
  readonly reject: (error: ApnsTransportError) => void;
  readonly startedAt: number;
  timer: NodeJS.Timeout | undefined;
  settled: boolean;
  refusals: number;
  stream: ClientHttp2Stream | null;
  session: PoolSession | null;
  // the exchange on the current stream
  responseHeaders: IncomingHttpHeaders | undefined;
  body: Buffer[] | null;
  bodyLength: number;
  ended: boolean;
  streamError: Error | undefined;
  // intrusive FIFO links
  queued: boolean;
  prev: PendingRequest | null;
  next: PendingRequest | null;
}

/** FIFO with O(1) removal from anywhere (timeouts leave the middle). */
class RequestQueue {
  private head: PendingRequest | null = null;
  private tail: PendingRequest | null = null;
  size = 0;

  push(r: PendingRequest): void {
    r.prev = this.tail;
    r.next = null;
    if (this.tail) this.tail.next = r;
    else this.head = r;
    this.tail = r;
    r.queued = true;
    this.size++;
  }

  unshift(r: PendingRequest): void {
    r.next = this.head;
    r.prev = null;
    if (this.head) this.head.prev = r;
    else this.tail = r;
    this.head = r;
    r.queued = true;
    this.size++;
  }

  shift(): PendingRequest | null {
    const r = this.head;
    if (r) this.remove(r);
    return r;
  }

  remove(r: PendingRequest): void {
    if (!r.queued) return;
    if (r.prev) r.prev.next = r.next;
    else this.head = r.next;
    if (r.next) r.next.prev = r.prev;
    else this.tail = r.prev;
    r.prev = r.next = null;
    r.queued = false;
    this.size--;
  }
}

// ------------------------------------------------------------------ sessions ---

type SessionState = 'connecting' | 'ready' | 'retired' | 'closed';

class PoolSession {
  state: SessionState = 'connecting';
  everReady = false;
  /** TLS is up ('connect'), the server's SETTINGS may still be missing. */
  tlsUp = false;
  /** Retired on purpose (credentials changed, client closing): not a connect failure. */
  abandoned = false;
  h2: ClientHttp2Session | null = null;
  /** Streams open on this session. */
  active = 0;
  /** The server's SETTINGS_MAX_CONCURRENT_STREAMS (capped). */
  capacity = 0;
  /** lastStreamID of a GOAWAY received, -1 before. */
  goawayLastStreamId = -1;
  lastHeardAt = performance.now();
  pingOutstanding = false;
  connectTimer: NodeJS.Timeout | undefined;
  pingTimer: NodeJS.Timeout | undefined;
  pingDeadline: NodeJS.Timeout | undefined;
  /** Why the session failed, when it did. */
  error: ApnsTransportError | undefined;
  /** Set when the session was abandoned as stalled: destroys it. */
  stalledTimer: NodeJS.Timeout | undefined;
  private resetTokens = RESET_BURST;
  private resetRefilledAt = performance.now();

  constructor(readonly id: number) {}

  /** May we RST one more stream (token bucket below common rapid-reset limits)? */
  takeResetToken(): boolean {
    const now = performance.now();
    this.resetTokens = Math.min(RESET_BURST, this.resetTokens + ((now - this.resetRefilledAt) / 1000) * RESET_RATE_PER_SECOND);
    this.resetRefilledAt = now;
    if (this.resetTokens < 1) return false;
    this.resetTokens -= 1;
    return true;
  }

  usable(): boolean {
    const h2 = this.h2;
    return this.state === 'ready' && h2 !== null && !h2.closed && !h2.destroyed && this.active < this.capacity;
  }

  clearTimers(): void {
    clearTimeout(this.connectTimer);
    clearInterval(this.pingTimer);
    clearTimeout(this.pingDeadline);
    this.connectTimer = this.pingTimer = this.pingDeadline = undefined;
    this.pingOutstanding = false;
  }
}

// -------------------------------------------------------------------- client ---

export class Http2ApnsClient implements ApnsTransport {
  private readonly origin: string;
  private readonly ca: string[] | undefined;
  private credentials: ApnsCredentials;
  private tokens: ProviderTokenCache | null;

  private readonly connections: number;
  private readonly requestTimeoutMs: number;
  private readonly pingIntervalMs: number;
  private readonly pingTimeoutMs: number;
  private readonly connectTimeoutMs: number;
  private readonly backoffInitialMs: number;
  private readonly backoffMaxMs: number;
  private readonly closeGraceMs: number;

  private readonly log: Logger;
  private readonly metrics: ApnsClientMetrics;
  private readonly removeMetricsSource: () => void;

  /** Sessions that take new requests (connecting or ready). */
  private readonly pool: PoolSession[] = [];
  /** Retired sessions finishing their in-flight streams. */
  private readonly draining = new Set<PoolSession>();
  private readonly queue = new RequestQueue();
  private pendingCount = 0;
  private nextSessionId = 1;
  private sessionsOpened = 0;

  private consecutiveFailures = 0;
  private nextConnectAt = 0;
  private lastConnectError: ApnsTransportError | undefined;

  private pumping = false;
  private pumpAgain = false;
  private closing = false;
  private closePromise: Promise<void> | undefined;
  private onSessionGone: (() => void) | undefined;

  constructor(opts: Http2ApnsClientOptions) {
    this.origin = resolveEndpoint(opts.endpoint).origin;
    this.ca = opts.ca ? [...rootCertificates, opts.ca] : undefined;
    this.connections = positiveInt(opts.connections, 2, 'connections');
    this.requestTimeoutMs = positiveInt(opts.requestTimeoutMs, 15_000, 'requestTimeoutMs');
    this.pingIntervalMs = opts.pingIntervalMs === 0 ? 0 : positiveInt(opts.pingIntervalMs, 60_000, 'pingIntervalMs');
    this.pingTimeoutMs = positiveInt(opts.pingTimeoutMs, 10_000, 'pingTimeoutMs');
    this.connectTimeoutMs = positiveInt(opts.connectTimeoutMs, 10_000, 'connectTimeoutMs');
    this.backoffInitialMs = positiveInt(opts.reconnectBackoff?.initialMs, 500, 'reconnectBackoff.initialMs');
    this.backoffMaxMs = Math.max(this.backoffInitialMs, positiveInt(opts.reconnectBackoff?.maxMs, 30_000, 'reconnectBackoff.maxMs'));
    this.closeGraceMs = opts.closeGraceMs ?? 3_000;
    this.log = (opts.log ?? silentLogger()).child({ component: 'apns-client' });
    this.credentials = opts.credentials;
    this.tokens = prepareCredentials(opts.credentials);
    this.metrics = apnsClientMetrics(opts.registry);
    this.removeMetricsSource = this.metrics.addSessionSource(() => this.sessionCounts());
  }

  send(notification: ApnsNotification): Promise<ApnsResponse> {
    return new Promise<ApnsResponse>((resolve, reject) => {
      const req: PendingRequest = {
        notification,
        resolve,
        reject,
        startedAt: performance.now(),
        timer: undefined,
        settled: false,
        refusals: 0,
        stream: null,
        session: null,
        responseHeaders: undefined,
        body: null,
        bodyLength: 0,
        ended: false,
        streamError: undefined,
        queued: false,
        prev: null,
        next: null,
      };
      if (this.closing) {
        req.settled = true;
        this.observe(req, 'transport_error');
        reject(new ApnsTransportError('closed', 'APNs client is closed'));
        return;
      }
      this.pendingCount++;
      req.timer = setTimeout(() => this.onRequestTimeout(req), this.requestTimeoutMs);
      this.queue.push(req);
      this.fillPool();
      this.pump();
    });
  }

  setCredentials(credentials: ApnsCredentials): void {
    const tokens = prepareCredentials(credentials);
    this.credentials = credentials;
    this.tokens = tokens;
    this.consecutiveFailures = 0;
    this.nextConnectAt = 0;
    this.lastConnectError = undefined;
    const old = [...this.pool];
    for (const s of old) {
      if (s.state === 'connecting') s.abandoned = true;
      this.retire(s, 'credentials changed');
    }
    this.log.info({ kind: credentials.kind, retiredSessions: old.length }, 'APNs credentials replaced; existing sessions drain');
    if (this.queue.size > 0) {
      this.fillPool();
      this.pump();
    }
  }

  close(): Promise<void> {
    if (this.closePromise) return this.closePromise;
    this.closing = true;
    this.rejectQueued(() => new ApnsTransportError('closed', 'APNs client closed before the request was sent'));
    for (const s of [...this.pool]) {
      s.abandoned = true;
      this.retire(s, 'client closing');
    }
    this.closePromise = new Promise<void>((resolve) => {
      let graceTimer: NodeJS.Timeout | undefined;
      let lastResort: NodeJS.Timeout | undefined;
      const finish = (): void => {
        clearTimeout(graceTimer);
        clearTimeout(lastResort);
        this.onSessionGone = undefined;
        this.removeMetricsSource();
        resolve();
      };
      this.onSessionGone = () => {
        if (this.pool.length === 0 && this.draining.size === 0) finish();
      };
      if (this.pool.length === 0 && this.draining.size === 0) {
        finish();
        return;
      }
      graceTimer = setTimeout(() => {
        for (const s of [...this.pool, ...this.draining]) destroyQuietly(s.h2);
        lastResort = setTimeout(finish, 1_000);
      }, this.closeGraceMs);
    });
    return this.closePromise;
  }

  stats(): Http2ApnsClientStats {
    let inFlight = 0;
    for (const s of this.pool) inFlight += s.active;
    for (const s of this.draining) inFlight += s.active;
    return {
      pending: this.pendingCount,
      queued: this.queue.size,
      inFlight,
      sessions: this.sessionCounts(),
      sessionsOpened: this.sessionsOpened,
      connectFailures: this.consecutiveFailures,
    };
  }

  // ------------------------------------------------------------- scheduling ---

  private sessionCounts(): SessionCounts {
    let ready = 0;
    let connecting = 0;
    for (const s of this.pool) {
      if (s.state === 'ready') ready++;
      else if (s.state === 'connecting') connecting++;
    }
    return { ready, connecting, draining: this.draining.size };
  }

  /** Hands queued requests to sessions with free streams; opens sessions when needed. */
  private pump(): void {
    if (this.pumping) {
      this.pumpAgain = true;
      return;
    }
    this.pumping = true;
    try {
      do {
        this.pumpAgain = false;
        while (this.queue.size > 0) {
          const s = this.pickSession();
          if (!s) break;
          this.dispatch(this.queue.shift()!, s);
        }
        if (this.queue.size > 0 && !this.closing) {
          this.fillPool();
          if (this.pool.length === 0) {
            // No session and none may be opened yet: back-off after failed connects.
            const cause = this.lastConnectError;
            const waitMs = Math.max(0, this.nextConnectAt - Date.now());
            this.rejectQueued(
              () =>
                new ApnsTransportError(
                  cause?.kind ?? 'connect',
                  `APNs unreachable (next connect in ${waitMs} ms)${cause ? `: ${cause.message}` : ''}`,
                  { cause },
                ),
            );
          }
        }
      } while (this.pumpAgain);
    } finally {
      this.pumping = false;
    }
  }

  private pickSession(): PoolSession | null {
    let best: PoolSession | null = null;
    for (const s of this.pool) {
      if (s.usable() && (best === null || s.active < best.active)) best = s;
    }
    return best;
  }

  /** Opens sessions up to the pool size, unless backing off after failed connects. */
  private fillPool(): void {
    if (this.closing || this.pool.length >= this.connections) return;
    if (this.nextConnectAt > 0 && Date.now() < this.nextConnectAt) return;
    while (this.pool.length < this.connections && !this.closing) {
      if (!this.openSession()) break;
    }
  }

  private rejectQueued(makeError: () => ApnsTransportError): void {
    for (let r = this.queue.shift(); r; r = this.queue.shift()) this.fail(r, makeError());
  }

  // --------------------------------------------------------------- requests ---

  private requestHeaders(n: ApnsNotification): OutgoingHttpHeaders {
    const headers: OutgoingHttpHeaders = {
      ':method': 'POST',
      ':path': `/3/device/${encodeURIComponent(n.deviceToken)}`,
      'apns-push-type': n.pushType,
      'apns-priority': String(n.priority),
      'apns-expiration': String(n.expiration),
      'content-type': 'application/json',
    };
    if (n.topic) headers['apns-topic'] = n.topic;
    if (n.collapseId !== undefined) headers['apns-collapse-id'] = n.collapseId;
    if (this.tokens) headers.authorization = `bearer ${this.tokens.get()}`;
    return headers;
  }

  private dispatch(req: PendingRequest, s: PoolSession): void {
    const h2 = s.h2!;
    let stream: ClientHttp2Stream;
    try {
      stream = h2.request(this.requestHeaders(req.notification), { endStream: false });
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ERR_HTTP2_GOAWAY_SESSION' || code === 'ERR_HTTP2_INVALID_SESSION' || code === 'ERR_HTTP2_OUT_OF_STREAMS' || h2.closed || h2.destroyed) {
        // Never sent: put it back and take the session out of the pool.
        this.queue.unshift(req);
        this.retire(s, `session refuses new streams (${code ?? 'closed'})`);
        return;
      }
      this.fail(req, new ApnsTransportError('protocol', `request rejected before sending: ${errorMessage(err)}`, { cause: err }));
      return;
    }
    s.active++;
    req.stream = stream;
    req.session = s;
    req.responseHeaders = undefined;
    req.body = null;
    req.bodyLength = 0;
    req.ended = false;
    req.streamError = undefined;
    // Shared handlers (no closures per request): the stream carries its client and request.
    const tagged = stream as TaggedStream;
    tagged[kClient] = this;
    tagged[kRequest] = req;
    stream.on('response', Http2ApnsClient.onStreamResponse);
    stream.on('data', Http2ApnsClient.onStreamData);
    stream.on('end', Http2ApnsClient.onStreamEnd);
    stream.on('error', Http2ApnsClient.onStreamError);
    stream.on('close', Http2ApnsClient.onStreamClose);
    stream.end(req.notification.payload);
  }

  private static onStreamResponse(this: TaggedStream, headers: IncomingHttpHeaders): void {
    const req = this[kRequest]!;
    req.responseHeaders = headers;
    if (req.session) req.session.lastHeardAt = performance.now();
  }

  private static onStreamData(this: TaggedStream, chunk: Buffer): void {
    const req = this[kRequest]!;
    if (req.bodyLength >= MAX_BODY_BYTES) return;
    (req.body ??= []).push(chunk);
    req.bodyLength += chunk.length;
  }

  private static onStreamEnd(this: TaggedStream): void {
    // Node may end a stream that the server reset: only a clean end is an answer.
    const code = this.rstCode;
    if (code !== undefined && code !== NGHTTP2_NO_ERROR) return;
    const req = this[kRequest]!;
    req.ended = true;
    if (req.responseHeaders) {
      const body = req.body === null ? '' : Buffer.concat(req.body).toString('utf8');
      this[kClient]!.answered(req, req.responseHeaders, body);
    }
  }

  private static onStreamError(this: TaggedStream, err: Error): void {
    this[kRequest]!.streamError = err;
  }

  private static onStreamClose(this: TaggedStream): void {
    const client = this[kClient]!;
    const req = this[kRequest]!;
    const s = req.session!;
    s.active--;
    req.stream = null;
    req.session = null;
    if (!req.settled && !(req.ended && req.responseHeaders)) {
      client.streamClosedEarly(req, s, this, req.responseHeaders !== undefined, req.streamError);
    }
    req.body = null;
    req.responseHeaders = undefined;
    if (client.queue.size > 0) client.pump();
  }

  private answered(req: PendingRequest, headers: IncomingHttpHeaders, body: string): void {
    if (this.consecutiveFailures !== 0) {
      this.consecutiveFailures = 0;
      this.nextConnectAt = 0;
      this.lastConnectError = undefined;
    }
    const status = Number(headers[':status']) || 0;
    const response: ApnsResponse = { status };
    const apnsId = headers['apns-id'];
    if (typeof apnsId === 'string') response.apnsId = apnsId;
    if (status !== 200 || body) {
      const { reason, timestamp } = parseErrorBody(body);
      if (reason !== undefined) response.reason = reason;
      if (timestamp !== undefined) response.timestamp = timestamp;
    }
    const retryAfterMs = parseRetryAfter(headers['retry-after']);
    if (retryAfterMs !== undefined) response.retryAfterMs = retryAfterMs;
    if (status === 403 && response.reason === 'ExpiredProviderToken' && this.tokens) {
      const renewed = this.tokens.expire();
      this.log.warn({ renewed }, 'APNs says the provider token expired');
    }
    if (this.settle(req, 'answered')) req.resolve(response);
  }

  private streamClosedEarly(req: PendingRequest, s: PoolSession, stream: ClientHttp2Stream, gotHeaders: boolean, err: Error | undefined): void {
    const code = stream.rstCode;
    const id = stream.id;
    // Not processed by APNs (RFC 9113 §8.7): refused, above the GOAWAY's lastStreamID, or never sent.
    const unprocessed =
      !gotHeaders &&
      (code === NGHTTP2_REFUSED_STREAM || id === undefined || (s.goawayLastStreamId >= 0 && id > s.goawayLastStreamId));
    if (unprocessed && !this.closing) {
      req.refusals++;
      if (req.refusals <= MAX_REFUSED_RETRIES) {
        this.metrics.retriedRefusedStreams.inc();
        this.queue.unshift(req);
        return;
      }
      this.fail(req, new ApnsTransportError('reset', `APNs refused the request ${req.refusals} times`));
      return;
    }
    let kind: TransportErrorKind = 'reset';
    if (this.closing) kind = 'closed';
    else if (s.error?.kind === 'tls') kind = 'tls';
    const detail = err ? `: ${errorMessage(err)}` : s.error ? `: ${s.error.message}` : '';
    const what = gotHeaders ? 'stream reset mid-response' : 'stream closed before APNs answered';
    this.fail(req, new ApnsTransportError(kind, `${what} (code ${code ?? '?'})${detail}`, { cause: err ?? s.error }));
  }

  private onRequestTimeout(req: PendingRequest): void {
    req.timer = undefined;
    if (req.settled) return;
    const stream = req.stream;
    const s = req.session;
    this.fail(req, new ApnsTransportError('timeout', `no answer from APNs within ${this.requestTimeoutMs} ms`));
    if (!stream || !s || stream.closed || stream.destroyed) return;
    // Silent for a whole request timeout: check the connection now rather than at the next PING.
    if (performance.now() - s.lastHeardAt >= this.requestTimeoutMs) this.maybePing(s, true);
    if (s.takeResetToken()) {
      try {
        stream.close(NGHTTP2_CANCEL);
      } catch {
        // the stream is gone already
      }
    } else {
      this.abandonStalledSession(s);
    }
  }

  /**
   * Too many requests timed out on one session to RST them all: servers treat floods
   * of RST_STREAM as an attack (CVE-2023-44487; nghttp2 answers GOAWAY). The session
   * takes no new requests and is destroyed once every request on it has timed out.
   */
  private abandonStalledSession(s: PoolSession): void {
    if (s.stalledTimer || s.state === 'closed') return;
    this.log.warn({ session: s.id, inFlight: s.active }, 'many APNs requests timed out on one session; replacing it');
    this.retire(s, 'stalled');
    s.stalledTimer = setTimeout(() => destroyQuietly(s.h2), this.requestTimeoutMs + 50);
    s.stalledTimer.unref();
  }

  /** Marks a request settled (once); false when it already was. */
  private settle(req: PendingRequest, outcome: RequestOutcome): boolean {
    if (req.settled) return false;
    req.settled = true;
    clearTimeout(req.timer);
    req.timer = undefined;
    this.queue.remove(req);
    this.pendingCount--;
    this.observe(req, outcome);
    return true;
  }

  private fail(req: PendingRequest, err: ApnsTransportError): void {
    if (this.settle(req, err.kind === 'timeout' ? 'timeout' : 'transport_error')) req.reject(err);
  }

  private observe(req: PendingRequest, outcome: RequestOutcome): void {
    this.metrics.requestDuration.observe({ outcome }, (performance.now() - req.startedAt) / 1000);
  }

  // --------------------------------------------------------------- sessions ---

  /** Opens one session into the pool; false when that failed synchronously. */
  private openSession(): boolean {
    const s = new PoolSession(this.nextSessionId++);
    if (this.sessionsOpened++ >= this.connections) this.metrics.reconnects.inc();
    const options: SecureClientSessionOptions = { settings: { enablePush: false } };
    if (this.ca) options.ca = this.ca;
    if (this.credentials.kind === 'certificate') {
      options.cert = this.credentials.certPem;
      options.key = this.credentials.keyPem;
    }
    let h2: ClientHttp2Session;
    try {
      h2 = http2.connect(this.origin, options);
    } catch (err) {
      s.state = 'closed';
      s.error = new ApnsTransportError(classifyConnectError(err), `cannot connect to APNs: ${errorMessage(err)}`, { cause: err });
      this.connectFailed(s);
      return false;
    }
    s.h2 = h2;
    this.pool.push(s);
    s.connectTimer = setTimeout(() => {
      s.connectTimer = undefined;
      if (s.state !== 'connecting') return;
      s.error ??= new ApnsTransportError('connect', `no HTTP/2 session with APNs within ${this.connectTimeoutMs} ms`);
      destroyQuietly(h2);
    }, this.connectTimeoutMs);
    h2.on('connect', () => {
      s.tlsUp = true;
    });
    h2.on('remoteSettings', (settings: Settings) => this.onRemoteSettings(s, settings));
    h2.on('goaway', (code: number, lastStreamID: number, data?: Buffer) => this.onGoaway(s, code, lastStreamID, data));
    h2.on('error', (err: Error) => this.onSessionError(s, err));
    h2.on('frameError', (type: number, code: number, streamId: number) => {
      this.log.warn({ session: s.id, frameType: type, code, streamId }, 'APNs session could not send a frame; retiring it');
      this.retire(s, 'frameError');
    });
    h2.on('timeout', () => this.retire(s, 'session timeout'));
    h2.on('close', () => this.onSessionClose(s));
    this.log.debug({ session: s.id, origin: this.origin }, 'connecting to APNs');
    return true;
  }

  private onRemoteSettings(s: PoolSession, settings: Settings): void {
    const max = settings.maxConcurrentStreams;
    s.capacity = Math.min(max === undefined ? MAX_STREAMS_PER_SESSION : max, MAX_STREAMS_PER_SESSION);
    s.lastHeardAt = performance.now();
    if (s.state === 'connecting') {
      s.state = 'ready';
      s.everReady = true;
      clearTimeout(s.connectTimer);
      s.connectTimer = undefined;
      // (the back-off is reset by the first answer, not here: a server may accept the
      // connection and then GOAWAY every request)
      if (this.pingIntervalMs > 0) {
        s.pingTimer = setInterval(() => this.maybePing(s), this.pingIntervalMs);
        s.pingTimer.unref();
      }
      this.log.debug({ session: s.id, maxConcurrentStreams: max }, 'APNs session ready');
    }
    if (this.queue.size > 0) this.pump();
  }

  private onGoaway(s: PoolSession, code: number, lastStreamID: number, data: Buffer | undefined): void {
    s.goawayLastStreamId = lastStreamID;
    let reason: string | undefined;
    if (data && data.length > 0) {
      const parsed = parseErrorBody(data.toString('utf8'));
      reason = parsed.reason ?? data.toString('utf8', 0, Math.min(data.length, 200));
    }
    if (s.state === 'retired' && reason === undefined && code === NGHTTP2_NO_ERROR) {
      // The server's answer to our own GOAWAY (session.close()): nothing to report.
      this.log.debug({ session: s.id, lastStreamID, inFlight: s.active }, 'APNs acknowledged the session close');
      return;
    }
    this.metrics.goaways.inc({ reason: goawayReasonLabel(reason) });
    this.log.warn({ session: s.id, code, lastStreamID, reason, inFlight: s.active }, 'APNs sent GOAWAY; session retired');
    const graceful = code === NGHTTP2_NO_ERROR && (reason === undefined || GRACEFUL_GOAWAY_REASONS.has(reason));
    if (!graceful) {
      // An error GOAWAY (BadCertificate, Forbidden, ENHANCE_YOUR_CALM, …): reconnecting at once
      // would be churn. Refused requests are still re-sent, on another session or after the back-off.
      const kind: TransportErrorKind = reason?.startsWith('BadCertificate') ? 'tls' : 'protocol';
      this.noteFailure(new ApnsTransportError(kind, `APNs sent GOAWAY${reason ? ` ${reason}` : ''} (code ${code})`), s.id, 'APNs GOAWAY with an error; backing off');
    }
    this.retire(s, 'goaway');
  }

  private onSessionError(s: PoolSession, err: Error): void {
    if (!s.error) {
      const kind = classifyConnectError(err) === 'tls' ? 'tls' : s.everReady ? 'reset' : 'connect';
      s.error = new ApnsTransportError(kind, `APNs session error: ${errorMessage(err)}`, { cause: err });
    }
    if (!this.closing) this.log.warn({ session: s.id, err: errorMessage(err), ready: s.everReady }, 'APNs session error');
    this.retire(s, 'error');
  }

  /** Takes a session out of the pool: no new streams, in-flight ones may finish. */
  private retire(s: PoolSession, why: string): void {
    if (s.state === 'retired' || s.state === 'closed') return;
    const wasConnecting = s.state === 'connecting';
    s.state = 'retired';
    const i = this.pool.indexOf(s);
    if (i >= 0) this.pool.splice(i, 1);
    this.draining.add(s);
    s.clearTimers();
    this.log.debug({ session: s.id, why, inFlight: s.active }, 'APNs session retired');
    if (wasConnecting) {
      // A failed connect: back off before the next one (set before anything may reconnect).
      if (!s.abandoned && !this.closing) this.connectFailed(s);
    } else if (this.pendingCount > 0) {
      // While there is work, keep the pool at full size (otherwise it refills on the next send).
      this.fillPool();
    }
    const h2 = s.h2;
    if (h2 && !h2.destroyed) {
      try {
        if (wasConnecting) h2.destroy();
        else if (!h2.closed) h2.close();
      } catch {
        destroyQuietly(h2);
      }
    }
    if (this.queue.size > 0) this.pump();
  }

  private onSessionClose(s: PoolSession): void {
    const was = s.state;
    s.clearTimers();
    clearTimeout(s.stalledTimer);
    s.state = 'closed';
    const i = this.pool.indexOf(s);
    if (i >= 0) this.pool.splice(i, 1);
    this.draining.delete(s);
    if (was === 'connecting' && !s.abandoned && !this.closing) this.connectFailed(s);
    else if (was === 'ready' && !this.closing) {
      this.log.info({ session: s.id }, 'APNs session closed');
      if (this.pendingCount > 0) this.fillPool();
    }
    this.onSessionGone?.();
    if (this.queue.size > 0) this.pump();
  }

  private connectFailed(s: PoolSession): void {
    let err = s.error;
    if (!err) {
      // Closed after our TLS handshake but before the server's SETTINGS: with TLS 1.3 that is
      // how a refused client certificate looks (the server validates it after we are done).
      err =
        s.tlsUp && this.credentials.kind === 'certificate'
          ? new ApnsTransportError('tls', 'APNs closed the connection right after the TLS handshake (client certificate refused?)')
          : new ApnsTransportError('connect', 'connection to APNs closed during setup');
    }
    this.noteFailure(err, s.id, 'APNs connection failed');
  }

  /** A failed connect or an error GOAWAY: no new connection before an exponential back-off. */
  private noteFailure(err: ApnsTransportError, sessionId: number, what: string): void {
    this.consecutiveFailures++;
    const base = Math.min(this.backoffMaxMs, this.backoffInitialMs * 2 ** Math.min(this.consecutiveFailures - 1, 30));
    const delay = Math.round(base / 2 + (Math.random() * base) / 2);
    this.nextConnectAt = Date.now() + delay;
    this.lastConnectError = err;
    this.metrics.connectFailures.inc({ kind: err.kind });
    this.log.warn({ session: sessionId, kind: err.kind, err: err.message, failures: this.consecutiveFailures, retryInMs: delay }, what);
    if (this.queue.size > 0) this.pump();
  }

  private maybePing(s: PoolSession, now = false): void {
    const h2 = s.h2;
    if (s.state !== 'ready' || s.pingOutstanding || !h2) return;
    if (!now && performance.now() - s.lastHeardAt < this.pingIntervalMs / 2) return;
    s.pingOutstanding = true;
    s.pingDeadline = setTimeout(() => {
      s.pingDeadline = undefined;
      if (s.state !== 'ready') return;
      s.error = new ApnsTransportError('timeout', `PING not answered within ${this.pingTimeoutMs} ms`);
      this.metrics.pingTimeouts.inc();
      this.log.warn({ session: s.id, inFlight: s.active }, 'APNs PING unanswered; destroying the session');
      this.retire(s, 'ping timeout');
      destroyQuietly(h2);
    }, this.pingTimeoutMs);
    s.pingDeadline.unref();
    let sent = false;
    try {
      sent = h2.ping((err) => {
        clearTimeout(s.pingDeadline);
        s.pingDeadline = undefined;
        s.pingOutstanding = false;
        if (!err) s.lastHeardAt = performance.now();
      });
    } catch {
      sent = false;
    }
    if (!sent) {
      clearTimeout(s.pingDeadline);
      s.pingDeadline = undefined;
      s.pingOutstanding = false;
    }
  }
}

function positiveInt(value: number | undefined, fallback: number, name: string): number {
  if (value === undefined) return fallback;
  if (!Number.isFinite(value) || value <= 0) throw new Error(`APNs client option ${name} must be a positive number, got ${value}`);
  return Math.ceil(value);
}

/** Checks credentials up front (throws a plain Error); the token cache for token auth. */
function prepareCredentials(credentials: ApnsCredentials): ProviderTokenCache | null {
  if (credentials.kind === 'token') return new ProviderTokenCache(credentials);
  try {
    createSecureContext({ cert: credentials.certPem, key: credentials.keyPem });
  } catch (err) {
    throw new Error(`APNs client certificate/key unusable: ${errorMessage(err)}`, { cause: err });
  }
  return null;
}

function destroyQuietly(h2: ClientHttp2Session | null): void {
  if (!h2 || h2.destroyed) return;
  try {
    h2.destroy();
  } catch {
    // already gone
  }
}
