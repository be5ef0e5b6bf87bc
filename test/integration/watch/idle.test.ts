/**
 * The IDLE watcher against a real Cyrus 3.6 (src/testbed/cyrus.ts: idled, master user in
 * proxyservers) and, briefly, a real Dovecot 2.3: a delivery to INBOX and to another mailbox
 * with its own IDLE connection each make one change; a mailbox beyond idleMaxPerUser is found
 * by the STATUS poll; setMailboxes moves mailboxes between IDLE and polling; after a Cyrus
 * restart the watcher reconnects and its catch-up pushes what arrived meanwhile, once.
 * Needs root and `node scripts/bootstrap.mjs test`.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Registry } from 'prom-client';
import { startCyrus, type CyrusInstance } from '../../../src/testbed/cyrus.js';
import { sleep, startDovecot, waitFor, type DovecotInstance } from '../../../src/testbed/index.js';
import { IdleWatcherFactory, type IdleWatcherOptions } from '../../../src/watch/idle.js';
import { MasterCredentials } from '../../../src/watch/login.js';
import type { MailboxChange, UserWatcher } from '../../../src/watch/types.js';
import { captureLogger, Collector, context, MemoryStates, message, Relay, upstream } from './notify-harness.js';

/** Polled mailboxes are checked this often in these tests. */
const POLL_MS = 500;
/** Long enough for a duplicate to show up if there were one (several poll rounds). */
const SETTLE_MS = 1200;

interface Server {
  host: string;
  imapPort: number;
  masterUser: string;
  masterPassword: string;
}

function watchOn(server: Server, stops: Array<() => Promise<void>>) {
  return (user: string, mailboxes: string[], opts: { port?: number; states?: MemoryStates } & Partial<IdleWatcherOptions> = {}) => {
    const collector = new Collector();
    const states = opts.states ?? new MemoryStates();
    const logs = captureLogger();
    const registry = new Registry();
    const factory = new IdleWatcherFactory({
      upstream: upstream(server.host, opts.port ?? server.imapPort),
      credentials: new MasterCredentials({ user: server.masterUser, password: server.masterPassword }),
      registry,
      backoff: { initialMs: 100, maxMs: 1000 },
      idleMaxPerUser: opts.idleMaxPerUser ?? 2,
      pollIntervalMs: opts.pollIntervalMs ?? POLL_MS,
      ...(opts.idleRefreshMs !== undefined ? { idleRefreshMs: opts.idleRefreshMs } : {}),
    });
    const watcher = factory.start(user, mailboxes, context(collector, states, logs.log));
    stops.push(() => factory.close());
    return { watcher, collector, states, logs, registry };
  };
}

async function connected(w: UserWatcher): Promise<void> {
  await waitFor(() => w.connected, { timeoutMs: 20_000, what: `${w.user}'s watcher to connect` });
}

