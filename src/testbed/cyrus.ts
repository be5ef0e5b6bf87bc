/**
 * A throwaway Cyrus IMAP 3.6 on loopback, entirely inside a fresh temp dir: imapd.conf and
 * cyrus.conf, sasldb users plus a proxy-capable master user, self-signed TLS, spool, sockets.
 * Used by the IDLE watcher tests (Cyrus 3.6 has no NOTIFY).
 *
 * Packages come from `node scripts/bootstrap.mjs test`: cyrus-common, sasl2-bin, cyrus-clients,
 * msmtp-mta from apt, and cyrus-imapd (imapd, idled) unpacked with `dpkg -x` into
 * /opt/xaps-cyrus (XAPS_CYRUS_PKG_DIR), because Debian's cyrus-imapd conflicts with
 * dovecot-imapd, which must stay installed.
 *
 * Quirks handled here (Debian 12, Cyrus 3.6.1):
 * - the master must start as root and switches to the `cyrus` user itself; imapd and friends
 *   refuse euid 0, and so do `deliver`/`ctl_cyrusdb`, which run through `runuser -u cyrus`;
 * - the master does not pass `-C` on, so every `cmd=` in cyrus.conf carries it;
 * - the dir must be traversable by `cyrus` (mkdtemp gives 0700: chmod 755, chown cyrus:mail);
 * - `idled` runs so that IDLE wakes at once on delivery (without it Cyrus polls every
 *   `imapidlepoll` seconds);
 * - the master user is in `admins` and `proxyservers`: it logs in with SASL PLAIN, authzid =
 *   the user, authcid = master. Cyrus has no "user*master" LOGIN form;
 * - Cyrus logs only to syslog (nothing here needs its log; `master.log` holds the master's own
 *   stdout/stderr);
 * - `failedloginpause: 0`, or every failed login costs 3 s.
 * The master runs in the foreground as our child (no -d) and leads its own process group. A
 * SIGTERM stop takes its children (imapd, lmtpd, idled) down with it in ~50 ms; a SIGKILLed
 * master would orphan them (idled is reparented to init at once, prefork imapd keep
 * listening), so stop() and the exit hook also SIGKILL that process group — ours alone.
 */
import fs from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { freePorts } from './ports.js';
import {
  findBinary,
  killProcessGroup,
  probeBanner,
  runCommand,
  spawnDaemon,
  terminate,
  waitFor,
  WaitAborted,
  type TrackedProcess,
  startWithPortRetry,
} from './processes.js';
import { encodeMailboxName } from '../push/mutf7.js';

export interface CyrusOptions {
  /** user → password (default alice:alicepw bob:bobpw carol:carolpw). */
  users?: Record<string, string>;
  /** Master user (default master / masterpw): in `admins` and `proxyservers`. */
  masterUser?: string;
  masterPassword?: string;
  /** Appended verbatim to imapd.conf. */
  extraConfig?: string;
}

export interface CyrusInstance {
  dir: string;
  host: string;
  imapPort: number;
  imapsPort: number;
  lmtpPort: number;
  /** The self-signed server certificate (use as the CA to trust). */
  caCertPath: string;
  configPath: string;
  /** Master process pid (changes on restart). */
  pid: number;
  users: Record<string, string>;
  masterUser: string;
  masterPassword: string;
  /**
   * Real delivery through Cyrus `deliver` (LMTP to lmtpd; wakes IDLE at once through idled).
   * `mailbox` is a UTF-8 name relative to INBOX ("Work/Projects"); it must exist (createMailbox),
   * or Cyrus delivers to INBOX instead.
   */
  deliver(user: string, rfc822: string | Buffer, mailbox?: string): Promise<void>;
  /** CREATE a mailbox (UTF-8 name, "/" as separator) over IMAP as the user. */
  createMailbox(user: string, name: string): Promise<void>;
  /** SIGTERM the master, wait up to 5 s, then SIGKILL it. Idempotent. */
  stop(): Promise<void>;
  /**
   * Stop and start again with the same dir, ports, users and mail. imapd.conf and cyrus.conf
   * are not rewritten, so a test may edit them (e.g. add notifyd) and restart.
   */
  restart(): Promise<void>;
  /** Stop and delete the dir (unless XAPS_TESTBED_KEEP=1). */
  destroy(): Promise<void>;
}

const CYRUS_BIN = '/usr/lib/cyrus/bin';

/** Where bootstrap unpacked cyrus-imapd (imapd, idled). */
export function cyrusPackageDir(): string {
  return process.env.XAPS_CYRUS_PKG_DIR || '/opt/xaps-cyrus';
}

function imapdBin(): string {
  return path.join(cyrusPackageDir(), 'usr/lib/cyrus/bin/imapd');
}
function idledBin(): string {
  return path.join(cyrusPackageDir(), 'usr/lib/cyrus/bin/idled');
}

