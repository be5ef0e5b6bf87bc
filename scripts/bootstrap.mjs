#!/usr/bin/env node
// bootstrap.mjs — make a fresh clone of xaps-proxy ready to run on a Debian 12 machine.
//
// Usage: node scripts/bootstrap.mjs <test|demo|bench>
//
// Plain Node ESM with no npm dependencies: it runs before `npm ci`. Idempotent and quick
// when everything is already in place. Steps:
//   1. npm ci, when node_modules is missing or does not match package-lock.json
//      (node_modules/.package-lock.json, npm's record of what it installed, is compared
//      entry by entry with package-lock.json).
//   2. Debian packages, installed only when one of their files is missing:
//        dovecot-core dovecot-imapd dovecot-lmtpd   test, demo, bench
//          (dovecot-core also ships the Lua push driver: lib01_mail_lua_plugin.so and
//           lib22_push_notification_lua_plugin.so; Debian 12 has no separate dovecot-lua)
//        redis-server                               test, demo
//        haproxy                                    test, bench
//        openssl                                    all
//        cyrus-common sasl2-bin cyrus-clients msmtp-mta test
//          (Cyrus 3.6 for the IDLE watcher tests. Debian's cyrus-imapd CONFLICTS with
//           dovecot-imapd, so it is not installed: step 2b unpacks it instead. msmtp-mta is
//           the lightest MTA satisfying cyrus-common's dependency.)
//      `apt-get update` runs once first (only when something is missing). A temporary
//      /usr/sbin/policy-rc.d that exits 101 keeps the packages from starting system-wide
//      daemons on 143/993/6379; it is only created (and later removed) when none exists.
//   2b. test only: cyrus-imapd (imapd, idled) of exactly cyrus-common's version, fetched with
//      `apt-get download` and unpacked with `dpkg -x` into /opt/xaps-cyrus (override with
//      XAPS_CYRUS_PKG_DIR; src/testbed/cyrus.ts reads the same). Skipped when
//      <dir>/.xaps-version already names the installed cyrus-common version.
//   3. npm run build (tsc to dist/), always.
// Exits non-zero with a clear message on any failure.

import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const PURPOSES = ['test', 'demo', 'bench'];
const t0 = Date.now();

function say(msg) {
  process.stdout.write(`[bootstrap] ${msg}\n`);
}
function die(msg, code = 1) {
  process.stderr.write(`[bootstrap] ERROR: ${msg}\n`);
  process.exit(code);
}
function secs(since) {
  return `${((Date.now() - since) / 1000).toFixed(1)}s`;
}

// ------------------------------------------------------------------ arguments ---
const purpose = process.argv[2];
if (!PURPOSES.includes(purpose)) {
  die(`usage: node scripts/bootstrap.mjs <${PURPOSES.join('|')}>  (got ${JSON.stringify(purpose ?? '')})`, 2);
}
const [major, minor] = process.versions.node.split('.').map(Number);
if (major < 20 || (major === 20 && minor < 10)) {
  die(`Node.js >= 20.10 is required, this is ${process.version}`);
}

// ---------------------------------------------------------------- npm ci ------
function readJson(file) {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch {
    return undefined;
  }
}

/** Why node_modules must be (re)installed, or undefined when it matches package-lock.json. */
function npmInstallReason() {
  const lockPath = path.join(ROOT, 'package-lock.json');
  const nm = path.join(ROOT, 'node_modules');
  const hiddenPath = path.join(nm, '.package-lock.json');
  if (!fs.existsSync(lockPath)) die('package-lock.json is missing; cannot run npm ci');
  if (!fs.existsSync(nm)) return 'node_modules is missing';
  if (!fs.existsSync(hiddenPath)) return 'node_modules/.package-lock.json is missing';
  const lock = readJson(lockPath);
  const hidden = readJson(hiddenPath);
  if (!lock?.packages) die('package-lock.json is unreadable or has no "packages" (lockfileVersion >= 2 needed)');
  if (!hidden?.packages) return 'node_modules/.package-lock.json is unreadable';
  // Fast path: npm's own record is at least as new as the lockfile and byte-identical in the
  // parts that matter. mtime alone is not trusted (a checkout can touch either file), so the
  // entries are always compared: every installed entry must be in the lockfile with the same
  // version/integrity, and every non-optional lockfile entry must be installed (optional ones
  // for other platforms, e.g. @esbuild/darwin-arm64, are legitimately absent).
  const same = (a, b) => a.version === b.version && (a.integrity ?? '') === (b.integrity ?? '') && !!a.link === !!b.link;
  for (const [key, inst] of Object.entries(hidden.packages)) {
    if (key === '') continue;
    const want = lock.packages[key];
    if (!want) return `node_modules has ${key}, which package-lock.json does not list`;
    if (!same(want, inst)) return `${key} differs from package-lock.json`;
  }
  for (const [key, want] of Object.entries(lock.packages)) {
    if (key === '' || want.optional || want.devOptional) continue;
    if (!hidden.packages[key]) return `${key} is in package-lock.json but not installed`;
  }
  // The files npm wrote must still be there (someone may have removed a package by hand).
  for (const key of Object.keys(hidden.packages)) {
    if (key.startsWith('node_modules/') && !fs.existsSync(path.join(ROOT, key))) {
      return `${key} is missing on disk`;
    }
  }
  return undefined;
}

