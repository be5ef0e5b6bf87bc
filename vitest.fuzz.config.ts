/**
 * `npm run fuzz`: the property tests of test/fuzz/ with XAPS_FUZZ_RUNS cases each (100000 by
 * default here; see test/helpers/fuzz.ts). `npm test` runs the same files with small counts.
 * No Dovecot or Redis needed: everything runs in process, HTTP on loopback.
 */
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/fuzz/**/*.test.ts'],
    env: { XAPS_FUZZ_RUNS: process.env.XAPS_FUZZ_RUNS || '100000' },
    // one property may take many minutes at 100000 cases on a busy machine
    testTimeout: 4 * 60 * 60_000,
    hookTimeout: 120_000,
    pool: 'forks',
    fileParallelism: true,
    maxWorkers: 2,
    reporters: ['default'],
  },
});
