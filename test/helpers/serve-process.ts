/** `xaps-proxy serve` as its own process (node --import tsx src/cli/main.ts), for tests that kill it for real. */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { freePort } from '../../src/testbed/ports.js';
import { RawImap } from './raw-imap.js';
import { ROOT, cleanEnv } from '../unit/cli/helpers.js';

export interface ServeProcess {
  child: ChildProcess;
  pid: number;
  /** The plain --listen port. */
  port: number;
  /** The --metrics-listen port (/metrics, /healthz, /readyz). */
  metricsPort: number;
  /** Everything the process wrote to stderr so far. */
  stderr(): string;
  /** Everything the process wrote to stdout so far (its JSON log lines). */
  stdout(): string;
  /** Resolves once the process has exited and its output is read (at once if so already). */
  exited(): Promise<void>;
  /** Exit code, or the signal that ended it; null while it runs. */
  exitStatus(): { code: number | null; signal: NodeJS.Signals | null } | null;
  /** Sends `signal` to the process (if it still runs). */
  signal(signal: NodeJS.Signals): void;
  /** SIGKILL at once (a crash). */
  kill9(): Promise<void>;
  /** SIGTERM, then SIGKILL after `graceMs`. Idempotent. */
  stop(graceMs?: number): Promise<void>;
}

function tsxEntry(): string {
  const tsxPkg = path.join(ROOT, 'node_modules/tsx/package.json');
  const exp = (JSON.parse(readFileSync(tsxPkg, 'utf8')) as { exports: { '.': { import: string } | string } }).exports['.'];
  return path.join(ROOT, 'node_modules/tsx', typeof exp === 'string' ? exp : exp.import);
}

/** Spawns `serve --listen 127.0.0.1:<free port> ...args` and waits until it accepts IMAP connections. */
export async function spawnServe(args: string[], opts: { startTimeoutMs?: number } = {}): Promise<ServeProcess> {
  const port = await freePort();
  const metricsPort = await freePort();
  const child = spawn(
    process.execPath,
    ['--import', tsxEntry(), path.join(ROOT, 'src/cli/main.ts'), 'serve', '--listen', `127.0.0.1:${port}`, '--metrics-listen', `127.0.0.1:${metricsPort}`, ...args],
    { env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let stderr = '';
  let stdout = '';
  child.stderr!.on('data', (d) => (stderr += d));
  // always read, so that a chatty log level cannot fill the pipe and stall the proxy
  child.stdout!.on('data', (d) => (stdout += d));
  // 'close' comes after 'exit' once stdout and stderr are drained: no log line is missed
  const closed = new Promise<void>((resolve) => child.once('close', () => resolve()));
  const running = () => child.exitCode === null && child.signalCode === null;
  const exited = () => closed;
  const proc: ServeProcess = {
    child,
    pid: child.pid!,
    port,
    metricsPort,
    stderr: () => stderr,
    stdout: () => stdout,
    exited,
    exitStatus: () => (running() ? null : { code: child.exitCode, signal: child.signalCode }),
    signal(signal) {
      if (running()) process.kill(child.pid!, signal);
    },
    async kill9() {
      if (child.exitCode === null && child.signalCode === null) process.kill(child.pid!, 'SIGKILL');
      await exited();
    },
    async stop(graceMs = 5000) {
      if (child.exitCode !== null || child.signalCode !== null) return;
      process.kill(child.pid!, 'SIGTERM');
      const timer = setTimeout(() => {
        if (child.exitCode === null && child.signalCode === null) process.kill(child.pid!, 'SIGKILL');
      }, graceMs);
      await exited();
      clearTimeout(timer);
    },
  };
  const deadline = Date.now() + (opts.startTimeoutMs ?? 20_000);
  for (;;) {
    try {
      const c = await RawImap.connect({ port });
      c.close();
      return proc;
    } catch {
      if (child.exitCode !== null || Date.now() > deadline) {
        await proc.stop(1000);
        throw new Error(`proxy did not start: ${stderr}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}
