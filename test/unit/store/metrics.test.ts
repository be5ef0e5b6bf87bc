/**
 * Store metrics: failed operations are counted once, by the operation the caller used,
 * without hiding what the store is (instanceof, its own extras); the registration count
 * is cached between scrapes and survives a failed recount.
 */
import { afterEach, describe, expect, it } from 'vitest';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Registry } from 'prom-client';
import { EmbeddedRegistrationStore } from '../../../src/store/embedded.js';
import { StoreUnavailableError, type RegistrationStore } from '../../../src/store/types.js';
import { STORE_OPERATIONS, instrumentStore, observeRegistrationCount } from '../../../src/store/metrics.js';

async function errors(registry: Registry): Promise<Record<string, number>> {
  const m = (await registry.getMetricsAsJSON()).find((x) => x.name === 'xaps_store_errors_total')!;
  return Object.fromEntries(m.values.filter((v) => v.value > 0).map((v) => [String(v.labels.operation), v.value]));
}

async function registrations(registry: Registry): Promise<number> {
  const m = (await registry.getMetricsAsJSON()).find((x) => x.name === 'xaps_registrations')!;
  return m.values[0]!.value;
}

const unavailable = () => Promise.reject(new StoreUnavailableError('down'));

describe('instrumentStore', () => {
  const dirs: string[] = [];
  afterEach(async () => {
    await Promise.all(dirs.splice(0).map((d) => fs.rm(d, { recursive: true, force: true })));
  });

  it('is still the store it wraps, and counts only real failures, by operation', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'xaps-store-metrics-'));
    dirs.push(dir);
    const registry = new Registry();
    const raw = await EmbeddedRegistrationStore.open({ dataDir: dir, ttlMs: 60_000 });
    const store = instrumentStore(raw, registry);
    expect(store).toBeInstanceOf(EmbeddedRegistrationStore);
    expect(store.kind).toBe('embedded');
    const m = (await registry.getMetricsAsJSON()).find((x) => x.name === 'xaps_store_errors_total')!;
    expect(m.values.map((v) => v.labels.operation)).toEqual([...STORE_OPERATIONS]);

    const input = { user: 'alice', deviceToken: 'ab'.repeat(32), accountId: 'A', subtopic: 'com.apple.mobilemail', mailboxes: [], version: 2 as const };
    await store.upsert(input);
    expect((await store.counts()).registrations).toBe(1);
    // malformed input is the caller's mistake, not a store failure
    await expect(store.upsert({ ...input, deviceToken: 'xyz' })).rejects.toBeInstanceOf(TypeError);
    expect(await errors(registry)).toEqual({});

    await store.close();
    await expect(store.upsert(input)).rejects.toBeInstanceOf(StoreUnavailableError);
    expect(await errors(registry)).toEqual({ upsert: 1 });
  });

  it('counts a failure once, as the operation called, when the store calls itself', async () => {
    const registry = new Registry();
    const fake = {
      kind: 'redis' as const,
      listUsers: unavailable,
      async listAll() {
        await this.listUsers();
        return [];
      },
    };
    const store = instrumentStore(fake as unknown as RegistrationStore, registry);
    await expect(store.listAll()).rejects.toBeInstanceOf(StoreUnavailableError);
    expect(await errors(registry)).toEqual({ listAll: 1 });
  });

  it('counts a method that throws instead of rejecting', async () => {
    const registry = new Registry();
    const fake = {
      ping(): Promise<void> {
        throw new Error('synchronous');
      },
    };
    const store = instrumentStore(fake as unknown as RegistrationStore, registry);
    await expect(store.ping()).rejects.toThrow('synchronous');
    expect(await errors(registry)).toEqual({ ping: 1 });
  });
});

describe('observeRegistrationCount', () => {
  function countingStore(answers: Array<number | 'fail'>) {
    const store = {
      calls: 0,
      counts() {
        const a = answers[Math.min(store.calls, answers.length - 1)];
        store.calls++;
        return a === 'fail' ? unavailable() : Promise.resolve({ users: 1, registrations: a! });
      },
    };
    return store;
  }

  it('recounts only after cacheMs, and keeps the last count while counting fails', async () => {
    const registry = new Registry();
    let now = 1_000_000;
    const store = countingStore([3, 'fail', 5]);
    observeRegistrationCount(registry, store as unknown as RegistrationStore, { cacheMs: 10_000, clock: () => now });
    expect(await registrations(registry)).toBe(3);
    now += 9_999;
    expect(await registrations(registry)).toBe(3);
    expect(store.calls).toBe(1);
    now += 1;
    expect(await registrations(registry)).toBe(3); // the recount failed
    expect(store.calls).toBe(2);
    expect(await registrations(registry)).toBe(5); // a failure is not cached: asked again at once
    expect(store.calls).toBe(3);
  });

  it('is NaN, not 0, before any count succeeded; concurrent scrapes share one count', async () => {
    const registry = new Registry();
    const failing = countingStore(['fail']);
    observeRegistrationCount(registry, failing as unknown as RegistrationStore);
    expect(await registrations(registry)).toBeNaN();

    const other = new Registry();
    const store = countingStore([7]);
    observeRegistrationCount(other, store as unknown as RegistrationStore);
    const [a, b] = await Promise.all([registrations(other), registrations(other)]);
    expect([a, b]).toEqual([7, 7]);
    expect(store.calls).toBe(1);
  });
});
