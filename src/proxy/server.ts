/**
 * The client-facing listeners (plain with STARTTLS, implicit TLS) and the set of
 * live sessions. TLS material is held in one place so that a reload swaps it for
 * new connections without touching established ones.
 */
import net from 'node:net';
import tls from 'node:tls';
import { readFileSync } from 'node:fs';
import type { Logger } from '../ops/log.js';
import { Session, type PushCommandHandler, type SessionSettings, type SessionEvents } from './session.js';
import type { ListenerName, ProxyMetrics } from './metrics.js';

export interface HostPort {
  host: string;
  port: number;
}

export interface ProxyServerOptions {
  listen?: HostPort;
  listenTls?: HostPort;
  tlsCertPath?: string;
  tlsKeyPath?: string;
  session: Omit<SessionSettings, 'starttls'>;
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
  ) {
    this.reload();
  }

  /** Re-reads the files; on failure the previous material stays in force. */
  reload(): void {
    if (!this.certPath || !this.keyPath) return;
    const cert = readFileSync(this.certPath);
    const key = readFileSync(this.keyPath);
    const context = tls.createSecureContext({ cert, key });
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
  private servers: net.Server[] = [];
  private plainServer: net.Server | null = null;
  private tlsServer: tls.Server | null = null;
  private stopping = false;
  private stopped: Promise<void> | null = null;
  private drainDeadline = Infinity;
  private drainTimer: NodeJS.Timeout | null = null;
  /** Ends the wait of a drain in progress (deadline reached, or the last session closed). */
  private endDrain: (() => void) | null = null;

  constructor(private readonly opts: ProxyServerOptions) {
    this.tls = new TlsMaterial(opts.tlsCertPath, opts.tlsKeyPath);
  }

  private sessionSettings(): SessionSettings {
    return { ...this.opts.session, starttls: () => this.tls.secureContext };
  }

  private accept(socket: net.Socket, listener: ListenerName): void {
    if (this.stopping) {
      this.opts.metrics?.rejected('shutting_down');
      socket.destroy();
      return;
    }
    socket.on('error', () => undefined); // errors before the session attaches its handlers
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
    const session = new Session(socket, this.sessionSettings(), this.opts.push, this.opts.log, events);
    this.sessions.add(session);
    session.start().catch((err: unknown) => {
      this.opts.log.error({ err: String(err) }, 'session failed');
      session.close('internal error');
    });
  }

  async start(): Promise<void> {
    const { listen, listenTls } = this.opts;
    if (listen) {
      const server = net.createServer({ noDelay: true }, (s) => this.accept(s, 'listen'));
      await this.listenOn(server, listen);
      this.plainServer = server;
    }
    if (listenTls) {
      const material = this.tls.options;
      if (!material) throw new Error('--listen-tls needs --tls-cert and --tls-key');
      const server = tls.createServer({ ...material, noDelay: true } as tls.TlsOptions, (s) => this.accept(s, 'listen-tls'));
      server.on('tlsClientError', (err, socket) => {
        this.opts.log.debug({ err: err.message, client: socket.remoteAddress }, 'client TLS handshake failed');
      });
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

  /** New certificate for new connections; established sessions keep theirs. */
  reloadTls(): void {
    this.tls.reload();
    const material = this.tls.options;
    if (this.tlsServer && material) this.tlsServer.setSecureContext(material);
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
    await Promise.all(closing);
  }
}
