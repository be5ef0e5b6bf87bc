/**
 * The client-facing listeners (plain with STARTTLS, implicit TLS) and the set of
 * live sessions. TLS material is held in one place so that a reload swaps it for
 * new connections without touching established ones.
 *
 * Both listeners accept plain TCP: connection limits are applied there, before any
 * TLS work, and the implicit-TLS listener then runs the handshake itself with the
 * same secure context (versions, ciphers) that STARTTLS uses, within a deadline.
 */
import net from 'node:net';
import tls from 'node:tls';
import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import type { Logger } from '../ops/log.js';
import { DEFAULT_TLS_CIPHERS, type TlsMinVersion } from '../config/options.js';
import { ConnectionLimits, type LimitReason } from './conn-limits.js';
import { Session, type PushCommandHandler, type SessionSettings, type SessionEvents } from './session.js';
import type { ListenerName, ProxyMetrics } from './metrics.js';

export interface HostPort {
  host: string;
  port: number;
}

/** What clients may negotiate (--tls-min-version, --tls-ciphers). */
export interface TlsPolicy {
  minVersion: TlsMinVersion;
  /** OpenSSL cipher list for TLS up to 1.2; TLS 1.3 suites stay OpenSSL's defaults. */
  ciphers: string;
}

export const DEFAULT_TLS_POLICY: TlsPolicy = { minVersion: 'TLSv1.2', ciphers: DEFAULT_TLS_CIPHERS };

/** Longest TLS handshake on --listen-tls (the login timeout, when shorter, bounds it instead). */
export const TLS_HANDSHAKE_TIMEOUT_MS = 30_000;
/**
 * Refused connections on --listen-tls get a handshake so that they can read the BYE, but only this many at once;
 * beyond it (a flood) they are closed without one: a handshake is the costliest thing a connection asks for.
 */
export const MAX_REFUSAL_HANDSHAKES = 32;
/** A refused connection's handshake and BYE must be done within this; then it is destroyed. */
const REFUSAL_GRACE_MS = 5_000;
const LIMIT_WARNING_EVERY_MS = 60_000;
const BYE_PER_ADDRESS = '* BYE [UNAVAILABLE] Too many connections from your address, try again later\r\n';
const BYE_TOTAL = '* BYE [UNAVAILABLE] Too many connections to this server, try again later\r\n';

export interface ProxyServerOptions {
  listen?: HostPort;
  listenTls?: HostPort;
  tlsCertPath?: string;
  tlsKeyPath?: string;
  /** Default: TLS 1.2 and later, forward-secret AEAD ciphers (DEFAULT_TLS_POLICY). */
  tlsPolicy?: TlsPolicy;
  /** Most connections open at once (--max-connections); 0 or unset: unlimited. */
  maxConnections?: number;
  /** Most connections open at once from one address, IPv6 per /64 (--max-connections-per-ip); 0 or unset: unlimited. */
  maxConnectionsPerIp?: number;
  session: Omit<SessionSettings, 'starttls' | 'acceptedAt'>;
  push: PushCommandHandler | null;
  log: Logger;
  events?: SessionEvents;
  metrics?: ProxyMetrics;
}

export class TlsMaterial {
  private context: tls.SecureContext | null = null;
  private pem: { cert: Buffer; key: Buffer } | null = null;

  constructor(
    private readonly certPath?: string,
    private readonly keyPath?: string,
    private readonly policy: TlsPolicy = DEFAULT_TLS_POLICY,
  ) {
    this.reload();
  }

  /** Re-reads the files (the version and cipher policy stays); on failure the previous material stays in force. */
  reload(): void {
    if (!this.certPath || !this.keyPath) return;
    const cert = readFileSync(this.certPath);
    const key = readFileSync(this.keyPath);
    const context = tls.createSecureContext({
      cert,
      key,
      minVersion: this.policy.minVersion,
      ciphers: this.policy.ciphers,
      honorCipherOrder: true,
    });
    this.pem = { cert, key };
    this.context = context;
  }

  get secureContext(): tls.SecureContext | null {
    return this.context;
  }

  get options(): { cert: Buffer; key: Buffer } | null {
    return this.pem;
  }
}

export class ProxyServer {
  readonly sessions = new Set<Session>();
  readonly tls: TlsMaterial;
  private readonly limits: ConnectionLimits;
  /** Accepted sockets that are no session (yet): TLS handshakes in progress, refused connections being closed. */
  private readonly pending = new Set<net.Socket>();
  private refusalHandshakes = 0;
  private refusedSinceWarning = 0;
  private lastLimitWarning = -Infinity;
  private servers: net.Server[] = [];
  private plainServer: net.Server | null = null;
  private tlsServer: net.Server | null = null;
  private stopping = false;
  private stopped: Promise<void> | null = null;
  private drainDeadline = Infinity;
  private drainTimer: NodeJS.Timeout | null = null;
  /** Ends the wait of a drain in progress (deadline reached, or the last session closed). */
  private endDrain: (() => void) | null = null;

