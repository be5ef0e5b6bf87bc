/**
 * Mailbox states in the embedded store (the contract itself runs in embedded.test.ts via contract.ts): durability
 * (journal, snapshot, reopen), the journal format (`mbx.put`, older journals), group commit, the read-only view,
 * and a model check mixing registrations and states.
 */
import { promises as fsp } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { afterEach, describe, expect, it } from 'vitest';
import { EmbeddedReadOnlyStore, StoreReadOnlyError } from '../../../src/store/embedded-readonly.js';
import { EmbeddedRegistrationStore, type EmbeddedStoreOptions } from '../../../src/store/embedded.js';
import { createStore } from '../../../src/store/index.js';
import { encodeLine, parseLines, type RecordBase } from '../../../src/store/records.js';
import { StoreCorruptError, StoreUnavailableError, type MailboxStatus } from '../../../src/store/types.js';
import { CONTRACT_TTL_MS, inputFor, status, tokenFor } from './contract.js';

const DAY = 24 * 3600 * 1000;
const TTL = 30 * DAY;

const dirs: string[] = [];
const stores: Array<{ close(): Promise<void> }> = [];
async function tempDir(): Promise<string> {
  const d = await fsp.realpath(await fsp.mkdtemp(path.join(os.tmpdir(), 'xaps-mbx-')));
  dirs.push(d);
  return d;
}
afterEach(async () => {
  for (const s of stores.splice(0)) await s.close().catch(() => undefined);
  for (const d of dirs.splice(0)) await fsp.rm(d, { recursive: true, force: true });
});

async function open(dir: string, opts: Partial<EmbeddedStoreOptions> = {}): Promise<EmbeddedRegistrationStore> {
  const s = await EmbeddedRegistrationStore.open({ dataDir: dir, ttlMs: TTL, ...opts });
  stores.push(s);
  return s;
}

async function records(file: string): Promise<RecordBase[]> {
  return parseLines(await fsp.readFile(file), file).lines.map((l) => l.rec);
}

