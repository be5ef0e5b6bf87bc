/**
 * The NOTIFY watcher against a real Dovecot 2.3 (src/testbed/dovecot.ts, master user
 * master/masterpw, separator "*"): real deliveries through dovecot-lda make exactly one change
 * each — INBOX, a nested folder and a UTF-8 folder — in both master-login modes; expunges and
 * Dovecot's duplicate lines make none; setMailboxes adds and removes; a wrong master password
 * is a clear, retried error that never reaches the logs; an upstream restart is followed by a
 * reconnect whose catch-up pushes what arrived meanwhile, once; a stored state from before a
 * proxy restart is caught up on start; a nonexistent mailbox does not disturb the others.
 * Needs `node scripts/bootstrap.mjs test`.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { Registry } from 'prom-client';
import { sleep, startDovecot, waitFor, type DovecotInstance } from '../../../src/testbed/index.js';
import { ImapConnection } from '../../../src/watch/imap-connection.js';
import { masterLogin, MasterCredentials, type MasterLoginMode } from '../../../src/watch/login.js';
import { NotifyWatcherFactory, type NotifyUserWatcher, type NotifyWatcherOptions } from '../../../src/watch/notify.js';
import type { UserWatcher } from '../../../src/watch/types.js';
import { captureLogger, Collector, context, MemoryStates, message, Relay, upstream } from './notify-harness.js';

/** Long enough for Dovecot's duplicate STATUS lines (~0.5 s after a delivery) to have come. */
const SETTLE_MS = 1000;

const USERS = ['alice', 'bob', 'carol', 'dave', 'erin', 'frank', 'gina', 'hank', 'ivan'];

