/** "Did you mean …?" for misspelt option names. */

function editDistance(a: string, b: string): number {
  const prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let diag = prev[0]!;
    prev[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const above = prev[j]!;
      prev[j] = Math.min(above + 1, prev[j - 1]! + 1, diag + (a[i - 1] === b[j - 1] ? 0 : 1));
      diag = above;
    }
  }
  return prev[b.length]!;
}

/** `listenTls`, `LISTEN_TLS`, `--listen_tls` → `listen-tls`. */
export function toKebab(s: string): string {
  return s
    .replace(/^-+/, '')
    .replace(/([a-z0-9])([A-Z])/g, '$1-$2')
    .replace(/_/g, '-')
    .toLowerCase();
}

/** The candidate closest to `input`, if any is close enough to be a plausible typo. */
export function closest(input: string, candidates: readonly string[]): string | undefined {
  const wanted = toKebab(input);
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const c of candidates) {
    if (c === wanted) return c;
    const d = editDistance(wanted, c);
    if (d < bestDistance) {
      best = c;
      bestDistance = d;
    }
  }
  const limit = Math.max(2, Math.floor(wanted.length / 3));
  if (best !== undefined && bestDistance <= limit) return best;
  // A prefix such as `upstream` for `upstream-tl` is a good enough hint too.
  return candidates.find((c) => wanted.length >= 4 && (c.startsWith(wanted) || wanted.startsWith(c)));
}
