/**
 * CPU time of processes from /proc/<pid>/stat (utime + stime, all threads), in ms. Less noisy
 * than wall time on a shared machine: what a relay costs per MB does not depend on whether
 * someone else was using the CPU at the same time.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';

let ticksPerSecond: number | undefined;

function clockTicks(): number {
  if (ticksPerSecond === undefined) {
    try {
      ticksPerSecond = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      ticksPerSecond = 100;
    }
  }
  return ticksPerSecond;
}

interface StatFields {
  ppid: number;
  /** utime + stime, ms */
  cpuMs: number;
  userMs: number;
  sysMs: number;
  /** Minor page faults (a fresh page touched: e.g. malloc'd memory the kernel has to zero). */
  minflt: number;
}

function readStat(pid: number): StatFields | undefined {
  let text: string;
  try {
    text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  // "pid (comm) state ppid …": comm may contain spaces and parens; fields resume after the last ')'
  const rest = text.slice(text.lastIndexOf(')') + 2).split(' ');
  // rest[0] = state (field 3), rest[1] = ppid (4), rest[7] = minflt (10), rest[11] = utime (14), rest[12] = stime (15)
  const ms = 1000 / clockTicks();
  const userMs = Number(rest[11]) * ms;
  const sysMs = Number(rest[12]) * ms;
  return { ppid: Number(rest[1]), cpuMs: userMs + sysMs, userMs, sysMs, minflt: Number(rest[7]) };
}

export interface ProcessUsage {
  userMs: number;
  sysMs: number;
  minflt: number;
}

/** user and system CPU ms and minor faults of one process; undefined when it is gone. */
export function processUsage(pid: number): ProcessUsage | undefined {
  const s = readStat(pid);
  return s && { userMs: s.userMs, sysMs: s.sysMs, minflt: s.minflt };
}

/** utime+stime of one process (all its threads), ms; undefined when it is gone. */
export function processCpuMs(pid: number): number | undefined {
  return readStat(pid)?.cpuMs;
}

/** CPU ms of `root` and every live descendant, by pid (e.g. Dovecot's master and its imap processes). */
export function treeCpuMs(root: number): Map<number, number> {
  const byPid = new Map<number, StatFields>();
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const s = readStat(Number(name));
    if (s) byPid.set(Number(name), s);
  }
  const children = new Map<number, number[]>();
  for (const [pid, s] of byPid) {
    const list = children.get(s.ppid);
    if (list) list.push(pid);
    else children.set(s.ppid, [pid]);
  }
  const out = new Map<number, number>();
  const stack = [root];
  while (stack.length > 0) {
    const pid = stack.pop()!;
    const s = byPid.get(pid);
    if (!s) continue;
    out.set(pid, s.cpuMs);
    stack.push(...(children.get(pid) ?? []));
  }
  return out;
}

/** CPU used by a process tree between two treeCpuMs snapshots (processes born in between count from 0). */
export function treeCpuDelta(before: Map<number, number>, after: Map<number, number>): number {
  let sum = 0;
  for (const [pid, ms] of after) sum += ms - (before.get(pid) ?? 0);
  return sum;
}

export interface ProcessMemory {
  /** VmRSS, KiB: resident memory (RssAnon + RssFile + RssShmem). */
  rssKb: number;
  /** RssAnon, KiB: the process's own heap/stack pages (JS heap, malloc, buffers). */
  anonKb: number;
  /** RssFile, KiB: mapped files (the node binary, shared libraries). */
  fileKb: number;
  /** VmHWM, KiB: peak VmRSS. */
  hwmKb: number;
}

/** Memory of one process from /proc/PID/status; undefined when it is gone. */
export function processMemory(pid: number): ProcessMemory | undefined {
  let s: string;
  try {
    s = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return undefined;
  }
  const kb = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(s)?.[1] ?? NaN);
  return { rssKb: kb('VmRSS'), anonKb: kb('RssAnon'), fileKb: kb('RssFile'), hwmKb: kb('VmHWM') };
}

/** Open file descriptors of a process (entries of /proc/PID/fd); undefined when unreadable. */
export function openFds(pid: number): number | undefined {
  try {
    return fs.readdirSync(`/proc/${pid}/fd`).length;
  } catch {
    return undefined;
  }
}

/**
 * CPU ms of `root`, its live descendants, and every descendant it has already reaped (its
 * cutime + cstime: Dovecot's master waits for each imap process it started). Unlike treeCpuMs,
 * the difference of two readings includes processes that came and went in between.
 */
export function treeCpuMsWithReaped(root: number): number {
  let reaped = 0;
  try {
    const text = fs.readFileSync(`/proc/${root}/stat`, 'utf8');
    const rest = text.slice(text.lastIndexOf(')') + 2).split(' ');
    // rest[13] = cutime (field 16), rest[14] = cstime (17)
    reaped = ((Number(rest[13]) + Number(rest[14])) * 1000) / clockTicks();
  } catch {
    return NaN;
  }
  let live = 0;
  for (const ms of treeCpuMs(root).values()) live += ms;
  return reaped + live;
}

/** Busy and total CPU time of the whole machine so far (/proc/stat, all CPUs), ms. */
export function machineCpuMs(): { busyMs: number; totalMs: number } {
  const line = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0]!;
  // cpu user nice system idle iowait irq softirq steal guest guest_nice
  const v = line.trim().split(/\s+/).slice(1).map(Number);
  const idle = (v[3] ?? 0) + (v[4] ?? 0);
  const total = v.slice(0, 8).reduce((a, b) => a + b, 0);
  const ms = 1000 / clockTicks();
  return { busyMs: (total - idle) * ms, totalMs: total * ms };
}