/** Wraps the store's journal handle so a test can count, delay or fail its calls. */
function instrumentJournal(
  store: EmbeddedRegistrationStore,
  hooks: { write?: () => void; datasync?: () => Promise<void> | void },
): void {
  const holder = store as unknown as { journal: FileHandle };
  const real = holder.journal;
  holder.journal = new Proxy(real, {
    get(target, prop) {
      const v = Reflect.get(target, prop) as unknown;
      if (typeof v !== 'function') return v;
      return async (...args: unknown[]) => {
        if (prop === 'write') hooks.write?.();
        if (prop === 'datasync') await hooks.datasync?.();
        return (v as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
}

async function until(what: string, cond: () => boolean): Promise<void> {
  for (let i = 0; i < 2000 && !cond(); i++) await new Promise((r) => setTimeout(r, 5));
  if (!cond()) throw new Error(`timed out waiting for ${what}`);
}

describe('embedded store: mailbox state persistence', () => {
  it('keeps states across close and reopen (journal replay), and via createStore', async () => {
    const dir = await tempDir();
    const s1 = await open(dir);
    await s1.upsert(inputFor('alice', 1));
    await s1.upsert(inputFor('bob', 2));
    await s1.setMailboxState('alice', 'INBOX', status(10, 5, 4));
    await s1.setMailboxState('alice', 'Entwürfe', status(11, 2, 1));
    await s1.setMailboxState('alice', 'INBOX', status(10, 6, 5));
    await s1.setMailboxState('bob', 'INBOX', status(20, 1, 0));
    await s1.close();

    const s2 = await createStore({ dataDir: dir, ttlMs: TTL });
    stores.push(s2);
    expect(await s2.getMailboxStates('alice')).toEqual({ INBOX: status(10, 6, 5), Entwürfe: status(11, 2, 1) });
    expect(await s2.getMailboxStates('bob')).toEqual({ INBOX: status(20, 1, 0) });
    await s2.close();
  });

  it('writes mbx.put journal lines in the documented format', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    await s.upsert(inputFor('alice', 1));
    await s.setMailboxState('alice', 'INBOX', status(7, 42, 41));
    const recs = await records(s.journalFile);
    expect(recs.map((r) => r.type)).toEqual(['journal', 'reg.put', 'mbx.put']);
    expect(recs[0]).toMatchObject({ format: 1 });
    expect(recs[2]).toEqual({ type: 'mbx.put', user: 'alice', mailbox: 'INBOX', status: { uidValidity: 7, uidNext: 42, messages: 41 } });
  });

  it('writes nothing for an unchanged status or a user without registrations', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    await s.upsert(inputFor('alice', 1));
    await s.setMailboxState('alice', 'INBOX', status(7, 42, 41));
    const size = (await fsp.stat(s.journalFile)).size;
    await s.setMailboxState('alice', 'INBOX', status(7, 42, 41));
    await s.setMailboxState('ghost', 'INBOX', status(1, 1, 0));
    expect((await fsp.stat(s.journalFile)).size).toBe(size);
    await s.setMailboxState('alice', 'INBOX', status(7, 43, 42));
    expect((await fsp.stat(s.journalFile)).size).toBeGreaterThan(size);
  });

  it('keeps states in the snapshot (after the registrations) and replays snapshot + journal', async () => {
    const dir = await tempDir();
    const s1 = await open(dir);
    const now = Date.now();
    await s1.upsert(inputFor('alice', 1, { now }));
    await s1.upsert(inputFor('bob', 2, { now }));
    await s1.setMailboxState('alice', 'INBOX', status(1, 10, 9));
    await s1.setMailboxState('alice', 'Archive', status(2, 3, 2));
    await s1.setMailboxState('bob', 'INBOX', status(3, 4, 3));
    await s1.compact();
    const snap = await records(s1.snapshotFile);
    expect(snap[0]).toMatchObject({ type: 'snapshot', format: 1, records: 5 });
    expect(snap.slice(1).map((r) => `${r.type} ${String(r.user ?? (r.reg as { user: string }).user)} ${String(r.mailbox ?? '')}`)).toEqual([
      'reg.put alice ', 'reg.put bob ', 'mbx.put alice Archive', 'mbx.put alice INBOX', 'mbx.put bob INBOX',
    ]);
    await s1.setMailboxState('bob', 'INBOX', status(3, 5, 4)); // in the journal after the snapshot
    await s1.close();

    const s2 = await open(dir);
    expect(await s2.getMailboxStates('alice')).toEqual({ INBOX: status(1, 10, 9), Archive: status(2, 3, 2) });
    expect(await s2.getMailboxStates('bob')).toEqual({ INBOX: status(3, 5, 4) });
  });

  it('compaction drops the states of users whose registrations all expired', async () => {
    const dir = await tempDir();
    let now = Date.now();
    const s1 = await open(dir, { ttlMs: CONTRACT_TTL_MS, clock: () => now });
    await s1.upsert(inputFor('alice', 1, { now }));
    await s1.upsert(inputFor('carol', 2, { now: now - CONTRACT_TTL_MS + 60_000 }));
    await s1.setMailboxState('alice', 'INBOX', status(1, 2, 1));
    await s1.setMailboxState('carol', 'INBOX', status(3, 4, 3));
    now += 120_000; // carol expired, not purged
    expect(await s1.getMailboxStates('carol')).toEqual({ INBOX: status(3, 4, 3) });
    await s1.compact();
    expect(await s1.getMailboxStates('carol')).toEqual({});
    expect(await s1.getMailboxStates('alice')).toEqual({ INBOX: status(1, 2, 1) });
    expect((await records(s1.snapshotFile)).filter((r) => r.type === 'mbx.put')).toHaveLength(1);
    await s1.close();
    const s2 = await open(dir, { ttlMs: CONTRACT_TTL_MS, clock: () => now });
    expect(await s2.getMailboxStates('carol')).toEqual({});
    expect(await s2.getMailboxStates('alice')).toEqual({ INBOX: status(1, 2, 1) });
  });

  it('a removal of the last registration drops the states for good (after reopen too)', async () => {
    const dir = await tempDir();
    const s1 = await open(dir);
    await s1.upsert(inputFor('alice', 1));
    await s1.setMailboxState('alice', 'INBOX', status(1, 2, 1));
    expect(await s1.remove('alice', tokenFor(1))).toBe(true);
    await s1.upsert(inputFor('alice', 2)); // back, without states
    await s1.close();
    const s2 = await open(dir);
    expect(await s2.getMailboxStates('alice')).toEqual({});
    await s2.compact();
    await s2.close();
    const s3 = await open(dir);
    expect(await s3.getMailboxStates('alice')).toEqual({});
    expect((await s3.listByUser('alice')).map((r) => r.deviceToken)).toEqual([tokenFor(2)]);
  });

  it('loads a journal written before mailbox states existed, then takes states', async () => {
    const dir = await tempDir();
    const reg = { ...inputFor('alice', 1), firstSeen: Date.now(), lastSeen: Date.now() };
    await fsp.writeFile(path.join(dir, 'store.journal'), Buffer.concat([
      encodeLine({ type: 'journal', format: 1, gen: 0 }),
      encodeLine({ type: 'reg.put', reg }),
    ]));
    const s1 = await open(dir);
    expect(await s1.get('alice', tokenFor(1))).toEqual(reg);
    expect(await s1.getMailboxStates('alice')).toEqual({});
    await s1.setMailboxState('alice', 'INBOX', status(5, 6, 5));
    await s1.close();
    const s2 = await open(dir);
    expect(await s2.getMailboxStates('alice')).toEqual({ INBOX: status(5, 6, 5) });
  });

  it('refuses a malformed mbx.put record, naming the file and offset', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    await s.upsert(inputFor('alice', 1));
    await s.close();
    const file = path.join(dir, 'store.journal');
    const at = (await fsp.stat(file)).size;
    await fsp.appendFile(file, encodeLine({ type: 'mbx.put', user: 'alice', mailbox: 'INBOX', status: { uidValidity: 'x' } }));
    const err = await open(dir).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StoreCorruptError);
    expect((err as StoreCorruptError).offset).toBe(at);
    expect((err as Error).message).toMatch(/malformed mailbox state record/);
  });

  it('drops a torn final mbx.put (never acknowledged)', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    await s.upsert(inputFor('alice', 1));
    await s.setMailboxState('alice', 'INBOX', status(1, 2, 1));
    await s.close();
    const line = encodeLine({ type: 'mbx.put', user: 'alice', mailbox: 'INBOX', status: status(1, 3, 2) });
    await fsp.appendFile(path.join(dir, 'store.journal'), line.subarray(0, line.length - 5));
    const s2 = await open(dir);
    expect(await s2.getMailboxStates('alice')).toEqual({ INBOX: status(1, 2, 1) });
  });
});

