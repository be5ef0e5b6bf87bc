/**
 * Run counts and seeds of the property (fuzz) tests in test/fuzz/. Every property is defined
 * once and runs twice over: with a small count in `npm test`, and with XAPS_FUZZ_RUNS cases
 * each in `npm run fuzz` (which sets 100000).
 *
 *   XAPS_FUZZ_RUNS=N   run every property N times (times its share, see fuzzRuns)
 *   XAPS_FUZZ_SEED=S   the seed; without it one is drawn per test file. A failure prints the
 *                      seed, fast-check's counterexample path and the command that replays it.
 *   XAPS_FUZZ_PATH=P   with XAPS_FUZZ_SEED: replay just the failing case at path P (and shrink it)
 */
import fc from 'fast-check';
import { expect } from 'vitest';

function envInt(name: string): number | undefined {
  const raw = process.env[name];
  if (raw === undefined || raw.trim() === '') return undefined;
  if (!/^\s*-?\d+\s*$/.test(raw)) throw new Error(`${name} must be an integer, got ${JSON.stringify(raw)}`);
  return Number(raw);
}

/** The run count of `npm run fuzz`, or undefined in a normal test run. */
export const FUZZ_RUNS: number | undefined = (() => {
  const n = envInt('XAPS_FUZZ_RUNS');
  if (n !== undefined && n < 1) throw new Error('XAPS_FUZZ_RUNS must be at least 1');
  return n;
})();

/** The seed every property of this test file starts from. */
export const FUZZ_SEED: number = envInt('XAPS_FUZZ_SEED') ?? (Math.random() * 0x1_0000_0000) | 0;

const FUZZ_PATH = process.env.XAPS_FUZZ_PATH?.trim() || undefined;

/**
 * How many cases a property runs: `defaultForTest` in `npm test`, XAPS_FUZZ_RUNS × `share`
 * (at least 1) under `npm run fuzz`. A share below 1 is for properties whose cases are
 * orders of magnitude dearer than the rest (a TCP connection each).
 */
export function fuzzRuns(defaultForTest: number, share = 1): number {
  if (FUZZ_RUNS === undefined) return defaultForTest;
  return Math.max(1, Math.round(FUZZ_RUNS * share));
}

/** fast-check parameters: the run count, the seed, and the replay path when one is given. */
export function fuzzParams<Ts>(runs: number, extra: fc.Parameters<Ts> = {}): fc.Parameters<Ts> {
  return { ...extra, numRuns: runs, seed: FUZZ_SEED, ...(FUZZ_PATH ? { path: FUZZ_PATH } : {}) };
}

function failure<Ts>(details: fc.RunDetails<Ts>, report: string, runs: number): Error {
  const state = expect.getState();
  const file = state.testPath ? state.testPath.replace(`${process.cwd()}/`, '') : 'test/fuzz';
  const title = state.currentTestName?.split(' > ').pop();
  const name = title ? ` -t ${JSON.stringify(`^${title.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`)}` : '';
  const replay =
    `XAPS_FUZZ_SEED=${details.seed}` +
    (details.counterexamplePath ? ` XAPS_FUZZ_PATH=${JSON.stringify(details.counterexamplePath)}` : '') +
    ` XAPS_FUZZ_RUNS=${runs} npx vitest run ${file}${name}`;
  const cause = details.errorInstance;
  const got = cause instanceof Error ? `\n\nGot: ${cause.stack ?? cause.message}` : cause !== undefined ? `\n\nGot: ${String(cause)}` : '';
  return new Error(`${report}${got}\n\nReplay: ${replay}`, { cause });
}

/**
 * Checks a property with `runs` cases (from fuzzRuns) and the shared seed; on failure throws
 * fast-check's report (counterexample, seed, path) plus the command line that replays it.
 */
export function fuzzAssert<Ts>(property: fc.IAsyncProperty<Ts>, runs: number, extra?: fc.Parameters<Ts>): Promise<void>;
export function fuzzAssert<Ts>(property: fc.IProperty<Ts>, runs: number, extra?: fc.Parameters<Ts>): void;
export function fuzzAssert<Ts>(
  property: fc.IProperty<Ts> | fc.IAsyncProperty<Ts>,
  runs: number,
  extra?: fc.Parameters<Ts>,
): Promise<void> | void {
  const params = fuzzParams(runs, extra);
  const started = performance.now();
  if (property.isAsync()) {
    return fc.check(property as fc.IAsyncProperty<Ts>, params).then(async (details) => {
      if (details.failed) throw failure(details, (await fc.asyncDefaultReportMessage(details)) ?? 'property failed', runs);
      passed(details, started);
    });
  }
  const details = fc.check(property as fc.IProperty<Ts>, params);
  if (details.failed) throw failure(details, fc.defaultReportMessage(details) ?? 'property failed', runs);
  passed(details, started);
}

/** Under `npm run fuzz`, one line per property: how many cases ran, how long, from which seed. */
function passed<Ts>(details: fc.RunDetails<Ts>, started: number): void {
  if (FUZZ_RUNS === undefined) return;
  const title = expect.getState().currentTestName ?? 'property';
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  console.log(`[fuzz] ${title}: ${details.numRuns} cases in ${seconds} s (seed ${details.seed})`);
}
