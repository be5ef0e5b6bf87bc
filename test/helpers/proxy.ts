/** Starts xaps-proxy in-process from command-line flags, exactly as `serve` would configure it. */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { loadConfig } from '../../src/config/index.js';
import { startApp, type App, type AppDeps } from '../../src/app.js';
import { createLogger, silentLogger, type Logger } from '../../src/ops/log.js';
import { freePort } from '../../src/testbed/ports.js';

export interface TestProxy {
  app: App;
  plainPort: number;
  tlsPort: number;
  dataDir: string;
  stop(): Promise<void>;
}

export interface TestProxyOptions {
  upstreamPort: number;
  /** Extra flags (e.g. --apns-topic, --client-ip). */
  flags?: string[];
  tlsCert?: string;
  tlsKey?: string;
  deps?: AppDeps;
  dataDir?: string;
  /** Where the proxy logs (default: silent, or stderr with XAPS_TEST_LOG=level). */
  log?: Logger;
}

export async function startTestProxy(opts: TestProxyOptions): Promise<TestProxy> {
  const plainPort = await freePort();
  const tlsPort = await freePort();
  const metricsPort = await freePort();
  const dataDir = opts.dataDir ?? (await fs.mkdtemp(path.join(os.tmpdir(), 'xaps-test-data-')));
  const argv = [
    '--listen', `127.0.0.1:${plainPort}`,
    '--upstream', `127.0.0.1:${opts.upstreamPort}`,
    '--data-dir', dataDir,
    '--metrics-listen', `127.0.0.1:${metricsPort}`,
    ...(opts.tlsCert && opts.tlsKey
      ? ['--listen-tls', `127.0.0.1:${tlsPort}`, '--tls-cert', opts.tlsCert, '--tls-key', opts.tlsKey]
      : []),
    ...(opts.flags ?? []),
  ];
  const config = loadConfig({ argv, env: {} });
  const level = process.env.XAPS_TEST_LOG;
  const log = opts.log ?? (level ? createLogger({ level: level as 'debug', pretty: false, destination: process.stderr }) : silentLogger());
  const app = await startApp(config, log, opts.deps);
  return {
    app,
    plainPort,
    tlsPort,
    dataDir,
    stop: () => app.stop(),
  };
}
