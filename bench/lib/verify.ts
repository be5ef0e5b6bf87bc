/**
 * The benchmark's correctness check: every FETCH through every target must return the mailbox
 * exactly — the same number of literals, the same literal bytes, and (on the hashed warm-up runs)
 * the same content. A relay that drops, adds or alters bytes fails the run (exit 1).
 */
import type { CommandResult } from './imap-load.js';
import type { FilledMailbox } from './mailbox.js';

/** A target returned other bytes than the mailbox holds: the one failure this benchmark reports. */
export class CorrectnessError extends Error {}

export function expected(box: FilledMailbox, opts: { headers: boolean }): { literals: number; literalBytes: number } {
  return {
    literals: box.messages * (opts.headers ? 2 : 1),
    literalBytes: box.totalBytes + (opts.headers ? box.headerBytes : 0),
  };
}

export interface Reference {
  /** SHA-1 every hashed FETCH must match; null: the first hashed FETCH sets it (BODY[HEADER] mode,
   * where the order of the two literals per message is the server's choice). */
  digest: string | null;
  /** Bytes before the tagged line that every FETCH must match; null: the first FETCH sets it. */
  untaggedBytes: number | null;
}

/**
 * `perConnection[c][f]`: FETCH number f on connection c. Counts are checked on every FETCH, so a
 * lost or extra byte fails any run; content (SHA-1) on the runs that hashed it.
 */
export function verify(
  perConnection: CommandResult[][],
  box: FilledMailbox,
  opts: { headers: boolean },
  what: string,
  reference: Reference,
): void {
  const want = expected(box, opts);
  perConnection.forEach((fetches, i) =>
    fetches.forEach((c, k) => {
      const who = `${what}, connection ${i + 1}${fetches.length > 1 ? ` fetch ${k + 1}` : ''}`;
      if (c.status !== 'OK') throw new CorrectnessError(`${who}: ${c.text}`);
      if (c.literals !== want.literals) {
        throw new CorrectnessError(`${who}: ${c.literals} literals fetched, expected ${want.literals}`);
      }
      if (c.literalBytes !== want.literalBytes) {
        throw new CorrectnessError(
          `${who}: ${c.literalBytes} literal bytes fetched, expected ${want.literalBytes} (${c.literalBytes - want.literalBytes} difference)`,
        );
      }
      if (reference.untaggedBytes === null) reference.untaggedBytes = c.untaggedBytes;
      else if (c.untaggedBytes !== reference.untaggedBytes) {
        throw new CorrectnessError(
          `${who}: ${c.untaggedBytes} bytes of FETCH responses, expected ${reference.untaggedBytes} (${c.untaggedBytes - reference.untaggedBytes} difference)`,
        );
      }
      if (c.digest !== null) {
        if (reference.digest === null) reference.digest = c.digest;
        else if (c.digest !== reference.digest) {
          throw new CorrectnessError(`${who}: the fetched content differs (SHA-1 ${c.digest}, expected ${reference.digest})`);
        }
      }
    }),
  );
}