describe('embedded store: mailbox state write path', () => {
  it('group-commits concurrent state writes and resolves each only after its fsync', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    for (let u = 0; u < 5; u++) await s.upsert(inputFor(`u${u}`, u));
    let syncs = 0;
    let gate: (() => void) | undefined;
    let hold = true;
    instrumentJournal(s, {
      datasync: async () => {
        syncs++;
        if (hold) await new Promise<void>((r) => (gate = r));
      },
    });
    await new Promise((r) => setImmediate(r)); // the writer is idle: the first write starts a batch of its own
    let resolved = 0;
    const writes = Array.from({ length: 200 }, (_, i) =>
      s.setMailboxState(`u${i % 5}`, `box${i}`, status(1, i + 1, i)).then(() => void resolved++));
    await until('the first fsync', () => syncs === 1);
    await new Promise((r) => setTimeout(r, 20));
    expect(syncs).toBe(1); // the first batch is waiting for its fsync
    expect(resolved).toBe(0); // nothing acknowledged before it
    hold = false;
    gate?.();
    await Promise.all(writes);
    expect(resolved).toBe(200);
    expect(syncs).toBeGreaterThan(1); // the rest went in later batch(es)
    expect(syncs).toBeLessThan(200);
    await s.close();
    const s2 = await open(dir);
    for (let u = 0; u < 5; u++) expect(Object.keys(await s2.getMailboxStates(`u${u}`))).toHaveLength(40);
  });

  it('rejects a state write the disk refused, keeps the old state, and goes on afterwards', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    await s.upsert(inputFor('alice', 1));
    await s.setMailboxState('alice', 'INBOX', status(1, 2, 1));
    let fail = true;
    instrumentJournal(s, {
      write: () => {
        if (fail) throw Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' });
      },
    });
    await expect(s.setMailboxState('alice', 'INBOX', status(1, 3, 2))).rejects.toBeInstanceOf(StoreUnavailableError);
    expect(await s.getMailboxStates('alice')).toEqual({ INBOX: status(1, 2, 1) });
    fail = false;
    await s.setMailboxState('alice', 'INBOX', status(1, 4, 3));
    await s.close();
    const s2 = await open(dir);
    expect(await s2.getMailboxStates('alice')).toEqual({ INBOX: status(1, 4, 3) });
  });

  it('applies a batch in order: a state written before the last registration goes is dropped with it', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    await s.upsert(inputFor('alice', 1));
    await s.setMailboxState('alice', 'Old', status(9, 9, 9));
    // one batch: state, removal of the last registration, state (ignored: no registrations), re-registration, state
    const ops = [
      s.setMailboxState('alice', 'INBOX', status(1, 2, 1)),
      s.remove('alice', tokenFor(1)),
      s.setMailboxState('alice', 'Ignored', status(1, 2, 1)),
      s.upsert(inputFor('alice', 2)),
      s.setMailboxState('alice', 'INBOX', status(1, 5, 4)),
    ];
    await Promise.all(ops);
    const want = { INBOX: status(1, 5, 4) };
    expect(await s.getMailboxStates('alice')).toEqual(want);
    await s.close();
    const s2 = await open(dir);
    expect(await s2.getMailboxStates('alice')).toEqual(want);
  });
});

