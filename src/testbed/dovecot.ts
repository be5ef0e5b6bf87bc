/**
 * A throwaway Dovecot 2.3 on loopback, entirely inside a fresh temp dir: config, self-signed
 * TLS cert, passwd-file users plus a master user, maildirs, sockets and logs. Used by the test
 * suite and by `xaps-proxy demo`.
 *
 * The generated dovecot.conf `!include`s deploy/dovecot/xaps-trial.conf, the configuration the
 * local trial (docker-compose.yml) runs, and overrides only what is per instance: paths, ports,
 * TLS, the users directory (DOVECOT_TRIAL_DIR), limits and debug logging.
 *
 * Quirks handled here (see docs, verified on Debian 12 / Dovecot 2.3.19.1):
 * - as root, mail processes must not run as root: mail belongs to the `dovecot` user and the
 *   dir must be traversable by it (mkdtemp gives 0700: chmod 755);
 * - Dovecot keeps inherited fds open: its stdio goes to a file, never to a pipe;
 * - one inotify instance per IMAP session of the single mail uid: as root, raise
 *   fs.inotify.max_user_instances, or IDLE beyond ~128 sessions degrades to 30 s polling;
 * - `mail_max_userip_connections` defaults to 10: raised;
 * - the per-IP auth penalty (anvil) stays active: a failed login slows the next login from the
 *   same IP, which tests of the proxy's client-IP forwarding rely on.
 */
import fs from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freePorts } from './ports.js';
import {
  descendants,
  findBinary,
  isPidAlive,
  probeBanner,
  runCommand,
  spawnDaemon,
  terminate,
  waitFor,
  WaitAborted,
  type TrackedProcess,
  startWithPortRetry,
} from './processes.js';
import { PUSH_LUA_SCRIPT, packageRoot } from './push-lua.js';

/**
 * The Dovecot configuration shared with the local trial (docker-compose.yml mounts the same file):
 * deploy/dovecot/xaps-trial.conf. Every generated dovecot.conf `!include`s it and then sets only
 * what is per instance.
 */
export const DOVECOT_TRIAL_CONFIG_PATH: string = path.join(packageRoot(), 'deploy', 'dovecot', 'xaps-trial.conf');
/** The environment variable (imported by Dovecot) that the trial config's passdb/userdb paths start with. */
export const DOVECOT_TRIAL_DIR_VARIABLE = 'DOVECOT_TRIAL_DIR';

export interface DovecotOptions {
  /** Loopback address to listen on (default 127.0.0.1). */
  host?: string;
  /** user → password (default alice:alicepw bob:bobpw carol:carolpw). */
  users?: Record<string, string>;
  /** Also create `genUsers` users user0001.. with password `genPassword` (default "password"). */
  genUsers?: number;
  genPassword?: string;
  /** Master user (default master / masterpw); log in as "alice*master" with the master password. */
  masterUser?: string;
  masterPassword?: string;
  /** login_trusted_networks (default "127.0.0.0/8 ::1"; "" for none). */
  trustedNetworks?: string;
  /** Max concurrent IMAP sessions; sets process/client limits (default 1000). */
  maxConnections?: number;
  /** disable_plaintext_auth (default false). */
  disablePlaintextAuth?: boolean;
  /** auth_debug, auth_verbose, mail_debug. */
  debug?: boolean;
  /** Enable the push_notification Lua driver, POSTing JSON events to this URL. */
  pushLuaUrl?: string;
  /** Optional bearer token the Lua driver sends (push_lua_token). */
  pushLuaToken?: string;
  /** Add an IMAP listener with `haproxy = yes` (PROXY protocol v1/v2 header mandatory). */
  haproxyListener?: boolean;
  /** Hierarchy separator of the inbox namespace (default "/"). */
  separator?: string;
  /** Appended verbatim to dovecot.conf. */
  extraConfig?: string;
}