describe('NOTIFY watcher vs Dovecot', () => {
  let dovecot: DovecotInstance;
  const stops: Array<() => Promise<void>> = [];

  beforeAll(async () => {
    dovecot = await startDovecot({ users: Object.fromEntries(USERS.map((u) => [u, `${u}pw`])), haproxyListener: true });
  });
  afterEach(async () => {
    for (const stop of stops.splice(0).reverse()) await stop();
  });
  afterAll(async () => {
    await dovecot?.destroy();
  });

  function watch(
    user: string,
    mailboxes: string[],
    opts: { mode?: MasterLoginMode; port?: number; password?: string; states?: MemoryStates } & Partial<NotifyWatcherOptions> = {},
  ) {
    const collector = new Collector();
    const states = opts.states ?? new MemoryStates();
    const logs = captureLogger();
    const registry = opts.registry ?? new Registry();
    const factory = new NotifyWatcherFactory({
      upstream: opts.upstream ?? upstream(dovecot.host, opts.port ?? dovecot.imapPort),
      credentials: new MasterCredentials({
        user: dovecot.masterUser,
        password: opts.password ?? dovecot.masterPassword,
        mode: opts.mode ?? 'plain-authzid',
      }),
      registry,
      backoff: opts.backoff ?? { initialMs: 100, maxMs: 1000 },
      pollIntervalMs: opts.pollIntervalMs ?? 500,
      ...(opts.keepaliveMs !== undefined ? { keepaliveMs: opts.keepaliveMs } : {}),
    });
    const watcher = factory.start(user, mailboxes, context(collector, states, logs.log));
    stops.push(() => factory.close());
    return { watcher, collector, states, logs, registry };
  }

  async function connected(w: UserWatcher): Promise<void> {
    await waitFor(() => w.connected, { timeoutMs: 20_000, what: `${w.user}'s watcher to connect` });
  }

  async function mailboxStatus(user: string, mailbox: string) {
    const out = await dovecot.doveadm(['mailbox', 'status', '-u', user, 'messages uidnext uidvalidity', mailbox]);
    const n = (k: string) => Number(new RegExp(`${k}=(\\d+)`).exec(out)![1]);
    return { messages: n('messages'), uidNext: n('uidnext'), uidValidity: n('uidvalidity') };
  }

  for (const mode of ['plain-authzid', 'separator'] as const) {
    it(`one change per delivery to INBOX, Work/Projects and Entwürfe (master login ${mode})`, async () => {
      const user = mode === 'plain-authzid' ? 'alice' : 'bob';
      // the mailboxes exist and hold mail before the watcher starts (no stored state: no push)
      for (const mb of ['INBOX', 'Work/Projects', 'Entwürfe']) await dovecot.deliver(user, message('before'), mb);
      const { watcher, collector, states, registry } = watch(user, ['INBOX', 'Work/Projects', 'Entwürfe'], { mode });
      await connected(watcher);
      await waitFor(() => states.get(user, 'Entwürfe'), { what: 'the initial states to be stored' });
      expect(collector.changes).toEqual([]);

      await dovecot.deliver(user, message('to INBOX'));
      const [inbox] = await collector.waitFor(user, 'INBOX', 1);
      await dovecot.deliver(user, message('to a folder'), 'Work/Projects');
      const [work] = await collector.waitFor(user, 'Work/Projects', 1);
      await dovecot.deliver(user, message('to a UTF-8 folder'), 'Entwürfe');
      const [utf8] = await collector.waitFor(user, 'Entwürfe', 1);
      await sleep(SETTLE_MS);
      expect(collector.changes).toHaveLength(3); // Dovecot's duplicate lines made nothing more

      const s = await mailboxStatus(user, 'INBOX');
      expect(inbox).toMatchObject({ user, mailbox: 'INBOX', source: 'notify', changeId: `INBOX:${s.uidValidity}:${s.uidNext}` });
      expect(work).toMatchObject({ mailbox: 'Work/Projects', source: 'notify' });
      expect(utf8).toMatchObject({ mailbox: 'Entwürfe', source: 'notify' });
      expect(states.get(user, 'INBOX')).toEqual(s);
      expect(await registry.getSingleMetricAsString('xaps_watch_changes_total')).toContain('source="notify"} 3');
      expect(await registry.getSingleMetricAsString('xaps_watchers')).toContain('mode="notify"} 1');
      expect(await registry.getSingleMetricAsString('xaps_watcher_connections')).toContain('mode="notify"} 1');

      // an expunge changes MESSAGES only: the state follows, no change
      await dovecot.doveadm(['expunge', '-u', user, 'mailbox', 'INBOX', 'uid', '1']);
      await waitFor(() => states.get(user, 'INBOX')?.messages === s.messages - 1, { what: 'the expunge to be seen' });
      await sleep(SETTLE_MS);
      expect(collector.changes).toHaveLength(3);
    });
  }

  it('setMailboxes adds and removes mailboxes', async () => {
    const user = 'carol';
    await dovecot.deliver(user, message('creates Added'), 'Added');
    const { watcher, collector, states } = watch(user, ['INBOX']);
    await connected(watcher);

    watcher.setMailboxes(['INBOX', 'Added']);
    await waitFor(() => states.get(user, 'Added'), { what: 'Added to be watched' });
    expect(collector.changes).toEqual([]); // first sight of Added: stored, not pushed
    await dovecot.deliver(user, message('to Added'), 'Added');
    await collector.waitFor(user, 'Added', 1);

    watcher.setMailboxes(['INBOX']);
    await (watcher as NotifyUserWatcher).settled(); // NOTIFY SET without Added answered
    await dovecot.deliver(user, message('to Added, unwatched'), 'Added');
    await dovecot.deliver(user, message('to INBOX'));
    await collector.waitFor(user, 'INBOX', 1);
    await sleep(SETTLE_MS);
    expect(collector.of(user, 'Added')).toHaveLength(1);
    expect(collector.changes).toHaveLength(2);
  });

  it('after an upstream restart: reconnects, and the catch-up pushes what arrived meanwhile, once', async () => {
    const user = 'dave';
    const relay = await Relay.start(dovecot.host, dovecot.imapPort);
    stops.push(() => relay.close());
    await dovecot.deliver(user, message('first'));
    const { watcher, collector, registry } = watch(user, ['INBOX', 'Sent'], { port: relay.port });
    await connected(watcher);

    relay.block(); // the watcher loses Dovecot and cannot get back until unblocked
    await dovecot.restart();
    await waitFor(() => !watcher.connected, { what: 'the watcher to notice' });
    await dovecot.deliver(user, message('while nobody watched'));
    relay.unblock();
    const [caught] = await collector.waitFor(user, 'INBOX', 1);
    const s = await mailboxStatus(user, 'INBOX');
    expect(caught).toMatchObject({ mailbox: 'INBOX', source: 'catch-up', changeId: `INBOX:${s.uidValidity}:${s.uidNext}` });
    await connected(watcher);
    await sleep(SETTLE_MS);
    expect(collector.changes).toHaveLength(1);
    expect(await registry.getSingleMetricAsString('xaps_watcher_reconnects_total')).toMatch(/mode="notify"} [1-9]/);

    await dovecot.deliver(user, message('live again'));
    const after = await collector.waitFor(user, 'INBOX', 2);
    expect(after[1]!.source).toBe('notify');
  });

  it('catches up from a state stored before a proxy restart, and only stores mailboxes without one', async () => {
    const user = 'erin';
    await dovecot.deliver(user, message('old'));
    await dovecot.deliver(user, message('old'), 'Archive');
    const states = new MemoryStates();
    await states.setMailboxState(user, 'INBOX', await mailboxStatus(user, 'INBOX')); // as the last run left it
    await dovecot.deliver(user, message('new, while the proxy was down'));
    const { watcher, collector } = watch(user, ['INBOX', 'Archive'], { states });
    const [caught] = await collector.waitFor(user, 'INBOX', 1);
    const s = await mailboxStatus(user, 'INBOX');
    expect(caught).toMatchObject({ source: 'catch-up', changeId: `INBOX:${s.uidValidity}:${s.uidNext}` });
    await connected(watcher);
    await waitFor(() => states.get(user, 'Archive'), { what: 'Archive to be stored' });
    await sleep(SETTLE_MS);
    expect(collector.changes).toHaveLength(1);
    expect(states.get(user, 'INBOX')).toEqual(s);
  });

  it('a nonexistent mailbox does not disturb the others, and is picked up once mail creates it', async () => {
    const user = 'frank';
    const { watcher, collector, logs } = watch(user, ['INBOX', 'Does/Not/Exist']);
    await connected(watcher);
    await dovecot.deliver(user, message('to INBOX'));
    await collector.waitFor(user, 'INBOX', 1);
    expect(logs.text()).toContain('does not exist');
    await dovecot.deliver(user, message('creates it'), 'Does/Not/Exist');
    const [created] = await collector.waitFor(user, 'Does/Not/Exist', 1);
    expect(created.changeId).toMatch(/^Does\/Not\/Exist:\d+:2$/);
    await sleep(SETTLE_MS);
    expect(collector.changes).toHaveLength(2);
  });

  it('keeps a quiet connection alive with NOOP, and takes a BYE as a disconnect', async () => {
    const user = 'gina';
    const relay = await Relay.start(dovecot.host, dovecot.imapPort);
    stops.push(() => relay.close());
    const { watcher, collector, logs } = watch(user, ['INBOX'], { port: relay.port, keepaliveMs: 150 });
    await connected(watcher);
    const noops = () => relay.clientText.match(/ NOOP\r\n/g)?.length ?? 0;
    await waitFor(() => noops() >= 3, { what: 'keepalive NOOPs' });

    // `doveadm kick` makes the user's sessions say "* BYE …" and close. (The testbed's restart
    // is no use here: Dovecot 2.3's imap processes outlive a SIGTERMed master and keep serving.)
    await dovecot.doveadm(['kick', user]);
    await waitFor(() => /upstream said \* BYE/.test(logs.text()), { what: 'the BYE to be logged' });
    await waitFor(() => /watcher reconnected/.test(logs.text()), { timeoutMs: 20_000, what: 'the reconnect' });
    await connected(watcher);
    await dovecot.deliver(user, message('after the restart'));
    expect((await collector.waitFor(user, 'INBOX', 1))[0]!.source).toBe('notify');
  });

  it('watches over implicit TLS, and through a PROXY v2 listener', async () => {
    const ca = readFileSync(dovecot.caCertPath);
    const overTls = watch('hank', ['INBOX'], {
      upstream: { host: dovecot.host, port: dovecot.imapsPort, tls: 'tls', ca, servername: 'localhost', connectTimeoutMs: 5000, clientIp: 'id' },
    });
    const viaProxy = watch('ivan', ['INBOX'], {
      upstream: { host: dovecot.host, port: dovecot.haproxyPort!, tls: 'none', connectTimeoutMs: 5000, clientIp: 'proxy-v2' },
    });
    await connected(overTls.watcher);
    await connected(viaProxy.watcher);
    await dovecot.deliver('hank', message('over TLS'));
    await dovecot.deliver('ivan', message('through PROXY v2'));
    await overTls.collector.waitFor('hank', 'INBOX', 1);
    await viaProxy.collector.waitFor('ivan', 'INBOX', 1);
  });

  it('the watcher connection sends literals with and without LITERAL+', async () => {
    const conn = await ImapConnection.connect({ upstream: upstream(dovecot.host, dovecot.imapPort) });
    await masterLogin(conn, 'alice', new MasterCredentials({ user: dovecot.masterUser, password: dovecot.masterPassword }));
    expect(conn.hasCapability('LITERAL+')).toBe(true);
    const cmd = ['STATUS ', { literal: Buffer.from('INBOX') }, ' (MESSAGES)'];
    expect((await conn.ok(cmd)).untagged[0]!.line).toMatch(/^\* STATUS INBOX \(MESSAGES \d+\)$/);
    conn.capabilities.delete('LITERAL+'); // as with a server without it: wait for "+"
    expect((await conn.ok(cmd)).untagged[0]!.line).toMatch(/^\* STATUS INBOX \(MESSAGES \d+\)$/);
    expect((await conn.command(['STATUS ', { literal: Buffer.from('Nope') }, ' (MESSAGES)'])).status).toBe('NO');
    await conn.logout();
    expect(conn.closed).toBe(true);
  });

  describe('with a wrong master password', () => {
    // Its own Dovecot: a failed login makes Dovecot's anvil slow the next logins from 127.0.0.1.
    let bad: DovecotInstance;
    beforeAll(async () => {
      bad = await startDovecot({ users: { gina: 'ginapw' } });
    });
    afterAll(async () => {
      await bad?.destroy();
    });

    it('fails clearly, retries with back-off, and never logs the password', async () => {
      const password = 'Wr0ng-Master-Secret';
      const registry = new Registry();
      const collector = new Collector();
      const logs = captureLogger();
      const factory = new NotifyWatcherFactory({
        upstream: upstream(bad.host, bad.imapPort),
        credentials: new MasterCredentials({ user: bad.masterUser, password }),
        registry,
        backoff: { initialMs: 100, maxMs: 500 },
      });
      stops.push(() => factory.close());
      const watcher = factory.start('gina', ['INBOX'], context(collector, new MemoryStates(), logs.log));
      const failures = async () =>
        Number(/reason="authentication"} (\d+)/.exec(await registry.getSingleMetricAsString('xaps_watcher_login_failures_total'))![1]);
      await waitFor(async () => (await failures()) >= 2, { timeoutMs: 30_000, what: 'two failed logins' });
      expect(watcher.connected).toBe(false);
      const text = logs.text();
      expect(text).toContain('master login for gina failed (authentication): NO [AUTHENTICATIONFAILED]');
      const payload = Buffer.from(`gina\0${bad.masterUser}\0${password}`).toString('base64');
      for (const secret of [password, payload, Buffer.from(password).toString('base64')]) {
        expect(text).not.toContain(secret);
        expect(await registry.metrics()).not.toContain(secret);
      }
      expect(process.title).not.toContain(password);
    });
  });
});
