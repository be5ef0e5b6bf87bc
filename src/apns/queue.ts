/**
 * Time plumbing of the dispatcher: an injectable clock+timer (`Scheduler`), a binary min-heap, and a timeline that
 * keeps ONE timer armed for the earliest of many due times (so 100 000 waiting pushes cost one setTimeout, not
 * 100 000).
 */

/** Clock and timers; inject a manual one in tests. */
export interface Scheduler {
  /** ms since epoch. */
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

/**
 * Date.now and the global timers, looked up at call time (so vitest fake timers apply). Timers are unref'd: pending
 * pushes alone do not keep a process alive.
 */
export const systemScheduler: Scheduler = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => {
    const t = setTimeout(fn, ms);
    (t as { unref?: () => void }).unref?.();
    return t;
  },
  clearTimeout: (h) => clearTimeout(h as Parameters<typeof clearTimeout>[0]),
};

export class MinHeap<T> {
  private readonly items: T[] = [];
  constructor(private readonly less: (a: T, b: T) => boolean) {}

  get size(): number {
    return this.items.length;
  }

  peek(): T | undefined {
    return this.items[0];
  }

  push(item: T): void {
    const a = this.items;
    a.push(item);
    let i = a.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.less(a[i] as T, a[p] as T)) break;
      [a[i], a[p]] = [a[p] as T, a[i] as T];
      i = p;
    }
  }

  pop(): T | undefined {
    const a = this.items;
    if (a.length === 0) return undefined;
    const top = a[0] as T;
    const last = a.pop() as T;
    if (a.length > 0) {
      a[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < a.length && this.less(a[l] as T, a[m] as T)) m = l;
        if (r < a.length && this.less(a[r] as T, a[m] as T)) m = r;
        if (m === i) break;
        [a[i], a[m]] = [a[m] as T, a[i] as T];
        i = m;
      }
    }
    return top;
  }

  clear(): void {
    this.items.length = 0;
  }
}

interface Entry<K> {
  at: number;
  seq: number;
  key: K;
}

/**
 * Calls `fire(key)` for each (at, key) once `at` has come, in time order, with one armed timer. Entries are never
 * cancelled: `fire` must check whether the key still has something due (stale entries are cheap no-ops).
 * `onBatch` runs after each batch of fired entries.
 */
export class Timeline<K> {
  private readonly heap = new MinHeap<Entry<K>>((a, b) => a.at < b.at || (a.at === b.at && a.seq < b.seq));
  private seq = 0;
  private timer: unknown = undefined;
  private armedAt: number | undefined;
  private stopped = false;
  private running = false;

  constructor(
    private readonly scheduler: Scheduler,
    private readonly fire: (key: K) => void,
    private readonly onBatch: () => void,
  ) {}

  get size(): number {
    return this.heap.size;
  }

  add(at: number, key: K): void {
    if (this.stopped) return;
    this.heap.push({ at, seq: this.seq++, key });
    if (!this.running && (this.armedAt === undefined || at < this.armedAt)) this.arm();
  }

  private arm(): void {
    if (this.timer !== undefined) {
      this.scheduler.clearTimeout(this.timer);
      this.timer = undefined;
      this.armedAt = undefined;
    }
    const top = this.heap.peek();
    if (!top || this.stopped) return;
    const delay = Math.max(0, top.at - this.scheduler.now());
    this.armedAt = top.at;
    this.timer = this.scheduler.setTimeout(() => this.run(), delay);
  }

  private run(): void {
    this.timer = undefined;
    this.armedAt = undefined;
    if (this.stopped) return;
    const now = this.scheduler.now();
    this.running = true;
    try {
      for (let top = this.heap.peek(); top && top.at <= now; top = this.heap.peek()) {
        this.heap.pop();
        this.fire(top.key);
      }
      this.onBatch();
    } finally {
      this.running = false;
      // A clock a millisecond behind the timer simply re-arms for what is left.
      this.arm();
    }
  }

  stop(): void {
    this.stopped = true;
    if (this.timer !== undefined) this.scheduler.clearTimeout(this.timer);
    this.timer = undefined;
    this.armedAt = undefined;
    this.heap.clear();
  }
}

/** Full-jitter exponential back-off: uniform in [0, min(cap, base·2^(attempt-1))]; attempt counts from 1. */
export function fullJitterBackoff(attempt: number, baseMs: number, capMs: number, random: () => number): number {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(Math.max(attempt - 1, 0), 30));
  const r = random();
  const u = Number.isFinite(r) ? Math.min(Math.max(r, 0), 1) : 0.5;
  return Math.floor(u * ceiling);
}

/** "At most once per interval" for log lines that could otherwise flood (drops, alarms, store errors). */
export class LogLimiter {
  private readonly last = new Map<string, { at: number; suppressed: number }>();
  constructor(private readonly intervalMs: number, private readonly now: () => number) {}

  /** undefined: stay quiet; a number: log now, mentioning that many suppressed occurrences since the last line. */
  hit(key: string): number | undefined {
    const now = this.now();
    const e = this.last.get(key);
    if (e && now - e.at < this.intervalMs) {
      e.suppressed++;
      return undefined;
    }
    const suppressed = e?.suppressed ?? 0;
    this.last.set(key, { at: now, suppressed: 0 });
    return suppressed;
  }
}

/**
 * A FIFO set: add (if absent), delete and take-first in O(1) amortized. A Set
 * used as a queue makes every take-first walk past the deleted entries at its
 * front, which showed up in profiles of the push hot path.
 */
export class FifoSet<T> {
  private items: T[] = [];
  private head = 0;
  private readonly members = new Set<T>();

  get size(): number {
    return this.members.size;
  }

  add(item: T): void {
    if (this.members.has(item)) return;
    this.members.add(item);
    this.items.push(item);
  }

  delete(item: T): boolean {
    return this.members.delete(item);
  }

  /** Removes and returns the oldest member. */
  shift(): T | undefined {
    while (this.head < this.items.length) {
      const item = this.items[this.head++] as T;
      if (this.members.delete(item)) {
        this.compact();
        return item;
      }
    }
    this.compact();
    return undefined;
  }

  clear(): void {
    this.items = [];
    this.head = 0;
    this.members.clear();
  }

  /** Drops the consumed prefix once it is most of the array. */
  private compact(): void {
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
  }
}
