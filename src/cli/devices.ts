/**
 * `xaps-proxy devices …`: administer device registrations in the store named by the same
 * configuration as `serve` (--redis-url, --data-dir, --registration-ttl, --config).
 *
 *   devices list [--user U] [--json]    table (tokens shortened) or full JSON
 *   devices remove --user U --token T   T may be a unique prefix of at least 8 hex digits
 *   devices purge-expired               physically drop expired registrations
 *
 * The embedded store (--data-dir) belongs to one process at a time. While a proxy runs on it, `list` shows a
 * read-only view of it (and says so on stderr); `remove` and `purge-expired` need it to themselves and exit 1.
 */
import { configOrigins, loadConfig, type DevicesConfig } from '../config/index.js';
import { createLogger, shortToken, type Logger } from '../ops/log.js';
import { StoreLockedError, type Registration, type RegistrationStore } from '../store/types.js';
import { helpText, PROG, takeLocalFlags, UsageError, wantsHelp, type CliIO } from './args.js';

export interface StoreOptions {
  redisUrl?: string;
  dataDir: string;
  ttlMs: number;
  logger?: Logger;
  /** As in `createStore`: 'read-only-if-locked' gets a read-only view of an embedded store another process holds. */
  access?: 'read-write' | 'read-only-if-locked';
}
export type OpenStore = (opts: StoreOptions) => Promise<RegistrationStore>;

export interface DevicesDeps {
  /** Default: `createStore` from src/store. */
  openStore?: OpenStore;
}

const defaultOpenStore: OpenStore = async (opts) => {
  const { createStore } = await import('../store/index.js');
  return createStore(opts);
};

export async function runDevices(argv: readonly string[], io: CliIO, deps: DevicesDeps = {}): Promise<number> {
  const [sub, ...rest] = argv;
  if (sub === undefined) {
    io.stderr.write(helpText('devices'));
    return 2;
  }
  if (sub === 'help' || wantsHelp(argv)) {
    io.stdout.write(helpText('devices'));
    return 0;
  }
  switch (sub) {
    case 'list': {
      const { values, rest: configArgs } = takeLocalFlags(rest, { user: 'string', json: 'boolean' });
      return withStore(configArgs, io, deps, { access: 'read-only-if-locked' }, async (store) => {
        const regs = values.user !== undefined ? await store.listByUser(values.user) : await store.listAll();
        io.stdout.write(values.json ? `${JSON.stringify(regs, null, 2)}\n` : formatTable(regs, values.user));
        return 0;
      });
    }
    case 'remove': {
      const { values, rest: configArgs } = takeLocalFlags(rest, { user: 'string', token: 'string' });
      if (values.user === undefined) throw new UsageError('devices remove: --user is required');
      if (values.token === undefined) throw new UsageError('devices remove: --token is required');
      const user = values.user;
      const wanted = values.token.trim().replace(/…$/, '').toLowerCase();
      if (!/^[0-9a-f]{8,}$/.test(wanted)) {
        throw new UsageError('devices remove: --token must be the device token in hex (or a unique prefix of at least 8 digits)');
      }
      return withStore(configArgs, io, deps, { access: 'read-write', action: 'remove registrations' }, async (store) => {
        let token = wanted;
        if (wanted.length < 64) {
          const matches = (await store.listByUser(user)).filter((r) => r.deviceToken.toLowerCase().startsWith(wanted));
          if (matches.length > 1) {
            throw new UsageError(`devices remove: token prefix ${wanted} matches ${matches.length} registrations of "${user}"; give more digits`);
          }
          if (matches.length === 1) token = matches[0]!.deviceToken;
        }
        if (await store.remove(user, token)) {
          io.stdout.write(`removed the registration of "${user}" with token ${shortToken(token)}\n`);
          return 0;
        }
        io.stderr.write(`${PROG}: no registration of "${user}" with token ${shortToken(token)}; nothing removed\n`);
        return 1;
      });
    }
    case 'purge-expired': {
      return withStore(rest, io, deps, { access: 'read-write', action: 'purge expired registrations' }, async (store) => {
        const n = await store.purgeExpired();
        io.stdout.write(`removed ${n} expired registration${n === 1 ? '' : 's'}\n`);
        return 0;
      });
    }
    default:
      throw new UsageError(`unknown devices command "${sub}" (expected list, remove or purge-expired)`);
  }
}

/** How a command needs the store; `action` names what a read-write command could not do while the store is locked. */
type Access = { access: 'read-only-if-locked' } | { access: 'read-write'; action: string };

/** What `createStore` returns for a locked embedded store with 'read-only-if-locked' (EmbeddedReadOnlyStore). */
function readOnlyView(store: RegistrationStore): { holderPid?: number | undefined } | null {
  return (store as { readOnly?: unknown }).readOnly === true ? (store as { holderPid?: number | undefined }) : null;
}

async function withStore(
  configArgs: readonly string[],
  io: CliIO,
  deps: DevicesDeps,
  need: Access,
  body: (store: RegistrationStore) => Promise<number>,
): Promise<number> {
  const config: DevicesConfig = loadConfig({ argv: configArgs, env: io.env, cwd: io.cwd, command: 'devices' });
  // Admin commands talk on stdout; store logs go to stderr, and only warnings unless asked for more.
  const level = configOrigins(config).get('log-level')?.kind === 'default' ? 'warn' : config.logLevel;
  const logger = createLogger({ level, pretty: false, destination: process.stderr });
  const open = deps.openStore ?? defaultOpenStore;
  let store: RegistrationStore;
  try {
    store = await open({
      ...(config.redisUrl !== undefined ? { redisUrl: config.redisUrl } : {}),
      dataDir: config.dataDir,
      ttlMs: config.registrationTtl,
      logger,
      access: need.access,
    });
  } catch (err) {
    if (need.access === 'read-write' && err instanceof StoreLockedError && err.pid !== undefined) {
      io.stderr.write(
        `${PROG}: cannot ${need.action}: the data directory ${config.dataDir} is in use by pid ${err.pid} ` +
          '(a running xaps-proxy?); stop it first, or use Redis (--redis-url) for live administration\n',
      );
      return 1;
    }
    throw err;
  }
  const view = readOnlyView(store);
  if (view) {
    const who = view.holderPid !== undefined ? `pid ${view.holderPid}` : 'another process';
    io.stderr.write(`${PROG}: note: the store in ${config.dataDir} is in use by ${who}; showing a read-only view\n`);
  }
  try {
    return await body(store);
  } finally {
    await store.close();
  }
}

function truncate(s: string, max: number): string {
  return s.length > max ? `${s.slice(0, max - 1)}…` : s;
}

/** Plain-text table; tokens shortened to 8 hex digits. */
export function formatTable(regs: readonly Registration[], user?: string): string {
  if (regs.length === 0) return user !== undefined ? `no registrations for "${user}"\n` : 'no registrations\n';
  const header = ['USER', 'TOKEN', 'ACCOUNT', 'MAILBOXES', 'VERSION', 'LAST SEEN'];
  const rows = regs.map((r) => [
    r.user,
    shortToken(r.deviceToken),
    r.accountId,
    truncate(r.mailboxes.map((m) => m.name).join(',') || '-', 40),
    String(r.version),
    new Date(r.lastSeen).toISOString(),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
  const line = (cells: readonly string[]) => cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!))).join('  ');
  const n = regs.length;
  return `${[line(header), ...rows.map(line)].join('\n')}\n${n} registration${n === 1 ? '' : 's'}\n`;
}
