/**
 * xaps_ready mirrors the readiness report at scrape time: one series per check the
 * report has, and "all" for the verdict, which is 0 when the report cannot be made.
 */
import { describe, expect, it } from 'vitest';
import { Registry } from 'prom-client';
import { observeReadiness } from '../../../src/ops/readiness-metrics.js';
import type { ReadinessReport } from '../../../src/ops/readiness.js';

async function ready(registry: Registry): Promise<Record<string, number>> {
  const m = (await registry.getMetricsAsJSON()).find((x) => x.name === 'xaps_ready')!;
  return Object.fromEntries(m.values.map((v) => [String(v.labels.check), v.value]));
}

describe('observeReadiness', () => {
  it('follows the report from scrape to scrape', async () => {
    const registry = new Registry();
    let report: ReadinessReport = {
      ready: true,
      checks: { listeners: { ok: true }, upstream: { ok: true }, store: { ok: true }, certificate: { ok: true } },
    };
    let failing = false;
    observeReadiness(registry, async () => {
      if (failing) throw new Error('cannot tell');
      return report;
    });
    expect(await ready(registry)).toEqual({ all: 1, listeners: 1, upstream: 1, store: 1, certificate: 1 });

    report = { ready: false, checks: { listeners: { ok: true }, upstream: { ok: false, error: 'refused' } } };
    expect(await ready(registry)).toEqual({ all: 0, listeners: 1, upstream: 0 });

    failing = true;
    expect(await ready(registry)).toEqual({ all: 0 });
  });
});
