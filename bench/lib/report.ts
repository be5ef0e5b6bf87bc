/** Statistics, the results table, machine facts and the markdown report. */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { TARGET_LABEL, type TargetName, type Variant } from './targets.js';

export function median(xs: number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

export interface RunSample {
  variant: Variant;
  target: TargetName;
  round: number;
  mbps: number;
  bytes: number;
  wallMs: number;
  /** CPU of the relay process (haproxy / xaps-proxy) per MB; null for direct. */
  relayCpuMsPerMb: number | null;
  relayUserMsPerMb: number | null;
  relaySysMsPerMb: number | null;
  relayMinfltPerMb: number | null;
  clientCpuMsPerMb: number;
  dovecotCpuMsPerMb: number;
}

export interface Row {
  variant: Variant;
  target: TargetName;
  runs: number;
  medianMbps: number;
  minMbps: number;
  maxMbps: number;
  vsRelay: number | null;
  vsDirect: number | null;
  relayCpuMsPerMb: number | null;
  relayUserMsPerMb: number | null;
  relaySysMsPerMb: number | null;
  relayMinfltPerMb: number | null;
  clientCpuMsPerMb: number;
  dovecotCpuMsPerMb: number;
  perRound: number[];
  perRoundCpu: (number | null)[];
}

function medianOf(xs: (number | null)[]): number | null {
  const v = xs.filter((x): x is number => x !== null);
  return v.length ? median(v) : null;
}

export function summarize(samples: RunSample[], variants: Variant[], targets: TargetName[]): Row[] {
  const rows: Row[] = [];
  for (const variant of variants) {
    const med = new Map<TargetName, number>();
    for (const target of targets) {
      const s = samples.filter((x) => x.variant === variant && x.target === target).sort((a, b) => a.round - b.round);
      med.set(target, median(s.map((x) => x.mbps)));
    }
    for (const target of targets) {
      const s = samples.filter((x) => x.variant === variant && x.target === target).sort((a, b) => a.round - b.round);
      const m = med.get(target)!;
      rows.push({
        variant,
        target,
        runs: s.length,
        medianMbps: m,
        minMbps: Math.min(...s.map((x) => x.mbps)),
        maxMbps: Math.max(...s.map((x) => x.mbps)),
        vsRelay: med.has('relay') ? m / med.get('relay')! : null,
        vsDirect: med.has('direct') ? m / med.get('direct')! : null,
        relayCpuMsPerMb: medianOf(s.map((x) => x.relayCpuMsPerMb)),
        relayUserMsPerMb: medianOf(s.map((x) => x.relayUserMsPerMb)),
        relaySysMsPerMb: medianOf(s.map((x) => x.relaySysMsPerMb)),
        relayMinfltPerMb: medianOf(s.map((x) => x.relayMinfltPerMb)),
        clientCpuMsPerMb: median(s.map((x) => x.clientCpuMsPerMb)),
        dovecotCpuMsPerMb: median(s.map((x) => x.dovecotCpuMsPerMb)),
        perRound: s.map((x) => x.mbps),
        perRoundCpu: s.map((x) => x.relayCpuMsPerMb),
      });
    }
  }
  return rows;
}

export function ratio(rows: Row[], variant: Variant, a: TargetName, b: TargetName): number | null {
  const ra = rows.find((r) => r.variant === variant && r.target === a);
  const rb = rows.find((r) => r.variant === variant && r.target === b);
  return ra && rb ? ra.medianMbps / rb.medianMbps : null;
}

const f2 = (x: number | null) => (x === null || !Number.isFinite(x) ? '—' : x.toFixed(2));
const f1 = (x: number | null) => (x === null || !Number.isFinite(x) ? '—' : x.toFixed(1));

/** A markdown table padded so that it also reads well as plain text. */
export function table(header: string[], rows: string[][], align: ('l' | 'r')[]): string {
  const w = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const pad = (s: string, i: number) => (align[i] === 'r' ? s.padStart(w[i]) : s.padEnd(w[i]));
  const line = (cells: string[]) => `| ${cells.map(pad).join(' | ')} |`;
  const sep = `|${w.map((n, i) => (align[i] === 'r' ? '-'.repeat(n + 1) + ':' : ':' + '-'.repeat(n + 1))).join('|')}|`;
  return [line(header), sep, ...rows.map(line)].join('\n');
}

export function resultsTable(rows: Row[]): string {
  return table(
    ['target', 'variant', 'median MB/s', 'min–max MB/s', '× relay', '× direct', 'relay CPU ms/MB', 'client CPU ms/MB', 'Dovecot CPU ms/MB'],
    rows.map((r) => [
      TARGET_LABEL[r.target],
      r.variant === 'tls' ? 'TLS' : 'plain',
      f1(r.medianMbps),
      `${f1(r.minMbps)}–${f1(r.maxMbps)}`,
      f2(r.vsRelay),
      f2(r.vsDirect),
      r.target === 'direct' ? '—' : f2(r.relayCpuMsPerMb),
      f2(r.clientCpuMsPerMb),
      f2(r.dovecotCpuMsPerMb),
    ]),
    ['l', 'l', 'r', 'r', 'r', 'r', 'r', 'r', 'r'],
  );
}

export function roundsTable(rows: Row[]): string {
  const n = Math.max(...rows.map((r) => r.perRound.length));
  return table(
    ['target', 'variant', ...Array.from({ length: n }, (_, i) => `round ${i + 1}`)],
    rows.map((r) => [TARGET_LABEL[r.target], r.variant === 'tls' ? 'TLS' : 'plain', ...Array.from({ length: n }, (_, i) => f1(r.perRound[i] ?? null))]),
    ['l', 'l', ...Array<'r'>(n).fill('r')],
  );
}

export function relayDetailTable(rows: Row[]): string {
  const relays = rows.filter((r) => r.target !== 'direct');
  const n = Math.max(...relays.map((r) => r.perRoundCpu.length));
  return table(
    ['process', 'variant', 'CPU ms/MB', 'user ms/MB', 'sys ms/MB', 'minor faults/MB', ...Array.from({ length: n }, (_, i) => `r${i + 1} CPU`)],
    relays.map((r) => [
      r.target === 'relay' ? 'haproxy' : 'xaps-proxy',
      r.variant === 'tls' ? 'TLS' : 'plain',
      f2(r.relayCpuMsPerMb),
      f2(r.relayUserMsPerMb),
      f2(r.relaySysMsPerMb),
      r.relayMinfltPerMb === null ? '—' : r.relayMinfltPerMb.toFixed(0),
      ...Array.from({ length: n }, (_, i) => f2(r.perRoundCpu[i] ?? null)),
    ]),
    ['l', 'l', 'r', 'r', 'r', 'r', ...Array<'r'>(n).fill('r')],
  );
}

export const AIM = 0.95;

export function aimLines(rows: Row[], variants: Variant[]): string[] {
  const out: string[] = [];
  for (const v of variants) {
    const pr = ratio(rows, v, 'proxy', 'relay');
    const pd = ratio(rows, v, 'proxy', 'direct');
    const rd = ratio(rows, v, 'relay', 'direct');
    const parts = [`xaps-proxy/relay ${f2(pr)}`, `xaps-proxy/direct ${f2(pd)}`, `relay/direct ${f2(rd)}`];
    const proxyCpu = rows.find((r) => r.variant === v && r.target === 'proxy')?.relayCpuMsPerMb ?? null;
    const relayCpu = rows.find((r) => r.variant === v && r.target === 'relay')?.relayCpuMsPerMb ?? null;
    if (proxyCpu !== null && relayCpu !== null) parts.push(`CPU per MB xaps-proxy/haproxy ${f1(proxyCpu / relayCpu)}×`);
    const verdict = pr === null ? '' : pr >= AIM ? ` → aim met (${f2(pr)} ≥ ${AIM})` : ` → aim NOT met (${f2(pr)} < ${AIM})`;
    out.push(`${v === 'tls' ? 'TLS' : 'plain'}: ${parts.join(', ')}${verdict}`);
  }
  return out;
}

// ------------------------------------------------------------------ machine ---

function tryRun(cmd: string, args: string[], env?: NodeJS.ProcessEnv): string | undefined {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], env: env ?? process.env }).trim();
  } catch {
    return undefined;
  }
}