function isRoot(): boolean {
  return typeof process.getuid === 'function' && process.getuid() === 0;
}

function cyrusUserExists(): boolean {
  try {
    return /^cyrus:/m.test(readFileSync('/etc/passwd', 'utf8'));
  } catch {
    return false;
  }
}

/** True when Cyrus can be started here: root, cyrus-common, sasl2-bin, the unpacked imapd/idled, openssl. */
export function cyrusAvailable(): boolean {
  return (
    isRoot() &&
    cyrusUserExists() &&
    ['master', 'lmtpd', 'deliver', 'ctl_cyrusdb'].every((b) => existsSync(path.join(CYRUS_BIN, b))) &&
    existsSync(imapdBin()) &&
    existsSync(idledBin()) &&
    findBinary('saslpasswd2') !== undefined &&
    findBinary('runuser') !== undefined &&
    findBinary('openssl') !== undefined
  );
}

const DEFAULT_USERS: Record<string, string> = { alice: 'alicepw', bob: 'bobpw', carol: 'carolpw' };
const HOST = '127.0.0.1';

function checkName(what: string, v: string): void {
  if (!/^[a-z0-9][a-z0-9._-]*$/i.test(v)) throw new Error(`invalid ${what} ${JSON.stringify(v)} for the Cyrus testbed`);
}
function checkPassword(user: string, v: string): void {
  if (/[\r\n\0]/.test(v) || v === '') throw new Error(`invalid password for ${user}`);
}

async function makeDir(): Promise<string> {
  let parent = os.tmpdir();
  if (parent.length > 40) parent = '/tmp'; // unix socket paths must stay short
  const dir = await fs.mkdtemp(path.join(parent, 'xaps-cyrus-'));
  await fs.chmod(dir, 0o755);
  return fs.realpath(dir);
}

/** SIGTERM the master (its children follow), SIGKILL after 5 s, then SIGKILL whatever is left in its group. */
async function stopMaster(p: TrackedProcess): Promise<void> {
  await terminate(p, { graceMs: 5000 });
  killProcessGroup(p.pid);
}

interface Ports {
  imap: number;
  imaps: number;
  lmtp: number;
}

function imapdConf(dir: string, masterUser: string, cert: string, key: string, ports: Ports, extra?: string): string {
  return [
    '# generated by xaps-proxy src/testbed/cyrus.ts: throwaway test instance, loopback only',
    `configdirectory: ${dir}/config`,
    'defaultpartition: default',
    `partition-default: ${dir}/spool`,
    'servername: localhost',
    `syslog_prefix: xaps-cyrus-${ports.imap}`,
    `admins: cyrus ${masterUser}`,
    `proxyservers: ${masterUser}`,
    'sasl_pwcheck_method: auxprop',
    'sasl_auxprop_plugin: sasldb',
    `sasl_sasldb_path: ${dir}/sasldb2`,
    'sasl_mech_list: PLAIN LOGIN',
    'allowplaintext: yes',
    'failedloginpause: 0',
    'unixhierarchysep: yes',
    'altnamespace: yes',
    'autocreate_quota: 0',
    'autocreate_post: 1',
    'lmtp_downcase_rcpt: yes',
    `lmtpsocket: ${dir}/socket/lmtp`,
    `idlesocket: ${dir}/socket/idle`,
    `notifysocket: ${dir}/socket/notify`,
    `tls_server_cert: ${cert}`,
    `tls_server_key: ${key}`,
    ...(extra ? ['# extraConfig', extra] : []),
    '',
  ].join('\n');
}

function cyrusConf(conf: string, dir: string, ports: Ports): string {
  const imapd = imapdBin();
  return `# generated by xaps-proxy src/testbed/cyrus.ts
START {
  recover cmd="ctl_cyrusdb -C ${conf} -r"
  idled cmd="${idledBin()} -C ${conf}"
}
SERVICES {
  imap cmd="${imapd} -C ${conf}" listen="${HOST}:${ports.imap}" prefork=1
  imaps cmd="${imapd} -s -C ${conf}" listen="${HOST}:${ports.imaps}" prefork=0
  lmtp cmd="lmtpd -a -C ${conf}" listen="${HOST}:${ports.lmtp}" prefork=0
  lmtpunix cmd="lmtpd -C ${conf}" listen="${dir}/socket/lmtp" prefork=0
}
EVENTS {
  checkpoint cmd="ctl_cyrusdb -C ${conf} -c" period=30
}
DAEMON {
}
`;
}

/** Quoted IMAP string (test input: no CR/LF, 7-bit). */
function q(s: string): string {
  return `"${s.replace(/[\\"]/g, (c) => `\\${c}`)}"`;
}