  constructor(private readonly opts: ProxyServerOptions) {
    this.tls = new TlsMaterial(opts.tlsCertPath, opts.tlsKeyPath, opts.tlsPolicy);
    this.limits = new ConnectionLimits(opts.maxConnections ?? 0, opts.maxConnectionsPerIp ?? 0);
  }

  private sessionSettings(acceptedAt: number): SessionSettings {
    return { ...this.opts.session, starttls: () => this.tls.secureContext, acceptedAt };
  }

  /** Client connections open now (sessions and TLS handshakes), or those counted for `address` (IPv6: its /64). */
  openConnections(address?: string): number {
    return this.limits.count(address);
  }

  private get handshakeTimeoutMs(): number {
    return Math.min(TLS_HANDSHAKE_TIMEOUT_MS, this.opts.session.loginTimeoutMs);
  }

  /** A new TCP connection on either listener: limits, then the TLS handshake (listen-tls), then the session. */
  private onConnection(raw: net.Socket, listener: ListenerName): void {
    const acceptedAt = performance.now();
    raw.on('error', () => undefined); // errors before the session attaches its handlers
    if (this.stopping) {
      this.opts.metrics?.rejected('shutting_down');
      raw.destroy();
      return;
    }
    const admission = this.limits.admit(raw.remoteAddress ?? '');
    if (!admission.admitted) {
      this.refuse(raw, listener, admission.reason);
      return;
    }
    raw.once('close', admission.release);
    if (listener === 'listen') this.accept(raw, listener, acceptedAt);
    else this.handshake(raw, this.handshakeTimeoutMs, (secure) => this.accept(secure, listener, acceptedAt));
  }

  /** Server side of a TLS handshake on `raw`, within `timeoutMs`; `done` gets the secured socket. */
  private handshake(raw: net.Socket, timeoutMs: number, done: (secure: tls.TLSSocket) => void): void {
    const context = this.tls.secureContext;
    if (!context) {
      raw.destroy();
      return;
    }
    const client = raw.remoteAddress;
    const secure = new tls.TLSSocket(raw, { isServer: true, secureContext: context });
    secure.on('error', () => undefined); // the session attaches its own handlers
    this.pending.add(secure);
    const timer = setTimeout(() => {
      this.opts.log.debug({ client, timeoutMs }, 'client TLS handshake timed out');
      secure.destroy();
    }, timeoutMs);
    const settle = () => {
      clearTimeout(timer);
      this.pending.delete(secure);
    };
    const onError = (err: Error) => {
      settle();
      this.opts.log.debug({ err: err.message, client }, 'client TLS handshake failed');
      secure.destroy();
    };
    secure.once('error', onError);
    secure.once('close', settle);
    secure.once('secure', () => {
      settle();
      secure.off('error', onError);
      if (this.stopping) secure.destroy();
      else done(secure);
    });
  }

  /**
   * Over a connection limit: `* BYE [UNAVAILABLE]` and close. On --listen-tls after a short handshake, so that the
   * client can show the reason, unless too many refusals are already in one (then the socket is closed at once).
   */
  private refuse(raw: net.Socket, listener: ListenerName, reason: LimitReason): void {
    this.opts.metrics?.rejected(reason);
    this.noteRefusal(reason, raw.remoteAddress ?? '');
    const bye = reason === 'per_address_limit' ? BYE_PER_ADDRESS : BYE_TOTAL;
    if (listener === 'listen') {
      this.byeAndClose(raw, bye);
      return;
    }
    if (this.refusalHandshakes >= MAX_REFUSAL_HANDSHAKES) {
      raw.destroy();
      return;
    }
    this.refusalHandshakes++;
    raw.once('close', () => this.refusalHandshakes--);
    this.handshake(raw, Math.min(REFUSAL_GRACE_MS, this.handshakeTimeoutMs), (secure) => this.byeAndClose(secure, bye));
  }

  private byeAndClose(socket: net.Socket, bye: string): void {
    this.pending.add(socket);
    socket.once('close', () => this.pending.delete(socket));
    socket.end(bye);
    socket.resume(); // read and drop what the client sends, so that its close is seen
    setTimeout(() => socket.destroy(), REFUSAL_GRACE_MS).unref();
  }

