/**
 * `xaps-proxy config check [options]`: load the configuration exactly as `serve` would,
 * check that the TLS files are usable, print the effective configuration (secrets masked)
 * and `configuration OK` (exit 0), or the one-line error (exit 2).
 */
import { readFileSync } from 'node:fs';
import { createSecureContext } from 'node:tls';
import { ConfigError, configWarnings, describeConfig, loadConfig, type Config } from '../config/index.js';
import { helpText, PROG, UsageError, wantsHelp, type CliIO } from './args.js';

/** `config <sub>`: only `check` exists. */
export function runConfigCommand(argv: readonly string[], io: CliIO): number {
  const [sub, ...rest] = argv;
  if (sub === undefined) {
    io.stderr.write(helpText('config'));
    return 2;
  }
  if (sub === 'help' || sub === '--help' || sub === '-h') {
    io.stdout.write(helpText('config'));
    return 0;
  }
  if (sub !== 'check') throw new UsageError(`unknown config command "${sub}" (expected: config check)`);
  return runConfigCheck(rest, io);
}

export function runConfigCheck(argv: readonly string[], io: CliIO): number {
  if (wantsHelp(argv)) {
    io.stdout.write(helpText('config'));
    return 0;
  }
  try {
    const config = loadConfig({ argv, env: io.env, cwd: io.cwd, command: 'serve' });
    checkTlsMaterial(config);
    io.stdout.write(describeConfig(config));
    for (const warning of configWarnings(config)) io.stderr.write(`${PROG}: warning: ${warning}\n`);
    io.stdout.write('configuration OK\n');
    return 0;
  } catch (err) {
    if (err instanceof ConfigError) {
      io.stderr.write(`${PROG}: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
}

function firstLine(err: unknown): string {
  return String((err as Error | undefined)?.message ?? err).split('\n')[0]!;
}

/**
 * Deeper than loading: the certificate and key parse and belong together, the upstream CA
 * parses. Throws ConfigError naming the option.
 */
export function checkTlsMaterial(config: Config): void {
  if (config.tlsCert && config.tlsKey) {
    try {
      createSecureContext({ cert: readFileSync(config.tlsCert), key: readFileSync(config.tlsKey) });
    } catch (err) {
      throw new ConfigError(
        `--tls-key: cannot be used with --tls-cert "${config.tlsCert}" (${firstLine(err)}); expected a PEM certificate chain and its private key`,
        { option: 'tls-key' },
      );
    }
  }
  if (config.upstreamCa) {
    try {
      const pem = readFileSync(config.upstreamCa, 'utf8');
      if (!pem.includes('-----BEGIN CERTIFICATE-----')) throw new Error('no PEM certificate found');
      createSecureContext({ ca: pem });
    } catch (err) {
      throw new ConfigError(`--upstream-ca: "${config.upstreamCa}" is not a usable PEM CA file (${firstLine(err)})`, {
        option: 'upstream-ca',
      });
    }
  }
}
