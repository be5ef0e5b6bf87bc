/**
 * Start-up and shutdown shared by the benchmarks (bench/*.ts): the command line, and
 * everything a benchmark starts registers its stop here, and it is stopped in reverse order on
 * exit, on errors and on Ctrl-C / SIGTERM (a second signal exits at once; the test bed's exit
 * hook SIGKILLs the daemons it tracks).
 */

import path from 'node:path';
import { fileURLToPath } from 'node:url';

export function say(msg: string): void {
  process.stderr.write(`[bench] ${msg}\n`);
}

const cleanups: { what: string; run: () => Promise<void> }[] = [];
let cleaning: Promise<void> | undefined;
let interrupted = false;

export function onCleanup(what: string, run: () => Promise<void>): void {
  cleanups.push({ what, run });
}

export function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    while (cleanups.length > 0) {
      const c = cleanups.pop()!;
      try {
        await c.run();
      } catch (err) {
        say(`cleanup of ${c.what} failed: ${(err as Error).message}`);
      }
    }
  })();
  return cleaning;
}

/** A benchmark found wrong bytes or a broken session: the one kind of failure (exit 1). */
export class BenchFailure extends Error {}

/**
 * The command line, parsed by `parse`: an options object, or the exit code when there is nothing
 * to run: `--help` prints `usage` (0); a bad option prints its message and `usage` (2). An error
 * `isArgsError` does not accept is not about the options and is thrown on.
 */
export function commandLine<A>(parse: (argv: string[]) => A | 'help', usage: string, isArgsError: (err: unknown) => boolean = () => true): A | number {
  try {
    const p = parse(process.argv.slice(2));
    if (p === 'help') {
      process.stdout.write(usage);
      return 0;
    }
    return p;
  } catch (err) {
    if (isArgsError(err)) {
      process.stderr.write(`bench: ${(err as Error).message}\n\n${usage}`);
      return 2;
    }
    throw err;
  }
}

/** Whether the module of `importMetaUrl` is the script node was started with (not imported). */
export function isEntryPoint(importMetaUrl: string): boolean {
  return !!process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(importMetaUrl);
}

/**
 * Runs `main` (its result is the exit code), cleaning up in every case. Timing never fails a
 * benchmark: only exceptions (something broke) give exit 1. `failureText`: what to print for an
 * exception, when a benchmark words some of its own (undefined: the default text).
 */
export function runMain(main: () => Promise<number>, failureText?: (err: unknown) => string | undefined): void {
  for (const [sig, code] of [['SIGINT', 130], ['SIGTERM', 143]] as const) {
    process.on(sig, () => {
      // second Ctrl-C: leave now; the testbed's exit hook SIGKILLs the pids it started
      if (interrupted) process.exit(code);
      interrupted = true;
      say(`${sig}: stopping everything this benchmark started ...`);
      void cleanup().finally(() => process.exit(code));
    });
  }
  main()
    .then(async (code) => {
      await cleanup();
      process.exit(code);
    })
    .catch(async (err: unknown) => {
      if (interrupted) return; // the signal handler cleans up and exits
      const what = err instanceof BenchFailure ? 'FAILED (wrong result)' : 'FAILED';
      process.stderr.write(failureText?.(err) ?? `\n[bench] ${what}: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      await cleanup();
      process.exit(1);
    });
}