export interface DovecotInstance {
  dir: string;
  host: string;
  imapPort: number;
  imapsPort: number;
  lmtpPort: number;
  haproxyPort?: number;
  /** The self-signed server certificate (use as the CA to trust). */
  caCertPath: string;
  /** Its private key (e.g. to terminate TLS elsewhere with the same identity). */
  tlsKeyPath: string;
  configPath: string;
  logPath: string;
  /** Master process pid (changes on restart). */
  pid: number;
  users: Record<string, string>;
  masterUser: string;
  masterPassword: string;
  /** Path of the Lua push script when pushLuaUrl was given. */
  pushLuaPath?: string;
  /** Non-fatal problems found while starting (e.g. inotify limit could not be raised). */
  warnings: string[];
  /** Real delivery through dovecot-lda (fires MessageNew); creates the mailbox if missing. */
  deliver(user: string, rfc822: string | Buffer, mailbox?: string): Promise<void>;
  /** Run `doveadm -c <config> ...args`, resolve with stdout. */
  doveadm(args: string[]): Promise<string>;
  /** Dovecot's log (log_path) so far. */
  readLog(): Promise<string>;
  /** SIGTERM the master, wait up to 5 s, then SIGKILL it. Idempotent. */
  stop(): Promise<void>;
  /** Stop and start again with the same dir, ports, users and mail. */
  restart(): Promise<void>;
  /** `kill -9` of the master and every process it started (a crash): sessions drop at once. */
  kill(): Promise<void>;
  /** Stop and delete the dir (unless XAPS_TESTBED_KEEP=1). */
  destroy(): Promise<void>;
}

const DOVECOT_CANDIDATES = ['/usr/sbin/dovecot'];
const LIBEXEC = '/usr/lib/dovecot';

function dovecotBin(): string | undefined {
  return findBinary('dovecot', DOVECOT_CANDIDATES);
}
function doveadmBin(): string | undefined {
  return findBinary('doveadm', ['/usr/bin/doveadm']);
}

/** True when Dovecot with IMAP, LMTP, LDA and doveadm is installed. */
export function dovecotAvailable(): boolean {
  return (
    dovecotBin() !== undefined &&
    doveadmBin() !== undefined &&
    ['imap', 'imap-login', 'lmtp', 'dovecot-lda'].every((b) => existsSync(path.join(LIBEXEC, b))) &&
    findBinary('openssl') !== undefined
  );
}

const DEFAULT_USERS: Record<string, string> = { alice: 'alicepw', bob: 'bobpw', carol: 'carolpw' };

function isRoot(): boolean {
  return typeof process.getuid === 'function' && process.getuid() === 0;
}

function assertLoopback(host: string): void {
  if (!/^127\.\d+\.\d+\.\d+$/.test(host) && host !== '::1' && host !== 'localhost') {
    throw new Error(`testbed Dovecot listens on loopback only, not ${host}`);
  }
}

function assertConfValue(name: string, v: string): void {
  if (/[\r\n]/.test(v)) throw new Error(`${name} must not contain line breaks`);
}

function passwdLine(user: string, password: string): string {
  if (/[:\s]/.test(user) || user === '') throw new Error(`invalid user name ${JSON.stringify(user)}`);
  if (/[\r\n]/.test(password)) throw new Error(`invalid password for ${user}`);
  // passwd-file fields are ':'-separated; {PLAIN} passwords may not contain ':' either.
  if (password.includes(':')) throw new Error(`password of ${user} must not contain ':'`);
  return `${user}:{PLAIN}${password}::::::\n`;
}

/** A short temp dir: unix socket paths under base_dir must stay below ~100 bytes. */
async function makeDir(): Promise<string> {
  let parent = os.tmpdir();
  if (parent.length > 40) parent = '/tmp';
  const dir = await fs.mkdtemp(path.join(parent, 'xaps-dovecot-'));
  await fs.chmod(dir, 0o755);
  return fs.realpath(dir);
}

interface Identity {
  mailUser: string;
  mailGroup: string;
  internalUser: string;
  internalGroup: string;
  loginUser: string;
}

async function identity(): Promise<Identity> {
  if (isRoot()) {
    // Dovecot refuses mail processes as root: the package's unprivileged users do the work.
    return { mailUser: 'dovecot', mailGroup: 'dovecot', internalUser: 'dovecot', internalGroup: 'dovecot', loginUser: 'dovenull' };
  }
  const info = os.userInfo();
  const group = (await runCommand('id', ['-gn'])).stdout.trim() || String(info.gid);
  return { mailUser: info.username, mailGroup: group, internalUser: info.username, internalGroup: group, loginUser: info.username };
}

