/**
 * The tracker stores a mailbox's new state only once the change's push is done with (the sink's promise resolved:
 * the dispatcher's notifyAndWait); a watcher that stops meanwhile drops that write, so the next start catches the
 * change up again. The supervisor hands the sink's promise through to the watchers. No timers are involved: promises
 * are controlled by the test and settled with setImmediate rounds.
 */
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Registry } from 'prom-client';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { silentLogger } from '../../../src/ops/log.js';
import { mailboxRef } from '../../../src/store/common.js';
import { EmbeddedRegistrationStore } from '../../../src/store/embedded.js';
import { LocalLeaseManager } from '../../../src/watch/leases.js';
import { WatchSupervisor, type SupervisorTimers } from '../../../src/watch/supervisor.js';
import { MailboxTracker } from '../../../src/watch/tracker.js';
import type { ChangeSink, MailboxChange, MailboxStatus } from '../../../src/watch/types.js';
import { watchMetrics } from '../../../src/watch/watch-metrics.js';
import { FakeFactory, type FakeWatcher } from '../../helpers/fake-watchers.js';
import { inputFor } from '../store/contract.js';

const S = (uidValidity: number, uidNext: number, messages: number): MailboxStatus => ({ uidValidity, uidNext, messages });

async function settle(rounds = 20): Promise<void> {
  for (let i = 0; i < rounds; i++) await new Promise<void>((r) => setImmediate(r));
}

