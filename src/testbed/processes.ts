/**
 * Process helpers for the test bed: find a binary, spawn a daemon in the foreground with its
 * output in a log file, wait for a port or a condition, stop exactly the pid that was started.
 *
 * Every process spawned here is tracked; when this Node process exits, the tracked pids still
 * running are SIGKILLed (only those pids — never anything found by name). Children stay in our
 * process group, so a Ctrl-C in a terminal reaches them too.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';

const SBIN_DIRS = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin'];

/** Absolute path of an executable found in PATH or the usual sbin/bin directories. */
export function findBinary(name: string, extraCandidates: string[] = []): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(path.delimiter).filter(Boolean), ...SBIN_DIRS];
  const candidates = [...extraCandidates, ...dirs.map((d) => path.join(d, name))];
  for (const file of candidates) {
    try {
      fs.accessSync(file, fs.constants.X_OK);
      if (fs.statSync(file).isFile()) return file;
    } catch {
      /* next */
    }
  }
  return undefined;
}

/** True while `pid` exists and is not a zombie. */
export function isPidAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
  try {
    // "pid (comm) S ..." — comm may contain spaces/parens, the state follows the last ')'.
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return true; // no /proc: trust kill(0)
  }
}

/** This process's RLIMIT_NOFILE (children inherit it), from /proc/self/limits. */
export function fdLimit(): { soft: number; hard: number } | undefined {
  try {
    const m = /^Max open files\s+(\S+)\s+(\S+)/m.exec(fs.readFileSync('/proc/self/limits', 'utf8'));
    if (!m) return undefined;
    const n = (v: string | undefined) => (v === 'unlimited' ? Number.MAX_SAFE_INTEGER : Number(v));
    return { soft: n(m[1]), hard: n(m[2]) };
  } catch {
    return undefined;
  }
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Thrown by a waitFor check to stop waiting at once (the error is rethrown as is). */
export class WaitAborted extends Error {}

export interface WaitOptions {
  timeoutMs?: number;
  intervalMs?: number;
  /** Used in the timeout error message. */
  what?: string;
}

/** Poll `check` until it returns a truthy value (which is returned) or the timeout passes. */
export async function waitFor<T>(
  check: () => T | undefined | null | false | Promise<T | undefined | null | false>,
  opts: WaitOptions = {},
): Promise<T> {
  const timeoutMs = opts.timeoutMs ?? 20_000;
  const intervalMs = opts.intervalMs ?? 50;
  const deadline = Date.now() + timeoutMs;
  let lastErr: unknown;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
    } catch (err) {
      if (err instanceof WaitAborted) throw err;
      lastErr = err;
    }
    if (Date.now() >= deadline) {
      const why = lastErr instanceof Error ? ` (last error: ${lastErr.message})` : '';
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${opts.what ?? 'condition'}${why}`);
    }
    await sleep(intervalMs);
  }
}

/** Resolve true if a TCP connection to host:port succeeds (then closes it), false otherwise. */
export function canConnect(host: string, port: number, timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect({ host, port });
    const done = (ok: boolean) => {
      sock.removeAllListeners();
      sock.on('error', () => undefined);
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(timeoutMs, () => done(false));
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}

/**
 * True when process `pid` itself holds a listening TCP socket on `port` (Linux /proc). Unlike a
 * connect probe, this cannot be fooled by some other process already listening on that port.
 * Returns undefined when /proc cannot tell (not Linux, or no permission).
 */
export function pidListensOn(pid: number, port: number): boolean | undefined {
  let inodes: Set<string>;
  try {
    inodes = new Set<string>();
    for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/${pid}/fd/${fd}`));
        if (m) inodes.add(m[1]!);
      } catch {
        /* fd closed meanwhile */
      }
    }
  } catch {
    return undefined;
  }
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0');
  for (const table of ['tcp', 'tcp6']) {
    let text: string;
    try {
      text = fs.readFileSync(`/proc/${pid}/net/${table}`, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      // sl local_address rem_address st ... uid timeout inode
      if (f.length > 9 && f[3] === '0A' && f[1]!.endsWith(`:${hexPort}`) && inodes.has(f[9]!)) return true;
    }
  }
  return false;
}