async function makeCert(tlsDir: string): Promise<{ cert: string; key: string }> {
  const cert = path.join(tlsDir, 'cert.pem');
  const key = path.join(tlsDir, 'key.pem');
  const openssl = findBinary('openssl');
  if (!openssl) throw new Error('openssl not found (run: node scripts/bootstrap.mjs test)');
  await runCommand(openssl, [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '3650',
    '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1',
    '-keyout', key, '-out', cert,
  ]);
  await fs.chmod(key, 0o600);
  await fs.chmod(cert, 0o644);
  return { cert, key };
}

interface ConfInput {
  dir: string;
  host: string;
  ports: { imap: number; imaps: number; lmtp: number; haproxy?: number };
  id: Identity;
  cert: string;
  key: string;
  maxConnections: number;
  trustedNetworks: string;
  disablePlaintextAuth: boolean;
  debug: boolean;
  separator: string;
  pushLuaPath?: string;
  pushLuaUrl?: string;
  pushLuaToken?: string;
  extraConfig?: string;
}

function renderConfig(c: ConfInput): string {
  const max = c.maxConnections;
  const dh = existsSync('/usr/share/dovecot/dh.pem') ? 'ssl_dh = </usr/share/dovecot/dh.pem' : '';
  const push = c.pushLuaPath !== undefined;
  const lua = 'mail_lua notify push_notification push_notification_lua';
  const haproxyListener =
    c.ports.haproxy !== undefined
      ? `  inet_listener imap_haproxy {
    address = ${c.host}
    port = ${c.ports.haproxy}
    haproxy = yes
  }
`
      : '';
  const lines = [
    '# generated by xaps-proxy src/testbed/dovecot.ts: throwaway test instance, loopback only',
    '# Everything that is not per instance comes from the shipped trial configuration; the',
    '# settings after the include override its values (paths, ports, users, TLS, limits).',
    `!include ${DOVECOT_TRIAL_CONFIG_PATH}`,
    '',
    '# passwd-files and mail of this instance (read by the included passdb/userdb; the last value wins)',
    `import_environment = $import_environment ${DOVECOT_TRIAL_DIR_VARIABLE}=${c.dir}`,
    `listen = ${c.host}`,
    `instance_name = xaps-testbed-${c.ports.imap}`,
    `base_dir = ${c.dir}/run`,
    `state_dir = ${c.dir}/state`,
    `log_path = ${c.dir}/log/dovecot.log`,
    `default_internal_user = ${c.id.internalUser}`,
    `default_internal_group = ${c.id.internalGroup}`,
    `default_login_user = ${c.id.loginUser}`,
    ...(c.debug ? ['auth_debug = yes', 'auth_verbose = yes', 'mail_debug = yes', 'verbose_proctitle = yes'] : []),
    '',
    'ssl = yes',
    `ssl_cert = <${c.cert}`,
    `ssl_key = <${c.key}`,
    dh,
    `disable_plaintext_auth = ${c.disablePlaintextAuth ? 'yes' : 'no'}`,
    // Only the reply to a failed login is immediate; the per-IP anvil penalty (2 s, doubling,
    // max 15 s, applied to the NEXT login from that IP) is independent of this and stays on.
    'auth_failure_delay = 0',
    `login_trusted_networks = ${c.trustedNetworks}`,
    `haproxy_trusted_networks = 127.0.0.0/8 ::1`,
    '',
    `mail_uid = ${c.id.mailUser}`,
    `mail_gid = ${c.id.mailGroup}`,
    'first_valid_uid = 1',
    'first_valid_gid = 1',
    'namespace inbox {',
    `  separator = ${c.separator}`,
    '}',
    '',
    `default_client_limit = ${max * 2 + 100}`,
    'service imap-login {',
    '  chroot =',
    `  client_limit = ${max + 100}`,
    '  inet_listener imap {',
    `    address = ${c.host}`,
    `    port = ${c.ports.imap}`,
    '  }',
    '  inet_listener imaps {',
    `    address = ${c.host}`,
    `    port = ${c.ports.imaps}`,
    '    ssl = yes',
    '  }',
    haproxyListener + '}',
    'service imap {',
    `  process_limit = ${max}`,
    '}',
    'service lmtp {',
    '  inet_listener lmtp {',
    `    address = ${c.host}`,
    `    port = ${c.ports.lmtp}`,
    '  }',
    '}',
    'service anvil {',
    '  chroot =',
    `  client_limit = ${max * 2 + 100}`,
    '}',
    'service auth {',
    `  client_limit = ${max * 2 + 100}`,
    '}',
    '',
    'protocol imap {',
    `  mail_max_userip_connections = ${max + 100}`,
    // $mail_plugins here is the included protocol imap value (zlib imap_zlib)
    ...(push ? [`  mail_plugins = $mail_plugins ${lua}`] : []),
    '}',
  ];
  if (push) {
    lines.push(
      'protocol lda {',
      `  mail_plugins = $mail_plugins ${lua}`,
      '}',
      'protocol lmtp {',
      `  mail_plugins = $mail_plugins ${lua}`,
      '}',
      'plugin {',
      `  push_notification_driver = lua:file=${c.pushLuaPath}`,
      `  push_lua_url = ${c.pushLuaUrl}`,
      ...(c.pushLuaToken ? [`  push_lua_token = ${c.pushLuaToken}`] : []),
      '}',
    );
  }
  if (c.extraConfig) lines.push('', '# extraConfig', c.extraConfig);
  return lines.join('\n') + '\n';
}