/** LOGIN as the user, run the commands one by one, LOGOUT; rejects unless every command is OK. */
async function imapAsUser(port: number, user: string, password: string, commands: Array<string | Buffer>): Promise<void> {
  const sock = net.connect({ host: HOST, port });
  sock.setEncoding('latin1');
  let buf = '';
  let waiter: (() => void) | null = null;
  let closed = false;
  sock.on('data', (d: string) => {
    buf += d;
    waiter?.();
  });
  sock.on('close', () => {
    closed = true;
    waiter?.();
  });
  sock.on('error', () => undefined);
  const until = async (re: RegExp): Promise<string> => {
    const deadline = Date.now() + 15_000;
    for (;;) {
      const m = re.exec(buf);
      if (m) {
        buf = buf.slice(m.index + m[0].length);
        return m[0];
      }
      if (closed) throw new Error(`Cyrus closed the connection (${buf.trim().slice(0, 200)})`);
      if (Date.now() > deadline) throw new Error('Cyrus did not answer in time');
      await new Promise<void>((r) => {
        waiter = r;
        setTimeout(r, 200);
      });
      waiter = null;
    }
  };
  try {
    await until(/^\* OK[^\n]*\n/m);
    const all = [`LOGIN ${q(user)} ${q(password)}`, ...commands];
    for (let i = 0; i < all.length; i++) {
      const tag = `t${i}`;
      const cmd = all[i]!;
      sock.write(Buffer.concat([Buffer.from(`${tag} `), Buffer.isBuffer(cmd) ? cmd : Buffer.from(cmd), Buffer.from('\r\n')]));
      const line = await until(new RegExp(`^${tag} (OK|NO|BAD)[^\\n]*\\n`, 'm'));
      if (!line.startsWith(`${tag} OK`)) {
        const what = i === 0 ? 'LOGIN' : Buffer.isBuffer(cmd) ? cmd.toString('latin1', 0, 40) : cmd;
        throw new Error(`Cyrus refused ${what} for ${user}: ${line.trim()}`);
      }
    }
    sock.write('z LOGOUT\r\n');
    await until(/^z OK[^\n]*\n/m).catch(() => undefined);
  } finally {
    sock.destroy();
  }
}

