/**
 * Signals of a real `serve` process in front of a real Dovecot: SIGHUP reloads the client
 * TLS certificate and the log level without dropping sessions; SIGTERM/SIGINT drain (new
 * connections refused, /readyz 503, open sessions may finish) and then say
 * `* BYE [UNAVAILABLE]` to whoever is left, and the process exits 0.
 */
import { X509Certificate } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type tls from 'node:tls';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { selfSignedCertificate, type SelfSigned } from '../../src/cert/selfsigned.js';
import { issueMailPushCert } from '../../src/testbed/apns-certs.js';
import { startDovecot, type DovecotInstance } from '../../src/testbed/dovecot.js';
import { freePort } from '../../src/testbed/ports.js';
import { RawImap } from '../helpers/raw-imap.js';
import { spawnServe, type ServeProcess } from '../helpers/serve-process.js';
import { apnsFixture } from '../helpers/apns-fixture.js';

interface LogLine {
  level: number;
  msg: string;
  [key: string]: unknown;
}

const DEBUG = 20;

function logLines(proc: ServeProcess): LogLine[] {
  return proc
    .stdout()
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as LogLine);
}

/** The first log line (at index `from` or later) that satisfies `pred`; its index and the line. */
async function waitForLog(proc: ServeProcess, pred: (l: LogLine) => boolean, what: string, from = 0): Promise<{ index: number; line: LogLine }> {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const lines = logLines(proc);
    const index = lines.findIndex((l, i) => i >= from && pred(l));
    if (index >= 0) return { index, line: lines[index]! };
    if (proc.exitStatus() !== null || Date.now() > deadline) {
      throw new Error(`no log line: ${what}\nstdout:\n${proc.stdout().slice(-3000)}\nstderr:\n${proc.stderr()}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

const fingerprint = (pem: string) => new X509Certificate(pem).fingerprint256;
const peerFingerprint = (c: RawImap) => (c.socket as tls.TLSSocket).getPeerCertificate().fingerprint256;

async function login(c: RawImap, user: string, pass: string): Promise<void> {
  await c.greeting();
  expect(await c.command('l', `LOGIN ${user} ${pass}`)).toMatch(/^l OK/m);
  expect(await c.command('s', 'SELECT INBOX')).toMatch(/^s OK/m);
}

async function refused(port: number): Promise<boolean> {
  return RawImap.connect({ port }).then(
    (c) => {
      c.close();
      return false;
    },
    (err: NodeJS.ErrnoException) => err.code === 'ECONNREFUSED',
  );
}

describe('serve and signals', () => {
  let dovecot: DovecotInstance;
  let dir: string;
  const procs: ServeProcess[] = [];
  const clients: RawImap[] = [];
  const cleanups: Array<() => Promise<void>> = [];

  beforeAll(async () => {
    dovecot = await startDovecot({ users: { alice: 'alicepw', bob: 'bobpw', carol: 'carolpw' } });
    await dovecot.deliver('alice', 'From: a@example.org\r\nSubject: kept\r\n\r\nhello\r\n');
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'xaps-signals-'));
  });
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    await Promise.all(procs.splice(0).map((p) => p.kill9()));
    for (const cleanup of cleanups.splice(0)) await cleanup();
  });
  afterAll(async () => {
    await dovecot?.stop();
    if (dir) await fs.rm(dir, { recursive: true, force: true });
  });

  /** A serve process with the TLS listener and a config file, plus whatever `extra` flags. */
  async function serve(name: string, opts: { certs: SelfSigned; configText?: string; extra?: string[] }) {
    const certPath = path.join(dir, `${name}.cert.pem`);
    const keyPath = path.join(dir, `${name}.key.pem`);
    const configPath = path.join(dir, `${name}.yaml`);
    await fs.writeFile(certPath, opts.certs.certPem);
    await fs.writeFile(keyPath, opts.certs.keyPem, { mode: 0o600 });
    await fs.writeFile(configPath, opts.configText ?? 'log-level: info\n');
    const tlsPort = await freePort();
    const proc = await spawnServe([
      '--upstream', `127.0.0.1:${dovecot.imapPort}`,
      '--listen-tls', `127.0.0.1:${tlsPort}`,
      '--tls-cert', certPath,
      '--tls-key', keyPath,
      '--config', configPath,
      '--apns-topic', 'com.apple.mobilemail.push.org.example',
      '--data-dir', path.join(dir, `${name}-data`),
      ...(opts.extra ?? []),
    ]);
    procs.push(proc);
    const connect = async (how: { tls?: SelfSigned } = {}) => {
      const c = await RawImap.connect(how.tls ? { port: tlsPort, tls: true, ca: how.tls.certPem } : { port: proc.port });
      clients.push(c);
      return c;
    };
    return { proc, tlsPort, certPath, keyPath, configPath, connect };
  }

  it('SIGHUP: new TLS connections get the new certificate, a session from before keeps working; the APNs certificate reloads too', async () => {
    const first = selfSignedCertificate();
    const second = selfSignedCertificate();
    const apns = await apnsFixture();
    cleanups.push(async () => {
      await apns.mock.close();
      await fs.rm(apns.dir, { recursive: true, force: true });
    });
    const s = await serve('tls', { certs: first, extra: apns.flags });

    const before = await s.connect({ tls: first });
    expect(peerFingerprint(before)).toBe(fingerprint(first.certPem));
    await login(before, 'alice', 'alicepw');

    await fs.writeFile(s.keyPath, second.keyPem);
    await fs.writeFile(s.certPath, second.certPem);
    const renewed = issueMailPushCert(apns.ca, { uidTopic: apns.topic, notAfter: new Date(Date.now() + 400 * 86_400_000) });
    await fs.writeFile(apns.keyPath, renewed.keyPem);
    await fs.writeFile(apns.certPath, renewed.certPem);
    s.proc.signal('SIGHUP');
    const reloaded = await waitForLog(s.proc, (l) => l.msg === 'certificates reloaded', 'certificates reloaded');
    const { line: apnsReload } = await waitForLog(s.proc, (l) => l.msg === 'Mail push certificate reloaded', 'APNs certificate reloaded');
    expect(apnsReload.notAfter).toBe(new Date(new X509Certificate(renewed.certPem).validTo).toISOString());

    const after = await s.connect({ tls: second });
    expect(peerFingerprint(after)).toBe(fingerprint(second.certPem));
    expect(peerFingerprint(after)).not.toBe(fingerprint(first.certPem));
    await after.greeting();

    // the session from before the reload: same connection, same certificate, still relayed
    expect(await before.command('n', 'NOOP')).toMatch(/^n OK/m);
    const fetched = await before.command('f', 'FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])');
    expect(fetched).toContain('Subject: kept');
    expect(fetched).toMatch(/^f OK/m);
    expect(peerFingerprint(before)).toBe(fingerprint(first.certPem));

    // broken certificate files: an error naming the options, and the last good certificates stay
    await fs.writeFile(s.certPath, 'not a certificate\n');
    await fs.writeFile(apns.certPath, 'not a certificate either\n');
    s.proc.signal('SIGHUP');
    const { line } = await waitForLog(s.proc, (l) => /certificates not reloaded/.test(l.msg), 'reload failure', reloaded.index + 1);
    expect(line.level).toBe(50);
    expect(line.msg).toContain('--tls-cert');
    expect(line.msg).toContain('--apns-cert');
    const third = await s.connect({ tls: second });
    expect(peerFingerprint(third)).toBe(fingerprint(second.certPem));
    await third.greeting();
    expect(await before.command('m', 'NOOP')).toMatch(/^m OK/m);
    expect(s.proc.exitStatus()).toBeNull();
  });

  it('SIGHUP: a changed log-level in the config file applies at once, to sessions already open too', async () => {
    const s = await serve('level', { certs: selfSignedCertificate(), configText: 'log-level: info\n' });
    const early = await s.connect();
    await login(early, 'carol', 'carolpw');
    const { line: loginLine } = await waitForLog(s.proc, (l) => l.msg === 'login' && l.user === 'carol', 'login of carol');
    const sid = loginLine.sid;
    expect(sid).toBeTruthy();
    expect(logLines(s.proc).filter((l) => l.level <= DEBUG)).toEqual([]);

    await fs.writeFile(s.configPath, 'log-level: debug\n');
    s.proc.signal('SIGHUP');
    const toDebug = await waitForLog(s.proc, (l) => l.msg === 'log level changed' && l.to === 'debug', 'level debug');
    // the session opened at info level now logs at debug level as well
    expect(await early.command('o', 'LOGOUT')).toMatch(/^o OK/m);
    await waitForLog(s.proc, (l) => l.level === DEBUG && l.sid === sid && l.msg === 'session closed', 'debug line of the early session', toDebug.index);
    const fresh = await s.connect();
    await fresh.greeting();
    await waitForLog(s.proc, (l) => l.level === DEBUG && l.msg === 'client connected' && l.sid !== sid, 'debug line of a new session', toDebug.index);

    // a broken file keeps the previous level and says which option is wrong
    await fs.writeFile(s.configPath, 'log-level: loud\n');
    s.proc.signal('SIGHUP');
    const broken = await waitForLog(s.proc, (l) => /configuration not reloaded/.test(l.msg), 'reload refused', toDebug.index);
    expect(broken.line.level).toBe(50);
    expect(broken.line.option).toBe('log-level');
    expect(broken.line.msg).toContain('--log-level: expected one of');
    expect(broken.line.msg).toContain(`${s.configPath} line 1`);
    await waitForLog(s.proc, (l) => l.msg === 'certificates reloaded', 'certificates still reloaded', broken.index);
    const still = await s.connect();
    await still.greeting();
    await waitForLog(s.proc, (l) => l.level === DEBUG && l.msg === 'client connected', 'still at debug', broken.index + 1);

    // and back to info: debug lines stop
    await fs.writeFile(s.configPath, 'log-level: info\n');
    s.proc.signal('SIGHUP');
    const toInfo = await waitForLog(s.proc, (l) => l.msg === 'log level changed' && l.to === 'info', 'level info');
    const quiet = await s.connect();
    await login(quiet, 'bob', 'bobpw');
    expect(await quiet.command('o', 'LOGOUT')).toMatch(/^o OK/m);
    await waitForLog(s.proc, (l) => l.msg === 'login' && l.user === 'bob', 'info line of bob', toInfo.index);
    await quiet.waitClosed();
    await s.proc.stop();
    expect(logLines(s.proc).slice(toInfo.index).filter((l) => l.level <= DEBUG)).toEqual([]);
  });

  it('SIGTERM: refuses new connections, answers /readyz 503, then BYE to idle and IDLE sessions and exit 0', async () => {
    const s = await serve('term', { certs: selfSignedCertificate(), extra: ['--drain-timeout', '2s'] });
    const readyz = () => fetch(`http://127.0.0.1:${s.proc.metricsPort}/readyz`).then(async (r) => ({ status: r.status, body: await r.text() }));
    expect((await readyz()).status).toBe(200);

    const idle = await s.connect();
    await login(idle, 'alice', 'alicepw');
    const idling = await s.connect();
    await login(idling, 'bob', 'bobpw');
    idling.send('i IDLE\r\n');
    await idling.until((t) => t.startsWith('+'), 20_000, 'IDLE continuation');

    const t0 = Date.now();
    s.proc.signal('SIGTERM');
    await waitForLog(s.proc, (l) => l.msg.startsWith('shutting down') && l.signal === 'SIGTERM', 'shutting down');
    expect(await refused(s.proc.port)).toBe(true);
    expect(await refused(s.tlsPort)).toBe(true);
    const draining = await readyz();
    expect(draining.status).toBe(503);
    expect(draining.body).toContain('draining');
    // open sessions still work while draining
    expect(await idle.command('n', 'NOOP')).toMatch(/^n OK/m);

    const byeIdle = await idle.until((t) => /^\* BYE \[UNAVAILABLE\]/m.test(t), 20_000, 'BYE (idle)');
    const byeIdling = await idling.until((t) => /^\* BYE \[UNAVAILABLE\]/m.test(t), 20_000, 'BYE (IDLE)');
    expect(Date.now() - t0).toBeGreaterThanOrEqual(2_000); // not before the drain timeout
    expect(byeIdle).toMatch(/^\* BYE \[UNAVAILABLE\] [^\r\n]+\r\n$/m);
    expect(byeIdling).toMatch(/^\* BYE \[UNAVAILABLE\] [^\r\n]+\r\n$/m);
    await Promise.all([idle.waitClosed(), idling.waitClosed()]);
    await s.proc.exited();
    expect(s.proc.exitStatus()).toEqual({ code: 0, signal: null });
    expect(Date.now() - t0).toBeLessThan(2_000 + 15_000);
    expect(logLines(s.proc).some((l) => l.msg === 'stopped')).toBe(true);
  });

  it('SIGINT, then SIGTERM during the drain: the rest are closed at once', async () => {
    const s = await serve('twice', { certs: selfSignedCertificate(), extra: ['--drain-timeout', '10m'] });
    const c = await s.connect();
    await login(c, 'alice', 'alicepw');
    s.proc.signal('SIGINT');
    await waitForLog(s.proc, (l) => l.msg.startsWith('shutting down') && l.signal === 'SIGINT', 'shutting down');
    expect(await c.command('n', 'NOOP')).toMatch(/^n OK/m);
    const t0 = Date.now();
    s.proc.signal('SIGTERM');
    await c.until((t) => /^\* BYE \[UNAVAILABLE\]/m.test(t), 20_000, 'BYE');
    await s.proc.exited();
    expect(s.proc.exitStatus()).toEqual({ code: 0, signal: null });
    expect(Date.now() - t0).toBeLessThan(20_000); // the drain timeout was ten minutes
  });

  it('SIGTERM: when the last session logs out by itself, the process exits without waiting for the timeout', async () => {
    const s = await serve('logout', { certs: selfSignedCertificate(), extra: ['--drain-timeout', '60s'] });
    const c = await s.connect();
    await login(c, 'alice', 'alicepw');
    s.proc.signal('SIGTERM');
    await waitForLog(s.proc, (l) => l.msg.startsWith('shutting down') && l.signal === 'SIGTERM', 'shutting down');
    const reply = await c.command('o', 'LOGOUT');
    expect(reply).toMatch(/^o OK/m);
    expect(reply).not.toContain('[UNAVAILABLE]'); // the server's own BYE, not the proxy's
    const loggedOut = Date.now();
    await s.proc.exited();
    expect(s.proc.exitStatus()).toEqual({ code: 0, signal: null });
    expect(Date.now() - loggedOut).toBeLessThan(20_000); // the drain timeout was 60 s
  });
});
