import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import type { CliIO } from '../../../src/cli/args.js';

export const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const TSX_PKG = new URL('../../../node_modules/tsx/package.json', import.meta.url);
const tsxExport = (JSON.parse(readFileSync(TSX_PKG, 'utf8')) as { exports: Record<string, unknown> }).exports['.'];
const TSX = new URL(
  typeof tsxExport === 'string' ? tsxExport : String((tsxExport as { import?: string; default?: string }).import ?? (tsxExport as { default?: string }).default),
  TSX_PKG,
).href;

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** The environment without any XAPS_* variable of the machine running the tests. */
export function cleanEnv(extra: Record<string, string> = {}): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (v !== undefined && !k.startsWith('XAPS_')) env[k] = v;
  return { ...env, ...extra };
}

/** Run `node --import tsx src/cli/main.ts ...args` (the real entry point) in `cwd`. */
export function runCli(args: readonly string[], opts: { env?: Record<string, string>; cwd?: string } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      // tsx resolved from the project, so the child can run in any directory.
      ['--import', TSX, `${ROOT}src/cli/main.ts`, ...args],
      { cwd: opts.cwd ?? ROOT, env: cleanEnv(opts.env), timeout: 30_000 },
      (err, stdout, stderr) => {
        const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
        resolve({ code, stdout, stderr });
      },
    );
  });
}

/** In-memory CliIO capturing output. */
export function memoryIO(opts: { env?: Record<string, string | undefined>; cwd?: string } = {}): CliIO & { out: () => string; err: () => string } {
  let out = '';
  let err = '';
  return {
    stdout: { write: (s: string) => (out += s) },
    stderr: { write: (s: string) => (err += s) },
    env: opts.env ?? {},
    cwd: opts.cwd ?? '/',
    out: () => out,
    err: () => err,
  };
}
