/**
 * Summarise a V8 .cpuprofile (from `node --cpu-prof`): self time per function and inclusive
 * time per function, top N. Usable on its own:
 *
 *   npx tsx bench/lib/cpuprofile.ts bench/results/profiles/CPU.….cpuprofile [top]
 */
import fs from 'node:fs';
import { SourceMap } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number; columnNumber: number };
  hitCount?: number;
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples?: number[];
  timeDeltas?: number[];
}

export interface FunctionCost {
  name: string;
  /** file:line, shortened to the project / node: / (program) */
  where: string;
  selfMs: number;
  totalMs: number;
}

export interface ProfileSummary {
  totalMs: number;
  /** Time not idle (everything except "(idle)"). */
  busyMs: number;
  functions: FunctionCost[];
  /** Self time grouped by category (project file, node:internal, GC, native …). */
  categories: { category: string; selfMs: number }[];
}

const maps = new Map<string, SourceMap | null>();

/** dist/…/x.js:line → src/…/x.ts:line through the .js.map tsc wrote next to it. */
function originalPosition(file: string, line0: number, col0: number): { file: string; line0: number } | null {
  if (!file.endsWith('.js')) return null;
  let map = maps.get(file);
  if (map === undefined) {
    map = null;
    try {
      map = new SourceMap(JSON.parse(fs.readFileSync(file + '.map', 'utf8')));
    } catch {
      /* no map */
    }
    maps.set(file, map);
  }
  if (!map) return null;
  const e = map.findEntry(line0, col0) as { originalSource?: string; originalLine?: number };
  if (!e || e.originalSource === undefined || e.originalLine === undefined) return null;
  const src = e.originalSource.startsWith('file://') ? fileURLToPath(e.originalSource) : path.resolve(path.dirname(file), e.originalSource);
  return { file: src, line0: e.originalLine };
}

function location(url: string, line0: number, col0: number, root: string): string {
  if (!url) return '';
  const file = url.startsWith('file://') ? fileURLToPath(url) : url;
  const orig = originalPosition(file, line0, col0);
  if (orig) return `${shortUrl(orig.file, root)}:${orig.line0 + 1}`;
  return `${shortUrl(url, root)}:${line0 + 1}`;
}

function shortUrl(url: string, root: string): string {
  if (!url) return '';
  let u = url.startsWith('file://') ? fileURLToPath(url) : url;
  if (u.startsWith(root + path.sep)) u = u.slice(root.length + 1);
  return u;
}

function category(name: string, url: string): string {
  if (name === '(garbage collector)') return 'GC';
  if (name === '(idle)') return 'idle';
  if (name === '(program)') return '(program): native/VM outside JS';
  if (!url) return `native: ${name || '(anonymous)'}`;
  if (url.startsWith('node:')) return url;
  if (url.includes('node_modules/')) return 'node_modules/' + url.split('node_modules/').pop()!.split('/')[0];
  return url;
}

export function summarizeProfile(file: string, root: string): ProfileSummary {
  const prof = JSON.parse(fs.readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map<number, ProfileNode>();
  for (const n of prof.nodes) byId.set(n.id, n);
  const parent = new Map<number, number>();
  for (const n of prof.nodes) for (const c of n.children ?? []) parent.set(c, n.id);

  // time per node from samples + timeDeltas (more exact than hitCount × interval)
  const selfUs = new Map<number, number>();
  const samples = prof.samples ?? [];
  const deltas = prof.timeDeltas ?? [];
  for (let i = 0; i < samples.length; i++) {
    // delta i is the time before sample i; attribute the following interval to sample i
    const dt = deltas[i + 1] ?? 0;
    selfUs.set(samples[i], (selfUs.get(samples[i]) ?? 0) + Math.max(0, dt));
  }

  const key = (n: ProfileNode) => `${n.callFrame.functionName || '(anonymous)'}\u0000${n.callFrame.url}:${n.callFrame.lineNumber + 1}`;
  const fn = new Map<string, FunctionCost>();
  const cats = new Map<string, number>();
  let totalUs = 0;
  let idleUs = 0;
  for (const [id, us] of selfUs) {
    const n = byId.get(id)!;
    totalUs += us;
    const name = n.callFrame.functionName || '(anonymous)';
    if (name === '(idle)') idleUs += us;
    const k = key(n);
    const url = shortUrl(n.callFrame.url, root);
    const where = location(n.callFrame.url, n.callFrame.lineNumber, n.callFrame.columnNumber, root);
    const f = fn.get(k) ?? { name, where, selfMs: 0, totalMs: 0 };
    f.selfMs += us / 1000;
    fn.set(k, f);
    const c = category(name, where ? where.replace(/:\d+$/, '') : url);
    cats.set(c, (cats.get(c) ?? 0) + us / 1000);
    // inclusive time: every distinct function on the stack once
    const seen = new Set<string>();
    for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
      const node = byId.get(cur)!;
      const kk = key(node);
      if (seen.has(kk)) continue;
      seen.add(kk);
      const g = fn.get(kk) ?? {
        name: node.callFrame.functionName || '(anonymous)',
        where: location(node.callFrame.url, node.callFrame.lineNumber, node.callFrame.columnNumber, root),
        selfMs: 0,
        totalMs: 0,
      };
      g.totalMs += us / 1000;
      fn.set(kk, g);
    }
  }
  return {
    totalMs: totalUs / 1000,
    busyMs: (totalUs - idleUs) / 1000,
    functions: [...fn.values()].filter((f) => f.name !== '(root)'),
    categories: [...cats.entries()].map(([category, selfMs]) => ({ category, selfMs })).sort((a, b) => b.selfMs - a.selfMs),
  };
}

export function formatProfile(s: ProfileSummary, top = 25): string {
  const pct = (ms: number) => `${((100 * ms) / Math.max(s.busyMs, 1e-9)).toFixed(1).padStart(5)}%`;
  const lines: string[] = [];
  lines.push(`profile: ${(s.totalMs / 1000).toFixed(1)} s sampled, ${(s.busyMs / 1000).toFixed(1)} s busy (percentages are of busy time)`);
  lines.push('', 'top self time:');
  for (const f of [...s.functions].filter((f) => f.name !== '(idle)').sort((a, b) => b.selfMs - a.selfMs).slice(0, top)) {
    lines.push(`  ${pct(f.selfMs)} ${f.selfMs.toFixed(0).padStart(7)} ms  ${f.name}  ${f.where}`);
  }
  lines.push('', 'top inclusive time (JS functions):');
  for (const f of [...s.functions].filter((f) => f.where && !f.where.startsWith('(')).sort((a, b) => b.totalMs - a.totalMs).slice(0, top)) {
    lines.push(`  ${pct(f.totalMs)} ${f.totalMs.toFixed(0).padStart(7)} ms  ${f.name}  ${f.where}`);
  }
  lines.push('', 'self time by file / category:');
  for (const c of s.categories.filter((c) => c.category !== 'idle').slice(0, top)) {
    lines.push(`  ${pct(c.selfMs)} ${c.selfMs.toFixed(0).padStart(7)} ms  ${c.category}`);
  }
  return lines.join('\n');
}

// standalone use
if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const file = process.argv[2];
  if (!file) {
    process.stderr.write('usage: tsx bench/lib/cpuprofile.ts FILE.cpuprofile [top]\n');
    process.exit(2);
  }
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
  process.stdout.write(formatProfile(summarizeProfile(file, root), Number(process.argv[3]) || 25) + '\n');
}
