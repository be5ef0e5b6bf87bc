/** Placeholder for `xaps-proxy demo` (the real implementation is written separately and replaces this file). */
export async function runDemo(argv: string[]): Promise<void> {
  void argv;
  throw new Error('demo: not implemented');
}
