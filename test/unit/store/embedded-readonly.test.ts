import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { mailboxRef } from '../../../src/store/common.js';
import { EmbeddedReadOnlyStore, StoreReadOnlyError } from '../../../src/store/embedded-readonly.js';
import { EmbeddedRegistrationStore, type EmbeddedStoreOptions } from '../../../src/store/embedded.js';
import { createStore } from '../../../src/store/index.js';
import { encodeLine } from '../../../src/store/records.js';
import { StoreCorruptError, StoreLockedError, StoreUnavailableError, type Registration } from '../../../src/store/types.js';
import { inputFor, tokenFor } from './contract.js';
import { crashRegistration } from './fixtures/crash-data.js';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const FIXTURES = fileURLToPath(new URL('./fixtures/', import.meta.url));
const DAY = 24 * 3600 * 1000;
const TTL = 30 * DAY;

const dirs: string[] = [];
const children: ChildProcess[] = [];
const stores: Array<{ close(): Promise<void> }> = [];
async function tempDir(): Promise<string> {
  const d = await fsp.realpath(await fsp.mkdtemp(path.join(os.tmpdir(), 'xaps-store-ro-')));
  dirs.push(d);
  return d;
}
afterEach(async () => {
  vi.restoreAllMocks();
  for (const s of stores.splice(0)) await s.close().catch(() => undefined);
  for (const c of children.splice(0)) {
    if (c.exitCode === null && c.signalCode === null && c.pid !== undefined) c.kill('SIGKILL');
  }
  for (const d of dirs.splice(0)) await fsp.rm(d, { recursive: true, force: true });
});

async function open(dir: string, opts: Partial<EmbeddedStoreOptions> = {}): Promise<EmbeddedRegistrationStore> {
  const s = await EmbeddedRegistrationStore.open({ dataDir: dir, ttlMs: TTL, ...opts });
  stores.push(s);
  return s;
}

function openView(dir: string, opts: { loadAttempts?: number; holderPid?: number } = {}): Promise<EmbeddedReadOnlyStore> {
  return EmbeddedRegistrationStore.openReadOnly({ dataDir: dir, ttlMs: TTL, ...opts });
}