async function raiseInotifyLimit(want: number, warnings: string[]): Promise<void> {
  const file = '/proc/sys/fs/inotify/max_user_instances';
  let cur = 0;
  try {
    cur = parseInt(await fs.readFile(file, 'utf8'), 10) || 0;
  } catch {
    return;
  }
  if (cur >= want) return;
  if (isRoot()) {
    try {
      await fs.writeFile(file, `${want}\n`);
      return;
    } catch {
      /* read-only /proc/sys (container) */
    }
  }
  warnings.push(
    `fs.inotify.max_user_instances=${cur} < ${want}: IDLE beyond ~${cur} sessions falls back to 30 s polling`,
  );
}

/** Start a throwaway Dovecot; see DovecotOptions for the knobs. */
export async function startDovecot(opts: DovecotOptions = {}): Promise<DovecotInstance> {
  const dovecot = dovecotBin();
  const doveadm = doveadmBin();
  if (!dovecot || !doveadm || !dovecotAvailable()) {
    throw new Error('Dovecot is not installed (run: node scripts/bootstrap.mjs test)');
  }
  const host = opts.host ?? '127.0.0.1';
  assertLoopback(host);
  const users = { ...(opts.users ?? DEFAULT_USERS) };
  const genUsers = opts.genUsers ?? 0;
  const genPassword = opts.genPassword ?? 'password';
  for (let i = 1; i <= genUsers; i++) users[`user${String(i).padStart(4, '0')}`] = genPassword;
  const masterUser = opts.masterUser ?? 'master';
  const masterPassword = opts.masterPassword ?? 'masterpw';
  const maxConnections = opts.maxConnections ?? 1000;
  const trustedNetworks = opts.trustedNetworks ?? '127.0.0.0/8 ::1';
  for (const [k, v] of Object.entries({ trustedNetworks, pushLuaUrl: opts.pushLuaUrl ?? '', pushLuaToken: opts.pushLuaToken ?? '' })) {
    assertConfValue(k, v);
  }
  if (/[\s*?[\]{}"]/.test(DOVECOT_TRIAL_CONFIG_PATH)) {
    // Dovecot's !include takes a glob without quoting
    throw new Error(`the checkout path must not contain spaces or glob characters: ${DOVECOT_TRIAL_CONFIG_PATH}`);
  }
  const warnings: string[] = [];

  const dir = await makeDir();
  try {
    const id = await identity();
    for (const sub of ['run', 'state', 'log', 'mail', 'tls']) await fs.mkdir(path.join(dir, sub), { recursive: true });
    const { cert, key } = await makeCert(path.join(dir, 'tls'));

    await fs.writeFile(path.join(dir, 'users.passwd'), Object.entries(users).map(([u, p]) => passwdLine(u, p)).join(''), { mode: 0o644 });
    await fs.writeFile(path.join(dir, 'master.passwd'), passwdLine(masterUser, masterPassword), { mode: 0o644 });

    let pushLuaPath: string | undefined;
    if (opts.pushLuaUrl !== undefined) {
      pushLuaPath = path.join(dir, 'xaps-push.lua');
      await fs.writeFile(pushLuaPath, PUSH_LUA_SCRIPT, { mode: 0o644 });
    }

    type Ports = { imap: number; imaps: number; lmtp: number; haproxy?: number };
    const pickPorts = async (): Promise<Ports> => {
      const [imap, imaps, lmtp, haproxy] = await freePorts(opts.haproxyListener ? 4 : 3, host);
      return { imap: imap!, imaps: imaps!, lmtp: lmtp!, ...(opts.haproxyListener ? { haproxy: haproxy! } : {}) };
    };
    const configPath = path.join(dir, 'dovecot.conf');
    const writeConfig = async (p: Ports): Promise<void> => {
      await fs.writeFile(
        configPath,
        renderConfig({
          dir, host, ports: p, id, cert, key, maxConnections, trustedNetworks,
          disablePlaintextAuth: opts.disablePlaintextAuth ?? false,
          debug: opts.debug ?? false,
          separator: opts.separator ?? '/',
          pushLuaPath, pushLuaUrl: opts.pushLuaUrl, pushLuaToken: opts.pushLuaToken,
          extraConfig: opts.extraConfig,
        }),
      );
      // Fail early with doveconf's own message if the config is wrong.
      const doveconf = findBinary('doveconf', ['/usr/bin/doveconf']);
      if (doveconf) {
        await runCommand(doveconf, ['-c', configPath, '-n']).catch((e: Error) => {
          throw new Error(`invalid ${configPath}: ${e.message}`);
        });
      }
    };
    let ports = await pickPorts();
    await writeConfig(ports);

    const mailDir = path.join(dir, 'mail');
    if (isRoot()) {
      await runCommand('chown', [`${id.mailUser}:${id.mailGroup}`, mailDir]);
      await fs.chmod(mailDir, 0o700);
      try {
        await runCommand('runuser', ['-u', id.mailUser, '--', 'test', '-w', mailDir]);
      } catch {
        throw new Error(`user '${id.mailUser}' cannot write ${mailDir}: a parent directory of ${dir} is not traversable`);
      }
    }
    await raiseInotifyLimit(maxConnections + 256, warnings);

    const logPath = path.join(dir, 'log', 'dovecot.log');
    const stderrPath = path.join(dir, 'log', 'dovecot.stderr');
    const pidFile = path.join(dir, 'run', 'master.pid');

    let proc: TrackedProcess | undefined;
    let stopping: Promise<void> | undefined;

    const start = async (): Promise<number> => {
      await fs.rm(pidFile, { force: true });
      // -F: stay in the foreground as our child (we hold and reap the pid); stdio to a file.
      proc = await spawnDaemon(dovecot, ['-F', '-c', configPath], { logPath: stderrPath, cwd: dir });
      const p = proc;
      try {
        await waitFor(
          async () => {
            if (p.hasExited()) throw new WaitAborted('dovecot exited during startup');
            return probeBanner(host, ports.imap, { expect: '* OK', timeoutMs: 2000 }).then(() => true);
          },
          { timeoutMs: 30_000, intervalMs: 50, what: `Dovecot greeting on ${host}:${ports.imap}` },
        );
      } catch (err) {
        const tail = await readTail([stderrPath, logPath]);
        await terminate(p, { graceMs: 1000 });
        throw new Error(`Dovecot did not start (${(err as Error).message}).\n${tail}`);
      }
      const pid = await waitFor(
        () => {
          try {
            const n = parseInt(readFileSync(pidFile, 'utf8'), 10);
            return Number.isInteger(n) && n > 0 ? n : undefined;
          } catch {
            return undefined;
          }
        },
        { timeoutMs: 5000, what: `${pidFile}` },
      );
      return pid;
    };

    const instance: DovecotInstance = {
      dir,
      host,
      imapPort: ports.imap,
      imapsPort: ports.imaps,
      lmtpPort: ports.lmtp,
      ...(ports.haproxy !== undefined ? { haproxyPort: ports.haproxy } : {}),
      caCertPath: cert,
      tlsKeyPath: key,
      configPath,
      logPath,
      pid: 0,
      users,
      masterUser,
      masterPassword,
      ...(pushLuaPath !== undefined ? { pushLuaPath } : {}),
      warnings,
      async deliver(user: string, rfc822: string | Buffer, mailbox?: string): Promise<void> {
        const args = ['-c', configPath, '-d', user, '-o', 'lda_mailbox_autocreate=yes', '-o', 'lda_mailbox_autosubscribe=yes'];
        if (mailbox !== undefined) args.push('-m', mailbox);
        const msg = typeof rfc822 === 'string' ? Buffer.from(rfc822, 'utf8') : rfc822;
        await runCommand(path.join(LIBEXEC, 'dovecot-lda'), args, { input: msg, timeoutMs: 30_000 });
      },
      async doveadm(args: string[]): Promise<string> {
        return (await runCommand(doveadm, ['-c', configPath, ...args], { timeoutMs: 30_000 })).stdout;
      },
      async readLog(): Promise<string> {
        try {
          return await fs.readFile(logPath, 'utf8');
        } catch {
          return '';
        }
      },
      stop(): Promise<void> {
        if (!stopping) {
          const p = proc;
          const pid = instance.pid;
          stopping = (async () => {
            if (!p) return;
            // SIGTERM the master (graceful: ~2.5 s), SIGKILL after 5 s; only this pid.
            await terminate(p, { graceMs: 5000, pid: pid > 0 ? pid : p.pid });
            if (pid > 0 && pid !== p.pid) await terminate(p, { graceMs: 1000 });
          })();
        }
        return stopping;
      },
      async kill(): Promise<void> {
        const pid = instance.pid;
        // the children outlive a killed master: collect the tree first, by pid
        for (const victim of [pid, ...descendants(pid)]) {
          try {
            process.kill(victim, 'SIGKILL');
          } catch {
            /* already gone */
          }
        }
        if (proc) await proc.exited;
        stopping = Promise.resolve();
      },
      async restart(): Promise<void> {
        await instance.stop();
        instance.pid = await start();
        stopping = undefined;
      },
      async destroy(): Promise<void> {
        await instance.stop();
        if (process.env.XAPS_TESTBED_KEEP !== '1') await fs.rm(dir, { recursive: true, force: true });
      },
    };
    // only on the first start: restart() keeps its ports
    instance.pid = await startWithPortRetry(start, {
      retryable: (err) => /Address already in use/i.test(err.message),
      repick: async () => {
        ports = await pickPorts();
        await writeConfig(ports);
        instance.imapPort = ports.imap;
        instance.imapsPort = ports.imaps;
        instance.lmtpPort = ports.lmtp;
        if (ports.haproxy !== undefined) instance.haproxyPort = ports.haproxy;
        await fs.writeFile(logPath, '');
      },
    });
    return instance;
  } catch (err) {
    if (process.env.XAPS_TESTBED_KEEP !== '1') await fs.rm(dir, { recursive: true, force: true }).catch(() => undefined);
    throw err;
  }
}

async function readTail(files: string[], lines = 20): Promise<string> {
  const parts: string[] = [];
  for (const f of files) {
    try {
      const text = (await fs.readFile(f, 'utf8')).trimEnd();
      if (text) parts.push(`--- ${f}\n${text.split('\n').slice(-lines).join('\n')}`);
    } catch {
      /* missing */
    }
  }
  return parts.join('\n');
}

/** Whether a Dovecot master pid is still running (helper for tests). */
export function dovecotRunning(instance: Pick<DovecotInstance, 'pid'>): boolean {
  return isPidAlive(instance.pid);
}
