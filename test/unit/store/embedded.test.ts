import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { Writable } from 'node:stream';
import fc from 'fast-check';
import { afterEach, describe, expect, it } from 'vitest';
import { createLogger, type Logger } from '../../../src/ops/log.js';
import { mailboxRef } from '../../../src/store/common.js';
import { EmbeddedRegistrationStore, type EmbeddedStoreOptions } from '../../../src/store/embedded.js';
import { createStore } from '../../../src/store/index.js';
import { encodeLine } from '../../../src/store/records.js';
import { StoreCorruptError, StoreLockedError, StoreUnavailableError, type Registration } from '../../../src/store/types.js';
import { CONTRACT_TTL_MS, inputFor, storeContract, tokenFor } from './contract.js';
import { crashRegistration } from './fixtures/crash-data.js';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const FIXTURES = fileURLToPath(new URL('./fixtures/', import.meta.url));
const DAY = 24 * 3600 * 1000;

const dirs: string[] = [];
const children: ChildProcess[] = [];
async function tempDir(): Promise<string> {
  const d = await fsp.mkdtemp(path.join(os.tmpdir(), 'xaps-store-'));
  dirs.push(d);
  return d;
}
afterEach(async () => {
  for (const c of children.splice(0)) {
    if (c.exitCode === null && c.signalCode === null && c.pid !== undefined) c.kill('SIGKILL');
  }
  for (const d of dirs.splice(0)) await fsp.rm(d, { recursive: true, force: true });
});

function open(dir: string, opts: Partial<EmbeddedStoreOptions> = {}): Promise<EmbeddedRegistrationStore> {
  return EmbeddedRegistrationStore.open({ dataDir: dir, ttlMs: 30 * DAY, ...opts });
}

