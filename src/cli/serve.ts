/** `xaps-proxy serve`: run the proxy until SIGTERM/SIGINT; SIGHUP reloads certificates. */
import type { Config } from '../config/index.js';
import { createLogger } from '../ops/log.js';
import { startApp } from '../app.js';

const DRAIN_MS = 30_000;

export async function runServe(config: Config): Promise<void> {
  const log = createLogger({ level: config.logLevel });
  const app = await startApp(config, log);
  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'shutting down');
    app.stop(DRAIN_MS).then(
      () => process.exit(0),
      (err: unknown) => {
        log.error({ err: String(err) }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGHUP', () => {
    app.reload().then(
      () => log.info('certificates reloaded'),
      (err: unknown) => log.error({ err: String(err) }, 'reload failed; keeping the previous certificates'),
    );
  });
}