export interface Machine {
  nproc: number;
  cpu: string;
  kernel: string;
  node: string;
  dovecot: string;
  haproxy: string;
  memGb: string;
}

export function machine(): Machine {
  let cpu = 'unknown';
  try {
    cpu = /^model name\s*:\s*(.+)$/m.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'))?.[1]?.trim() ?? os.cpus()[0]?.model ?? 'unknown';
  } catch {
    cpu = os.cpus()[0]?.model ?? 'unknown';
  }
  return {
    nproc: Number(tryRun('nproc', [])) || os.availableParallelism(),
    cpu,
    kernel: `${os.type()} ${os.release()} ${os.arch()}`,
    node: process.version,
    dovecot: tryRun('dovecot', ['--version']) ?? tryRun('/usr/sbin/dovecot', ['--version']) ?? 'unknown',
    haproxy: (tryRun('haproxy', ['-v']) ?? tryRun('/usr/sbin/haproxy', ['-v']) ?? 'unknown').split('\n')[0].replace(/ - https?:.*$/, ''),
    memGb: (os.totalmem() / 2 ** 30).toFixed(1),
  };
}

/** Short commit (+ "dirty" when tracked files differ); tolerant of no git / no commit. */
export function commit(root: string): string {
  // GIT_OPTIONAL_LOCKS=0: status must not even refresh the index (read-only)
  const env = { ...process.env, GIT_OPTIONAL_LOCKS: '0' };
  const head = tryRun('git', ['-C', root, 'rev-parse', '--short', 'HEAD'], env);
  if (!head) return 'unknown (not a git checkout, or no commit yet)';
  const dirty = tryRun('git', ['-C', root, 'status', '--porcelain', '--untracked-files=no'], env);
  return dirty ? `${head} (with uncommitted changes)` : head;
}

export function writeReport(file: string, text: string): void {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, text);
}