function spawnTs(script: string, args: string[]): ChildProcess {
  const child = spawn(process.execPath, ['--import', 'tsx', path.join(FIXTURES, script), ...args], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(child);
  return child;
}

/** Collects log lines of a pino logger (to check what was warned, and that no token leaks). */
function captureLogger(): { logger: Logger; lines: string[] } {
  const lines: string[] = [];
  const dest = new Writable({
    write(chunk: Buffer, _enc, cb) {
      lines.push(...chunk.toString('utf8').split('\n').filter(Boolean));
      cb();
    },
  });
  return { logger: createLogger({ level: 'debug', pretty: false, destination: dest }), lines };
}

async function flipByte(file: string, offset: number): Promise<void> {
  const buf = await fsp.readFile(file);
  buf[offset] = (buf[offset] as number) ^ 0x20;
  await fsp.writeFile(file, buf);
}

storeContract('embedded', async ({ ttlMs }) => {
  const dir = await tempDir();
  const store = await open(dir, { ttlMs });
  return { store, cleanup: () => store.close() };
});

describe('embedded store: persistence', () => {
  it('keeps data across close and reopen, and via createStore', async () => {
    const dir = await tempDir();
    const s1 = await open(dir);
    const now = Date.now();
    await s1.upsert(inputFor('alice', 1, { now: now - 1000, mailboxes: [mailboxRef('INBOX'), mailboxRef('Entwürfe')] }));
    await s1.upsert(inputFor('alice', 1, { now }));
    await s1.upsert(inputFor('bob', 2, { now }));
    await s1.upsert(inputFor('carol', 3, { now }));
    expect(await s1.remove('carol', tokenFor(3))).toBe(true);
    const before = await s1.listAll();
    await s1.close();
    await s1.close(); // idempotent

    const s2 = await createStore({ dataDir: dir, ttlMs: 30 * DAY });
    expect(s2.kind).toBe('embedded');
    expect(await s2.listAll()).toEqual(before);
    expect((await s2.get('alice', tokenFor(1)))?.firstSeen).toBe(now - 1000);
    expect((await s2.upsert(inputFor('alice', 1, { now: now + 1 }))).created).toBe(false);
    await s2.close();
    await expect(s2.upsert(inputFor('alice', 9))).rejects.toThrow(/closed/);
  });

  it('compacts into a snapshot and replays snapshot + journal', async () => {
    const dir = await tempDir();
    const s1 = await open(dir, { compactMinBytes: 2048 });
    const now = Date.now();
    for (let i = 0; i < 60; i++) await s1.upsert(inputFor(`u${i % 5}`, i, { now }));
    for (let i = 0; i < 60; i += 3) await s1.remove(`u${i % 5}`, tokenFor(i));
    await s1.upsert(inputFor('old', 1, { now: now - 40 * DAY }));
    const snapshot = await fsp.stat(path.join(dir, 'store.snapshot'));
    expect(snapshot.size).toBeGreaterThan(0);
    const before = await s1.listAll();
    expect(before).toHaveLength(40);
    await s1.compact();
    const journal = await fsp.readFile(path.join(dir, 'store.journal'), 'utf8');
    expect(journal.split('\n').filter(Boolean)).toHaveLength(1); // only the header
    await s1.upsert(inputFor('late', 1, { now }));
    await s1.close();

    const s2 = await open(dir);
    expect(await s2.listAll()).toEqual([...before, (await s2.get('late', tokenFor(1))) as Registration].sort((a, b) =>
      a.user < b.user ? -1 : a.user > b.user ? 1 : a.deviceToken < b.deviceToken ? -1 : 1));
    expect(await s2.purgeExpired()).toBe(0); // the expired one was dropped by compaction
    await s2.close();
  });

  it('ignores a journal left over from a crash between the snapshot and journal renames', async () => {
    const dir = await tempDir();
    const s1 = await open(dir);
    const now = Date.now();
    await s1.upsert(inputFor('alice', 1, { now }));
    await s1.upsert(inputFor('alice', 2, { now }));
    await s1.remove('alice', tokenFor(2));
    const oldJournal = await fsp.readFile(path.join(dir, 'store.journal'));
    await s1.compact();
    await s1.close();
    await fsp.writeFile(path.join(dir, 'store.journal'), oldJournal); // as if the process died before the 2nd rename
    const s2 = await open(dir);
    expect((await s2.listAll()).map((r) => r.deviceToken)).toEqual([tokenFor(1)]);
    await s2.upsert(inputFor('alice', 3, { now }));
    await s2.close();
    const s3 = await open(dir);
    expect((await s3.listAll()).map((r) => r.deviceToken)).toEqual([tokenFor(1), tokenFor(3)]);
    await s3.close();
  });

  it('loses no acknowledged registration when the writer is killed with SIGKILL mid-burst', async () => {
    const dir = await tempDir();
    const acked = new Set<number>();
    for (let round = 0; round < 3; round++) {
      const target = 400 + round * 300;
      const child = spawnTs('crash-writer.ts', [dir, String(round * 1_000_000), '65536']);
      let stderr = '';
      child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
      const rl = createInterface({ input: child.stdout as NodeJS.ReadableStream });
      const closed = new Promise<void>((resolve) => rl.once('close', resolve));
      const exited = new Promise<NodeJS.Signals | null>((resolve) => child.once('exit', (_code, sig) => resolve(sig)));
      let count = 0;
      let killed = false;
      rl.on('line', (line) => {
        if (!line.startsWith('ACK ')) return;
        acked.add(Number(line.slice(4)));
        if (++count >= target && !killed) {
          killed = true;
          child.kill('SIGKILL');
        }
      });
      const sig = await exited;
      await closed; // every ACK line the child got out before dying
      expect(sig, `crash writer died on its own: ${stderr}`).toBe('SIGKILL');
      expect(count).toBeGreaterThanOrEqual(target);
    }

    const store = await open(dir);
    const all = new Map((await store.listAll()).map((r) => [`${r.user} ${r.deviceToken}`, r]));
    const missing: number[] = [];
    for (const n of acked) {
      const want = crashRegistration(n);
      const got = all.get(`${want.user} ${want.deviceToken}`);
      if (!got) missing.push(n);
      else {
        expect(got.accountId).toBe(want.accountId);
        expect(got.mailboxes).toEqual(want.mailboxes);
      }
    }
    expect(missing).toEqual([]);
    expect(all.size).toBeGreaterThanOrEqual(acked.size);
    await store.close();
  });
});

/** Wraps the store's journal handle so a test can count or fail its calls. */
function instrumentJournal(
  store: EmbeddedRegistrationStore,
  hooks: { write?: () => void; datasync?: () => void },
): void {
  const holder = store as unknown as { journal: FileHandle };
  const real = holder.journal;
  holder.journal = new Proxy(real, {
    get(target, prop) {
      const v = Reflect.get(target, prop) as unknown;
      if (typeof v !== 'function') return v;
      const hook = prop === 'write' ? hooks.write : prop === 'datasync' ? hooks.datasync : undefined;
      return (...args: unknown[]) => {
        hook?.();
        return (v as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
}

describe('embedded store: write path', () => {
  it('group-commits concurrent upserts into few fsyncs', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    let syncs = 0;
    instrumentJournal(s, { datasync: () => syncs++ });
    await Promise.all(Array.from({ length: 200 }, (_, i) => s.upsert(inputFor(`u${i % 7}`, i))));
    expect(syncs).toBeGreaterThan(0);
    expect(syncs).toBeLessThan(200);
    await s.close();
    const s2 = await open(dir);
    expect((await s2.counts()).registrations).toBe(200);
    await s2.close();
  });

  it('rejects a write that failed, and goes on when the disk works again', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    await s.upsert(inputFor('alice', 1));
    let fail = true;
    instrumentJournal(s, {
      write: () => {
        if (fail) throw Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' });
      },
    });
    await expect(s.upsert(inputFor('alice', 2))).rejects.toBeInstanceOf(StoreUnavailableError);
    expect(await s.get('alice', tokenFor(2))).toBeNull();
    fail = false;
    await s.upsert(inputFor('alice', 3));
    await s.ping();
    await s.close();
    const s2 = await open(dir);
    expect((await s2.listAll()).map((r) => r.deviceToken)).toEqual([tokenFor(1), tokenFor(3)]);
    await s2.close();
  });

  it('refuses writes after a failed fsync until it has rewritten its files', async () => {
    const dir = await tempDir();
    const { logger, lines } = captureLogger();
    const s = await open(dir, { logger });
    await s.upsert(inputFor('alice', 1));
    instrumentJournal(s, {
      datasync: () => {
        throw Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' });
      },
    });
    await expect(s.upsert(inputFor('alice', 2))).rejects.toBeInstanceOf(StoreUnavailableError);
    await expect(s.ping()).rejects.toBeInstanceOf(StoreUnavailableError);
    expect(await s.get('alice', tokenFor(2))).toBeNull();
    // the next writes first rewrite snapshot + journal from memory (at most once a second), then succeed
    const deadline = Date.now() + 30_000;
    for (;;) {
      try {
        await s.upsert(inputFor('alice', 3));
        break;
      } catch (err) {
        expect(err).toBeInstanceOf(StoreUnavailableError);
        if (Date.now() > deadline) throw err;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    await s.ping();
    expect(lines.some((l) => l.includes('can no longer be trusted'))).toBe(true);
    await s.close();
    const s2 = await open(dir);
    expect((await s2.listAll()).map((r) => r.deviceToken)).toEqual([tokenFor(1), tokenFor(3)]);
    await s2.close();
  });
});

describe('embedded store: damaged files', () => {
  async function populated(n = 20): Promise<string> {
    const dir = await tempDir();
    const s = await open(dir);
    for (let i = 0; i < n; i++) await s.upsert(inputFor(`user${i % 3}`, i, { mailboxes: [mailboxRef('INBOX'), mailboxRef('Ärchiv')] }));
    await s.close();
    return dir;
  }

  it('refuses a journal with a flipped byte in the middle, naming the file and offset', async () => {
    const dir = await populated();
    const file = path.join(dir, 'store.journal');
    const buf = await fsp.readFile(file);
    let at = Math.floor(buf.length / 2);
    while (buf[at] === 0x0a || buf[at - 1] === 0x0a) at++;
    await flipByte(file, at);
    const err = await open(dir).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StoreCorruptError);
    expect((err as Error).message).toContain(file);
    expect((err as Error).message).toMatch(/byte offset \d+/);
    const lineStart = buf.lastIndexOf(0x0a, at) + 1;
    expect((err as StoreCorruptError).offset).toBe(lineStart);
    expect((err as StoreCorruptError).file).toBe(file);
    // the failed open released the lock and changed nothing: repairing the byte makes it open again
    await flipByte(file, at);
    const s = await open(dir);
    expect((await s.counts()).registrations).toBe(20);
    await s.close();
  });

  it('refuses garbage lines in the middle of the journal', async () => {
    const dir = await populated(5);
    const file = path.join(dir, 'store.journal');
    const buf = await fsp.readFile(file);
    const second = buf.indexOf(0x0a) + 1;
    await fsp.writeFile(file, Buffer.concat([buf.subarray(0, second), Buffer.from('garbage\n'), buf.subarray(second)]));
    const err = await open(dir).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StoreCorruptError);
    expect((err as Error).message).toContain(`${file} is damaged at byte offset ${second}`);
  });

  it('refuses a complete journal line with a valid checksum but an unknown record type', async () => {
    const dir = await populated(2);
    const file = path.join(dir, 'store.journal');
    await fsp.appendFile(file, encodeLine({ type: 'from.the.future', x: 1 }));
    await expect(open(dir)).rejects.toThrow(/unknown record type "from.the.future"/);
  });

  it('tolerates a torn last journal line, warns, and truncates it away', async () => {
    const dir = await populated(5);
    const file = path.join(dir, 'store.journal');
    const size = (await fsp.stat(file)).size;
    const line = encodeLine({ type: 'reg.put', reg: { ...inputFor('torn', 1), firstSeen: 1, lastSeen: 1 } });
    await fsp.appendFile(file, line.subarray(0, line.length - 20));
    const { logger, lines } = captureLogger();
    const s = await open(dir, { logger });
    expect((await s.counts()).registrations).toBe(5);
    expect(await s.get('torn', tokenFor(1))).toBeNull();
    expect(lines.some((l) => l.includes('torn final journal record') && l.includes(`"offset":${size}`))).toBe(true);
    expect((await fsp.stat(file)).size).toBe(size);
    await s.upsert(inputFor('after', 1));
    await s.close();
    const s2 = await open(dir);
    expect((await s2.counts()).registrations).toBe(6);
    await s2.close();
  });

  it('tolerates a torn tail of plain garbage too', async () => {
    const dir = await populated(3);
    await fsp.appendFile(path.join(dir, 'store.journal'), Buffer.from([0, 0, 0, 0x7b]));
    const s = await open(dir);
    expect((await s.counts()).registrations).toBe(3);
    await s.close();
  });

  it('refuses a truncated snapshot', async () => {
    const dir = await populated();
    const s = await open(dir);
    await s.compact();
    await s.close();
    const file = path.join(dir, 'store.snapshot');
    const size = (await fsp.stat(file)).size;
    await fsp.truncate(file, size - 7);
    const err = await open(dir).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StoreCorruptError);
    expect((err as Error).message).toContain(file);
    expect((err as Error).message).toMatch(/truncated/);
    // truncated at a record boundary too
    const buf = await fsp.readFile(file);
    await fsp.writeFile(file, buf.subarray(0, buf.lastIndexOf(0x0a, buf.length - 2) + 1));
    await expect(open(dir)).rejects.toThrow(/store\.snapshot is damaged.*truncated/);
    // and with only part of its header left
    await fsp.writeFile(file, buf.subarray(0, 30));
    await expect(open(dir)).rejects.toThrow(/store\.snapshot is damaged at byte offset 0/);
  });

  it('refuses a snapshot with a flipped byte, or a missing journal next to a snapshot', async () => {
    const dir = await populated();
    const s = await open(dir);
    await s.compact();
    await s.close();
    const snap = path.join(dir, 'store.snapshot');
    const size = (await fsp.stat(snap)).size;
    await flipByte(snap, Math.floor(size * 0.6));
    const err = await open(dir).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StoreCorruptError);
    expect((err as Error).message).toContain(snap);
    await flipByte(snap, Math.floor(size * 0.6));
    await fsp.rm(path.join(dir, 'store.journal'));
    await expect(open(dir)).rejects.toThrow(/journal is missing/);
  });
});

describe('embedded store: directory lock', () => {
  it('refuses a second open in the same process', async () => {
    const dir = await tempDir();
    const s = await open(dir);
    const err = await open(dir).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StoreLockedError);
    expect((err as Error).message).toContain(`pid ${process.pid}`);
    await s.close();
    const again = await open(dir);
    await again.close();
  });

  it('refuses a directory held by another process, naming its pid, and takes over once it is gone', async () => {
    const dir = await tempDir();
    const child = spawnTs('hold-open.ts', [dir]);
    const rl = createInterface({ input: child.stdout as NodeJS.ReadableStream });
    const pid = await new Promise<number>((resolve, reject) => {
      rl.on('line', (line) => {
        if (line.startsWith('READY ')) resolve(Number(line.slice(6)));
      });
      child.once('exit', (code) => reject(new Error(`hold-open exited early (${code})`)));
    });
    const err = await open(dir).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StoreLockedError);
    expect((err as Error).message).toContain(`pid ${pid}`);
    expect((err as StoreLockedError).pid).toBe(pid);

    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill('SIGKILL');
    await exited;
    const s = await open(dir); // stale lock of a dead process
    await s.close();
    await expect(fsp.stat(path.join(dir, 'store.lock'))).rejects.toThrow(/ENOENT/);
  });

  it('takes over a lock left by an earlier process with the same pid (container restart)', async () => {
    const dir = await tempDir();
    await fsp.writeFile(path.join(dir, 'store.lock'), JSON.stringify({
      pid: process.pid, hostname: 'old-container', nonce: 'x', since: Date.now() - 1000, startTime: '1',
    }));
    const s = await open(dir);
    await s.close();
  });
});

