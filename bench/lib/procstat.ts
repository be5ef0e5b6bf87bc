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
