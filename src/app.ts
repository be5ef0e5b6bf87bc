/**
 * Composition root: builds the running proxy from a validated configuration.
 * The CLI's `serve` and `demo`, and the integration tests, all start the proxy
 * through here, so what is tested is what operators run.
 */
import { readFileSync } from 'node:fs';
import type { Config } from './config/index.js';
import type { TlsMinVersion } from './config/options.js';
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
import { observeReadiness } from './ops/readiness-metrics.js';
import { observeTlsCertificate, proxyMetrics } from './proxy/metrics.js';
import { instrumentPushHandler, observeApnsCertificate, pushRegistrationMetrics } from './push/metrics.js';
import { instrumentStore, observeRegistrationCount } from './store/metrics.js';

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
  /**
   * Stops accepting, lets sessions finish up to drainMs, closes the rest, flushes pending
   * pushes and closes the store. Calling it again while it runs only shortens the drain
   * (a second SIGTERM) and returns the same promise.
   */
  stop(drainMs?: number): Promise<void>;
  /**
   * SIGHUP: TLS and APNs certificates. Both are tried; throws (keeping the old material of
   * whatever failed) with one message naming the option of each broken file.
   */
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
    ? instrumentStore(
        await createStore({ redisUrl: config.redisUrl, dataDir: config.dataDir, ttlMs: config.registrationTtl, logger: log }),
        registry,
      )
    : null;
  if (store) observeRegistrationCount(registry, store);
  pushRegistrationMetrics(registry);
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
    const unobserved =
      deps.push !== undefined
        ? deps.push
        : store && service
          ? new PushRegistrationHandler(() => service.topic(), store, log, {
              registered: (r) => watching?.registrationChanged(r.user),
            })
          : null;
    const handler = unobserved && instrumentPushHandler(unobserved, registry);
    if (service?.currentCertificate) observeApnsCertificate(registry, () => service.currentCertificate);
    proxy = new ProxyServer({
      listen: config.listen,
      listenTls: config.listenTls,
      tlsCertPath: config.tlsCert,
      tlsKeyPath: config.tlsKey,
      tlsPolicy: { minVersion: config.tlsMinVersion as TlsMinVersion, ciphers: config.tlsCiphers },
      maxConnections: config.maxConnections,
      maxConnectionsPerIp: config.maxConnectionsPerIp,
      push: handler,
      log,
      metrics: proxyMetrics(registry),
      session: {
        upstream,
        idleTimeoutMs: config.idleTimeout,
        loginTimeoutMs: config.loginTimeout,
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
  if (config.tlsCert) observeTlsCertificate(registry, () => server.tls.options?.cert ?? null);
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
    draining: () => server.draining,
  });
  observeReadiness(registry, () => readiness.check());
  // auxiliary: a taken port costs the metrics, not the IMAP service
  const ops = await startOpsServer({ listen: config.metricsListen, registry, readiness: () => readiness.check(), log }).catch(
    (err: unknown) => {
      const at = `${config.metricsListen.host}:${config.metricsListen.port}`;
      log.error({ err: String(err), listen: at }, 'operations listener (--metrics-listen) could not start; no /metrics, /healthz, /readyz');
      return null;
    },
  );
  const purge = store ? schedulePurge(store, log) : null;
  let stopping: Promise<void> | null = null;
  let flushMs = Infinity;
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
    stop: (drainMs = 0) => {
      flushMs = Math.min(flushMs, drainMs, 5_000);
      if (stopping) {
        void server.stop(drainMs);
        return stopping;
      }
      stopping = (async () => {
        if (purge) clearInterval(purge);
        await server.stop(drainMs);
        // the operations listener answered /readyz with 503 during the drain; now it goes too
        await ops?.stop();
        await watch?.stop();
        await push?.close({ flushMs });
        await store?.close();
      })();
      return stopping;
    },
    reload: async () => {
      const tlsOption = '--tls-cert/--tls-key';
      const apnsOption = config.apnsP12 ? '--apns-p12' : '--apns-cert';
      // both are tried; one broken file does not keep the other certificate from reloading
      const results = await Promise.allSettled([Promise.resolve().then(() => server.reloadTls()), push?.reload()]);
      const problems = results.flatMap((r, i) => {
        if (r.status === 'fulfilled') return [];
        const message = String((r.reason as Error | undefined)?.message ?? r.reason).split('\n')[0];
        return [i === 0 ? `${tlsOption} ("${config.tlsCert}", "${config.tlsKey}"): ${message}` : `${apnsOption}: ${message}`];
      });
      if (problems.length > 0) throw new Error(problems.join('; '));
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
