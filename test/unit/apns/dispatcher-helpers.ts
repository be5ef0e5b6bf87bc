/**
 * Test helpers for the push dispatcher: a manual clock/timer scheduler, a scripted fake APNs transport, a real
 * embedded registration store in a temp dir, and metric readers.
 */
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Registry } from 'prom-client';
import { PushDispatcher, type DispatcherOptions } from '../../../src/apns/dispatcher.js';
import type { Scheduler } from '../../../src/apns/queue.js';
import {
  ApnsTransportError,
  type ApnsCredentials,
  type ApnsNotification,
  type ApnsResponse,
  type ApnsTransport,
} from '../../../src/apns/types.js';
import { mailboxRef } from '../../../src/store/common.js';
import { EmbeddedRegistrationStore } from '../../../src/store/embedded.js';
import type { Registration, RegistrationInput, RegistrationStore } from '../../../src/store/types.js';

export const T0 = 1_700_000_000_000;
export const TOPIC = 'com.apple.mobilemail.push.org.example';
const DAY = 24 * 3600 * 1000;

/** Lets promise chains and I/O callbacks run (no timers involved). */
export async function flush(rounds = 10): Promise<void> {
  for (let i = 0; i < rounds; i++) await new Promise<void>((r) => setImmediate(r));
}

/** Time stands still until advance(): timers fire in due order, with flush() after each. */
export class ManualScheduler implements Scheduler {
  private t: number;
  private seq = 0;
  private readonly timers = new Map<number, { at: number; seq: number; fn: () => void }>();

  constructor(start = T0) {
    this.t = start;
  }

  now(): number {
    return this.t;
  }

  setTimeout(fn: () => void, ms: number): unknown {
    const id = ++this.seq;
    this.timers.set(id, { at: this.t + Math.max(0, ms), seq: id, fn });
    return id;
  }

  clearTimeout(handle: unknown): void {
    this.timers.delete(handle as number);
  }

  get timerCount(): number {
    return this.timers.size;
  }

  /** The earliest armed timer, if any. */
  nextAt(): number | undefined {
    let best: number | undefined;
    for (const t of this.timers.values()) if (best === undefined || t.at < best) best = t.at;
    return best;
  }

  async advance(ms: number): Promise<void> {
    await this.advanceTo(this.t + ms);
  }

  async advanceTo(target: number): Promise<void> {
    await flush(); // what is already resolved happens before the clock moves
    for (;;) {
      let next: [number, { at: number; seq: number; fn: () => void }] | undefined;
      for (const e of this.timers) {
        if (e[1].at <= target && (!next || e[1].at < next[1].at || (e[1].at === next[1].at && e[1].seq < next[1].seq))) next = e;
      }
      if (!next) break;
      this.timers.delete(next[0]);
      this.t = Math.max(this.t, next[1].at);
      next[1].fn();
      await flush();
    }
    this.t = Math.max(this.t, target);
    await flush();
  }
}

export type Answer = ApnsResponse | ApnsTransportError | Error;
export interface Sent {
  n: ApnsNotification;
  at: number;
  payload: { aps: { 'account-id': string; m?: string[] } };
}

/** Records every send; answers via `respond` (default 200), or holds answers until release() in manual mode. */
export class FakeTransport implements ApnsTransport {
  readonly sent: Sent[] = [];
  respond: (n: ApnsNotification, index: number) => Answer | Promise<Answer> = () => ({ status: 200, apnsId: 'x' });
  manual = false;
  private held: Array<{ resolve: (a: Answer) => void }> = [];
  inFlight = 0;
  maxInFlight = 0;

  constructor(private readonly sched: Scheduler) {}

  send(n: ApnsNotification): Promise<ApnsResponse> {
    const index = this.sent.length;
    this.sent.push({ n, at: this.sched.now(), payload: JSON.parse(n.payload) as Sent['payload'] });
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    const answer: Promise<Answer> = this.manual
      ? new Promise<Answer>((resolve) => this.held.push({ resolve }))
      : Promise.resolve().then(() => this.respond(n, index));
    return answer.then((a) => {
      this.inFlight--;
      if (a instanceof Error) throw a;
      return a;
    });
  }

  /** Answers the oldest `count` held requests with `answer` (manual mode). */
  release(count = Infinity, answer: Answer = { status: 200 }): number {
    let n = 0;
    while (n < count && this.held.length > 0) {
      (this.held.shift() as { resolve: (a: Answer) => void }).resolve(answer);
      n++;
    }
    return n;
  }

  get heldCount(): number {
    return this.held.length;
  }

  setCredentials(_c: ApnsCredentials): void {}
  async close(): Promise<void> {}