  /** Each refusal at debug level; a warning at most once a minute, with the count since the last one. */
  private noteRefusal(reason: LimitReason, client: string): void {
    this.refusedSinceWarning++;
    this.opts.log.debug({ reason, client }, 'connection refused: over a connection limit');
    const now = performance.now();
    if (now - this.lastLimitWarning < LIMIT_WARNING_EVERY_MS) return;
    this.opts.log.warn(
      { reason, client, refused: this.refusedSinceWarning, open: this.limits.count() },
      reason === 'total_limit'
        ? 'connections refused: --max-connections reached'
        : 'connections refused: --max-connections-per-ip reached for a client address',
    );
    this.lastLimitWarning = now;
    this.refusedSinceWarning = 0;
  }

  private accept(socket: net.Socket, listener: ListenerName, acceptedAt: number): void {
    const observed = this.opts.metrics?.opened(listener, socket instanceof tls.TLSSocket) ?? {};
    const events: SessionEvents = {
      ...observed,
      authenticated: (s, u) => this.opts.events?.authenticated?.(s, u),
      closed: (s) => {
        observed.closed?.(s);
        this.sessions.delete(s);
        if (this.sessions.size === 0) this.endDrain?.();
        this.opts.events?.closed?.(s);
      },
    };
    const session = new Session(socket, this.sessionSettings(acceptedAt), this.opts.push, this.opts.log, events);
    this.sessions.add(session);
    session.start().catch((err: unknown) => {
      this.opts.log.error({ err: String(err) }, 'session failed');
      session.close('internal error');
    });
  }

  async start(): Promise<void> {
    const { listen, listenTls } = this.opts;
    if (listen) {
      const server = net.createServer({ noDelay: true }, (s) => this.onConnection(s, 'listen'));
      await this.listenOn(server, listen);
      this.plainServer = server;
    }
    if (listenTls) {
      if (!this.tls.secureContext) throw new Error('--listen-tls needs --tls-cert and --tls-key');
      const server = net.createServer({ noDelay: true }, (s) => this.onConnection(s, 'listen-tls'));
      await this.listenOn(server, listenTls);
      this.tlsServer = server;
    }
  }

  private listenOn(server: net.Server, at: HostPort): Promise<void> {
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host: at.host, port: at.port }, () => {
        server.off('error', reject);
        server.on('error', (err) => this.opts.log.error({ err: err.message }, 'listener error'));
        this.servers.push(server);
        resolve();
      });
    });
  }

  /** Bound addresses (useful with port 0). */
  addresses(): { plain?: HostPort; tls?: HostPort } {
    const of = (s: net.Server | null): HostPort | undefined => {
      const a = s?.address();
      return a && typeof a === 'object' ? { host: a.address, port: a.port } : undefined;
    };
    return { plain: of(this.plainServer), tls: of(this.tlsServer) };
  }

  /** New certificate for new connections (both listeners use the one context); established sessions keep theirs. */
  reloadTls(): void {
    this.tls.reload();
  }

  /** True once stop() was called: no new connections are accepted. */
  get draining(): boolean {
    return this.stopping;
  }

  /**
   * Stops accepting; closes the sessions still open after `drainMs` with
   * `* BYE [UNAVAILABLE]`. A later call while draining can only shorten the wait (a second
   * SIGTERM: `stop(0)` closes at once); every call resolves when the listeners are closed.
   */
  stop(drainMs = 0): Promise<void> {
    const deadline = Date.now() + drainMs;
    if (this.stopped) {
      if (deadline < this.drainDeadline) this.drainUntil(deadline);
      return this.stopped;
    }
    this.stopping = true;
    this.stopped = this.drainAndClose(deadline);
    return this.stopped;
  }

  private drainUntil(deadline: number): void {
    this.drainDeadline = deadline;
    if (this.drainTimer) clearTimeout(this.drainTimer);
    this.drainTimer = setTimeout(() => this.endDrain?.(), Math.max(0, deadline - Date.now()));
  }

  private async drainAndClose(deadline: number): Promise<void> {
    const closing = this.servers.map((s) => new Promise<void>((r) => s.close(() => r())));
    if (this.sessions.size > 0) {
      await new Promise<void>((resolve) => {
        this.endDrain = resolve;
        this.drainUntil(deadline);
      });
    }
    if (this.drainTimer) clearTimeout(this.drainTimer);
    this.endDrain = null;
    for (const s of [...this.sessions]) s.close('server shutting down', '[UNAVAILABLE] Server shutting down, try again later');
    for (const socket of [...this.pending]) socket.destroy();
    await Promise.all(closing);
  }
}