function spawnTs(script: string, args: string[]): ChildProcess {
  const child = spawn(process.execPath, ['--import', 'tsx', path.join(FIXTURES, script), ...args], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(child);
  return child;
}

/** Names, sizes, mtimes, inodes and contents of everything in `dir`, and the directory's own mtime. */
async function dirState(dir: string): Promise<unknown> {
  const names = (await fsp.readdir(dir)).sort();
  const files = await Promise.all(names.map(async (name) => {
    const file = path.join(dir, name);
    const st = await fsp.stat(file);
    return { name, size: st.size, mtimeNs: st.mtimeMs, ino: st.ino, sha: createHash('sha256').update(await fsp.readFile(file)).digest('hex') };
  }));
  return { files, dirMtimeMs: (await fsp.stat(dir)).mtimeMs };
}

const tokens = (regs: Registration[]): string[] => regs.map((r) => r.deviceToken);

describe('embedded store: read-only view', () => {
  it('reads a store held open by this process, including a write made after a compaction, as of when it was opened', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    const now = Date.now();
    await s.upsert(inputFor('alice', 1, { now: now - 1000, mailboxes: [mailboxRef('INBOX'), mailboxRef('Entwürfe')] }));
    await s.upsert(inputFor('alice', 1, { now }));
    await s.upsert(inputFor('bob', 2, { now }));
    await s.upsert(inputFor('old', 3, { now: now - 40 * DAY }));
    await s.compact();
    await s.upsert(inputFor('carol', 4, { now })); // only in the journal of the new generation
    await s.remove('bob', tokenFor(2));

    const view = await openView(dir);
    expect(view.kind).toBe('embedded');
    expect(view.readOnly).toBe(true);
    expect(view.holderPid).toBe(process.pid); // from store.lock
    expect(view.gen).toBe(1);
    expect(await view.listAll()).toEqual(await s.listAll());
    expect(await view.get('carol', tokenFor(4))).toEqual(await s.get('carol', tokenFor(4)));
    expect((await view.get('alice', tokenFor(1)))?.firstSeen).toBe(now - 1000);
    expect(await view.get('bob', tokenFor(2))).toBeNull();
    expect(await view.listUsers()).toEqual(['alice', 'carol']);
    expect(tokens(await view.listByUser('alice'))).toEqual([tokenFor(1)]);
    expect(await view.counts()).toEqual({ users: 2, registrations: 2 });
    await view.ping();

    // a point-in-time view: later writes are not in it, a new view has them
    await s.upsert(inputFor('dave', 5, { now }));
    expect(await view.get('dave', tokenFor(5))).toBeNull();
    const again = await openView(dir);
    expect(await again.get('dave', tokenFor(5))).not.toBeNull();
    await again.close();

    await view.close();
    await expect(view.listAll()).rejects.toBeInstanceOf(StoreUnavailableError);
    await expect(view.ping()).rejects.toThrow(/closed/);
    await s.upsert(inputFor('erin', 6)); // the owner is unaffected
  });

  it('rejects writes with a clear error naming the directory and the owner, and writes nothing', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    await s.upsert(inputFor('alice', 1, { now: Date.now() - 40 * DAY }));
    const before = await dirState(dir);
    const view = await openView(dir);
    for (const attempt of [
      () => view.upsert(inputFor('alice', 2)),
      () => view.remove('alice', tokenFor(1)),
      () => view.purgeExpired(),
    ]) {
      const err = await attempt().catch((e: unknown) => e);
      expect(err).toBeInstanceOf(StoreReadOnlyError);
      expect(err).toBeInstanceOf(StoreUnavailableError);
      expect((err as Error).message).toMatch(new RegExp(
        `^read-only view of ${dir.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: the store is in use by the running proxy \\(pid ${process.pid}\\); ` +
          '(upsert|remove|purgeExpired) needs exclusive access: stop the proxy first, or use Redis',
      ));
      expect((err as StoreReadOnlyError).pid).toBe(process.pid);
      expect((err as StoreReadOnlyError).dir).toBe(dir);
    }
    expect(await dirState(dir)).toEqual(before);
    expect(await s.purgeExpired()).toBe(1); // the owner still has it
    await view.close();
    await expect(view.upsert(inputFor('alice', 2))).rejects.toThrow(/closed/);
  });

  it('says so when it was opened without anyone holding the store', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    await s.close();
    const view = await openView(dir);
    expect(view.holderPid).toBeUndefined();
    await expect(view.remove('a', tokenFor(1))).rejects.toThrow(`read-only view of ${dir}: it was opened without the store lock; remove needs exclusive access`);
  });

  it('creates, changes and deletes nothing: torn tail, leftover temp files and a superseded journal stay as they are', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    const now = Date.now();
    for (let i = 0; i < 5; i++) await s.upsert(inputFor(`u${i % 2}`, i, { now }));
    const oldJournal = await fsp.readFile(path.join(dir, 'store.journal'));
    await s.compact();
    await s.upsert(inputFor('late', 9, { now }));
    const journal = path.join(dir, 'store.journal');
    const torn = encodeLine({ type: 'reg.put', reg: { ...inputFor('torn', 1), firstSeen: 1, lastSeen: now } });
    await fsp.appendFile(journal, torn.subarray(0, torn.length - 15)); // a write in progress
    await fsp.writeFile(path.join(dir, 'store.journal.tmp'), 'half a compaction');
    await fsp.writeFile(path.join(dir, 'store.snapshot.tmp'), 'half a compaction');
    // let every mtime settle in the past, so that a rewrite with the same content would show
    await new Promise((r) => setTimeout(r, 20));

    const before = await dirState(dir);
    const view = await openView(dir);
    expect(tokens(await view.listAll())).toEqual([tokenFor(9), tokenFor(0), tokenFor(2), tokenFor(4), tokenFor(1), tokenFor(3)]);
    expect(await view.get('torn', tokenFor(1))).toBeNull();
    await view.close();
    expect(await dirState(dir)).toEqual(before);

    // a journal older than the snapshot (crash between the two renames): the snapshot alone, nothing rewritten
    await s.close();
    await fsp.writeFile(journal, oldJournal);
    const before2 = await dirState(dir);
    const view2 = await openView(dir, { loadAttempts: 2 });
    expect(tokens(await view2.listAll())).toEqual([tokenFor(0), tokenFor(2), tokenFor(4), tokenFor(1), tokenFor(3)]);
    expect(await dirState(dir)).toEqual(before2);

    // an empty directory is an empty store, and stays empty; a missing one is an error, and stays missing
    const empty = await tempDir();
    const emptyBefore = await dirState(empty);
    expect(await (await openView(empty)).counts()).toEqual({ users: 0, registrations: 0 });
    expect(await dirState(empty)).toEqual(emptyBefore);
    const missing = path.join(empty, 'nope');
    await expect(openView(missing)).rejects.toThrow(new StoreUnavailableError(`no embedded store in ${missing}: the directory does not exist`));
    await expect(fsp.stat(missing)).rejects.toThrow(/ENOENT/);
  });

  it('still reports real damage as StoreCorruptError, naming the file and offset', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    for (let i = 0; i < 10; i++) await s.upsert(inputFor('alice', i));
    const file = path.join(dir, 'store.journal');
    const buf = await fsp.readFile(file);
    const second = buf.indexOf(0x0a) + 1;
    await fsp.writeFile(file, Buffer.concat([buf.subarray(0, second), Buffer.from('garbage\n'), buf.subarray(second)]));
    const before = await dirState(dir);
    const err = await openView(dir).catch((e: unknown) => e); // default attempts: retried, then thrown
    expect(err).toBeInstanceOf(StoreCorruptError);
    expect((err as StoreCorruptError).file).toBe(file);
    expect((err as StoreCorruptError).offset).toBe(second);
    expect(await dirState(dir)).toEqual(before);
    await fsp.writeFile(file, buf);

    // an unknown record type in a complete line
    await s.close();
    await fsp.appendFile(file, encodeLine({ type: 'from.the.future', x: 1 }));
    await expect(openView(dir, { loadAttempts: 2 })).rejects.toThrow(/unknown record type "from.the.future"/);
    await fsp.writeFile(file, buf);

    // a journal newer than the snapshot stays an error after the retries
    const s2 = await open(dir);
    await s2.compact();
    await s2.compact();
    const snap = path.join(dir, 'store.snapshot');
    await s2.close();
    await fsp.writeFile(file, encodeLine({ type: 'journal', format: 1, gen: 7 }));
    await expect(openView(dir, { loadAttempts: 3 })).rejects.toThrow(/journal generation 7 is newer than snapshot generation 2/);
    // and a snapshot without its journal
    await fsp.rm(file);
    await expect(openView(dir, { loadAttempts: 2 })).rejects.toThrow(/journal is missing but snapshot/);
    await fsp.truncate(snap, 40);
    await expect(openView(dir, { loadAttempts: 2 })).rejects.toBeInstanceOf(StoreCorruptError);
  });

  it('retries when the owner compacts between its reads of the journal and the snapshot', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    const now = Date.now();
    await s.upsert(inputFor('alice', 1, { now }));
    await s.upsert(inputFor('alice', 2, { now }));
    await s.remove('alice', tokenFor(2));
    const journal = path.join(dir, 'store.journal');
    const realReadFile = fsp.readFile.bind(fsp) as (file: string, ...rest: unknown[]) => Promise<Buffer | string>;
    const reads: string[] = [];
    let raced = false;
    vi.spyOn(fsp, 'readFile').mockImplementation((async (file: string, ...rest: unknown[]) => {
      const out = await realReadFile(file, ...rest);
      reads.push(path.basename(String(file)));
      if (!raced && String(file) === journal) {
        // the view holds journal gen 0; the owner now compacts to gen 1 and writes into the new journal
        raced = true;
        await s.compact();
        await s.upsert(inputFor('bob', 3, { now }));
      }
      return out;
    }) as never);
    const view = await openView(dir);
    vi.restoreAllMocks();
    expect(raced).toBe(true);
    expect(reads.filter((r) => r.startsWith('store.journal') || r.startsWith('store.snapshot'))).toEqual([
      'store.journal', 'store.snapshot', // gen 0 journal + gen 1 snapshot: superseded, retried
      'store.journal', 'store.snapshot', // gen 1 pair
    ]);
    expect(view.gen).toBe(1);
    expect(await view.listAll()).toEqual(await s.listAll());
    expect(await view.get('bob', tokenFor(3))).not.toBeNull();
  });

  it('loads consistently while another process appends and compacts (every acknowledged write is there)', async () => {
    const dir = await tempDir();
    const child = spawnTs('crash-writer.ts', [dir, '0', '8192']);
    let stderr = '';
    child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    const acked = new Set<number>();
    let ready!: () => void;
    const isReady = new Promise<void>((resolve) => (ready = resolve));
    createInterface({ input: child.stdout as NodeJS.ReadableStream }).on('line', (line) => {
      if (line === 'READY') ready();
      else if (line.startsWith('ACK ')) acked.add(Number(line.slice(4)));
    });
    await isReady;
    const gens = new Set<number>();
    let views = 0;
    const deadline = Date.now() + 4000;
    while (Date.now() < deadline || views < 20) {
      const ackedBefore = [...acked];
      const view = await openView(dir);
      expect(view.holderPid).toBe(child.pid);
      gens.add(view.gen);
      const all = new Map((await view.listAll()).map((r) => [`${r.user} ${r.deviceToken}`, r]));
      const missing = ackedBefore.filter((n) => {
        const want = crashRegistration(n);
        return all.get(`${want.user} ${want.deviceToken}`)?.accountId !== want.accountId;
      });
      expect(missing, 'acknowledged before the view was opened, but not in it').toEqual([]);
      await view.close();
      views++;
    }
    expect(child.exitCode, stderr).toBeNull();
    expect(acked.size).toBeGreaterThan(100);
    expect(gens.size).toBeGreaterThan(1); // it compacted under our feet
    await expect(open(dir)).rejects.toBeInstanceOf(StoreLockedError);
  });
});

