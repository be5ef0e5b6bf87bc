/**
 * `xaps-proxy serve`: run the proxy until SIGTERM/SIGINT (drain, then exit 0); SIGHUP
 * reloads the certificates and the log level.
 */
import { camelCase, ConfigError, formatDuration, optionNames, type Config, type OptionName } from '../config/index.js';
import { reloadConfig } from '../config/load.js';
import { createLogger, setLogLevel, type Logger } from '../ops/log.js';
import { startApp, type App } from '../app.js';

export async function runServe(config: Config): Promise<void> {
  const log = createLogger({ level: config.logLevel });
  let started: App | null = null;
  let level = config.logLevel;
  // one reload at a time, so that two quick SIGHUPs cannot apply their results out of order
  let reloading = Promise.resolve();
  // registered before starting: the default action of SIGHUP would end the process
  process.on('SIGHUP', () => {
    const running = started;
    if (!running) {
      log.warn('SIGHUP ignored: still starting');
      return;
    }
    reloading = reloading.then(async () => {
      level = applyConfiguration(config, level, log);
      await reloadCertificates(running, log);
    });
  });
  const app = await startApp(config, log);
  started = app;
  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) {
      log.warn({ signal, sessions: app.proxy.sessions.size }, 'second signal: closing the remaining sessions now');
      void app.stop(0);
      return;
    }
    stopping = true;
    log.info(
      { signal, sessions: app.proxy.sessions.size, drainTimeout: formatDuration(config.drainTimeout) },
      'shutting down: new connections are refused, open sessions may finish until the drain timeout',
    );
    app.stop(config.drainTimeout).then(
      () => {
        log.info('stopped');
        process.exit(0);
      },
      (err: unknown) => {
        log.error({ err: String(err) }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

/**
 * Loads the configuration again from the same flags, environment and file, applies the
 * log level and says which other changes need a restart. A broken configuration changes
 * nothing. Returns the log level in force.
 */
function applyConfiguration(running: Config, level: Config['logLevel'], log: Logger): Config['logLevel'] {
  let next: Config;
  try {
    next = reloadConfig(running);
  } catch (err) {
    const e = err instanceof ConfigError ? err : new ConfigError(String((err as Error | undefined)?.message ?? err));
    log.error({ err: e.message, option: e.option }, `configuration not reloaded, keeping the previous values: ${e.message}`);
    return level;
  }
  if (next.logLevel !== level) {
    setLogLevel(log, next.logLevel);
    log.info({ from: level, to: next.logLevel }, 'log level changed');
  }
  const changed = changedOptions(running, next).filter((n) => n !== 'log-level');
  if (changed.length > 0) {
    log.warn({ options: changed.map((n) => `--${n}`) }, 'changed options take effect only after a restart');
  }
  return next.logLevel;
}

async function reloadCertificates(app: App, log: Logger): Promise<void> {
  try {
    await app.reload();
    log.info('certificates reloaded');
  } catch (err) {
    const message = String((err as Error | undefined)?.message ?? err);
    log.error({ err: message }, `certificates not reloaded, keeping the previous ones: ${message}`);
  }
}

/** Names of the options whose values differ (values are compared, never logged). */
function changedOptions(a: Config, b: Config): OptionName[] {
  const av = a as unknown as Record<string, unknown>;
  const bv = b as unknown as Record<string, unknown>;
  return optionNames('serve').filter((n) => JSON.stringify(av[camelCase(n)]) !== JSON.stringify(bv[camelCase(n)]));
}
