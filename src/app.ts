/**
 * Composition root: builds the running proxy from a validated configuration.
 * The CLI's `serve` and `demo`, and the integration tests, all start the proxy
 * through here, so what is tested is what operators run.
 */
import { readFileSync } from 'node:fs';
import type { Config } from './config/index.js';
import type { Logger } from './ops/log.js';
import { ProxyServer } from './proxy/server.js';
import type { PushCommandHandler } from './proxy/session.js';
import { createStore, type RegistrationStore } from './store/index.js';
import { PushRegistrationHandler } from './push/handler.js';

export interface App {
  proxy: ProxyServer;
  /** The registration store, when push is configured. */
  store: RegistrationStore | null;
  /** Stops accepting, lets sessions finish up to drainMs, closes the rest. */
  stop(drainMs?: number): Promise<void>;
  reload(): void;
}

export interface AppDeps {
  /** Replaces the push handler built from the configuration (tests). */
  push?: PushCommandHandler | null;
}

/** Longest line and literal accepted before login: Dovecot's own imap_max_line_length. */
export const PREAUTH_MAX_LINE = 64 * 1024;

export async function startApp(config: Config, log: Logger, deps: AppDeps = {}): Promise<App> {
  const topic = config.apnsTopic ?? null;
  const store = topic
    ? await createStore({ redisUrl: config.redisUrl, dataDir: config.dataDir, ttlMs: config.registrationTtl, logger: log })
    : null;
  const push = deps.push !== undefined ? deps.push : store ? new PushRegistrationHandler(() => topic, store, log) : null;
  const proxy = new ProxyServer({
    listen: config.listen,
    listenTls: config.listenTls,
    tlsCertPath: config.tlsCert,
    tlsKeyPath: config.tlsKey,
    push,
    log,
    session: {
      upstream: {
        host: config.upstream.host,
        port: config.upstream.port,
        tls: config.upstreamTls,
        ca: config.upstreamCa ? readFileSync(config.upstreamCa) : undefined,
        servername: config.upstreamServername,
        insecure: config.upstreamInsecure,
        connectTimeoutMs: config.connectTimeout,
        clientIp: config.clientIp,
      },
      idleTimeoutMs: config.idleTimeout,
      preauthMaxLine: PREAUTH_MAX_LINE,
      localCommandMax: PREAUTH_MAX_LINE,
      allowPlaintextAuth: config.allowPlaintextAuth,
    },
  });
  try {
    await proxy.start();
  } catch (err) {
    await store?.close();
    throw err;
  }
  const purge = store ? schedulePurge(store, log) : null;
  const a = proxy.addresses();
  log.info(
    { listen: a.plain && `${a.plain.host}:${a.plain.port}`, listenTls: a.tls && `${a.tls.host}:${a.tls.port}`, upstream: `${config.upstream.host}:${config.upstream.port}` },
    'xaps-proxy listening',
  );
  return {
    proxy,
    store,
    stop: async (drainMs = 0) => {
      if (purge) clearInterval(purge);
      await proxy.stop(drainMs);
      await store?.close();
    },
    reload: () => proxy.reloadTls(),
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