/** Start a throwaway Cyrus 3.6; see CyrusOptions. */
export async function startCyrus(opts: CyrusOptions = {}): Promise<CyrusInstance> {
  if (!isRoot()) throw new Error('the Cyrus testbed needs root (its master switches to the cyrus user)');
  if (!cyrusAvailable()) throw new Error('Cyrus is not installed (run: node scripts/bootstrap.mjs test)');
  const users = { ...(opts.users ?? DEFAULT_USERS) };
  const masterUser = opts.masterUser ?? 'master';
  const masterPassword = opts.masterPassword ?? 'masterpw';
  for (const [u, p] of Object.entries(users)) {
    checkName('user name', u);
    checkPassword(u, p);
  }
  checkName('master user', masterUser);
  checkPassword(masterUser, masterPassword);
  if (opts.extraConfig && /\0/.test(opts.extraConfig)) throw new Error('invalid extraConfig');
  const saslpasswd2 = findBinary('saslpasswd2')!;
  const openssl = findBinary('openssl')!;

  const dir = await makeDir();
  try {
    for (const sub of ['config', 'spool', 'socket', 'tls', 'log', 'run']) await fs.mkdir(path.join(dir, sub), { recursive: true });
    for (const sub of ['db', 'socket', 'lock', 'proc', 'log', 'msg', 'user', 'quota', 'sieve']) {
      await fs.mkdir(path.join(dir, 'config', sub), { recursive: true });
    }
    const cert = path.join(dir, 'tls', 'cert.pem');
    const key = path.join(dir, 'tls', 'key.pem');
    await runCommand(openssl, [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '3650',
      '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
      '-keyout', key, '-out', cert,
    ]);

    const sasldb = path.join(dir, 'sasldb2');
    for (const [u, p] of [...Object.entries(users), [masterUser, masterPassword] as const]) {
      await runCommand(saslpasswd2, ['-p', '-c', '-f', sasldb, '-u', 'localhost', u], { input: p });
    }

    const configPath = path.join(dir, 'imapd.conf');
    const cyrusConfPath = path.join(dir, 'cyrus.conf');
    let ports: Ports;
    const writeConfig = async (): Promise<void> => {
      await fs.writeFile(configPath, imapdConf(dir, masterUser, cert, key, ports, opts.extraConfig));
      await fs.writeFile(cyrusConfPath, cyrusConf(configPath, dir, ports));
    };
    const pickPorts = async (): Promise<Ports> => {
      const [imap, imaps, lmtp] = await freePorts(3, HOST);
      return { imap: imap!, imaps: imaps!, lmtp: lmtp! };
    };
    ports = await pickPorts();
    await writeConfig();
    await runCommand('chown', ['-R', 'cyrus:mail', dir]);
    await fs.chmod(key, 0o600);
    await fs.chmod(sasldb, 0o600);
    try {
      await runCommand('runuser', ['-u', 'cyrus', '--', 'test', '-w', path.join(dir, 'spool')]);
    } catch {
      throw new Error(`user 'cyrus' cannot write ${dir}/spool: a parent directory of ${dir} is not traversable`);
    }

    const logPath = path.join(dir, 'log', 'master.log');
    const pidFile = path.join(dir, 'run', 'master.pid');
    let proc: TrackedProcess | undefined;
    let stopping: Promise<void> | undefined;

    const start = async (): Promise<number> => {
      await fs.rm(pidFile, { force: true });
      // No -d: the master stays in the foreground as our child; stdio goes to a file.
      proc = await spawnDaemon(path.join(CYRUS_BIN, 'master'), ['-C', configPath, '-M', cyrusConfPath, '-p', pidFile], {
          logPath,
          cwd: dir,
          processGroup: true,
        });
      const p = proc;
      try {
        await waitFor(
          async () => {
            if (p.hasExited()) throw new WaitAborted('the Cyrus master exited during startup');
            return probeBanner(HOST, ports.imap, { expect: '* OK', timeoutMs: 2000 }).then(() => true);
          },
          { timeoutMs: 30_000, intervalMs: 50, what: `Cyrus greeting on ${HOST}:${ports.imap}` },
        );
      } catch (err) {
        let tail = '';
        try {
          tail = (await fs.readFile(logPath, 'utf8')).split('\n').slice(-20).join('\n');
        } catch {
          /* no log */
        }
        await stopMaster(p);
        throw new Error(`Cyrus did not start (${(err as Error).message}); Cyrus logs to syslog only.\n${tail}`);
      }
      return p.pid;
    };

    const instance: CyrusInstance = {
      dir,
      host: HOST,
      imapPort: ports.imap,
      imapsPort: ports.imaps,
      lmtpPort: ports.lmtp,
      caCertPath: cert,
      configPath,
      pid: 0,
      users,
      masterUser,
      masterPassword,
      async deliver(user: string, rfc822: string | Buffer, mailbox?: string): Promise<void> {
        const msg = typeof rfc822 === 'string' ? Buffer.from(rfc822, 'utf8') : rfc822;
        if (mailbox !== undefined && mailbox !== 'INBOX' && encodeMailboxName(mailbox) !== mailbox) {
          // deliver/lmtpd take the plus-address detail as UTF-8 but the LMTP client refuses
          // 8-bit addresses: APPEND as the user instead (IDLE and idled see it the same way)
          const password = users[user];
          if (password === undefined) throw new Error(`unknown testbed user ${user}`);
          await imapAsUser(instance.imapPort, user, password, [
            Buffer.concat([Buffer.from(`APPEND ${q(encodeMailboxName(mailbox))} {${msg.length}+}\r\n`), msg]),
          ]);
          return;
        }
        const args = ['-u', 'cyrus', '--', path.join(CYRUS_BIN, 'deliver'), '-C', configPath, '-a', user];
        if (mailbox !== undefined && mailbox !== 'INBOX') args.push('-m', mailbox);
        args.push(user);
        await runCommand('runuser', args, { input: msg, timeoutMs: 30_000 });
      },
      async createMailbox(user: string, name: string): Promise<void> {
        const password = users[user];
        if (password === undefined) throw new Error(`unknown testbed user ${user}`);
        await imapAsUser(instance.imapPort, user, password, [`CREATE ${q(encodeMailboxName(name))}`]);
      },
      stop(): Promise<void> {
        if (!stopping) {
          const p = proc;
          stopping = (async () => {
            if (!p) return;
            await stopMaster(p);
          })();
        }
        return stopping;
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

    instance.pid = await startWithPortRetry(start, {
      retryable: () => true, // Cyrus' start failure carries no bind error to match: retry any
      repick: async () => {
        ports = await pickPorts();
        await writeConfig();
        instance.imapPort = ports.imap;
        instance.imapsPort = ports.imaps;
        instance.lmtpPort = ports.lmtp;
      },
    });
    // Log every user in once: Cyrus creates INBOX on first login (autocreate_quota), so that
    // watchers can EXAMINE it before any delivery.
    try {
      for (const [u, p] of Object.entries(users)) await imapAsUser(instance.imapPort, u, p, []);
    } catch (err) {
      await instance.stop();
      throw err;
    }
    return instance;
  } catch (err) {
    if (process.env.XAPS_TESTBED_KEEP !== '1') await fs.rm(dir, { recursive: true, force: true }).catch(() => undefined);
    throw err;
  }
}