const installReason = npmInstallReason();
if (installReason) {
  say(`npm ci (${installReason}) ...`);
  const t = Date.now();
  const r = spawnSync('npm', ['ci', '--no-audit', '--no-fund'], { cwd: ROOT, stdio: 'inherit' });
  if (r.error) die(`could not run npm: ${r.error.message}`);
  if (r.status !== 0) die(`npm ci failed (exit ${r.status ?? r.signal})`);
  say(`npm ci done in ${secs(t)}`);
}

// ----------------------------------------------------------- Debian packages ---
/**
 * What each purpose needs: a file that proves the package is installed, and the package that
 * ships it. Checked by file, not by dpkg status, so a package installed some other way counts.
 */
const DOVECOT = [
  { file: '/usr/sbin/dovecot', pkg: 'dovecot-core' },
  { file: '/usr/bin/doveadm', pkg: 'dovecot-core' },
  { file: '/usr/lib/dovecot/dovecot-lda', pkg: 'dovecot-core' },
  // Lua push driver (mail_lua + push_notification_lua); in Debian 12 these ship in dovecot-core.
  { file: '/usr/lib/dovecot/modules/lib01_mail_lua_plugin.so', pkg: 'dovecot-core' },
  { file: '/usr/lib/dovecot/modules/lib22_push_notification_lua_plugin.so', pkg: 'dovecot-core' },
  { file: '/usr/lib/dovecot/imap', pkg: 'dovecot-imapd' },
  { file: '/usr/lib/dovecot/imap-login', pkg: 'dovecot-imapd' },
  { file: '/usr/lib/dovecot/lmtp', pkg: 'dovecot-lmtpd' },
];
const REDIS = [{ bin: 'redis-server', pkg: 'redis-server' }];
const HAPROXY = [{ bin: 'haproxy', pkg: 'haproxy' }];
const OPENSSL = [{ bin: 'openssl', pkg: 'openssl' }];
/** Cyrus minus cyrus-imapd (which conflicts with dovecot-imapd; see step 2b). */
const CYRUS = [
  { file: '/usr/lib/cyrus/bin/master', pkg: 'cyrus-common' },
  { file: '/usr/lib/cyrus/bin/lmtpd', pkg: 'cyrus-common' },
  { file: '/usr/lib/cyrus/bin/deliver', pkg: 'cyrus-common' },
  { bin: 'saslpasswd2', pkg: 'sasl2-bin' },
  { file: '/usr/lib/cyrus/bin/imtest', pkg: 'cyrus-clients' },
  // any MTA satisfies cyrus-common's dependency; msmtp-mta is the lightest one
  { file: '/usr/sbin/sendmail', pkg: 'msmtp-mta' },
];
const NEEDS = {
  test: [...DOVECOT, ...REDIS, ...HAPROXY, ...OPENSSL, ...CYRUS],
  demo: [...DOVECOT, ...REDIS, ...OPENSSL],
  bench: [...DOVECOT, ...REDIS, ...HAPROXY, ...OPENSSL, ...CYRUS],
};
/** Lua plugin files; if a future Debian moves them out of dovecot-core, try these packages. */
const LUA_FILES = new Set(DOVECOT.filter((n) => n.file.includes('_lua_')).map((n) => n.file));
const LUA_FALLBACK_PKGS = ['dovecot-lua'];

const SEARCH_PATH = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin'];
function isExecutable(file) {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}
function hasBinary(name) {
  const dirs = [...(process.env.PATH ?? '').split(path.delimiter).filter(Boolean), ...SEARCH_PATH];
  return dirs.some((d) => isExecutable(path.join(d, name)));
}
function present(need) {
  if (need.bin) return hasBinary(need.bin);
  return fs.existsSync(need.file);
}
function missingNeeds() {
  return NEEDS[purpose].filter((n) => !present(n));
}

