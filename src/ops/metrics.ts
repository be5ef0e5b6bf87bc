/**
 * Prometheus metrics. Every subsystem declares its own metrics in its own file
 * with a function taking this registry (`xaps_` prefix, base units, `_total` for
 * counters, `_seconds` for durations), so that what a metric means sits next to
 * the code that moves it. Labels are bounded: never usernames, tokens or
 * mailbox names.
 */
import { Registry, collectDefaultMetrics } from 'prom-client';

export { Registry };

/** A registry with the default process metrics (CPU, memory, event loop lag, fds). */
export function createRegistry(opts: { defaultMetrics?: boolean } = {}): Registry {
  const registry = new Registry();
  if (opts.defaultMetrics !== false) collectDefaultMetrics({ register: registry, prefix: 'xaps_' });
  return registry;
}
