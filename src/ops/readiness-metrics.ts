/**
 * `xaps_ready{check}`: /readyz as a metric, so that an alert can fire on "upstream down" from a scrape. Computed at
 * scrape time from the readiness report, which is cached for about a second (./readiness.ts), so scrapes and
 * /readyz probes together still cost one upstream connection and one store ping per second at most.
 */
import { Gauge, type Registry } from 'prom-client';
import type { ReadinessReport } from './readiness.js';

/** `all` is the overall verdict (/readyz answering 200). */
export const READY_CHECKS = ['listeners', 'upstream', 'store', 'certificate', 'all'] as const;
export type ReadyCheck = (typeof READY_CHECKS)[number];

const sources = new WeakMap<Registry, { report: () => Promise<ReadinessReport> }>();

export function observeReadiness(registry: Registry, report: () => Promise<ReadinessReport>): void {
  const existing = sources.get(registry);
  if (existing) {
    existing.report = report;
    return;
  }
  const source = { report };
  sources.set(registry, source);
  new Gauge({
    name: 'xaps_ready',
    help: '1 when a readiness check passes, else 0: listeners, upstream, store, certificate (the last two only when configured), all (/readyz would answer 200).',
    labelNames: ['check'] as const,
    registers: [registry],
    async collect() {
      let r: ReadinessReport | null = null;
      try {
        r = await source.report();
      } catch {
        r = null; // a readiness that cannot even be computed is not ready
      }
      this.reset();
      this.set({ check: 'all' }, r?.ready ? 1 : 0);
      if (!r) return;
      const checks: Array<[ReadyCheck, { ok: boolean } | undefined]> = [
        ['listeners', r.checks.listeners],
        ['upstream', r.checks.upstream],
        ['store', r.checks.store],
        ['certificate', r.checks.certificate],
      ];
      for (const [check, result] of checks) if (result) this.set({ check }, result.ok ? 1 : 0);
    },
  });
}