/** Wait until host:port accepts TCP connections. */
export async function waitForPort(host: string, port: number, opts: WaitOptions = {}): Promise<void> {
  await waitFor(() => canConnect(host, port), { what: `${host}:${port} to accept connections`, ...opts });
}

/**
 * Connect, read until `expect` appears in the received text (resolve with the text), or fail on
 * close/timeout. Used for "* OK" greetings and "+PONG".
 */
export function probeBanner(
  host: string,
  port: number,
  opts: { send?: string; expect: string; timeoutMs?: number },
): Promise<string> {
  return new Promise((resolve, reject) => {
    let buf = '';
    const sock = net.connect({ host, port });
    const finish = (err?: Error) => {
      sock.removeAllListeners();
      sock.on('error', () => undefined);
      sock.destroy();
      if (err) reject(err);
      else resolve(buf);
    };
    sock.setTimeout(opts.timeoutMs ?? 2000, () => finish(new Error(`no "${opts.expect}" from ${host}:${port} in time`)));
    sock.once('connect', () => {
      if (opts.send !== undefined) sock.write(opts.send);
    });
    sock.on('data', (d: Buffer) => {
      buf += d.toString('latin1');
      if (buf.includes(opts.expect)) finish();
    });
    sock.once('error', (e) => finish(e));
    sock.once('close', () => finish(new Error(`${host}:${port} closed before "${opts.expect}" (got ${JSON.stringify(buf)})`)));
  });
}

// ------------------------------------------------------------------ tracking ---

const tracked = new Set<number>();
/** Leaders of process groups started with `processGroup`: the whole group is killed, not just the leader. */
const trackedGroups = new Set<number>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => killAllTracked());
}

/** SIGKILL every tracked pid that is still running (synchronous; safe in an 'exit' handler). */
export function killAllTracked(): void {
  for (const pid of tracked) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* already gone */
    }
  }
  tracked.clear();
  for (const pgid of [...trackedGroups]) killProcessGroup(pgid);
}

/** SIGKILL every process left in the group led by `pgid` (spawned with `processGroup`), and stop tracking it. */
export function killProcessGroup(pgid: number): void {
  try {
    process.kill(-pgid, 'SIGKILL');
  } catch {
    /* already gone */
  }
  trackedGroups.delete(pgid);
}

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface TrackedProcess {
  pid: number;
  child: ChildProcess;
  /** Resolves when the process has exited (never rejects). */
  exited: Promise<ExitInfo>;
  hasExited(): boolean;
}

export interface SpawnDaemonOptions {
  /** stdout and stderr are appended to this file (daemons keep inherited fds: never a pipe). */
  logPath: string;
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Lead a new process group, so that its children can be killed with it (killProcessGroup). */
  processGroup?: boolean;
}

/** Spawn a long-running process in the foreground, output to a log file, pid tracked. */
export async function spawnDaemon(cmd: string, args: string[], opts: SpawnDaemonOptions): Promise<TrackedProcess> {
  installExitHook();
  const fd = fs.openSync(opts.logPath, 'a');
  let child: ChildProcess;
  try {
    child = spawn(cmd, args, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ['ignore', fd, fd], detached: opts.processGroup === true });
  } finally {
    fs.closeSync(fd);
  }
  let exitedFlag = false;
  const exited = new Promise<ExitInfo>((resolve) => {
    child.once('exit', (code, signal) => {
      exitedFlag = true;
      if (child.pid !== undefined) tracked.delete(child.pid);
      resolve({ code, signal });
    });
  });
  // Spawn errors (ENOENT, EACCES) arrive asynchronously as 'error'.
  const pid = await new Promise<number>((resolve, reject) => {
    child.once('error', (err) => {
      exitedFlag = true;
      reject(new Error(`cannot start ${cmd}: ${err.message}`));
    });
    child.once('spawn', () => resolve(child.pid as number));
  });
  tracked.add(pid);
  if (opts.processGroup) trackedGroups.add(pid);
  child.unref();
  return { pid, child, exited, hasExited: () => exitedFlag };
}

