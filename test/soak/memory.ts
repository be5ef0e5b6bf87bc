/**
 * Memory of the proxy process over a soak, and the verdict "flat after warm-up".
 *
 * Every sample: RSS (/proc/<pid>/status), CPU (/proc/<pid>/stat), the proxy's own /metrics (V8 heap as it happens to
 * be), and the LIVE memory: through the inspector (./inspector.ts) a full garbage collection in the proxy, then its
 * process.memoryUsage() — heap used + external (Buffers, TLS) after that GC is what the proxy really holds on to.
 *
 * Verdict. Warm-up is the first 25 % of the load (at least 20 s). After it, the median of the first third of the
 * remaining time is compared with the median of the last third; flat = end / start <= 1 + tolerance (10 %), on the
 * live memory. Why that one, measured in 2-minute soaks before deciding:
 * - RSS swung by -29 % and +19 % in runs without any leak: it follows V8's reserved heap, which V8 grows and shrinks
 *   in large steps (66 -> 27 -> 64 MB heap total within 30 s in one run). A 10 % band on RSS judges V8's sizing
 *   policy, not the proxy.
 * - Heap-used as sampled is a sawtooth (24 -> 44 MB between collections); which phase a window catches is chance.
 * - After a full GC, the heap stayed within 22.7-23.5 MB for a whole run: a leak of even 2 MB shows. External memory
 *   is added because retained Buffers hardly show in the V8 heap (their bytes live outside it).
 * Medians of windows (tens of samples each) rather than single samples keep one odd sample from deciding. RSS and
 * the sampled heap are still reported. The forced GCs cost the proxy ~10-20 ms each.
 */
import fs from 'node:fs';

export interface MemorySample {
  /** ms since the load started (negative: before). */
  t: number;
  rssBytes: number | null;
  heapUsedBytes: number | null;
  heapTotalBytes: number | null;
  externalBytes: number | null;
  cpuMs: number | null;
  /** Heap used + external right after a full GC (null: the inspector did not answer). */
  liveBytes: number | null;
  liveHeapBytes: number | null;
  liveExternalBytes: number | null;
  /** Client connections open at the proxy (xaps_client_connections, all listeners). */
  clientConnections: number | null;
  /** Users watched (xaps_watchers, all modes). */
  watchers: number | null;
  /** Open upstream connections of the watchers (xaps_watcher_connections, all modes). */
  watcherConnections?: number | null;
}

let clockTicks: number | undefined;

function ticksPerSecond(): number {
  // CLK_TCK is 100 on every Linux this runs on; getconf would be a process spawn per run for nothing
  if (clockTicks === undefined) clockTicks = 100;
  return clockTicks;
}

/** Resident set size of a process, bytes (undefined: gone). */
export function readRss(pid: number): number | undefined {
  try {
    const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}

/** utime + stime of a process, ms (undefined: gone). */
export function readCpuMs(pid: number): number | undefined {
  try {
    const text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    // fields[11] = utime (field 14), fields[12] = stime (field 15), in clock ticks
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / ticksPerSecond();
  } catch {
    return undefined;
  }
}

/**
 * Sum of the values of every series of `name` in a Prometheus text exposition whose labels include `labels`
 * (undefined: no such series).
 */
export function metricSum(text: string, name: string, labels: Record<string, string> = {}): number | undefined {
  let sum: number | undefined;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    let labelText = '';
    let valueText: string;
    if (rest.startsWith('{')) {
      const end = rest.indexOf('}');
      if (end < 0) continue;
      labelText = rest.slice(1, end);
      valueText = rest.slice(end + 1).trim();
    } else if (rest.startsWith(' ')) {
      valueText = rest.trim();
    } else {
      continue; // another metric whose name starts with this one
    }
    const ok = Object.entries(labels).every(([k, v]) => labelText.includes(`${k}="${v}"`));
    if (!ok) continue;
    const value = Number(valueText.split(' ')[0]);
    if (!Number.isFinite(value)) continue;
    sum = (sum ?? 0) + value;
  }
  return sum;
}

/** Every label value of `label` among the series of `name`, with its summed value. */
export function metricByLabel(text: string, name: string, label: string): Record<string, number> {
  const out: Record<string, number> = {};
  const re = new RegExp(`^${name.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\{([^}]*)\\}\\s+(\\S+)`);
  for (const line of text.split('\n')) {
    const m = re.exec(line);
    if (!m) continue;
    const lv = new RegExp(`(?:^|,)${label}="([^"]*)"`).exec(m[1]!);
    const value = Number(m[2]);
    if (!lv || !Number.isFinite(value)) continue;
    out[lv[1]!] = (out[lv[1]!] ?? 0) + value;
  }
  return out;
}

export interface WindowStats {
  fromMs: number;
  toMs: number;
  samples: number;
  median: number;
  min: number;
  max: number;
}

