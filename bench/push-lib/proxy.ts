/** xaps-proxy as operators run it (`node dist/cli/main.js serve …`), in its own process, for push benchmarks. */
import fs from 'node:fs';
import path from 'node:path';
import { freePort } from '../../src/testbed/ports.js';
import { canConnect, spawnDaemon, terminate, waitFor, WaitAborted, type TrackedProcess } from '../../src/testbed/processes.js';

export interface PushProxy {
  pid: number;
  port: number;
  logPath: string;
  argv: string[];
  log(): string;
  stop(): Promise<void>;
}

export async function startPushProxy(o: { root: string; upstreamPort: number; dataDir: string; flags: string[]; logPath: string }): Promise<PushProxy> {
  const main = path.join(o.root, 'dist', 'cli', 'main.js');
  const port = await freePort();
  const args = [main, 'serve', '--listen', `127.0.0.1:${port}`, '--metrics-listen', `127.0.0.1:${await freePort()}`, '--upstream', `127.0.0.1:${o.upstreamPort}`, '--data-dir', o.dataDir, '--log-level', 'warn', ...o.flags];
  const env = { ...process.env };
  for (const k of Object.keys(env)) if (k.startsWith('XAPS_')) delete env[k]; // flags only
  const proc: TrackedProcess = await spawnDaemon(process.execPath, args, { logPath: o.logPath, cwd: o.root, env });
  const log = () => (fs.existsSync(o.logPath) ? fs.readFileSync(o.logPath, 'utf8') : '');
  try {
    await waitFor(
      async () => {
        if (proc.hasExited()) throw new WaitAborted('xaps-proxy exited during startup');
        return canConnect('127.0.0.1', port);
      },
      { timeoutMs: 30_000, intervalMs: 50, what: `xaps-proxy listening on ${port}` },
    );
  } catch (err) {
    await terminate(proc, { graceMs: 2000 });
    throw new Error(`xaps-proxy did not start (${(err as Error).message})\n${log().trimEnd()}`);
  }
  let stopping: Promise<void> | undefined;
  return {
    pid: proc.pid,
    port,
    logPath: o.logPath,
    argv: [process.execPath, ...args],
    log,
    stop() {
      stopping ??= terminate(proc, { graceMs: 15_000 });
      return stopping;
    },
  };
}

/** VmRSS / VmHWM of a process in KiB (/proc/PID/status); undefined when it is gone. */
export function memKb(pid: number): { rss: number; hwm: number } | undefined {
  try {
    const s = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const rss = Number(/^VmRSS:\s+(\d+)/m.exec(s)?.[1]);
    const hwm = Number(/^VmHWM:\s+(\d+)/m.exec(s)?.[1]);
    return { rss, hwm };
  } catch {
    return undefined;
  }
}

/** Established TCP connections whose local port is `port` (the server side: connections INTO it), IPv4+IPv6. */
export function establishedTo(port: number): number {
  const hex = port.toString(16).toUpperCase().padStart(4, '0');
  let n = 0;
  for (const f of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text = '';
    try {
      text = fs.readFileSync(f, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols.length < 4) continue;
      if (cols[3] === '01' && cols[1]!.endsWith(`:${hex}`)) n++;
    }
  }
  return n;
}