describe('embedded store: mailbox states in the read-only view', () => {
  it('sees the states as of when it was opened, and refuses to write them', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    await s.upsert(inputFor('alice', 1));
    await s.setMailboxState('alice', 'INBOX', status(1, 2, 1));
    await s.compact();
    await s.setMailboxState('alice', 'Sent', status(3, 4, 3));
    const view = await EmbeddedReadOnlyStore.open({ dataDir: dir, ttlMs: TTL });
    stores.push(view);
    expect(await view.getMailboxStates('alice')).toEqual({ INBOX: status(1, 2, 1), Sent: status(3, 4, 3) });
    const err = await view.setMailboxState('alice', 'INBOX', status(1, 3, 2)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StoreReadOnlyError);
    expect((err as Error).message).toMatch(/setMailboxState/);
    await s.setMailboxState('alice', 'INBOX', status(1, 9, 8));
    expect(await view.getMailboxStates('alice')).toEqual({ INBOX: status(1, 2, 1), Sent: status(3, 4, 3) });

    // and through createStore's fallback while the directory is locked
    const fallback = await createStore({ dataDir: dir, ttlMs: TTL, access: 'read-only-if-locked' });
    stores.push(fallback);
    expect(await fallback.getMailboxStates('alice')).toEqual({ INBOX: status(1, 9, 8), Sent: status(3, 4, 3) });
  });
});

