/**
 * The things being compared, all on loopback in front of one Dovecot:
 *   direct  Dovecot itself (imap / imaps port)
 *   relay   haproxy `mode tcp`, a blind relay (terminating TLS in the TLS variant)
 *   proxy   xaps-proxy, in its own process, started as operators run it (dist/cli/main.js serve)
 */
import fs from 'node:fs';
import path from 'node:path';
import { freePorts, startTcpRelay, waitFor, type TcpRelayInstance } from '../../src/testbed/index.js';
import { canConnect, spawnDaemon, terminate, WaitAborted, type TrackedProcess } from '../../src/testbed/processes.js';
import type { DovecotInstance } from '../../src/testbed/index.js';
import type { Endpoint } from './imap-wire.js';

export type TargetName = 'direct' | 'relay' | 'proxy';
export type Variant = 'plain' | 'tls';

export const TARGET_LABEL: Record<TargetName, string> = {
  direct: 'Dovecot direct',
  relay: 'haproxy mode tcp',
  proxy: 'xaps-proxy',
};

export interface ProxyProcess {
  pid: number;
  plainPort: number;
  tlsPort: number;
  /** Its --metrics-listen port (Prometheus /metrics on 127.0.0.1). */
  metricsPort: number;
  logPath: string;
  /** The exact command line, for the report. */
  argv: string[];
  /** Where --cpu-prof writes, when profiling. */
  profileDir?: string;
  stop(): Promise<void>;
}

export interface ProxyStartOptions {
  root: string;
  upstreamPort: number;
  certPath: string;
  keyPath: string;
  workDir: string;
  /** Run under `node --cpu-prof`, profile written into this dir on exit. */
  profileDir?: string;
  /** Extra node options for the proxy process (experiments: GC flags, --trace-gc, …). */
  nodeArgs?: string[];
  /** Extra `serve` options. */
  serveArgs?: string[];
  /** Log file name inside workDir (default xaps-proxy.log). */
  logName?: string;
  /** The build to run (default <root>/dist): e.g. a patched copy, for before/after comparisons. */
  distDir?: string;
}

/** `node dist/cli/main.js serve …` with a plain and a TLS listener, in a child process. */
export async function startProxyProcess(o: ProxyStartOptions): Promise<ProxyProcess> {
  const main = path.join(o.distDir ?? path.join(o.root, 'dist'), 'cli', 'main.js');
  // its own metrics port: the default 127.0.0.1:9925 may be taken by another proxy on the machine
  const [plainPort, tlsPort, metricsPort] = await freePorts(3);
  const nodeArgs = [...(o.nodeArgs ?? []), ...(o.profileDir ? ['--cpu-prof', '--cpu-prof-dir', o.profileDir] : [])];
  if (o.profileDir) fs.mkdirSync(o.profileDir, { recursive: true });
  const args = [
    ...nodeArgs,
    main,
    'serve',
    '--listen', `127.0.0.1:${plainPort}`,
    '--listen-tls', `127.0.0.1:${tlsPort}`,
    '--tls-cert', o.certPath,
    '--tls-key', o.keyPath,
    '--upstream', `127.0.0.1:${o.upstreamPort}`,
    '--metrics-listen', `127.0.0.1:${metricsPort}`,
    '--log-level', 'warn',
    ...(o.serveArgs ?? []),
  ];
  const logPath = path.join(o.workDir, o.logName ?? 'xaps-proxy.log');
  const env = { ...process.env };
  for (const k of Object.keys(env)) if (k.startsWith('XAPS_')) delete env[k]; // flags only
  const proc: TrackedProcess = await spawnDaemon(process.execPath, args, { logPath, cwd: o.root, env });
  try {
    await waitFor(
      async () => {
        if (proc.hasExited()) throw new WaitAborted('xaps-proxy exited during startup');
        return (await canConnect('127.0.0.1', plainPort)) && (await canConnect('127.0.0.1', tlsPort));
      },
      { timeoutMs: 20_000, intervalMs: 50, what: `xaps-proxy listening on ${plainPort} and ${tlsPort}` },
    );
  } catch (err) {
    await terminate(proc, { graceMs: 2000 });
    const log = fs.existsSync(logPath) ? fs.readFileSync(logPath, 'utf8').trimEnd() : '';
    throw new Error(`xaps-proxy did not start (${(err as Error).message})\n${log}`);
  }
  let stopping: Promise<void> | undefined;
  return {
    pid: proc.pid,
    plainPort,
    tlsPort,
    metricsPort,
    logPath,
    argv: [process.execPath, ...args],
    profileDir: o.profileDir,
    stop() {
      // SIGTERM: `serve` drains (no sessions left) and exits 0; --cpu-prof writes on that exit
      stopping ??= terminate(proc, { graceMs: 15_000 });
      return stopping;
    },
  };
}

export interface Relays {
  plain: TcpRelayInstance;
  tls: TcpRelayInstance;
}

/** Two haproxy processes (mode tcp): one plain, one terminating TLS with Dovecot's cert. */
export async function startRelays(upstreamPort: number, certPath: string, keyPath: string, track: (stop: () => Promise<void>) => void): Promise<Relays> {
  const plain = await startTcpRelay({ target: { host: '127.0.0.1', port: upstreamPort } });
  track(() => plain.stop());
  const tls = await startTcpRelay({
    target: { host: '127.0.0.1', port: upstreamPort },
    tls: { certPemPath: certPath, keyPemPath: keyPath },
  });
  track(() => tls.stop());
  return { plain, tls };
}

/** The targets of one benchmark run: null where not started. */
export interface TargetEnv {
  dovecot: DovecotInstance;
  relays: Relays | null;
  proxy: ProxyProcess | null;
  ca: Buffer;
}

/** Where a client connects to reach `target` in `variant`, and the relay process in between (null: direct). */
export function endpointOf(env: TargetEnv, variant: Variant, target: TargetName): { ep: Endpoint; pid: number | null } {
  const tls = variant === 'tls' ? { ca: env.ca, servername: 'localhost' } : undefined;
  const host = '127.0.0.1';
  switch (target) {
    case 'direct':
      return { ep: { host, port: variant === 'tls' ? env.dovecot.imapsPort : env.dovecot.imapPort, tls }, pid: null };
    case 'relay': {
      const r = variant === 'tls' ? env.relays!.tls : env.relays!.plain;
      return { ep: { host, port: r.port, tls }, pid: r.pid };
    }
    case 'proxy':
      return { ep: { host, port: variant === 'tls' ? env.proxy!.tlsPort : env.proxy!.plainPort, tls }, pid: env.proxy!.pid };
  }
}

/** What the proxy logged (warn and above), less the configuration warnings it prints at startup, line by line. */
export function proxyLogLines(p: ProxyProcess): string[] {
  return (fs.existsSync(p.logPath) ? fs.readFileSync(p.logPath, 'utf8') : '').split('\n').filter((l) => l.trim() && !l.startsWith('xaps-proxy: warning:'));
}
