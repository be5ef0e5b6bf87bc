/** Placeholder: `xaps-proxy cert` is being written (issue 4). */
import type { CliIO } from './args.js';

export async function runCert(argv: readonly string[], io: CliIO): Promise<number> {
  void argv;
  io.stderr.write('xaps-proxy: cert is not available yet\n');
  return 1;
}