interface Deferred {
  promise: Promise<void>;
  resolve(): void;
  reject(err: Error): void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  let reject!: (err: Error) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** Mailbox states in memory, shared by the trackers of one test (a "restart" is a new tracker on the same states). */
function memoryStates(initial: Record<string, MailboxStatus> = {}) {
  const data: Record<string, MailboxStatus> = { ...initial };
  const writes: Array<[string, MailboxStatus]> = [];
  return {
    data,
    writes,
    async getMailboxStates(): Promise<Record<string, MailboxStatus>> {
      return { ...data };
    },
    async setMailboxState(_u: string, mb: string, s: MailboxStatus): Promise<void> {
      data[mb] = s;
      writes.push([mb, s]);
    },
  };
}

type States = ReturnType<typeof memoryStates>;

/** A tracker whose sink records the change and returns what `answer` gives for it. */
function tracker(states: States, answer: (c: MailboxChange) => unknown) {
  const changes: MailboxChange[] = [];
  const sink: ChangeSink = (c) => {
    changes.push(c);
    return answer(c);
  };
  const t = new MailboxTracker('alice', { onChange: sink, states, log: silentLogger() }, watchMetrics(new Registry()), silentLogger());
  return { t, changes };
}

describe('MailboxTracker: state stored after the push', () => {
  it('writes the new UIDNEXT only once the sink promise resolved', async () => {
    const states = memoryStates({ INBOX: S(1, 3, 2) });
    const push = deferred();
    const { t, changes } = tracker(states, () => push.promise);
    await t.beginCatchUp(['INBOX']);
    expect(t.observe('INBOX', S(1, 3, 2), 'notify')).toBe('unchanged');
    expect(t.observe('INBOX', S(1, 4, 3), 'notify')).toBe('changed');
    expect(changes.map((c) => [c.changeId, c.source])).toEqual([['INBOX:1:4', 'notify']]);
    await settle();
    expect(states.writes).toEqual([]);
    expect(states.data.INBOX).toEqual(S(1, 3, 2));
    push.resolve();
    await settle();
    expect(states.writes).toEqual([['INBOX', S(1, 4, 3)]]);
  });

  it('a catch-up change waits for its push too', async () => {
    const states = memoryStates({ INBOX: S(1, 3, 2) });
    const push = deferred();
    const { t, changes } = tracker(states, () => push.promise);
    await t.beginCatchUp(['INBOX']);
    expect(t.observe('INBOX', S(1, 6, 5), 'notify')).toBe('changed');
    expect(changes.map((c) => c.source)).toEqual(['catch-up']);
    await settle();
    expect(states.writes).toEqual([]);
    push.resolve();
    await settle();
    expect(states.data.INBOX).toEqual(S(1, 6, 5));
  });

  it('a rejected sink promise counts as done with: the state is written, later writes are not blocked', async () => {
    const states = memoryStates({ INBOX: S(1, 3, 2) });
    const push = deferred();
    const { t } = tracker(states, (c) => (c.changeId === 'INBOX:1:4' ? push.promise : Promise.resolve()));
    await t.beginCatchUp(['INBOX']);
    t.observe('INBOX', S(1, 3, 2), 'notify');
    t.observe('INBOX', S(1, 4, 3), 'notify');
    t.observe('INBOX', S(1, 5, 4), 'notify');
    push.reject(new Error('dispatcher broke'));
    await settle();
    expect(states.writes).toEqual([['INBOX', S(1, 4, 3)], ['INBOX', S(1, 5, 4)]]);
  });

  it('writes stay in observation order: a later change answered first is stored after the earlier one', async () => {
    const states = memoryStates({ INBOX: S(1, 3, 2) });
    const first = deferred();
    const { t } = tracker(states, (c) => (c.changeId === 'INBOX:1:4' ? first.promise : Promise.resolve()));
    await t.beginCatchUp(['INBOX']);
    t.observe('INBOX', S(1, 3, 2), 'notify');
    t.observe('INBOX', S(1, 4, 3), 'notify');
    t.observe('INBOX', S(1, 5, 4), 'notify'); // its push is done at once
    await settle();
    expect(states.writes).toEqual([]); // never the newer UIDNEXT before the older change was pushed
    first.resolve();
    await settle();
    expect(states.writes).toEqual([['INBOX', S(1, 4, 3)], ['INBOX', S(1, 5, 4)]]);
    expect(states.data.INBOX).toEqual(S(1, 5, 4));
  });

  it('a catch-up while the push is still out (the mailbox moved to another connection, or it reconnected) does not emit the change again', async () => {
    const states = memoryStates({ INBOX: S(1, 3, 2), Work: S(2, 7, 6) });
    const push = deferred();
    const { t, changes } = tracker(states, () => push.promise);
    await t.beginCatchUp(['INBOX', 'Work']);
    t.observe('INBOX', S(1, 3, 2), 'idle');
    t.observe('Work', S(2, 7, 6), 'idle');
    expect(t.observe('INBOX', S(1, 4, 3), 'idle')).toBe('changed'); // its push is out; the store still says 3
    await settle();
    expect(states.data.INBOX).toEqual(S(1, 3, 2));
    await t.beginCatchUp(['INBOX', 'Work']);
    expect(t.observe('INBOX', S(1, 4, 3), 'poll')).toBe('unchanged'); // was: 'changed', a second push of INBOX:1:4
    expect(t.observe('Work', S(2, 8, 7), 'poll')).toBe('changed'); // mail while the connection changed: caught up
    expect(changes.map((c) => [c.changeId, c.source])).toEqual([
      ['INBOX:1:4', 'idle'],
      ['Work:2:8', 'catch-up'],
    ]);
    push.resolve();
    await settle();
    expect(states.data).toEqual({ INBOX: S(1, 4, 3), Work: S(2, 8, 7) });
    // with the store up to date, what arrived after is caught up as before
    await t.beginCatchUp(['INBOX']);
    expect(t.observe('INBOX', S(1, 5, 4), 'poll')).toBe('changed');
    expect(changes.at(-1)).toMatchObject({ changeId: 'INBOX:1:5', source: 'catch-up' });
  });

  it('stopping (flush) while the push is pending does not wait for it and does not write; the restart catches up', async () => {
    const states = memoryStates({ INBOX: S(1, 3, 2), Work: S(9, 10, 9) });
    const push = deferred();
    const { t } = tracker(states, () => push.promise);
    await t.beginCatchUp(['INBOX', 'Work']);
    t.observe('INBOX', S(1, 3, 2), 'notify');
    t.observe('Work', S(9, 10, 9), 'notify');
    t.observe('INBOX', S(1, 4, 3), 'notify');
    const flushed = await Promise.race([t.flush().then(() => 'flushed' as const), settle().then(() => 'still waiting' as const)]);
    expect(flushed).toBe('flushed');
    expect(states.writes).toEqual([]);
    push.resolve(); // answered after the stop: too late, the watcher is gone
    await settle();
    expect(states.writes).toEqual([]);
    expect(states.data.INBOX).toEqual(S(1, 3, 2));

    // the next start (this process or another) compares with the stored state and pushes the mail again
    const again = tracker(states, () => Promise.resolve());
    await again.t.beginCatchUp(['INBOX', 'Work']);
    expect(again.t.observe('INBOX', S(1, 4, 3), 'notify')).toBe('changed');
    expect(again.t.observe('Work', S(9, 10, 9), 'notify')).toBe('unchanged');
    expect(again.changes.map((c) => [c.changeId, c.source])).toEqual([['INBOX:1:4', 'catch-up']]);
    await settle();
    expect(states.data.INBOX).toEqual(S(1, 4, 3));
  });

  it('flush still writes what needs no push, and what was pushed and reached its turn before the stop', async () => {
    const states = memoryStates();
    const { t } = tracker(states, () => Promise.resolve());
    t.observe('INBOX', S(1, 3, 2), 'notify'); // first sight: stored without a push
    t.observe('INBOX', S(1, 4, 3), 'notify');
    await settle();
    t.observe('Work', S(5, 7, 6), 'notify'); // first sight, queued at the stop
    await t.flush();
    expect(states.writes).toEqual([['INBOX', S(1, 3, 2)], ['INBOX', S(1, 4, 3)], ['Work', S(5, 7, 6)]]);
  });

  // A real bug, left failing on purpose: an observation that changes only MESSAGES (an expunge) while the push of
  // the UIDNEXT rise is pending queues a push-less write of the *new* UIDNEXT behind it. On stop the pending write is
  // dropped but the push-less one goes through, so the store holds the new UIDNEXT although the push never finished:
  // the restart's catch-up sees nothing new and the mail is never pushed.
  it('stopping while the push is pending: a later expunge line must not store the unpushed UIDNEXT', async () => {
    const states = memoryStates({ INBOX: S(1, 3, 2) });
    const push = deferred();
    const { t } = tracker(states, () => push.promise);
    await t.beginCatchUp(['INBOX']);
    t.observe('INBOX', S(1, 3, 2), 'notify');
    expect(t.observe('INBOX', S(1, 4, 3), 'notify')).toBe('changed'); // new mail, push pending
    expect(t.observe('INBOX', { messages: 2 }, 'notify')).toBe('unchanged'); // a message expunged meanwhile
    await t.flush(); // the watcher stops before the push is answered
    await settle();
    expect(states.data.INBOX?.uidNext).toBe(3);

    const again = tracker(states, () => Promise.resolve());
    await again.t.beginCatchUp(['INBOX']);
    again.t.observe('INBOX', S(1, 4, 2), 'notify');
    expect(again.changes.map((c) => [c.changeId, c.source])).toEqual([['INBOX:1:4', 'catch-up']]);
  });

  const immediate: Array<[string, (c: MailboxChange) => unknown]> = [
    ['undefined', () => undefined],
    ['a number', () => 1],
    ['a non-promise object', () => ({ pushed: true })],
    [
      'nothing (it throws)',
      () => {
        throw new Error('sink broke');
      },
    ],
  ];
  for (const [what, answer] of immediate) {
    it(`a sink returning ${what} keeps the immediate write (also through a stop)`, async () => {
      const states = memoryStates({ INBOX: S(1, 3, 2) });
      const { t, changes } = tracker(states, answer);
      await t.beginCatchUp(['INBOX']);
      t.observe('INBOX', S(1, 3, 2), 'notify');
      expect(t.observe('INBOX', S(1, 4, 3), 'notify')).toBe('changed');
      expect(changes).toHaveLength(1);
      await settle(2);
      expect(states.writes).toEqual([['INBOX', S(1, 4, 3)]]);

      t.observe('INBOX', S(1, 5, 4), 'notify');
      await t.flush();
      expect(states.writes).toEqual([['INBOX', S(1, 4, 3)], ['INBOX', S(1, 5, 4)]]);
    });
  }
});

// ---------------------------------------------------------------- supervisor pass-through

const dirs: string[] = [];
const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
  for (const d of dirs.splice(0)) await fsp.rm(d, { recursive: true, force: true });
});

