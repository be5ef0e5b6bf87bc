/**
 * A real mock APNs for tests, the demo and benchmarks: HTTP/2 over TLS on loopback
 * (`http2.createSecureServer`), asking for a client certificate issued by `clientCa`
 * and refusing the handshake without one, like Apple does. It answers like Apple:
 * `apns-id` on every answer, JSON error bodies `{"reason":…}` (+ `timestamp` in ms on
 * 410), and it validates what Apple validates (method, path, token, topic against the
 * certificate's UID / topics extension, push type, priority, expiration, collapse id,
 * payload size; provider tokens when token auth is enabled).
 *
 * Knobs for failure tests: a per-request answer handler (status, reason, Retry-After,
 * delays, stalls, stream resets), GOAWAY after n answers, stalling everything,
 * destroying connections. No test-framework imports: this compiles into dist/.
 */
import http2, { type Http2SecureServer, type IncomingHttpHeaders, type OutgoingHttpHeaders, type ServerHttp2Session, type ServerHttp2Stream } from 'node:http2';
import { createPublicKey, randomUUID, verify, type KeyObject } from 'node:crypto';
import type { TLSSocket } from 'node:tls';
import type { AddressInfo } from 'node:net';
import forge from 'node-forge';
import { TOPICS_OID, createTestCa, issueServerCert, type TestCa } from './apns-certs.js';

const { NGHTTP2_NO_ERROR, NGHTTP2_REFUSED_STREAM, NGHTTP2_INTERNAL_ERROR } = http2.constants;

/** Apple's payload limit for regular pushes. */
export const MOCK_APNS_MAX_PAYLOAD = 4096;

export interface MockApnsOptions {
  /** PEM CA(s) that issued the accepted client certificates. */
  clientCa: string | string[];
  port?: number;
  host?: string;
  /** SETTINGS_MAX_CONCURRENT_STREAMS advertised (default 1000, like Apple). */
  maxConcurrentStreams?: number;
  /** CA for the server certificate (default: a fresh one); trust `caPem`. */
  serverCa?: TestCa;
  /**
   * Enables token authentication: key id → PEM public key (ES256). Connections
   * without a client certificate are then accepted and need a valid bearer token.
   */
  tokenKeys?: Record<string, string>;
  /** With tokenKeys: the team id the token's `iss` must carry (default: any). */
  teamId?: string;
  /** Keep RecordedRequests in `requests` (default true; benchmarks turn it off). */
  record?: boolean;
  /** Highest TLS version offered (default TLSv1.3; Apple's docs speak of TLS 1.2). */
  tlsMaxVersion?: 'TLSv1.2' | 'TLSv1.3';
}

export interface RecordedRequest {
  method: string;
  path: string;
  /** The token in the path (may be invalid; see the answer). */
  deviceToken: string;
  /** Request headers, pseudo-headers included, lower-case names. */
  headers: Record<string, string>;
  /** The body parsed as JSON, undefined when it is not JSON. */
  body: unknown;
  rawBody: string;
  /** Subject of the client certificate (e.g. { UID, CN, C }), null without one. */
  clientCertSubject: Record<string, string> | null;
  /** Topics the client certificate may push to (UID + topics extension). */
  clientCertTopics: string[];
  /** Decoded provider token (token auth). */
  providerToken?: { kid: string; iss: string; iat: number; valid: boolean };
  /** Which connection (1, 2, …), in accept order. */
  sessionId: number;
  streamId: number;
  /** ms since epoch. */
  at: number;
}

export interface MockAnswer {
  status: number;
  reason?: string;
  /** 410: ms since epoch (default: now). */
  timestamp?: number;
  /** Retry-After header: seconds, or an HTTP date. */
  retryAfter?: number | string;
  /** apns-id to answer with (default: the request's, else a random UUID). */
  apnsId?: string;
  /** Answer after this long. */
  delayMs?: number;
  /** Never answer (the client must time out). */
  stall?: boolean;
  /**
   * Reset the stream instead of answering: true = INTERNAL_ERROR, or an HTTP/2
   * error code (7 = REFUSED_STREAM: the client may safely re-send).
   */
  resetStream?: boolean | number;
  /** Send headers and part of the body, then reset (INTERNAL_ERROR). */
  resetMidResponse?: boolean;
}

export type MockHandler = (req: RecordedRequest) => MockAnswer | Promise<MockAnswer>;

