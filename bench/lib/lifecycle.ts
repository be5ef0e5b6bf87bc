/**
 * Start-up and shutdown shared by bench/imap-mix.ts, bench/idle-capacity.ts and bench/all.ts:
 * everything a benchmark starts registers its stop here, and it is stopped in reverse order on
 * exit, on errors and on Ctrl-C / SIGTERM (a second signal exits at once; the test bed's exit
 * hook SIGKILLs the daemons it tracks).
 */

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
 * Runs `main` (its result is the exit code), cleaning up in every case. Timing never fails a
 * benchmark: only exceptions (something broke) give exit 1.
 */
export function runMain(main: () => Promise<number>): void {
  for (const [sig, code] of [['SIGINT', 130], ['SIGTERM', 143]] as const) {
    process.on(sig, () => {
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
      if (interrupted) return;
      const what = err instanceof BenchFailure ? 'FAILED (wrong result)' : 'FAILED';
      process.stderr.write(`\n[bench] ${what}: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      await cleanup();
      process.exit(1);
    });
}