describe('createStore: access', () => {
  it("'read-only-if-locked' gives a read-only view of a locked store, a writable store otherwise", async () => {
    const dir = await tempDir();
    const s = await open(dir);
    await s.upsert(inputFor('alice', 1));
    await expect(createStore({ dataDir: dir, ttlMs: TTL })).rejects.toBeInstanceOf(StoreLockedError);
    await expect(createStore({ dataDir: dir, ttlMs: TTL, access: 'read-write' })).rejects.toBeInstanceOf(StoreLockedError);
    const view = await createStore({ dataDir: dir, ttlMs: TTL, access: 'read-only-if-locked' });
    expect(view).toBeInstanceOf(EmbeddedReadOnlyStore);
    expect((view as EmbeddedReadOnlyStore).holderPid).toBe(process.pid);
    expect(tokens(await view.listAll())).toEqual([tokenFor(1)]);
    await expect(view.upsert(inputFor('alice', 2))).rejects.toBeInstanceOf(StoreReadOnlyError);
    await view.close();
    await s.close();

    const rw = await createStore({ dataDir: dir, ttlMs: TTL, access: 'read-only-if-locked' });
    stores.push(rw);
    expect(rw).toBeInstanceOf(EmbeddedRegistrationStore);
    await rw.upsert(inputFor('alice', 2));
    expect(tokens(await rw.listAll())).toEqual([tokenFor(1), tokenFor(2)]);
  });

  it('an unreadable lock file stays an error', async () => {
    const dir = await tempDir();
    await fsp.writeFile(path.join(dir, 'store.lock'), 'not json');
    await expect(createStore({ dataDir: dir, ttlMs: TTL, access: 'read-only-if-locked' })).rejects.toThrow(/unreadable lock file/);
  });
});
