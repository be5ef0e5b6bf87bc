/**
 * `xaps-proxy serve` as its own process for the soak: from dist/ (`node dist/cli/main.js`, so that the memory
 * measured is the proxy's and not a TypeScript loader's) or from the sources through tsx (like the integration
 * tests' spawnServe). Its JSON log lines (stdout and stderr) are read as they come and counted by level; warnings
 * and errors are kept (a tail, and a count per message) for the report.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { isPidAlive } from '../../src/testbed/processes.js';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export type ProxyEntry = 'dist' | 'tsx';

export interface ProxyLogStats {
  /** Lines by pino level name (info, warn, error, fatal, …; "text" for lines that are not JSON). */
  byLevel: Record<string, number>;
  /** "level: msg" → count, for warn and above. */
  messages: Record<string, number>;
  /** The last warn-and-above and non-JSON lines (each cut to 400 characters). */
  tail: string[];
}

export interface ProxyProcess {
  pid: number;
  entry: ProxyEntry;
  plainPort: number;
  tlsPort: number;
  metricsPort: number;
  child: ChildProcess;
  /** Set once the process has exited. */
  exit(): { code: number | null; signal: NodeJS.Signals | null; at: number } | null;
  alive(): boolean;
  logs(): ProxyLogStats;
  /** GET http://127.0.0.1:<metrics port><path>; rejects on a transport error or a timeout. */
  http(pathname: string, timeoutMs?: number): Promise<{ status: number; body: string }>;
  /** SIGTERM (graceful drain), SIGKILL after graceMs; resolves with how it exited. Idempotent. */
  stop(graceMs?: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const LEVELS: Record<number, string> = { 10: 'trace', 20: 'debug', 30: 'info', 40: 'warn', 50: 'error', 60: 'fatal' };
const TAIL = 40;

function tsxImport(): string {
  const pkg = path.join(ROOT, 'node_modules/tsx/package.json');
  const exp = (JSON.parse(readFileSync(pkg, 'utf8')) as { exports: { '.': { import: string } | string } }).exports['.'];
  return path.join(ROOT, 'node_modules/tsx', typeof exp === 'string' ? exp : exp.import);
}

/** The environment minus XAPS_* variables of whoever runs the soak. */
function cleanEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('XAPS_')) env[k] = v;
  return env;
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

export async function startProxyProcess(opts: {
  entry: ProxyEntry;
  plainPort: number;
  tlsPort: number;
  metricsPort: number;
  /** Everything after `serve` except --listen, --listen-tls and --metrics-listen. */
  args: string[];
  /** Node options before the entry (e.g. --trace-gc). */
  nodeArgs?: string[];
  /** Lines that are not JSON log records are offered here first; returning true keeps them out of the log stats. */
  onText?: (line: string) => boolean;
  startTimeoutMs?: number;
}): Promise<ProxyProcess> {
  const argv: string[] = [...(opts.nodeArgs ?? [])];
  if (opts.entry === 'dist') {
    const main = path.join(ROOT, 'dist/cli/main.js');
    if (!existsSync(main)) throw new Error(`${main} is missing: run "npm run build" (or use --entry tsx)`);
    argv.push(main);
  } else {
    argv.push('--import', tsxImport(), path.join(ROOT, 'src/cli/main.ts'));
  }
  argv.push(
    'serve',
    '--listen', `127.0.0.1:${opts.plainPort}`,
    '--listen-tls', `127.0.0.1:${opts.tlsPort}`,
    '--metrics-listen', `127.0.0.1:${opts.metricsPort}`,
    ...opts.args,
  );
  const child = spawn(process.execPath, argv, { env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
  const stats: ProxyLogStats = { byLevel: {}, messages: {}, tail: [] };
  const keep = (line: string) => {
    stats.tail.push(line.length > 400 ? `${line.slice(0, 400)}…` : line);
    if (stats.tail.length > TAIL) stats.tail.shift();
  };
  const onLine = (line: string) => {
    if (line.trim() === '') return;
    let rec: { level?: number; msg?: string } | undefined;
    try {
      rec = JSON.parse(line) as { level?: number; msg?: string };
    } catch {
      rec = undefined;
    }
    if (!rec || typeof rec.level !== 'number') {
      if (opts.onText?.(line)) return;
      stats.byLevel.text = (stats.byLevel.text ?? 0) + 1;
      keep(line);
      return;
    }
    const level = LEVELS[rec.level] ?? String(rec.level);
    stats.byLevel[level] = (stats.byLevel[level] ?? 0) + 1;
    if (rec.level >= 40) {
      const k = `${level}: ${String(rec.msg ?? '')}`;
      stats.messages[k] = (stats.messages[k] ?? 0) + 1;
      keep(line);
    }
  };
  for (const stream of [child.stdout!, child.stderr!]) {
    let buf = '';
    stream.setEncoding('utf8');
    stream.on('data', (d: string) => {
      buf += d;
      let i: number;
      while ((i = buf.indexOf('\n')) >= 0) {
        onLine(buf.slice(0, i));
        buf = buf.slice(i + 1);
      }
    });
    stream.on('end', () => {
      if (buf) onLine(buf);
      buf = '';
    });
  }
  let exitInfo: { code: number | null; signal: NodeJS.Signals | null; at: number } | null = null;
  const closed = new Promise<void>((resolve) => {
    child.once('exit', (code, signal) => {
      exitInfo = { code, signal, at: Date.now() };
    });
    child.once('close', () => resolve());
  });
  const running = () => exitInfo === null && child.exitCode === null && child.signalCode === null;

  const http = async (pathname: string, timeoutMs = 5000): Promise<{ status: number; body: string }> => {
    const res = await fetch(`http://127.0.0.1:${opts.metricsPort}${pathname}`, { signal: AbortSignal.timeout(timeoutMs) });
    return { status: res.status, body: await res.text() };
  };

  let stopping: Promise<{ code: number | null; signal: NodeJS.Signals | null }> | undefined;
  const proc: ProxyProcess = {
    pid: child.pid!,
    entry: opts.entry,
    plainPort: opts.plainPort,
    tlsPort: opts.tlsPort,
    metricsPort: opts.metricsPort,
    child,
    exit: () => exitInfo,
    alive: () => running() && isPidAlive(child.pid!),
    logs: () => stats,
    http,
    stop(graceMs = 10_000) {
      stopping ??= (async () => {
        if (running()) {
          child.kill('SIGTERM');
          const timer = setTimeout(() => {
            if (running()) child.kill('SIGKILL');
          }, graceMs);
          await closed;
          clearTimeout(timer);
        } else {
          await closed;
        }
        return { code: child.exitCode, signal: child.signalCode };
      })();
      return stopping;
    },
  };

  const deadline = Date.now() + (opts.startTimeoutMs ?? 30_000);
  for (;;) {
    if (!running()) {
      await closed;
      throw new Error(`the proxy exited during startup (${child.exitCode ?? child.signalCode}):\n${stats.tail.join('\n')}`);
    }
    if (await canConnect(opts.plainPort)) {
      const health = await http('/healthz', 2000).catch(() => null);
      if (health?.status === 200) return proc;
    }
    if (Date.now() > deadline) {
      await proc.stop(1000);
      throw new Error(`the proxy did not start within ${opts.startTimeoutMs ?? 30_000} ms:\n${stats.tail.join('\n')}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}
