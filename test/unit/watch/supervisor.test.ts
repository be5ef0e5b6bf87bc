/**
 * WatchSupervisor with a fake WatcherFactory (records start / setMailboxes / stop), a scripted lease manager and the
 * real embedded store on a test clock. Passes are run by calling reconcile() / renewLeases() or by firing the
 * injected timers: nothing here waits for wall-clock time.
 */
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { Registry } from 'prom-client';
import { afterEach, describe, expect, it } from 'vitest';
import { createLogger, type Logger } from '../../../src/ops/log.js';
import { mailboxRef } from '../../../src/store/common.js';
import { EmbeddedRegistrationStore } from '../../../src/store/embedded.js';
import type { RegistrationStore } from '../../../src/store/types.js';
import { LocalLeaseManager } from '../../../src/watch/leases.js';
import { WatchSupervisor, watchedMailboxes, type SupervisorTimers, type WatchSupervisorOptions } from '../../../src/watch/supervisor.js';
import type { LeaseManager, MailboxChange } from '../../../src/watch/types.js';
import { inputFor, status, tokenFor } from '../store/contract.js';
import { FakeFactory, type FakeWatcher } from '../../helpers/fake-watchers.js';

const T0 = 1_700_000_000_000;
const DAY = 24 * 3600 * 1000;
const TTL = 30 * DAY;

// ---------------------------------------------------------------- fakes

/** A lease manager that grants unless told otherwise, and records what was asked. */
class ScriptedLeases implements LeaseManager {
  readonly instanceId = 'test-instance';
  readonly renewIntervalMs = 5000;
  readonly held = new Set<string>();
  readonly released: string[] = [];
  readonly renewed: string[][] = [];
  readonly deny = new Set<string>();
  readonly lose = new Set<string>();
  failAcquire = false;
  failRenew = false;
  failRelease = false;
  async acquire(user: string): Promise<boolean> {
    if (this.failAcquire) throw new Error('leases: redis unreachable');
    if (this.deny.has(user)) return false;
    this.held.add(user);
    return true;
  }
  async renew(users: string[]): Promise<string[]> {
    this.renewed.push([...users].sort());
    if (this.failRenew) throw new Error('leases: redis unreachable');
    const lost = users.filter((u) => this.lose.has(u));
    for (const u of lost) this.held.delete(u);
    return lost;
  }
  async release(user: string): Promise<void> {
    if (this.failRelease) throw new Error('leases: redis unreachable');
    this.held.delete(user);
    this.released.push(user);
  }
}

class ManualTimers implements SupervisorTimers {
  private seq = 0;
  readonly active = new Map<number, { fn: () => void; ms: number }>();
  setInterval(fn: () => void, ms: number): unknown {
    const id = ++this.seq;
    this.active.set(id, { fn, ms });
    return id;
  }
  clearInterval(handle: unknown): void {
    this.active.delete(handle as number);
  }
  intervals(): number[] {
    return [...this.active.values()].map((t) => t.ms).sort((a, b) => a - b);
  }
  /** Fires every timer with this interval once. */
  fire(ms: number): void {
    for (const t of [...this.active.values()]) if (t.ms === ms) t.fn();
  }
}

function captureLogger(): { logger: Logger; lines: () => Array<Record<string, unknown>> } {
  const raw: string[] = [];
  const dest = new Writable({
    write(chunk: Buffer, _enc, cb) {
      raw.push(...chunk.toString('utf8').split('\n').filter(Boolean));
      cb();
    },
  });
  return {
    logger: createLogger({ level: 'debug', pretty: false, destination: dest }),
    lines: () => raw.map((l) => JSON.parse(l) as Record<string, unknown>),
  };
}

async function metric(registry: Registry, name: string): Promise<number> {
  const m = registry.getSingleMetric(name);
  if (!m) throw new Error(`no metric ${name}`);
  return (await m.get()).values.reduce((n, v) => n + v.value, 0);
}

/** Lets queued promise chains (fake watcher stops, store writes) settle. */
async function settle(): Promise<void> {
  for (let i = 0; i < 20; i++) await new Promise<void>((r) => setImmediate(r));
}

// ---------------------------------------------------------------- harness

const dirs: string[] = [];
const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
  for (const d of dirs.splice(0)) await fsp.rm(d, { recursive: true, force: true });
});

interface Harness {
  store: EmbeddedRegistrationStore;
  clock: { now: number };
  factory: FakeFactory;
  leases: ScriptedLeases;
  timers: ManualTimers;
  registry: Registry;
  changes: MailboxChange[];
  sup: WatchSupervisor;
  log: ReturnType<typeof captureLogger>;
  make(opts?: Partial<WatchSupervisorOptions>): WatchSupervisor;
}