const noTimers: SupervisorTimers = { setInterval: () => 0, clearInterval: () => undefined };

async function supervised(onChange: ChangeSink): Promise<{ store: EmbeddedRegistrationStore; watcher: FakeWatcher }> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'xaps-track-wait-'));
  dirs.push(dir);
  const store = await EmbeddedRegistrationStore.open({ dataDir: dir, ttlMs: 24 * 3600 * 1000 });
  cleanups.push(() => store.close());
  await store.upsert(inputFor('alice', 1, { mailboxes: [mailboxRef('INBOX')] }));
  const factory = new FakeFactory();
  const sup = new WatchSupervisor({ store, factory, leases: new LocalLeaseManager(), onChange, maxWatchers: 10, timers: noTimers, log: silentLogger() });
  cleanups.push(() => sup.stop());
  await sup.start();
  const watcher = factory.live().get('alice');
  if (!watcher) throw new Error('no watcher started for alice');
  return { store, watcher };
}

describe('WatchSupervisor hands the sink result to the watchers', () => {
  const change: MailboxChange = { user: 'alice', mailbox: 'INBOX', changeId: 'INBOX:1:4', detectedAt: 0, source: 'notify' };

  it('returns the sink promise itself, and undefined when the sink throws', async () => {
    const push = deferred();
    const { watcher } = await supervised(() => push.promise);
    expect(watcher.ctx.onChange(change)).toBe(push.promise);
    push.resolve();

    const broken = await supervised(() => {
      throw new Error('sink broke');
    });
    expect(broken.watcher.ctx.onChange(change)).toBeUndefined();
  });

  it('a tracker on the watcher context stores the state in the registration store only after the push', async () => {
    const push = deferred();
    const { store, watcher } = await supervised(() => push.promise);
    const writes = vi.spyOn(store, 'setMailboxState');
    const t = new MailboxTracker('alice', watcher.ctx, watchMetrics(new Registry()), silentLogger());
    t.observe('INBOX', S(1, 3, 2), 'notify'); // first sight: stored at once
    await settle();
    expect(writes).toHaveBeenCalledTimes(1);
    await writes.mock.results[0]!.value;
    expect(await store.getMailboxStates('alice')).toEqual({ INBOX: S(1, 3, 2) });
    t.observe('INBOX', S(1, 4, 3), 'notify');
    await settle();
    expect(writes).toHaveBeenCalledTimes(1);
    expect(await store.getMailboxStates('alice')).toEqual({ INBOX: S(1, 3, 2) });
    push.resolve();
    await settle();
    expect(writes).toHaveBeenCalledTimes(2);
    await writes.mock.results[1]!.value;
    expect(await store.getMailboxStates('alice')).toEqual({ INBOX: S(1, 4, 3) });
  });
});