/**
 * Stop a process we started: `signal` (default SIGTERM), wait up to `graceMs` (default 5 s),
 * then SIGKILL. `pid` may differ from proc.pid only if the caller knows better (e.g. a pid file);
 * either way only that pid is signalled.
 */
export async function terminate(
  proc: TrackedProcess,
  opts: { graceMs?: number; signal?: NodeJS.Signals; pid?: number } = {},
): Promise<void> {
  const pid = opts.pid ?? proc.pid;
  const gone = () => proc.hasExited() || !isPidAlive(pid);
  if (!gone()) {
    try {
      process.kill(pid, opts.signal ?? 'SIGTERM');
    } catch {
      /* already gone */
    }
    const graceMs = opts.graceMs ?? 5000;
    const deadline = Date.now() + graceMs;
    while (!gone() && Date.now() < deadline) await sleep(25);
    if (!gone()) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* already gone */
      }
    }
  }
  if (pid === proc.pid) {
    // Our own child: wait for the exit event so the pid is reaped.
    await Promise.race([proc.exited, sleep(5000)]);
  } else {
    await waitFor(() => !isPidAlive(pid), { timeoutMs: 5000, what: `pid ${pid} to exit` }).catch(() => undefined);
  }
  tracked.delete(pid);
}

export interface RunResult {
  stdout: string;
  stderr: string;
  code: number | null;
}

/** Run a short command to completion, optionally feeding stdin; rejects on non-zero exit. */
export function runCommand(
  cmd: string,
  args: string[],
  opts: { input?: string | Buffer; env?: NodeJS.ProcessEnv; timeoutMs?: number; cwd?: string } = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout?.on('data', (d: Buffer) => out.push(d));
    child.stderr?.on('data', (d: Buffer) => err.push(d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    child.once('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${cmd}: ${e.message}`));
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      const res = { stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8'), code };
      if (code === 0) resolve(res);
      else {
        const why = signal ? `signal ${signal}` : `exit ${code}`;
        reject(new Error(`${path.basename(cmd)} ${args.join(' ')} failed (${why}): ${res.stderr.trim() || res.stdout.trim()}`));
      }
    });
    if (opts.input !== undefined && child.stdin) {
      child.stdin.on('error', () => undefined); // EPIPE if the command exits early; 'close' reports it
      child.stdin.end(opts.input);
    }
  });
}

/** Pids of every running descendant of `pid` (from /proc), children before grandchildren. */
export function descendants(pid: number): number[] {
  const parentOf = new Map<number, number>();
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      parentOf.set(Number(entry), ppid);
    } catch {
      /* gone meanwhile */
    }
  }
  const out: number[] = [];
  const queue = [pid];
  while (queue.length > 0) {
    const parent = queue.shift()!;
    for (const [child, ppid] of parentOf) {
      if (ppid === parent) {
        out.push(child);
        queue.push(child);
      }
    }
  }
  return out;
}

/**
 * Starts a server on ports probed as free, retrying (up to `attempts` times) when
 * another process took one between the probe and the bind: `retryable` says which
 * errors mean that, `repick` chooses new ports and rewrites the configuration.
 */
export async function startWithPortRetry<T>(
  start: () => Promise<T>,
  opts: { retryable: (err: Error) => boolean; repick: () => Promise<void>; attempts?: number },
): Promise<T> {
  const attempts = opts.attempts ?? 3;
  for (let attempt = 1; ; attempt++) {
    try {
      return await start();
    } catch (err) {
      if (attempt >= attempts || !opts.retryable(err as Error)) throw err;
      await opts.repick();
    }
  }
}