describe('IDLE watcher vs Cyrus 3.6', () => {
  let cyrus: CyrusInstance;
  const stops: Array<() => Promise<void>> = [];
  let watch: ReturnType<typeof watchOn>;

  beforeAll(async () => {
    cyrus = await startCyrus({ users: { alice: 'alicepw', bob: 'bobpw', carol: 'carolpw', dora: 'dorapw', erin: 'erinpw', frank: 'frankpw' } });
    watch = watchOn(cyrus, stops);
    for (const mb of ['Work/Projects', 'Polled', 'Later']) await cyrus.createMailbox('alice', mb);
    for (const mb of ['Lists', 'Work']) await cyrus.createMailbox('erin', mb);
    for (const mb of ['Archive', 'Late', 'Later']) await cyrus.createMailbox('frank', mb);
  });
  afterEach(async () => {
    for (const stop of stops.splice(0).reverse()) await stop();
  });
  afterAll(async () => {
    await cyrus?.destroy();
  });

  it('INBOX and a second mailbox by IDLE, a third beyond idleMaxPerUser by polling', async () => {
    const user = 'alice';
    const { watcher, collector, states, registry } = watch(user, ['INBOX', 'Work/Projects', 'Polled'], { idleMaxPerUser: 2 });
    await connected(watcher);
    expect(await registry.getSingleMetricAsString('xaps_watcher_connections')).toContain('mode="idle"} 3');
    expect(await registry.getSingleMetricAsString('xaps_watchers')).toContain('mode="idle"} 1');
    expect(states.get(user, 'Polled')).toEqual({ messages: 0, uidNext: 1, uidValidity: expect.any(Number) });

    await cyrus.deliver(user, message('to INBOX'));
    const [inbox] = await collector.waitFor(user, 'INBOX', 1);
    expect(inbox).toMatchObject({ mailbox: 'INBOX', source: 'idle', changeId: `INBOX:${states.get(user, 'INBOX')!.uidValidity}:2` });
    await cyrus.deliver(user, message('to a folder'), 'Work/Projects');
    const [work] = await collector.waitFor(user, 'Work/Projects', 1);
    expect(work.source).toBe('idle');
    await cyrus.deliver(user, message('to the polled one'), 'Polled');
    const [polled] = await collector.waitFor(user, 'Polled', 1);
    expect(polled.source).toBe('poll');
    await sleep(SETTLE_MS);
    expect(collector.changes).toHaveLength(3);

    // a second message to INBOX: one more change, with the next UIDNEXT
    await cyrus.deliver(user, message('again'));
    const again = await collector.waitFor(user, 'INBOX', 2);
    expect(again[1]!.changeId).toMatch(/:3$/);

    // setMailboxes: Later joins (polled), Work/Projects leaves, so Polled moves up to IDLE
    watcher.setMailboxes(['INBOX', 'Polled', 'Later']);
    await waitFor(() => states.get(user, 'Later'), { what: 'Later to be watched' });
    await connected(watcher);
    await cyrus.deliver(user, message('to Later'), 'Later');
    await cyrus.deliver(user, message('to Polled'), 'Polled');
    await cyrus.deliver(user, message('to Work, unwatched'), 'Work/Projects');
    expect((await collector.waitFor(user, 'Later', 1))[0]!.source).toBe('poll');
    const polledNow = await collector.waitFor(user, 'Polled', 2);
    expect(polledNow[1]!.source).toBe('idle'); // its own IDLE connection now
    await sleep(SETTLE_MS);
    expect(collector.of(user, 'Work/Projects')).toHaveLength(1);
  });

  it('after a Cyrus restart: reconnects, and the catch-up pushes what arrived meanwhile, once', async () => {
    const user = 'bob';
    const relay = await Relay.start(cyrus.host, cyrus.imapPort);
    stops.push(() => relay.close());
    const { watcher, collector, states, registry } = watch(user, ['INBOX'], { port: relay.port });
    await connected(watcher);
    await waitFor(() => states.get(user, 'INBOX'), { what: 'the INBOX state' });

    relay.block(); // cut off: mail can arrive (Cyrus is up again) while nobody watches
    await cyrus.restart();
    await waitFor(() => !watcher.connected, { what: 'the watcher to notice' });
    await cyrus.deliver(user, message('while nobody watched'));
    relay.unblock();
    const [caught] = await collector.waitFor(user, 'INBOX', 1);
    expect(caught).toMatchObject({ mailbox: 'INBOX', source: 'catch-up' });
    expect(caught.changeId).toMatch(/^INBOX:\d+:2$/);
    await connected(watcher);
    await sleep(SETTLE_MS);
    expect(collector.changes).toHaveLength(1);
    expect(await registry.getSingleMetricAsString('xaps_watcher_reconnects_total')).toMatch(/mode="idle"} [1-9]/);

    await cyrus.deliver(user, message('live again'));
    const after = await collector.waitFor(user, 'INBOX', 2);
    expect(after[1]!.source).toBe('idle');
  });

  it('renews IDLE every idleRefreshMs and still sees new mail', async () => {
    const user = 'dora';
    const relay = await Relay.start(cyrus.host, cyrus.imapPort);
    stops.push(() => relay.close());
    const { watcher, collector } = watch(user, ['INBOX'], { port: relay.port, idleRefreshMs: 150 });
    await connected(watcher);
    const renewals = () => relay.clientText.match(/^DONE\r\n/gm)?.length ?? 0;
    await waitFor(() => renewals() >= 3, { what: 'IDLE renewals' });
    expect(relay.clientText.match(/ IDLE\r\n/g)!.length).toBeGreaterThan(renewals());
    await cyrus.deliver(user, message('after renewals'));
    expect((await collector.waitFor(user, 'INBOX', 1))[0]!.source).toBe('idle');
  });

  it('a mailbox moved between IDLE and polling while its push is still out is not pushed again', async () => {
    // The push of a change may take a while (the dispatcher merges changes within its coalescing window); the state
    // is stored only once it is done. A mailbox that changes connection meanwhile (setMailboxes moves it between its
    // own IDLE connection and the poll) is compared with the store on the new connection: it must not take the
    // change it already reported for mail that arrived while nobody watched.
    const user = 'erin';
    const states = new MemoryStates();
    const collector = new Collector();
    let release: () => void = () => undefined;
    const pending = new Promise<void>((r) => (release = r));
    const registry = new Registry();
    const factory = new IdleWatcherFactory({
      upstream: upstream(cyrus.host, cyrus.imapPort),
      credentials: new MasterCredentials({ user: cyrus.masterUser, password: cyrus.masterPassword }),
      registry,
      backoff: { initialMs: 100, maxMs: 1000 },
      idleMaxPerUser: 2,
      pollIntervalMs: POLL_MS,
    });
    stops.push(async () => {
      release();
      await factory.close();
    });
    const onChange = (c: MailboxChange) => {
      collector.sink(c);
      return pending; // every push stays out until release()
    };
    const watcher = factory.start(user, ['INBOX', 'Work'], { onChange, states, log: captureLogger().log });
    await connected(watcher);
    await waitFor(() => states.get(user, 'Work'), { what: 'the Work state' });

    // IDLE → poll: Lists comes first, Work is the third mailbox
    await cyrus.deliver(user, message('to Work, on its own IDLE connection'), 'Work');
    const [live] = await collector.waitFor(user, 'Work', 1);
    expect(live!.source).toBe('idle');
    watcher.setMailboxes(['INBOX', 'Lists', 'Work']);
    // (the state writes wait in order behind the pending push: no stored Lists state to wait for)
    await waitFor(() => registry.getSingleMetricAsString('xaps_watcher_connections').then((t) => t.includes('mode="idle"} 3')), { what: 'the poll connection' });
    await connected(watcher);
    await sleep(SETTLE_MS); // several poll rounds of Work
    expect(collector.of(user, 'Work')).toHaveLength(1);

    // poll → IDLE: Lists leaves, Work gets its own connection again
    await cyrus.deliver(user, message('to Work, polled'), 'Work');
    const polled = await collector.waitFor(user, 'Work', 2);
    expect(polled[1]!.source).toBe('poll');
    watcher.setMailboxes(['INBOX', 'Work']);
    await sleep(SETTLE_MS);
    await connected(watcher);
    expect(collector.of(user, 'Work')).toHaveLength(2);

    // once the pushes are done the state is stored, and new mail is still seen
    release();
    await waitFor(() => states.get(user, 'Work')?.uidNext === live!.changeId.split(':').map(Number)[2]! + 1, { what: 'the Work state after the pushes' });
    await cyrus.deliver(user, message('to Work, after'), 'Work');
    expect((await collector.waitFor(user, 'Work', 3))[2]!.source).toBe('idle');
  });

  it('a mailbox added to the polled set during a poll round is polled when the round ends, not a whole interval later', async () => {
    const user = 'frank';
    const relay = await Relay.start(cyrus.host, cyrus.imapPort);
    stops.push(() => relay.close());
    // a poll interval far longer than the test: only a round right after the current one can see Later in time
    const { watcher, states } = watch(user, ['INBOX', 'Archive'], { port: relay.port, idleMaxPerUser: 1, pollIntervalMs: 10 * 60_000 });
    await connected(watcher);
    await waitFor(() => states.get(user, 'Archive'), { what: 'the first poll round' });

    // adding Late wakes the poll session: a round starts and hangs on its STATUS of Archive
    relay.holdReplies();
    const sent = relay.clientText.length;
    watcher.setMailboxes(['INBOX', 'Archive', 'Late']);
    await waitFor(() => /STATUS "?Archive"? /.test(relay.clientText.slice(sent)), { what: 'a poll round under way' });
    // Later joins while that round runs
    watcher.setMailboxes(['INBOX', 'Archive', 'Late', 'Later']);
    relay.releaseReplies();
    await waitFor(() => states.get(user, 'Late'), { what: 'Late polled in the round it started' });
    await waitFor(() => states.get(user, 'Later'), { timeoutMs: 15_000, what: 'Later polled right after that round' });
  });

  it('catches up from a stored state on start, and waits for a missing mailbox', async () => {
    const user = 'carol';
    await cyrus.deliver(user, message('old'));
    const states = new MemoryStates();
    // the real state as a previous run stored it, then one more message
    const probe = watch(user, ['INBOX'], { states: new MemoryStates() });
    await waitFor(() => probe.states.get(user, 'INBOX'), { what: 'the state before' });
    await states.setMailboxState(user, 'INBOX', probe.states.get(user, 'INBOX')!);
    const before = probe.states.get(user, 'INBOX')!;
    await stops.pop()!();
    await cyrus.deliver(user, message('new while the proxy was down'));

    const { watcher, collector, logs } = watch(user, ['INBOX', 'Nowhere'], { states, idleMaxPerUser: 5 });
    const [caught] = await collector.waitFor(user, 'INBOX', 1);
    expect(caught).toMatchObject({ source: 'catch-up', changeId: `INBOX:${before.uidValidity}:${before.uidNext + 1}` });
    await connected(watcher);
    expect(logs.text()).toContain('does not exist');
    await cyrus.deliver(user, message('live'));
    await collector.waitFor(user, 'INBOX', 2);
  });
});

describe('IDLE watcher vs Dovecot', () => {
  let dovecot: DovecotInstance;
  const stops: Array<() => Promise<void>> = [];

  beforeAll(async () => {
    dovecot = await startDovecot({ users: { alice: 'alicepw' } });
  });
  afterAll(async () => {
    for (const stop of stops.splice(0).reverse()) await stop();
    await dovecot?.destroy();
  });

  it('INBOX by IDLE, a folder by polling', async () => {
    const watch = watchOn(dovecot, stops);
    await dovecot.deliver('alice', message('creates Work'), 'Work');
    const { watcher, collector } = watch('alice', ['INBOX', 'Work'], { idleMaxPerUser: 1 });
    await connected(watcher);
    await dovecot.deliver('alice', message('to INBOX'));
    expect((await collector.waitFor('alice', 'INBOX', 1))[0]!.source).toBe('idle');
    await dovecot.deliver('alice', message('to Work'), 'Work');
    expect((await collector.waitFor('alice', 'Work', 1))[0]!.source).toBe('poll');
    await sleep(SETTLE_MS);
    expect(collector.changes).toHaveLength(2);
  });
});