export interface GoawayOptions {
  /**
   * 'processed' (default): lastStreamID = the highest stream answered on that
   * connection; streams above it are refused (not recorded) and must be re-sent.
   */
  lastStreamIdMode?: 'processed';
  /** GOAWAY debug data reason (default 'Shutdown'); null: no debug data. */
  reason?: string | null;
  /** HTTP/2 error code (default NO_ERROR). */
  errorCode?: number;
}

export interface MockApnsStats {
  /** Connections accepted since start. */
  sessionsOpened: number;
  /** Streams refused by a GOAWAY (their records were dropped). */
  refusedStreams: number;
  goawaysSent: number;
  /** Most streams ever open at once on one connection. */
  maxConcurrentStreamsSeen: number;
  /** TLS handshakes that failed (e.g. a client certificate from another CA). */
  tlsFailures: number;
  /** Requests received (refused-by-GOAWAY ones included), recorded or not. */
  requestsReceived: number;
  /** Connections that ended with an error (e.g. a client that vanished). */
  sessionErrors: number;
}

export interface MockApns {
  /** https://host:port */
  readonly url: string;
  readonly port: number;
  /** Trust this for the server certificate. */
  readonly caPem: string;
  /** Every request received (refused-by-GOAWAY ones excluded), in arrival order. */
  readonly requests: RecordedRequest[];
  respond(handler: MockHandler): void;
  /** GOAWAY after the next n answers, on the connection of the nth. */
  goawayAfter(nRequests: number, opts?: GoawayOptions): void;
  /** While on, requests are recorded but never answered. */
  stallAll(on: boolean): void;
  /** Drops every connection at the TCP level (no GOAWAY). */
  destroyConnections(): void;
  /** Open connections. */
  sessions(): number;
  stats(): MockApnsStats;
  waitForRequests(n: number, timeoutMs?: number): Promise<void>;
  close(): Promise<void>;
}

interface StreamEntry {
  stream: ServerHttp2Stream;
  refused: boolean;
  record: RecordedRequest | undefined;
}

interface SessionInfo {
  id: number;
  session: ServerHttp2Session;
  subject: Record<string, string> | null;
  topics: string[];
  hasCert: boolean;
  streams: Map<number, StreamEntry>;
  maxAnswered: number;
  goingAway: boolean;
}

const DEVICE_TOKEN_RE = /^(?:[0-9a-fA-F]{2}){32,100}$/;
const UUID_RE = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
const PUSH_TYPES = new Set(['alert', 'background', 'location', 'voip', 'complication', 'fileprovider', 'mdm', 'liveactivity', 'pushtotalk', 'widgets', 'controls']);

/** Topics a certificate may push to: its subject UID and its topics extension entries. */
export function certificateTopics(raw: Buffer | undefined, subject: Record<string, string> | null): string[] {
  const topics: string[] = [];
  const uid = subject?.UID;
  if (uid) topics.push(uid);
  if (!raw || raw.length === 0) return topics;
  try {
    const cert = forge.pki.certificateFromAsn1(forge.asn1.fromDer(raw.toString('binary')));
    const ext = cert.extensions.find((e: { id?: string }) => e.id === TOPICS_OID) as { value?: string } | undefined;
    if (ext?.value) {
      const seq = forge.asn1.fromDer(ext.value);
      if (Array.isArray(seq.value)) {
        for (const item of seq.value) {
          if (item.type === forge.asn1.Type.UTF8 && typeof item.value === 'string') {
            const t = forge.util.decodeUtf8(item.value);
            if (!topics.includes(t)) topics.push(t);
          }
        }
      }
    }
  } catch {
    // not parseable: the UID is all there is
  }
  return topics;
}

function flattenHeaders(h: IncomingHttpHeaders): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(h)) {
    if (v === undefined) continue;
    out[k] = Array.isArray(v) ? v.join(', ') : String(v);
  }
  return out;
}

function decodeToken(
  authorization: string | undefined,
  keys: Map<string, KeyObject>,
): { kid: string; iss: string; iat: number; valid: boolean } | 'missing' | 'malformed' {
  if (!authorization) return 'missing';
  const m = /^bearer\s+(\S+)$/i.exec(authorization);
  if (!m) return 'malformed';
  const parts = m[1]!.split('.');
  if (parts.length !== 3) return 'malformed';
  try {
    const header = JSON.parse(Buffer.from(parts[0]!, 'base64url').toString('utf8')) as { alg?: string; kid?: string };
    const claims = JSON.parse(Buffer.from(parts[1]!, 'base64url').toString('utf8')) as { iss?: string; iat?: number };
    const kid = String(header.kid ?? '');
    const key = keys.get(kid);
    const valid =
      header.alg === 'ES256' &&
      key !== undefined &&
      verify('sha256', Buffer.from(`${parts[0]}.${parts[1]}`), { key, dsaEncoding: 'ieee-p1363' }, Buffer.from(parts[2]!, 'base64url'));
    return { kid, iss: String(claims.iss ?? ''), iat: Number(claims.iat), valid };
  } catch {
    return 'malformed';
  }
}

