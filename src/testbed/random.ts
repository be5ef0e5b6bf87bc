/**
 * A seeded generator for test beds, soak runs and benchmarks, so that a seed replays the same mailboxes and
 * choices. xorshift32: fast and deterministic; not for anything secret.
 */
export function prng(seed: number): () => number {
  let x = seed >>> 0 || 0x9e3779b9;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x1_0000_0000;
  };
}