export interface SeriesVerdict {
  start: WindowStats;
  end: WindowStats;
  /** end median / start median. */
  ratio: number;
}

export interface MemoryVerdict {
  loadMs: number;
  warmupMs: number;
  /** Length of the start and the end window. */
  windowMs: number;
  tolerance: number;
  /** What decides `flat`: heap used + external right after a forced full GC. */
  criterion: 'live';
  live: SeriesVerdict | null;
  /** Its parts, and what is reported only (see the file comment). */
  liveHeap: SeriesVerdict | null;
  liveExternal: SeriesVerdict | null;
  rss: SeriesVerdict | null;
  heapUsed: SeriesVerdict | null;
  /** true when the deciding ratio is within 1 + tolerance; false also when it could not be computed. */
  flat: boolean;
  /** Why the verdict is weak or missing (too few samples, a short run). */
  notes: string[];
}

function median(sorted: number[]): number {
  const n = sorted.length;
  return n % 2 === 1 ? sorted[(n - 1) >> 1]! : (sorted[n / 2 - 1]! + sorted[n / 2]!) / 2;
}

function windowStats(points: Array<{ t: number; v: number | null }>, fromMs: number, toMs: number): WindowStats | null {
  const values = points
    .filter((p) => p.t >= fromMs && p.t <= toMs && p.v !== null && Number.isFinite(p.v))
    .map((p) => p.v as number)
    .sort((a, b) => a - b);
  if (values.length === 0) return null;
  return { fromMs, toMs, samples: values.length, median: median(values), min: values[0]!, max: values[values.length - 1]! };
}

export interface VerdictOptions {
  warmupShare?: number;
  minWarmupMs?: number;
  tolerance?: number;
  /** Share of the post-warm-up time each window spans (default 1/3: start, middle, end thirds). */
  windowShare?: number;
  /** Fewer live samples than this in a window: no verdict. */
  minWindowSamples?: number;
}

/** The warm-up and the window length memoryVerdict uses for a load of loadMs. */
export function verdictWindows(loadMs: number, opts: Pick<VerdictOptions, 'warmupShare' | 'minWarmupMs' | 'windowShare'> = {}): { warmupMs: number; windowMs: number } {
  const warmupMs = Math.max(opts.minWarmupMs ?? 20_000, loadMs * (opts.warmupShare ?? 0.25));
  return { warmupMs, windowMs: Math.max(0, loadMs - warmupMs) * (opts.windowShare ?? 1 / 3) };
}

/**
 * Flat or not, after the warm-up: the first and the last third of the time after the warm-up (25 % of the load, at
 * least 20 s) are compared by their medians.
 */
export function memoryVerdict(samples: MemorySample[], loadMs: number, opts: VerdictOptions = {}): MemoryVerdict {
  const tolerance = opts.tolerance ?? 0.1;
  const { warmupMs, windowMs } = verdictWindows(loadMs, opts);
  const post = Math.max(0, loadMs - warmupMs);
  const minSamples = opts.minWindowSamples ?? 3;
  const notes: string[] = [];
  if (post <= 0) notes.push(`the load (${Math.round(loadMs / 1000)} s) ended within the warm-up (${Math.round(warmupMs / 1000)} s): no verdict`);

  const series = (points: Array<{ t: number; v: number | null }>): SeriesVerdict | null => {
    if (post <= 0) return null;
    const start = windowStats(points, warmupMs, warmupMs + windowMs);
    const end = windowStats(points, loadMs - windowMs, loadMs);
    if (!start || !end || start.median <= 0) return null;
    return { start, end, ratio: end.median / start.median };
  };
  const live = series(samples.map((s) => ({ t: s.t, v: s.liveBytes })));
  let decided = live;
  if (live && (live.start.samples < minSamples || live.end.samples < minSamples)) {
    notes.push(`only ${live.start.samples} and ${live.end.samples} live-memory samples in the windows (want ${minSamples}): no verdict`);
    decided = null;
  } else if (post > 0 && !live) {
    notes.push('no live-memory sample in a window (the inspector did not answer): no verdict');
  }
  if (post > 0 && post < 60_000) notes.push(`only ${Math.round(post / 1000)} s after the warm-up: a slow leak cannot show in so short a run`);
  return {
    loadMs,
    warmupMs,
    windowMs,
    tolerance,
    criterion: 'live',
    live: decided,
    liveHeap: series(samples.map((s) => ({ t: s.t, v: s.liveHeapBytes }))),
    liveExternal: series(samples.map((s) => ({ t: s.t, v: s.liveExternalBytes }))),
    rss: series(samples.map((s) => ({ t: s.t, v: s.rssBytes }))),
    heapUsed: series(samples.map((s) => ({ t: s.t, v: s.heapUsedBytes }))),
    flat: decided !== null && decided.ratio <= 1 + tolerance,
    notes,
  };
}