  /** Sends to one device token. */
  to(token: string): Sent[] {
    return this.sent.filter((s) => s.n.deviceToken === token);
  }
}

export function token(i: number, user = 0): string {
  return `${user.toString(16).padStart(8, '0')}${i.toString(16).padStart(56, '0')}`;
}

export function accountId(i: number): string {
  return `0715A26B-1C2D-4E3F-8A9B-${i.toString(16).padStart(12, '0').toUpperCase()}`;
}

export function md5(name: string): string {
  return mailboxRef(name).md5;
}

export function regInput(user: string, i: number, opts: { mailboxes?: string[]; version?: 1 | 2; now?: number } = {}): RegistrationInput {
  const names = opts.mailboxes ?? ['INBOX'];
  const input: RegistrationInput = {
    user,
    deviceToken: token(i),
    accountId: accountId(i),
    subtopic: 'com.apple.mobilemail',
    mailboxes: names.map((n) => mailboxRef(n)),
    version: opts.version ?? 2,
  };
  if (opts.now !== undefined) input.now = opts.now;
  return input;
}

const dirs: string[] = [];

/** A real embedded store in a fresh temp dir, on the scheduler's clock. */
export async function tempStore(sched: Scheduler): Promise<EmbeddedRegistrationStore> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'xaps-dispatch-'));
  dirs.push(dir);
  return EmbeddedRegistrationStore.open({ dataDir: dir, ttlMs: 30 * DAY, clock: () => sched.now() });
}

export async function removeTempDirs(): Promise<void> {
  for (const d of dirs.splice(0)) await fsp.rm(d, { recursive: true, force: true });
}

type Sample = { value: number; labels: Record<string, string | number>; metricName?: string };

async function samples(registry: Registry, name: string): Promise<Sample[]> {
  const m = registry.getSingleMetric(name);
  if (!m) throw new Error(`no metric ${name}`);
  return (await m.get()).values as Sample[];
}

/** Sum of the series of a counter or gauge matching `labels` (0 when absent). */
export async function metric(registry: Registry, name: string, labels: Record<string, string> = {}): Promise<number> {
  let sum = 0;
  for (const v of await samples(registry, name)) {
    if ((v.metricName ?? name) !== name) continue;
    if (Object.entries(labels).every(([k, val]) => String(v.labels[k]) === val)) sum += v.value;
  }
  return sum;
}

/** Count and sum of a histogram. */
export async function histogram(registry: Registry, name: string): Promise<{ count: number; sum: number }> {
  let count = 0;
  let sum = 0;
  for (const v of await samples(registry, name)) {
    if (v.metricName === `${name}_count`) count += v.value;
    if (v.metricName === `${name}_sum`) sum += v.value;
  }
  return { count, sum };
}

/** pushes_total by result, only non-zero ones. */
export async function results(registry: Registry): Promise<Record<string, number>> {
  const m = registry.getSingleMetric('xaps_pushes_total');
  if (!m) throw new Error('no xaps_pushes_total');
  const out: Record<string, number> = {};
  for (const v of (await m.get()).values) if (v.value !== 0) out[String(v.labels.result)] = v.value;
  return out;
}

export interface Harness {
  sched: ManualScheduler;
  transport: FakeTransport;
  store: RegistrationStore;
  registry: Registry;
  dispatcher: PushDispatcher;
  topic: { value: string | null };
}

/** A dispatcher on a manual clock, a fake transport and a real embedded store. */
export async function harness(opts: Partial<DispatcherOptions> & { store?: RegistrationStore; sched?: ManualScheduler } = {}): Promise<Harness> {
  const sched = opts.sched ?? new ManualScheduler();
  const store = opts.store ?? (await tempStore(sched));
  const transport = new FakeTransport(sched);
  const registry = new Registry();
  const topic = { value: TOPIC as string | null };
  const dispatcher = new PushDispatcher({
    transport,
    topic: () => topic.value,
    registry,
    scheduler: sched,
    random: () => 0.5,
    ...opts,
    store,
  });
  return { sched, transport, store, registry, dispatcher, topic };
}

/** Registers `count` devices of `user` (tokens 0..count-1). */
export async function register(
  store: RegistrationStore,
  user: string,
  count: number,
  opts: { mailboxes?: string[]; version?: 1 | 2; now?: number; from?: number } = {},
): Promise<Registration[]> {
  const out: Registration[] = [];
  const from = opts.from ?? 0;
  const all = await Promise.all(Array.from({ length: count }, (_, i) => store.upsert(regInput(user, from + i, opts))));
  for (const r of all) out.push(r.registration);
  return out;
}

export { ApnsTransportError };