describe('embedded store: mailbox state model check', () => {
  it('matches a simple model after random operations and after reopening', async () => {
    const users = ['a', 'b', '{c}'];
    const op = fc.oneof(
      fc.record({ k: fc.constant('up' as const), user: fc.constantFrom(...users), n: fc.integer({ min: 0, max: 3 }), dt: fc.integer({ min: -2 * CONTRACT_TTL_MS, max: 0 }) }),
      fc.record({ k: fc.constant('rm' as const), user: fc.constantFrom(...users), n: fc.integer({ min: 0, max: 3 }) }),
      fc.record({ k: fc.constant('set' as const), user: fc.constantFrom(...users), box: fc.constantFrom('INBOX', 'Sent', 'Ä'), next: fc.integer({ min: 1, max: 4 }) }),
      fc.record({ k: fc.constant('purge' as const) }),
      fc.record({ k: fc.constant('compact' as const) }),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 30 }), fc.boolean(), async (ops, concurrent) => {
        const dir = await tempDir();
        const now = Date.now();
        const s = await EmbeddedRegistrationStore.open({ dataDir: dir, ttlMs: CONTRACT_TTL_MS, clock: () => now });
        const regs = new Map<string, Map<number, number>>(); // user -> n -> lastSeen
        const states = new Map<string, Map<string, MailboxStatus>>();
        const live = (t: number): boolean => t + CONTRACT_TTL_MS > now;
        const dropIfEmpty = (user: string): void => {
          if ((regs.get(user)?.size ?? 0) === 0) {
            regs.delete(user);
            states.delete(user);
          }
        };
        const pending: Array<Promise<unknown>> = [];
        const run = async (p: Promise<unknown>): Promise<void> => {
          if (concurrent) pending.push(p);
          else await p;
        };
        for (const o of ops) {
          if (o.k === 'up') {
            let m = regs.get(o.user);
            if (!m) regs.set(o.user, (m = new Map()));
            m.set(o.n, now + o.dt);
            await run(s.upsert(inputFor(o.user, o.n, { now: now + o.dt })));
          } else if (o.k === 'rm') {
            regs.get(o.user)?.delete(o.n);
            dropIfEmpty(o.user);
            await run(s.remove(o.user, tokenFor(o.n)));
          } else if (o.k === 'set') {
            if (regs.has(o.user)) {
              let m = states.get(o.user);
              if (!m) states.set(o.user, (m = new Map()));
              m.set(o.box, status(1, o.next, o.next - 1));
            }
            await run(s.setMailboxState(o.user, o.box, status(1, o.next, o.next - 1)));
          } else {
            // purge and compaction both drop what expired (and with it the states of emptied users)
            for (const [user, m] of regs) {
              for (const [n, t] of m) if (!live(t)) m.delete(n);
              dropIfEmpty(user);
            }
            await Promise.all(pending.splice(0));
            if (o.k === 'purge') await s.purgeExpired();
            else await s.compact();
          }
        }
        await Promise.all(pending.splice(0));
        const expected = (): Record<string, Record<string, MailboxStatus>> =>
          Object.fromEntries(users.map((u) => [u, Object.fromEntries(states.get(u) ?? [])]));
        const actual = async (st: { getMailboxStates(u: string): Promise<Record<string, MailboxStatus>> }): Promise<unknown> =>
          Object.fromEntries(await Promise.all(users.map(async (u) => [u, await st.getMailboxStates(u)] as const)));
        expect(await actual(s)).toEqual(expected());
        await s.close();
        const s2 = await EmbeddedRegistrationStore.open({ dataDir: dir, ttlMs: CONTRACT_TTL_MS, clock: () => now });
        expect(await actual(s2)).toEqual(expected());
        const view = await EmbeddedReadOnlyStore.open({ dataDir: dir, ttlMs: CONTRACT_TTL_MS, clock: () => now });
        expect(await actual(view)).toEqual(expected());
        await s2.close();
      }),
      { numRuns: 40 },
    );
  });
});