function run(cmd, args, log, extraEnv = {}) {
  fs.appendFileSync(log, `\n$ ${cmd} ${args.join(' ')}\n`);
  const fd = fs.openSync(log, 'a');
  try {
    const r = spawnSync(cmd, args, {
      stdio: ['ignore', fd, fd],
      env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive', ...extraEnv },
    });
    if (r.error) fs.appendFileSync(log, `spawn error: ${r.error.message}\n`);
    return r.status === 0;
  } finally {
    fs.closeSync(fd);
  }
}

function aptInstall(missing) {
  let pkgs = [...new Set(missing.map((n) => n.pkg))];
  const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
  if (!isRoot) {
    const what = missing.map((n) => n.bin ?? n.file).join(', ');
    die(
      `missing ${what}. Install the Debian packages as root:\n` +
        `  sudo apt-get install -y --no-install-recommends ${pkgs.join(' ')}\n` +
        `then run this again.`,
    );
  }
  if (!hasBinary('apt-get')) die(`apt-get not found; install these packages by hand: ${pkgs.join(' ')}`);

  const log = path.join(os.tmpdir(), `xaps-bootstrap-apt-${process.pid}.log`);
  fs.writeFileSync(log, '');
  const policy = '/usr/sbin/policy-rc.d';
  let madePolicy = false;
  const cleanup = () => {
    if (madePolicy) {
      try {
        fs.rmSync(policy, { force: true });
      } catch {
        /* ignore */
      }
      madePolicy = false;
    }
  };
  const fail = (msg) => {
    cleanup();
    try {
      process.stderr.write(fs.readFileSync(log, 'utf8'));
    } catch {
      /* ignore */
    }
    die(`${msg} (apt log above, also in ${log})`);
  };
  process.once('exit', cleanup);
  for (const sig of ['SIGINT', 'SIGTERM']) {
    process.once(sig, () => {
      cleanup();
      process.exit(130);
    });
  }

  if (!fs.existsSync(policy)) {
    // Keeps the packages' maintainer scripts from starting system-wide daemons (*:143, *:993, *:6379).
    fs.writeFileSync(policy, '#!/bin/sh\nexit 101\n', { mode: 0o755 });
    madePolicy = true;
  }
  const aptOpts = ['-o', 'Dpkg::Use-Pty=0', '-o', 'DPkg::Lock::Timeout=300'];
  const t = Date.now();
  // A new machine's package lists can be stale (superseded security versions 404): refresh once.
  if (!run('apt-get', ['update', ...aptOpts.slice(0, 2)], log)) fail('apt-get update failed');

  // dovecot-core is expected to ship the Lua push plugins. Should some Debian split them into a
  // separate package, add it when apt knows one (Debian 12 has no dovecot-lua).
  if (missing.some((n) => LUA_FILES.has(n.file))) {
    for (const extra of LUA_FALLBACK_PKGS) {
      const r = spawnSync('apt-cache', ['show', extra], { stdio: ['ignore', 'pipe', 'ignore'] });
      if (r.status === 0 && /^Package:/m.test(r.stdout.toString())) pkgs.push(extra);
    }
  }
  pkgs = [...new Set(pkgs)];
  say(`apt-get install ${pkgs.join(' ')} ...`);
  if (
    !run('apt-get', ['install', '-y', '--no-install-recommends', ...aptOpts, ...pkgs], log, {
      DEBIAN_FRONTEND: 'noninteractive',
    })
  ) {
    fail(`apt-get install ${pkgs.join(' ')} failed`);
  }
  cleanup();
  const still = missingNeeds();
  if (still.length) {
    fail(`still missing after apt-get install: ${still.map((n) => n.bin ?? n.file).join(', ')}`);
  }
  fs.rmSync(log, { force: true });
  say(`installed ${pkgs.join(' ')} in ${secs(t)}`);
}

const missing = missingNeeds();
if (missing.length) aptInstall(missing);

// ------------------------------------------------- cyrus-imapd, unpacked (test) ---
/**
 * Debian's cyrus-imapd and dovecot-imapd both "Provide: imap-server" and conflict, and the
 * Dovecot packages must stay. The Cyrus test bed needs only cyrus-imapd's imapd and idled, so
 * the package of exactly cyrus-common's version is downloaded and unpacked with `dpkg -x` into
 * a directory of our own (never registered with dpkg, nothing outside it is touched).
 */
