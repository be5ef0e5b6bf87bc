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
  port: number;
  /** Everything the process wrote to stderr so far. */
  stderr(): string;
  /** Resolves once the process has exited (at once if it already has). */
  exited(): Promise<void>;
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
  const child = spawn(
    process.execPath,
    ['--import', tsxEntry(), path.join(ROOT, 'src/cli/main.ts'), 'serve', '--listen', `127.0.0.1:${port}`, '--metrics-listen', `127.0.0.1:${await freePort()}`, ...args],
    { env: cleanEnv(), stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  const exit = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const exited = () => (child.exitCode !== null || child.signalCode !== null ? Promise.resolve() : exit);
  const proc: ServeProcess = {
    child,
    pid: child.pid!,
    port,
    stderr: () => stderr,
    exited,
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
