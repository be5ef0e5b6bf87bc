/**
 * Issue 7 acceptance (item 3), the soak: two minutes of connection churn, registrations, device turnover and LMTP
 * deliveries at steady rates through a real `xaps-proxy serve` process in front of a real Dovecot (NOTIFY watchers,
 * master user, embedded store), pushing to the mock APNs. The runner is test/soak/runner.ts (also `npm run soak`);
 * what counts as lost, duplicate and wrong is defined in test/soak/oracle.ts, the memory verdict in
 * test/soak/memory.ts. The only test in this file: it runs ~2.5 minutes.
 */
import { describe, expect, it } from 'vitest';
import { loadMinimums, runSoak, type SoakResult } from '../soak/runner.js';
import { formatSummary } from '../soak/report.js';

describe('soak: 2 minutes of steady load through a proxy process', () => {
  it('loses no push, pushes no unregistered mailbox, survives, and keeps its live memory flat', async () => {
    // from the sources (like spawnServe): dist/ may be older than src/ when this file runs alone
    const result: SoakResult = await runSoak({ minutes: 2, entry: 'tsx', log: (line) => console.log(line) });
    console.log(formatSummary(result));

    // the load happened: at least half of what the configured rates make in the configured time
    const min = loadMinimums(result.options, result.options.minutes * 60_000);
    const { sessions, registrations, deliveries } = result.load;
    expect(sessions.completed + sessions.aborted).toBeGreaterThanOrEqual(min.sessions);
    expect(result.load.sticky.idleCycles).toBeGreaterThan(0);
    expect(registrations.during).toBeGreaterThanOrEqual(min.registrations);
    expect(registrations.initial).toBeGreaterThan(0);
    expect(deliveries.ok).toBeGreaterThanOrEqual(min.deliveries);
    expect(result.oracle.expected).toBeGreaterThanOrEqual(min.expected);
    expect(result.oracle.pushes).toBeGreaterThanOrEqual(min.pushes);
    expect(deliveries.archive).toBeGreaterThan(0); // the never-registered mailbox really got mail

    // every delivery to a registered mailbox reached each of its devices; nothing else was pushed
    expect(result.oracle.lostExamples).toEqual([]);
    expect(result.oracle.lost).toBe(0);
    expect(result.oracle.wrongExamples).toEqual([]);
    expect(result.oracle.wrong).toBe(0);
    // with this definition a duplicate is a push no delivery explains: only a bug makes one
    expect(result.oracle.duplicates).toBe(0);

    // the proxy lived through it and stopped cleanly on SIGTERM
    expect(result.proxy.diedAt).toBeNull();
    expect(result.proxy.aliveAtEnd).toBe(true);
    expect(result.proxy.exit).toEqual({ code: 0, signal: null });

    // live memory (heap + external after a full GC), end third vs start third after the warm-up
    expect(result.memory.notes.filter((n) => /no verdict/.test(n))).toEqual([]);
    expect(result.memory.live).not.toBeNull();
    expect(result.memory.live!.ratio).toBeLessThanOrEqual(1 + result.options.tolerance);

    expect(result.failures).toEqual([]);
    expect(result.ok).toBe(true);
  }, 10 * 60_000);
});
