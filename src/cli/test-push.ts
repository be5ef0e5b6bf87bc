/** Placeholder: `xaps-proxy test-push` is being written (issue 4). */
import type { CliIO } from './args.js';

export async function runTestPush(argv: readonly string[], io: CliIO): Promise<number> {
  void argv;
  io.stderr.write('xaps-proxy: test-push is not available yet\n');
  return 1;
}