export async function startMockApns(opts: MockApnsOptions): Promise<MockApns> {
  const host = opts.host ?? '127.0.0.1';
  const serverCa = opts.serverCa ?? createTestCa('xaps-proxy mock APNs CA');
  const serverCert = issueServerCert(serverCa, ['localhost', '127.0.0.1', ...(host !== '127.0.0.1' && host !== 'localhost' ? [host] : [])]);
  const tokenKeys = new Map<string, KeyObject>();
  for (const [kid, pem] of Object.entries(opts.tokenKeys ?? {})) tokenKeys.set(kid, createPublicKey(pem));
  const tokenAuth = tokenKeys.size > 0;

  const server: Http2SecureServer = http2.createSecureServer({
    cert: serverCert.certPem,
    key: serverCert.keyPem,
    ca: opts.clientCa,
    requestCert: true,
    // With token auth, connections without a certificate are allowed; a bad certificate
    // is still refused (checked by hand in 'secureConnection').
    rejectUnauthorized: !tokenAuth,
    allowHTTP1: false,
    maxVersion: opts.tlsMaxVersion ?? 'TLSv1.3',
    settings: { maxConcurrentStreams: opts.maxConcurrentStreams ?? 1000 },
  });

  const requests: RecordedRequest[] = [];
  const sessions = new Map<ServerHttp2Session, SessionInfo>();
  const sockets = new Set<TLSSocket>();
  const waiters = new Set<() => void>();
  const stats: MockApnsStats = { sessionsOpened: 0, refusedStreams: 0, goawaysSent: 0, maxConcurrentStreamsSeen: 0, tlsFailures: 0, requestsReceived: 0, sessionErrors: 0 };
  let handler: MockHandler = () => ({ status: 200 });
  let stalled = false;
  let goaway: { remaining: number; opts: GoawayOptions } | null = null;
  let nextSessionId = 1;

  server.on('secureConnection', (socket: TLSSocket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    if (tokenAuth) {
      const cert = socket.getPeerCertificate();
      const presented = cert && Object.keys(cert).length > 0;
      if (presented && !socket.authorized) socket.destroy();
    }
  });
  server.on('tlsClientError', () => {
    stats.tlsFailures++;
  });
  server.on('sessionError', () => {});

  server.on('session', (session: ServerHttp2Session) => {
    let subject: Record<string, string> | null = null;
    let raw: Buffer | undefined;
    try {
      const cert = (session.socket as TLSSocket).getPeerCertificate();
      if (cert && Object.keys(cert).length > 0) {
        subject = { ...(cert.subject as unknown as Record<string, string>) };
        raw = cert.raw;
      }
    } catch {
      // no certificate
    }
    const info: SessionInfo = {
      id: nextSessionId++,
      session,
      subject,
      topics: certificateTopics(raw, subject),
      hasCert: subject !== null,
      streams: new Map(),
      maxAnswered: 0,
      goingAway: false,
    };
    stats.sessionsOpened++;
    sessions.set(session, info);
    session.on('error', () => {
      stats.sessionErrors++;
    });
    session.on('close', () => sessions.delete(session));
  });

  server.on('stream', (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => {
    const info = sessions.get(stream.session as ServerHttp2Session);
    stream.on('error', () => {});
    if (!info) {
      safeClose(stream, NGHTTP2_REFUSED_STREAM);
      return;
    }
    const id = stream.id ?? 0;
    const entry: StreamEntry = { stream, refused: false, record: undefined };
    if (info.goingAway) {
      entry.refused = true;
      stats.refusedStreams++;
      safeClose(stream, NGHTTP2_REFUSED_STREAM);
      return;
    }
    info.streams.set(id, entry);
    stats.maxConcurrentStreamsSeen = Math.max(stats.maxConcurrentStreamsSeen, info.streams.size);
    stream.on('close', () => info.streams.delete(id));
    const chunks: Buffer[] = [];
    let size = 0;
    stream.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size <= 64 * 1024) chunks.push(chunk);
    });
    stream.on('end', () => {
      if (entry.refused) return;
      const rawBody = Buffer.concat(chunks).toString('utf8');
      let body: unknown;
      try {
        body = rawBody ? JSON.parse(rawBody) : undefined;
      } catch {
        body = undefined;
      }
      const flat = flattenHeaders(headers);
      const path = flat[':path'] ?? '';
      const pathMatch = /^\/3\/device\/([^/?#]*)$/.exec(path);
      const record: RecordedRequest = {
        method: flat[':method'] ?? '',
        path,
        deviceToken: pathMatch ? decodeURIComponent(pathMatch[1]!) : '',
        headers: flat,
        body,
        rawBody,
        clientCertSubject: info.subject,
        clientCertTopics: info.topics,
        sessionId: info.id,
        streamId: id,
        at: Date.now(),
      };
      let tokenCheck: ReturnType<typeof decodeToken> | undefined;
      if (!info.hasCert && tokenAuth) {
        tokenCheck = decodeToken(flat.authorization, tokenKeys);
        if (typeof tokenCheck === 'object') record.providerToken = tokenCheck;
      }
      stats.requestsReceived++;
      if (opts.record !== false) {
        entry.record = record;
        requests.push(record);
        for (const w of waiters) w();
      }

      const rejection = validate(record, info, size, pathMatch !== null, tokenCheck);
      if (rejection) {
        answer(info, entry, rejection, record);
        return;
      }
      if (stalled) return;
      let result: MockAnswer | Promise<MockAnswer>;
      try {
        result = handler(record);
      } catch {
        result = { status: 500, reason: 'InternalServerError' };
      }
      Promise.resolve(result).then(
        (a) => answer(info, entry, a, record),
        () => answer(info, entry, { status: 500, reason: 'InternalServerError' }, record),
      );
    });
  });

  function validate(
    r: RecordedRequest,
    info: SessionInfo,
    size: number,
    pathOk: boolean,
    tokenCheck: ReturnType<typeof decodeToken> | undefined,
  ): MockAnswer | null {
    if (r.method !== 'POST') return { status: 405, reason: 'MethodNotAllowed' };
    if (!pathOk) return { status: 404, reason: 'BadPath' };
    if (r.deviceToken === '') return { status: 400, reason: 'MissingDeviceToken' };
    if (!info.hasCert) {
      if (tokenCheck === undefined || tokenCheck === 'missing') return { status: 403, reason: 'MissingProviderToken' };
      if (tokenCheck === 'malformed' || !tokenCheck.valid) return { status: 403, reason: 'InvalidProviderToken' };
      if (opts.teamId !== undefined && tokenCheck.iss !== opts.teamId) return { status: 403, reason: 'InvalidProviderToken' };
      if (!Number.isFinite(tokenCheck.iat) || tokenCheck.iat * 1000 < Date.now() - 3_600_000) return { status: 403, reason: 'ExpiredProviderToken' };
    }
    const topic = r.headers['apns-topic'];
    if (topic === undefined) {
      // Apple: without apns-topic, a single-topic certificate's topic applies.
      if (!(info.hasCert && info.topics.length === 1)) return { status: 400, reason: 'MissingTopic' };
    } else if (info.hasCert && !info.topics.includes(topic)) {
      return { status: 400, reason: 'TopicDisallowed' };
    }
    const pushType = r.headers['apns-push-type'];
    if (pushType !== undefined && !PUSH_TYPES.has(pushType)) return { status: 400, reason: 'InvalidPushType' };
    const priority = r.headers['apns-priority'];
    if (priority !== undefined && !['1', '5', '10'].includes(priority)) return { status: 400, reason: 'BadPriority' };
    const expiration = r.headers['apns-expiration'];
    if (expiration !== undefined && !/^\d+$/.test(expiration)) return { status: 400, reason: 'BadExpirationDate' };
    const collapseId = r.headers['apns-collapse-id'];
    if (collapseId !== undefined && Buffer.byteLength(collapseId) > 64) return { status: 400, reason: 'BadCollapseId' };
    const apnsId = r.headers['apns-id'];
    if (apnsId !== undefined && !UUID_RE.test(apnsId)) return { status: 400, reason: 'BadMessageId' };
    if (!DEVICE_TOKEN_RE.test(r.deviceToken)) return { status: 400, reason: 'BadDeviceToken' };
    if (size === 0) return { status: 400, reason: 'PayloadEmpty' };
    if (size > MOCK_APNS_MAX_PAYLOAD) return { status: 413, reason: 'PayloadTooLarge' };
    return null;
  }

  function answer(info: SessionInfo, entry: StreamEntry, a: MockAnswer, record: RecordedRequest): void {
    if (a.stall) return;
    if (a.delayMs && a.delayMs > 0) {
      const { delayMs: _ignored, ...rest } = a;
      setTimeout(() => answer(info, entry, rest, record), a.delayMs);
      return;
    }
    const stream = entry.stream;
    if (entry.refused || stream.closed || stream.destroyed) return;
    try {
      if (a.resetStream !== undefined && a.resetStream !== false) {
        stream.close(typeof a.resetStream === 'number' ? a.resetStream : NGHTTP2_INTERNAL_ERROR);
        return;
      }
      const headers: OutgoingHttpHeaders = {
        ':status': a.status,
        'apns-id': a.apnsId ?? record.headers['apns-id'] ?? randomUUID(),
      };
      if (a.retryAfter !== undefined) headers['retry-after'] = String(a.retryAfter);
      let body: string | undefined;
      if (a.status !== 200 || a.reason !== undefined) {
        const json: { reason: string; timestamp?: number } = { reason: a.reason ?? 'InternalServerError' };
        if (a.status === 410 || a.timestamp !== undefined) json.timestamp = a.timestamp ?? Date.now();
        body = JSON.stringify(json);
        headers['content-type'] = 'application/json';
      }
      if (a.resetMidResponse) {
        stream.respond(headers);
        stream.write((body ?? '{"reason":"').slice(0, 5));
        // destroy(), not close(): close() would first end the stream (END_STREAM), making the
        // answer complete; destroy() sends only RST_STREAM INTERNAL_ERROR.
        setTimeout(() => stream.destroy(new Error('mock APNs: reset mid-response')), 5);
        return;
      }
      if (body === undefined) stream.respond(headers, { endStream: true });
      else {
        stream.respond(headers);
        stream.end(body);
      }
    } catch {
      safeClose(stream, NGHTTP2_INTERNAL_ERROR);
      return;
    }
    const id = entry.stream.id ?? 0;
    if (id > info.maxAnswered) info.maxAnswered = id;
    if (goaway && --goaway.remaining <= 0) {
      const g = goaway.opts;
      goaway = null;
      sendGoaway(info, g);
    }
  }

  function sendGoaway(info: SessionInfo, g: GoawayOptions): void {
    if (info.goingAway) return;
    info.goingAway = true;
    const lastStreamId = info.maxAnswered;
    const reason = g.reason === undefined ? 'Shutdown' : g.reason;
    stats.goawaysSent++;
    try {
      info.session.goaway(g.errorCode ?? NGHTTP2_NO_ERROR, lastStreamId, reason === null ? undefined : Buffer.from(JSON.stringify({ reason })));
    } catch {
      // session already gone
    }
    for (const [id, entry] of info.streams) {
      if (id <= lastStreamId || entry.refused) continue;
      entry.refused = true;
      stats.refusedStreams++;
      if (entry.record) {
        const i = requests.lastIndexOf(entry.record);
        if (i >= 0) requests.splice(i, 1);
      }
      safeClose(entry.stream, NGHTTP2_REFUSED_STREAM);
    }
    // Let streams at or below lastStreamId finish, then close the connection.
    try {
      info.session.close();
    } catch {
      // gone
    }
  }

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port ?? 0, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', () => {});
  const port = (server.address() as AddressInfo).port;
  const urlHost = host.includes(':') ? `[${host}]` : host;

  const mock: MockApns = {
    url: `https://${urlHost}:${port}`,
    port,
    caPem: serverCa.certPem,
    requests,
    respond(h) {
      handler = h;
    },
    goawayAfter(n, g = {}) {
      goaway = { remaining: Math.max(1, Math.floor(n)), opts: g };
    },
    stallAll(on) {
      stalled = on;
    },
    destroyConnections() {
      for (const s of sockets) s.destroy();
    },
    sessions() {
      return sessions.size;
    },
    stats() {
      return { ...stats };
    },
    waitForRequests(n, timeoutMs = 5_000) {
      if (requests.length >= n) return Promise.resolve();
      return new Promise<void>((resolve, reject) => {
        const check = (): void => {
          if (requests.length >= n) {
            clearTimeout(timer);
            waiters.delete(check);
            resolve();
          }
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`mock APNs: ${requests.length} of ${n} requests after ${timeoutMs} ms`));
        }, timeoutMs);
        waiters.add(check);
      });
    },
    close() {
      return new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        for (const s of sessions.keys()) {
          try {
            s.destroy();
          } catch {
            // gone
          }
        }
        server.close(() => resolve());
      });
    },
  };
  return mock;
}

function safeClose(stream: ServerHttp2Stream, code: number): void {
  try {
    if (!stream.closed && !stream.destroyed) stream.close(code);
  } catch {
    // gone
  }
}