async function harness(opts: Partial<WatchSupervisorOptions> = {}): Promise<Harness> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'xaps-sup-'));
  dirs.push(dir);
  const clock = { now: T0 };
  const store = await EmbeddedRegistrationStore.open({ dataDir: dir, ttlMs: TTL, clock: () => clock.now });
  cleanups.push(() => store.close());
  const factory = new FakeFactory();
  const leases = new ScriptedLeases();
  const timers = new ManualTimers();
  const registry = new Registry();
  const changes: MailboxChange[] = [];
  const log = captureLogger();
  const make = (more: Partial<WatchSupervisorOptions> = {}): WatchSupervisor => {
    const sup = new WatchSupervisor({
      store,
      factory,
      leases,
      onChange: (c) => changes.push(c),
      maxWatchers: 100,
      timers,
      registry,
      log: log.logger,
      clock: () => clock.now,
      ...opts,
      ...more,
    });
    cleanups.push(() => sup.stop());
    return sup;
  };
  return { store, clock, factory, leases, timers, registry, changes, sup: make(), log, make };
}

function reg(user: string, n: number, mailboxes: string[], now = T0): Parameters<RegistrationStore['upsert']>[0] {
  return inputFor(user, n, { now, mailboxes: mailboxes.map((m) => mailboxRef(m)) });
}

// ---------------------------------------------------------------- tests

describe('watchedMailboxes', () => {
  it('is the union over the registrations, INBOX (any case) first, then sorted', () => {
    const regs = [
      { mailboxes: ['Sent', 'INBOX', 'Archive'].map((m) => mailboxRef(m)) },
      { mailboxes: ['inbox', 'Zeug', 'Archive', 'Ärger'].map((m) => mailboxRef(m)) },
    ];
    expect(watchedMailboxes(regs)).toEqual(['INBOX', 'Archive', 'Sent', 'Zeug', 'Ärger']);
    expect(watchedMailboxes([{ mailboxes: [] }])).toEqual(['INBOX']);
  });
});

