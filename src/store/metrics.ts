/**
 * Metrics of the registration store:
 *
 *   xaps_store_errors_total{operation}   store operations that failed, by RegistrationStore method
 *   xaps_registrations                   live (unexpired) registrations in the store, counted at scrape time
 *
 * Errors are counted by wrapping the store once in the composition root, so every user of the store (the push
 * handler, the dispatcher, the watchers, readiness) is covered without each of them counting. A TypeError is the
 * caller's malformed input, not the store failing, and is not counted.
 *
 * With Redis the registration count is the shared store's: every instance reports the same number (aggregate with
 * max, not sum). Counting walks the users index, so it is cached for `cacheMs`.
 */
import { Counter, Gauge, type Registry } from 'prom-client';
import type { RegistrationStore } from './types.js';

export const STORE_OPERATIONS = [
  'upsert',
  'get',
  'listByUser',
  'listUsers',
  'listAll',
  'remove',
  'purgeExpired',
  'counts',
  'getMailboxStates',
  'setMailboxState',
  'ping',
] as const satisfies readonly (keyof RegistrationStore)[];
export type StoreOperation = (typeof STORE_OPERATIONS)[number];

const OPERATION_SET = new Set<string | symbol>(STORE_OPERATIONS);
const counters = new WeakMap<Registry, Counter<'operation'>>();

function errorCounter(registry: Registry): Counter<'operation'> {
  const existing = counters.get(registry);
  if (existing) return existing;
  const counter = new Counter({
    name: 'xaps_store_errors_total',
    help: 'Registration store operations that failed (store unreachable, write not durable, damaged files), by operation.',
    labelNames: ['operation'] as const,
    registers: [registry],
  });
  for (const operation of STORE_OPERATIONS) counter.inc({ operation }, 0);
  counters.set(registry, counter);
  return counter;
}

/**
 * `store`, counting failed operations in `xaps_store_errors_total`. A Proxy rather than a delegating class: the
 * result is still `instanceof` the store's class and exposes its extras (the Redis connection), which leases and
 * change dedupe rely on. Methods run with the store itself as `this`, so one store method calling another (listAll
 * calling listUsers) counts one failure, the caller's.
 */
export function instrumentStore<S extends RegistrationStore>(store: S, registry: Registry): S {
  const counter = errorCounter(registry);
  const wrapped = new Map<string | symbol, unknown>();
  const failed = (operation: StoreOperation, err: unknown): never => {
    if (!(err instanceof TypeError)) counter.inc({ operation });
    throw err;
  };
  return new Proxy(store, {
    get(target, prop) {
      const value: unknown = Reflect.get(target, prop, target);
      if (typeof value !== 'function') return value;
      let fn = wrapped.get(prop);
      if (fn === undefined) {
        const method = value as (...args: unknown[]) => unknown;
        const operation = OPERATION_SET.has(prop) ? (prop as StoreOperation) : null;
        fn = operation
          ? (...args: unknown[]): Promise<unknown> => {
              let result: Promise<unknown>;
              try {
                result = Promise.resolve(method.apply(target, args));
              } catch (err) {
                return Promise.reject(err).catch((e: unknown) => failed(operation, e));
              }
              return result.catch((e: unknown) => failed(operation, e));
            }
          : method.bind(target);
        wrapped.set(prop, fn);
      }
      return fn;
    },
  });
}

export interface RegistrationCountOptions {
  /** How long a count is reused (default 10 s). */
  cacheMs?: number;
  clock?: () => number;
}

const countSources = new WeakMap<Registry, { store: RegistrationStore; cacheMs: number; clock: () => number }>();

/**
 * `xaps_registrations` from `store.counts()`, at most once per `cacheMs` however often it is scraped. A failed count
 * keeps the last value (the failure shows in xaps_store_errors_total); before any count succeeded it is NaN, not a
 * misleading 0.
 */
export function observeRegistrationCount(registry: Registry, store: RegistrationStore, opts: RegistrationCountOptions = {}): void {
  const settings = { store, cacheMs: opts.cacheMs ?? 10_000, clock: opts.clock ?? Date.now };
  const existing = countSources.get(registry);
  if (existing) {
    Object.assign(existing, settings);
    return;
  }
  countSources.set(registry, settings);
  let cached: { at: number; value: number } | null = null;
  let running: Promise<void> | null = null;
  const refresh = (): Promise<void> => {
    running ??= settings.store
      .counts()
      .then(
        (c) => {
          cached = { at: settings.clock(), value: c.registrations };
        },
        () => undefined,
      )
      .finally(() => {
        running = null;
      });
    return running;
  };
  new Gauge({
    name: 'xaps_registrations',
    help: 'Live (unexpired) push registrations in the store; shared by all instances on one Redis. Recounted at most every 10 s.',
    registers: [registry],
    async collect() {
      if (!cached || settings.clock() - cached.at >= settings.cacheMs) await refresh();
      this.set(cached ? cached.value : NaN);
    },
  });
}