function ensureCyrusImapd() {
  const dir = process.env.XAPS_CYRUS_PKG_DIR || '/opt/xaps-cyrus';
  const marker = path.join(dir, '.xaps-version');
  const q = spawnSync('dpkg-query', ['-W', '-f=${Version}', 'cyrus-common'], { stdio: ['ignore', 'pipe', 'ignore'] });
  const version = q.status === 0 ? q.stdout.toString().trim() : '';
  if (!version) die('cyrus-common is not installed (dpkg-query found no version); cannot unpack cyrus-imapd');
  const imapd = path.join(dir, 'usr/lib/cyrus/bin/imapd');
  let have = '';
  try {
    have = fs.readFileSync(marker, 'utf8').trim();
  } catch {
    /* not unpacked yet */
  }
  if (have === version && isExecutable(imapd) && isExecutable(path.join(dir, 'usr/lib/cyrus/bin/idled'))) return;
  const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
  if (!isRoot) {
    die(
      `cyrus-imapd ${version} is not unpacked in ${dir}. As root, run this script again, or:\n` +
        `  apt-get download cyrus-imapd=${version} && dpkg -x cyrus-imapd_*.deb ${dir}`,
    );
  }
  const t = Date.now();
  const log = path.join(os.tmpdir(), `xaps-bootstrap-cyrus-${process.pid}.log`);
  fs.writeFileSync(log, '');
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'xaps-cyrus-deb-'));
  const fail = (msg) => {
    fs.rmSync(work, { recursive: true, force: true });
    try {
      process.stderr.write(fs.readFileSync(log, 'utf8'));
    } catch {
      /* ignore */
    }
    die(`${msg} (log above, also in ${log})`);
  };
  say(`unpacking cyrus-imapd ${version} into ${dir} ...`);
  const download = () => {
    fs.appendFileSync(log, `\n$ (cd ${work}) apt-get download cyrus-imapd=${version}\n`);
    const fd = fs.openSync(log, 'a');
    try {
      const r = spawnSync('apt-get', ['download', '-o', 'Dpkg::Use-Pty=0', `cyrus-imapd=${version}`], {
        cwd: work,
        stdio: ['ignore', fd, fd],
      });
      return r.status === 0;
    } finally {
      fs.closeSync(fd);
    }
  };
  // Stale package lists (a superseded security version) make the download 404: refresh once.
  if (!download()) {
    if (!run('apt-get', ['update', '-o', 'Dpkg::Use-Pty=0'], log)) fail('apt-get update failed');
    if (!download()) fail(`apt-get download cyrus-imapd=${version} failed`);
  }
  const deb = fs.readdirSync(work).find((f) => /^cyrus-imapd_.*\.deb$/.test(f));
  if (!deb) fail('apt-get download left no cyrus-imapd .deb');
  // Unpack beside the target and swap it in, so an interrupted run never leaves half a tree.
  const staging = `${dir}.new-${process.pid}`;
  fs.rmSync(staging, { recursive: true, force: true });
  fs.mkdirSync(staging, { recursive: true, mode: 0o755 });
  if (!run('dpkg', ['-x', path.join(work, deb), staging], log)) fail(`dpkg -x ${deb} failed`);
  fs.writeFileSync(path.join(staging, '.xaps-version'), `${version}\n`);
  // The 'cyrus' user runs these binaries: the tree must be readable and traversable.
  fs.chmodSync(staging, 0o755);
  fs.rmSync(dir, { recursive: true, force: true });
  fs.renameSync(staging, dir);
  fs.rmSync(work, { recursive: true, force: true });
  if (!isExecutable(imapd)) fail(`${imapd} is missing after unpacking`);
  fs.rmSync(log, { force: true });
  say(`unpacked cyrus-imapd ${version} in ${secs(t)}`);
}
if (purpose === 'test' || purpose === 'bench') ensureCyrusImapd();

// --------------------------------------------------------------------- build ---
{
  const t = Date.now();
  const r = spawnSync('npm', ['run', '--silent', 'build'], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  if (r.error) die(`could not run npm run build: ${r.error.message}`);
  if (r.status !== 0) {
    process.stderr.write(r.stdout);
    process.stderr.write(r.stderr);
    die(`npm run build failed (exit ${r.status ?? r.signal})`);
  }
  say(`built dist/ in ${secs(t)}; ready for ${purpose} (${secs(t0)} total)`);
}