describe('WatchSupervisor', () => {
  it('starts a watcher for every stored user with live registrations, on the union of their mailboxes', async () => {
    const h = await harness();
    await h.store.upsert(reg('alice', 1, ['INBOX', 'Archive']));
    await h.store.upsert(reg('alice', 2, ['INBOX', 'Sent Messages', 'Archive']));
    await h.store.upsert(reg('bob', 3, ['INBOX']));
    await h.store.upsert(reg('carol', 4, ['INBOX'], T0 - TTL - 1)); // expired
    await h.sup.start();
    expect(h.factory.liveUsers()).toEqual(['alice', 'bob']);
    expect(h.factory.mailboxes('alice')).toEqual(['INBOX', 'Archive', 'Sent Messages']);
    expect(h.factory.mailboxes('bob')).toEqual(['INBOX']);
    expect(h.sup.watchedUsers()).toEqual(['alice', 'bob']);
    expect(h.sup.mailboxesOf('alice')).toEqual(['INBOX', 'Archive', 'Sent Messages']);
    expect([...h.leases.held].sort()).toEqual(['alice', 'bob']);
    expect(h.timers.intervals()).toEqual([5000, 10_000]); // renew (the lease manager's), reconcile (default)
    expect(await metric(h.registry, 'xaps_watched_users')).toBe(2);
    expect(await metric(h.registry, 'xaps_watchers_capped')).toBe(0);

    // the watcher context: changes go to the sink, states to the store
    const w = h.factory.live().get('alice') as FakeWatcher;
    w.ctx.onChange({ user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1:5', detectedAt: T0, source: 'notify' });
    expect(h.changes).toEqual([{ user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1:5', detectedAt: T0, source: 'notify' }]);
    await w.ctx.states.setMailboxState('alice', 'INBOX', status(1, 5, 4));
    expect(await h.store.getMailboxStates('alice')).toEqual({ INBOX: status(1, 5, 4) });
  });

  it('registrationChanged starts a new user at once and updates mailboxes, without a reconcile pass', async () => {
    const h = await harness();
    await h.store.upsert(reg('alice', 1, ['INBOX']));
    await h.sup.start();
    expect(h.factory.liveUsers()).toEqual(['alice']);

    await h.store.upsert(reg('dave', 5, ['INBOX', 'Work']));
    await h.sup.registrationChanged('dave');
    expect(h.factory.mailboxes('dave')).toEqual(['INBOX', 'Work']);

    const alice = h.factory.live().get('alice') as FakeWatcher;
    await h.store.upsert(reg('alice', 2, ['INBOX', 'Family']));
    await h.sup.registrationChanged('alice');
    expect(alice.calls).toEqual([['INBOX', 'Family']]);
    expect(h.factory.live().get('alice')).toBe(alice); // updated, not restarted

    // a refresh with the same mailboxes changes nothing
    await h.store.upsert(reg('alice', 2, ['Family', 'INBOX'], T0 + 1000));
    await h.sup.registrationChanged('alice');
    expect(alice.calls).toHaveLength(1);
    expect(h.factory.started).toHaveLength(2);
    expect(await metric(h.registry, 'xaps_watched_users')).toBe(2);
  });

  it('stops a watcher and releases the lease when the last registration is removed or expires', async () => {
    const h = await harness();
    await h.store.upsert(reg('alice', 1, ['INBOX'], T0 - TTL + 60_000)); // expires in a minute
    await h.store.upsert(reg('bob', 2, ['INBOX', 'Sent']));
    await h.store.upsert(reg('bob', 3, ['INBOX']));
    await h.sup.start();
    expect(h.factory.liveUsers()).toEqual(['alice', 'bob']);

    await h.store.remove('bob', tokenFor(2));
    await h.sup.reconcile();
    expect(h.factory.mailboxes('bob')).toEqual(['INBOX']); // one device left: its mailboxes only
    await h.store.remove('bob', tokenFor(3));
    h.timers.fire(10_000); // the reconcile timer
    await settle();
    expect(h.factory.liveUsers()).toEqual(['alice']);
    expect(h.leases.released).toEqual(['bob']);

    h.clock.now += 61_000; // alice's registration expired
    await h.sup.reconcile();
    expect(h.factory.liveUsers()).toEqual([]);
    expect(h.leases.released).toEqual(['bob', 'alice']);
    expect(h.factory.started.every((w) => w.stopped)).toBe(true);
    expect(await metric(h.registry, 'xaps_watched_users')).toBe(0);

    // registrationChanged for a user whose registration is gone by then starts nothing (and keeps no lease)
    await h.sup.registrationChanged('alice');
    expect(h.factory.liveUsers()).toEqual([]);
    expect(h.leases.held.size).toBe(0);
  });

  it('watches at most maxWatchers users, says so in metrics and a rate-limited log, and fills up when room frees', async () => {
    const h = await harness({ maxWatchers: 2, logIntervalMs: 60_000 });
    for (const [i, u] of ['u1', 'u2', 'u3', 'u4'].entries()) await h.store.upsert(reg(u, i, ['INBOX']));
    await h.sup.start();
    expect(h.factory.liveUsers()).toHaveLength(2);
    expect([...h.leases.held]).toHaveLength(2); // no lease taken for the users turned away: another instance may
    expect(await metric(h.registry, 'xaps_watchers_capped')).toBe(1);
    expect(await metric(h.registry, 'xaps_watchers_cap_hits_total')).toBe(2);
    await h.sup.reconcile();
    await h.sup.renewLeases();
    h.clock.now += 1000;
    await h.sup.reconcile();
    expect(await metric(h.registry, 'xaps_watchers_cap_hits_total')).toBe(2); // once per user, not per pass
    const capLogs = (): number => h.log.lines().filter((l) => String(l.msg).startsWith('watcher cap reached')).length;
    expect(capLogs()).toBe(1);
    h.clock.now += 60_000;
    await h.sup.reconcile();
    expect(capLogs()).toBe(2);

    // a new registration while capped stays unwatched here
    await h.store.upsert(reg('u5', 5, ['INBOX']));
    await h.sup.registrationChanged('u5');
    expect(h.factory.liveUsers()).not.toContain('u5');
    expect(await metric(h.registry, 'xaps_watchers_cap_hits_total')).toBe(3);

    // room frees: the next pass takes a waiting user
    const [first, second] = h.factory.liveUsers() as [string, string];
    for (const u of [first, second]) await h.store.remove(u, tokenFor(Number(u.slice(1)) - 1));
    await h.sup.reconcile();
    expect(h.factory.liveUsers()).toHaveLength(2);
    expect(h.factory.liveUsers()).not.toContain(first);
    expect(await metric(h.registry, 'xaps_watchers_capped')).toBe(1); // 3 users left, 2 watched
    const [third] = h.factory.liveUsers() as [string];
    await h.store.remove(third, tokenFor(third === 'u5' ? 5 : Number(third.slice(1)) - 1));
    await h.sup.renewLeases(); // the renew tick renews and takes free users, but only a reconcile notices removals
    expect(h.factory.liveUsers()).toContain(third);
    await h.sup.reconcile();
    expect(h.factory.liveUsers()).not.toContain(third);
    expect(h.factory.liveUsers()).toHaveLength(2);
    expect(await metric(h.registry, 'xaps_watchers_capped')).toBe(0);
    expect(h.sup.stats()).toMatchObject({ watched: 2, capped: 0 });
  });

  it('never exceeds the cap when many registrations arrive at once', async () => {
    const h = await harness({ maxWatchers: 5, concurrency: 8 });
    await h.sup.start();
    const users = Array.from({ length: 40 }, (_, i) => `c${i}`);
    await Promise.all(users.map((u, i) => h.store.upsert(reg(u, i, ['INBOX']))));
    await Promise.all([...users.map((u) => h.sup.registrationChanged(u)), h.sup.reconcile(), h.sup.renewLeases()]);
    expect(h.factory.liveUsers()).toHaveLength(5);
    expect(h.factory.started).toHaveLength(5);
    expect(h.leases.held.size).toBe(5);
    expect(await metric(h.registry, 'xaps_watchers_cap_hits_total')).toBe(35);
  });

  it('drops a watcher whose lease was lost (without releasing it) and counts a hand-over when it gets it back', async () => {
    const h = await harness();
    await h.store.upsert(reg('alice', 1, ['INBOX']));
    await h.store.upsert(reg('bob', 2, ['INBOX']));
    await h.sup.start();
    h.leases.lose.add('alice');
    h.leases.deny.add('alice'); // another instance has it now
    h.timers.fire(5000); // the renew timer
    await settle();
    expect(h.leases.renewed.at(-1)).toEqual(['alice', 'bob']);
    expect(h.factory.liveUsers()).toEqual(['bob']);
    expect(h.leases.released).toEqual([]); // not ours to release
    expect(await metric(h.registry, 'xaps_lease_losses_total')).toBe(1);
    expect(h.sup.stats()).toMatchObject({ watched: 1, elsewhere: 1, capped: 0 });

    // the other instance goes away: its lease frees, the next renew tick takes the user over
    h.leases.lose.clear();
    h.leases.deny.clear();
    await h.sup.renewLeases();
    expect(h.factory.liveUsers()).toEqual(['alice', 'bob']);
    expect(await metric(h.registry, 'xaps_lease_handovers_total')).toBe(1);
    expect(await metric(h.registry, 'xaps_lease_losses_total')).toBe(1);
  });

  it('leaves users leased by another instance alone and takes them when their lease frees', async () => {
    const h = await harness();
    await h.store.upsert(reg('alice', 1, ['INBOX']));
    await h.store.upsert(reg('bob', 2, ['INBOX']));
    h.leases.deny.add('bob');
    await h.sup.start();
    expect(h.factory.liveUsers()).toEqual(['alice']);
    await h.sup.registrationChanged('bob');
    expect(h.factory.liveUsers()).toEqual(['alice']);
    expect(await metric(h.registry, 'xaps_watchers_capped')).toBe(0);
    h.leases.deny.delete('bob');
    h.timers.fire(5000);
    await settle();
    expect(h.factory.liveUsers()).toEqual(['alice', 'bob']);
    expect(await metric(h.registry, 'xaps_lease_handovers_total')).toBe(1);
  });

  it('survives store, lease and watcher failures: logs them and retries on the next tick', async () => {
    const h = await harness({ logIntervalMs: 1 });
    await h.store.upsert(reg('alice', 1, ['INBOX']));
    let broken = true;
    let listBroken = false;
    const real = h.store;
    const flaky = Object.assign(Object.create(real) as RegistrationStore, {
      listUsers: () => (broken ? Promise.reject(new Error('disk on fire')) : real.listUsers()),
      listByUser: (u: string) => (broken || listBroken ? Promise.reject(new Error('disk on fire')) : real.listByUser(u)),
    });
    const sup = h.make({ store: flaky });
    await sup.start(); // does not throw
    expect(h.factory.liveUsers()).toEqual([]);
    expect(h.timers.intervals()).toEqual([5000, 10_000]);
    h.timers.fire(10_000);
    h.timers.fire(5000);
    await settle();
    expect(h.log.lines().some((l) => String(l.msg).startsWith('cannot list registered users') && l.level === 40)).toBe(true);

    broken = false;
    h.leases.failAcquire = true;
    h.timers.fire(10_000);
    await settle();
    expect(h.factory.liveUsers()).toEqual([]);
    expect(h.log.lines().some((l) => String(l.msg).startsWith('cannot take or check a watcher lease'))).toBe(true);

    h.leases.failAcquire = false;
    h.factory.failFor.add('alice');
    h.clock.now += 10;
    await sup.reconcile();
    expect(h.factory.liveUsers()).toEqual([]);
    expect(h.leases.held.size).toBe(0); // released again: another instance may do better
    expect(h.log.lines().some((l) => String(l.msg).startsWith('cannot start a watcher'))).toBe(true);

    h.factory.failFor.clear();
    h.timers.fire(5000);
    await settle();
    expect(h.factory.liveUsers()).toEqual(['alice']);

    // renew failing (a lease manager that throws): watchers stay, no loss counted
    h.leases.failRenew = true;
    h.timers.fire(5000);
    await settle();
    expect(h.factory.liveUsers()).toEqual(['alice']);
    expect(await metric(h.registry, 'xaps_lease_losses_total')).toBe(0);

    // a listByUser failure while watching keeps the watcher
    listBroken = true;
    h.clock.now += 10;
    await sup.reconcile();
    expect(h.factory.liveUsers()).toEqual(['alice']);
    expect(h.log.lines().some((l) => String(l.msg).startsWith('cannot read registrations'))).toBe(true);
    listBroken = false;
  });

  it('keeps a failing change sink away from the watcher', async () => {
    const h = await harness();
    await h.store.upsert(reg('alice', 1, ['INBOX']));
    const sup = h.make({ onChange: () => { throw new Error('sink broke'); } });
    await sup.start();
    const w = h.factory.live().get('alice') as FakeWatcher;
    expect(() => w.ctx.onChange({ user: 'alice', mailbox: 'INBOX', changeId: 'x', detectedAt: 0, source: 'idle' })).not.toThrow();
    expect(h.log.lines().some((l) => l.msg === 'change sink failed' && l.user === 'alice')).toBe(true);
  });

  it('stop() stops every watcher, releases the leases and the timers; nothing happens afterwards', async () => {
    const h = await harness();
    for (const [i, u] of ['a', 'b', 'c'].entries()) await h.store.upsert(reg(u, i, ['INBOX']));
    await h.sup.start();
    expect(h.factory.liveUsers()).toEqual(['a', 'b', 'c']);
    await h.sup.stop();
    expect(h.factory.liveUsers()).toEqual([]);
    expect([...h.leases.released].sort()).toEqual(['a', 'b', 'c']);
    expect(h.timers.active.size).toBe(0);
    expect(await metric(h.registry, 'xaps_watched_users')).toBe(0);
    await h.store.upsert(reg('d', 9, ['INBOX']));
    await h.sup.registrationChanged('d');
    await h.sup.reconcile();
    await h.sup.renewLeases();
    expect(h.factory.started).toHaveLength(3);
    await h.sup.stop(); // idempotent
  });

  it('stop() while a pass is running leaves no watcher behind', async () => {
    const h = await harness();
    for (let i = 0; i < 30; i++) await h.store.upsert(reg(`u${i}`, i, ['INBOX']));
    const sup = h.make({ concurrency: 2 });
    const starting = sup.start();
    await new Promise<void>((r) => setImmediate(r));
    await sup.stop();
    await starting;
    expect(h.factory.liveUsers()).toEqual([]);
    expect(h.leases.held.size).toBe(0);
  });

  it('does nothing in events mode (no factory): no watchers, no leases', async () => {
    const h = await harness();
    await h.store.upsert(reg('alice', 1, ['INBOX']));
    const sup = h.make({ factory: null });
    await sup.start();
    await sup.registrationChanged('alice');
    await sup.reconcile();
    await sup.renewLeases();
    expect(h.leases.held.size).toBe(0);
    expect(h.timers.active.size).toBe(0);
    expect(sup.watchedUsers()).toEqual([]);
    await sup.stop();
  });

  it('works with the LocalLeaseManager of the embedded store (single instance)', async () => {
    const h = await harness();
    await h.store.upsert(reg('alice', 1, ['INBOX', 'Archive']));
    const leases = new LocalLeaseManager({ instanceId: 'solo' });
    const sup = h.make({ leases });
    await sup.start();
    expect(h.factory.mailboxes('alice')).toEqual(['INBOX', 'Archive']);
    expect(await leases.renew(['alice'])).toEqual([]);
    await sup.renewLeases();
    expect(h.factory.liveUsers()).toEqual(['alice']);
    await sup.stop();
    expect(h.factory.liveUsers()).toEqual([]);
  });
});
