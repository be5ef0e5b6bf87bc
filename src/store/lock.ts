/**
 * Data-directory lock for the embedded store: `<dir>/store.lock`, created atomically (hard link of a fully
 * written temp file, or O_EXCL where links are not supported) and holding JSON {pid, hostname, bootId, startTime,
 * nonce, since}. A lock whose process is gone (no such pid, another boot, or the pid now belongs to a process started
 * at another time — e.g. a container restarted with the same pid) is stale and taken over. No flock: a data dir
 * shared by two pid namespaces (two containers on one volume) cannot be detected; don't do that.
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp, readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import path from 'node:path';
import type { Logger } from '../ops/log.js';
import { StoreLockedError } from './types.js';

interface LockInfo {
  pid: number;
  hostname: string;
  bootId?: string;
  startTime?: string;
  nonce: string;
  since: number;
}

/** Data dirs held by stores of this process (real paths). */
const heldHere = new Set<string>();

function readProc(file: string): string | undefined {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
}

function bootId(): string | undefined {
  return readProc('/proc/sys/kernel/random/boot_id')?.trim() || undefined;
}

/** Start time of a process in clock ticks since boot (field 22 of /proc/<pid>/stat), when /proc has it. */
function startTime(pid: number): string | undefined {
  const stat = readProc(`/proc/${pid}/stat`);
  if (!stat) return undefined;
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return fields[19];
}

function pidExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
  // A zombie (dead, not yet reaped by its parent) holds nothing.
  const stat = readProc(`/proc/${pid}/stat`);
  const state = stat?.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
  return state !== 'Z' && state !== 'X';
}

/** Whether the process that wrote `info` may still be running. */
function holderAlive(info: LockInfo): boolean {
  const boot = bootId();
  if (info.bootId && boot && info.bootId !== boot) return false;
  if (info.pid === process.pid) {
    // Not held by this process (checked before): a previous incarnation that had our pid.
    return false;
  }
  if (!pidExists(info.pid)) return false;
  const st = startTime(info.pid);
  if (info.startTime && st && info.startTime !== st) return false;
  return true;
}

function parseInfo(raw: string): LockInfo | null {
  try {
    const v = JSON.parse(raw) as Partial<LockInfo>;
    if (typeof v.pid === 'number' && Number.isInteger(v.pid) && v.pid > 0 && typeof v.nonce === 'string') {
      return v as LockInfo;
    }
  } catch {
    // fall through
  }
  return null;
}

export interface DirLock {
  readonly file: string;
  release(): Promise<void>;
}

export async function acquireDirLock(dir: string, log: Logger): Promise<DirLock> {
  const real = await fsp.realpath(dir);
  const file = path.join(real, 'store.lock');
  if (heldHere.has(real)) {
    throw new StoreLockedError(
      `data directory ${real} is already open by another store in this process (pid ${process.pid})`,
      { lockFile: file, pid: process.pid },
    );
  }
  const info: LockInfo = { pid: process.pid, hostname: hostname(), nonce: randomBytes(8).toString('hex'), since: Date.now() };
  const b = bootId();
  if (b) info.bootId = b;
  const st = startTime(process.pid);
  if (st) info.startTime = st;
  const content = `${JSON.stringify(info)}\n`;

  for (let attempt = 0; attempt < 5; attempt++) {
    if (await tryCreate(file, content)) {
      heldHere.add(real);
      let released = false;
      return {
        file,
        async release(): Promise<void> {
          if (released) return;
          released = true;
          heldHere.delete(real);
          const cur = await fsp.readFile(file, 'utf8').catch(() => undefined);
          if (cur !== undefined && parseInfo(cur)?.nonce === info.nonce) await fsp.unlink(file).catch(() => undefined);
        },
      };
    }
    const raw = await fsp.readFile(file, 'utf8').catch((err: NodeJS.ErrnoException) => (err.code === 'ENOENT' ? null : Promise.reject(err)));
    if (raw === null) continue; // vanished meanwhile: try again
    const other = parseInfo(raw);
    if (other && holderAlive(other)) {
      throw new StoreLockedError(
        `data directory ${real} is in use by pid ${other.pid} on ${other.hostname || 'an unknown host'} ` +
          `(since ${new Date(other.since).toISOString()}); stop that process first, or if it is not an xaps-proxy ` +
          `using this directory, delete ${file}`,
        { lockFile: file, pid: other.pid },
      );
    }
    if (!other) {
      // Unreadable lock (not written by us, or damaged): only take it over once it is clearly old.
      const stat = await fsp.stat(file).catch(() => null);
      if (stat && Date.now() - stat.mtimeMs < 10_000) {
        throw new StoreLockedError(`data directory ${real} has an unreadable lock file ${file}; if no other xaps-proxy uses this directory, delete it`, { lockFile: file });
      }
    }
    log.warn({ lockFile: file, stalePid: other?.pid }, 'taking over a stale store lock (its process is gone)');
    // Remove it only if it is still the same stale lock (another process may have taken it over meanwhile).
    const again = await fsp.readFile(file, 'utf8').catch(() => null);
    if (again === raw) await fsp.unlink(file).catch(() => undefined);
  }
  throw new StoreLockedError(`could not lock data directory ${real} (${file} keeps changing)`, { lockFile: file });
}

async function tryCreate(file: string, content: string): Promise<boolean> {
  const tmp = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  await fsp.writeFile(tmp, content, { mode: 0o644 });
  try {
    await fsp.link(tmp, file);
    return true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') return false;
    if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP' && code !== 'ENOSYS') throw err;
  } finally {
    await fsp.unlink(tmp).catch(() => undefined);
  }
  // No hard links here: O_EXCL create.
  try {
    await fsp.writeFile(file, content, { flag: 'wx', mode: 0o644 });
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw err;
  }
}