describe('embedded store: logging', () => {
  it('never logs a full device token', async () => {
    const dir = await tempDir();
    const { logger, lines } = captureLogger();
    const s = await open(dir, { logger, compactMinBytes: 1024 });
    for (let i = 0; i < 20; i++) await s.upsert(inputFor('alice', i, { now: Date.now() - 40 * DAY }));
    await s.purgeExpired();
    await s.close();
    await fsp.appendFile(path.join(dir, 'store.journal'), encodeLine({ type: 'reg.put', reg: inputFor('x', 1) }).subarray(0, 50));
    const s2 = await open(dir, { logger });
    await s2.close();
    expect(lines.length).toBeGreaterThan(0);
    for (const l of lines) for (let i = 0; i < 20; i++) expect(l).not.toContain(tokenFor(i));
  });
});

describe('embedded store: model check', () => {
  it('matches a simple model after random operations and after reopening', async () => {
    const op = fc.oneof(
      fc.record({ k: fc.constant('up' as const), user: fc.constantFrom('a', 'b', '{c}'), n: fc.integer({ min: 0, max: 5 }), dt: fc.integer({ min: -2 * CONTRACT_TTL_MS, max: 0 }), acct: fc.constantFrom('X', 'Y') }),
      fc.record({ k: fc.constant('rm' as const), user: fc.constantFrom('a', 'b', '{c}'), n: fc.integer({ min: 0, max: 5 }) }),
      fc.record({ k: fc.constant('purge' as const) }),
      fc.record({ k: fc.constant('compact' as const) }),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 30 }), async (ops) => {
        const dir = await tempDir();
        const now = Date.now();
        const s = await open(dir, { ttlMs: CONTRACT_TTL_MS, clock: () => now });
        const model = new Map<string, Registration>();
        const key = (u: string, n: number): string => `${u} ${tokenFor(n)}`;
        const live = (r: Registration): boolean => r.lastSeen + CONTRACT_TTL_MS > now;
        for (const o of ops) {
          if (o.k === 'up') {
            const t = now + o.dt;
            const old = model.get(key(o.user, o.n));
            const res = await s.upsert(inputFor(o.user, o.n, { now: t, accountId: o.acct }));
            const wasLive = old !== undefined && old.lastSeen + CONTRACT_TTL_MS > t;
            expect(res.created).toBe(!wasLive);
            model.set(key(o.user, o.n), { ...inputFor(o.user, o.n, { accountId: o.acct }), firstSeen: wasLive ? old.firstSeen : t, lastSeen: t });
          } else if (o.k === 'rm') {
            const old = model.get(key(o.user, o.n));
            expect(await s.remove(o.user, tokenFor(o.n))).toBe(old !== undefined && live(old));
            model.delete(key(o.user, o.n));
          } else if (o.k === 'purge') {
            let n = 0;
            for (const [k, r] of model) if (!live(r)) { model.delete(k); n++; }
            expect(await s.purgeExpired()).toBe(n);
          } else {
            await s.compact();
            for (const [k, r] of model) if (!live(r)) model.delete(k);
          }
        }
        const expected = [...model.values()].filter(live).sort((a, b) => (key(a.user, 0) + a.deviceToken < key(b.user, 0) + b.deviceToken ? -1 : 1));
        const sortReg = (l: Registration[]): Registration[] => l.sort((a, b) => (a.user === b.user ? (a.deviceToken < b.deviceToken ? -1 : 1) : a.user < b.user ? -1 : 1));
        expect(await s.listAll()).toEqual(sortReg(expected));
        await s.close();
        const s2 = await open(dir, { ttlMs: CONTRACT_TTL_MS, clock: () => now });
        expect(await s2.listAll()).toEqual(sortReg(expected));
        await s2.close();
      }),
      { numRuns: 40 },
    );
  });
});
