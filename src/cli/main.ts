#!/usr/bin/env node
/**
 * The `xaps-proxy` command: dispatch only.
 *
 *   serve | config check | devices list|remove|purge-expired | demo | version | help
 *
 * Exit codes: 0 OK; 1 runtime failure (e.g. `devices remove` found nothing, store
 * unreachable); 2 bad command line or configuration (`xaps-proxy: <one line>` on stderr).
 */
import { realpathSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { ConfigError, configWarnings, loadConfig } from '../config/index.js';
import { helpText, processIO, PROG, usage, UsageError, version, wantsHelp, type CliIO } from './args.js';
import { runConfigCommand } from './config-check.js';
import { runDevices } from './devices.js';

export async function main(argv: readonly string[], io: CliIO = processIO()): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case undefined:
        io.stderr.write(usage());
        return 2;
      case 'help':
      case '--help':
      case '-h':
        io.stdout.write(helpText(rest[0]));
        return 0;
      case 'version':
      case '--version':
        io.stdout.write(`${PROG} ${version()}\n`);
        return 0;
      case 'serve': {
        if (wantsHelp(rest)) {
          io.stdout.write(helpText('serve'));
          return 0;
        }
        const config = loadConfig({ argv: rest, env: io.env, cwd: io.cwd, command: 'serve' });
        for (const warning of configWarnings(config)) io.stderr.write(`${PROG}: warning: ${warning}\n`);
        const { runServe } = await import('./serve.js');
        await runServe(config);
        return 0;
      }
      case 'config':
        return runConfigCommand(rest, io);
      case 'devices':
        return await runDevices(rest, io);
      case 'cert': {
        const { runCert } = await import('./cert.js');
        return await runCert(rest, io);
      }
      case 'test-push': {
        const { runTestPush } = await import('./test-push.js');
        return await runTestPush(rest, io);
      }
      case 'demo': {
        const { runDemo } = await import('./demo.js');
        await runDemo(rest);
        return 0;
      }
      default:
        io.stderr.write(`${PROG}: unknown command ${JSON.stringify(command)}\n\n${usage()}`);
        return 2;
    }
  } catch (err) {
    if (err instanceof ConfigError || err instanceof UsageError) {
      io.stderr.write(`${PROG}: ${err.message}\n`);
      return 2;
    }
    const message = err instanceof Error ? err.message : String(err);
    io.stderr.write(`${PROG}: ${message.split('\n')[0]}\n`);
    return 1;
  }
}

function isEntryPoint(): boolean {
  const script = process.argv[1];
  if (!script) return false;
  try {
    return realpathSync(script) === realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

if (isEntryPoint()) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (err: unknown) => {
      process.stderr.write(`${PROG}: ${String(err)}\n`);
      process.exitCode = 1;
    },
  );
}
