/**
 * Composition root: builds the running proxy from a validated configuration.
 * The CLI's `serve` and `demo`, and the integration tests, all start the proxy
 * through here, so what is tested is what operators run.
 */
import { readFileSync } from 'node:fs';
import type { Config } from './config/index.js';
import type { Logger } from './ops/log.js';
import { createRegistry, type Registry } from './ops/metrics.js';
import { ProxyServer } from './proxy/server.js';
import type { PushCommandHandler } from './proxy/session.js';
import { createStore, type RegistrationStore } from './store/index.js';
import { PushRegistrationHandler } from './push/handler.js';
import { PushService } from './push/service.js';
import type { ApnsTransport } from './apns/types.js';
import type { UpstreamSettings } from './proxy/upstream.js';
import { WatchService } from './watch/service.js';
import { startOpsServer, type OpsServer } from './ops/http.js';
import { Readiness } from './ops/readiness.js';

export interface App {
  proxy: ProxyServer;
  /** The registration store, when push is configured. */
  store: RegistrationStore | null;
  /** Push delivery, when push is configured. */
  push: PushService | null;
  /** Mailbox watching, when push can be sent and a way to watch is configured. */
  watch: WatchService | null;
  registry: Registry;
  /** The operations HTTP listener (--metrics-listen: /metrics, /healthz, /readyz); null when it could not bind. */
  ops: OpsServer | null;
  /** Stops accepting, lets sessions finish up to drainMs, closes the rest. */
  stop(drainMs?: number): Promise<void>;
  /** SIGHUP: TLS and APNs certificates. Throws (keeping the old ones) when a new file is broken. */
  reload(): Promise<void>;
}

export interface AppDeps {
  /** Replaces the push handler built from the configuration (tests). */
  push?: PushCommandHandler | null;
  /** Replaces the APNs HTTP/2 client (tests). */
  apnsTransport?: ApnsTransport;
  registry?: Registry;
}

/** Longest line and literal accepted before login: Dovecot's own imap_max_line_length. */
export const PREAUTH_MAX_LINE = 64 * 1024;

export async function startApp(config: Config, log: Logger, deps: AppDeps = {}): Promise<App> {
  const registry = deps.registry ?? createRegistry();
  const pushConfigured = PushService.configured(config);
  const store = pushConfigured
    ? await createStore({ redisUrl: config.redisUrl, dataDir: config.dataDir, ttlMs: config.registrationTtl, logger: log })
    : null;
  const upstream: UpstreamSettings = {
    host: config.upstream.host,
    port: config.upstream.port,
    tls: config.upstreamTls,
    ca: config.upstreamCa ? readFileSync(config.upstreamCa) : undefined,
    servername: config.upstreamServername,
    insecure: config.upstreamInsecure,
    connectTimeoutMs: config.connectTimeout,
    clientIp: config.clientIp,
  };
  let push: PushService | null = null;
  let watch: WatchService | null = null;
  let proxy: ProxyServer | null = null;
  try {
    push = store ? await PushService.start(config, { store, registry, log, transport: deps.apnsTransport }) : null;
    const dispatcher = push?.dispatcher;
    watch = store && dispatcher ? await WatchService.start(config, { store, dispatcher, upstream, registry, log }) : null;
    const service = push;
    const watching = watch;
    const handler =
      deps.push !== undefined
        ? deps.push
        : store && service
          ? new PushRegistrationHandler(() => service.topic(), store, log, {
              registered: (r) => watching?.registrationChanged(r.user),
            })
          : null;
    proxy = new ProxyServer({
      listen: config.listen,
      listenTls: config.listenTls,
      tlsCertPath: config.tlsCert,
      tlsKeyPath: config.tlsKey,
      push: handler,
      log,
      session: {
        upstream,
        idleTimeoutMs: config.idleTimeout,
        preauthMaxLine: PREAUTH_MAX_LINE,
        localCommandMax: PREAUTH_MAX_LINE,
        allowPlaintextAuth: config.allowPlaintextAuth,
      },
    });
    await proxy.start();
  } catch (err) {
    await watch?.stop().catch(() => undefined);
    await push?.close().catch(() => undefined);
    await store?.close().catch(() => undefined);
    throw err;
  }
  const server = proxy;
  const readiness = new Readiness({
    listeners: () => {
      const bound = server.addresses();
      return [
        ...(config.listen ? [{ name: 'listen', bound: bound.plain !== undefined }] : []),
        ...(config.listenTls ? [{ name: 'listen-tls', bound: bound.tls !== undefined }] : []),
      ];
    },
    upstream,
    store,
    certificate: () => push?.currentCertificate ?? null,
  });
  // auxiliary: a taken port costs the metrics, not the IMAP service
  const ops = await startOpsServer({ listen: config.metricsListen, registry, readiness: () => readiness.check(), log }).catch(
    (err: unknown) => {
      const at = `${config.metricsListen.host}:${config.metricsListen.port}`;
      log.error({ err: String(err), listen: at }, 'operations listener (--metrics-listen) could not start; no /metrics, /healthz, /readyz');
      return null;
    },
  );
  const purge = store ? schedulePurge(store, log) : null;
  const a = proxy.addresses();
  log.info(
    {
      listen: a.plain && `${a.plain.host}:${a.plain.port}`,
      listenTls: a.tls && `${a.tls.host}:${a.tls.port}`,
      upstream: `${config.upstream.host}:${config.upstream.port}`,
      topic: push?.topic() ?? null,
    },
    'xaps-proxy listening',
  );
  return {
    proxy: server,
    store,
    push,
    watch,
    registry,
    ops,
    stop: async (drainMs = 0) => {
      if (purge) clearInterval(purge);
      await server.stop(drainMs);
      await ops?.stop();
      await watch?.stop();
      await push?.close({ flushMs: Math.min(drainMs, 5_000) });
      await store?.close();
    },
    reload: async () => {
      // both are tried; one broken file does not keep the other certificate from reloading
      const results = await Promise.allSettled([Promise.resolve().then(() => server.reloadTls()), push?.reload()]);
      const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) throw failed.reason;
    },
  };
}

const PURGE_EVERY_MS = 60 * 60 * 1000;

/** Expired registrations are invisible at once; this reclaims their space now and then. */
function schedulePurge(store: RegistrationStore, log: Logger): NodeJS.Timeout {
  const timer = setInterval(() => {
    store.purgeExpired().then(
      (n) => {
        if (n > 0) log.info({ removed: n }, 'expired registrations purged');
      },
      (err: unknown) => log.warn({ err: String(err) }, 'purging expired registrations failed'),
    );
  }, PURGE_EVERY_MS);
  timer.unref();
  return timer;
}
