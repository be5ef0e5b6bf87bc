/**
 * Embedded registration store: no server, files in the data directory, all reads from memory.
 *
 *   store.lock      which process owns the directory (lock.ts)
 *   store.snapshot  compacted state of generation G (records.ts); absent until the first compaction
 *   store.journal   mutations since that snapshot, generation G; every acknowledged write is in it or the snapshot
 *
 * Writes are queued; the single writer takes everything queued, appends it to the journal in one write and one
 * fdatasync (group commit), then updates memory and resolves the callers: an upsert resolves only once fsync'ed.
 * When the journal outgrows max(compactMinBytes, last snapshot size), the writer compacts: snapshot of G+1 to a temp
 * file, fsync, rename, directory fsync; then a fresh journal of G+1 the same way. On open, a journal older than the
 * snapshot (crash between the two renames) is ignored, as its content is in the snapshot.
 *
 * Damage: a complete line with a bad checksum, unparseable JSON, an unknown record type, a missing header, or a
 * snapshot whose size, record count or SHA-256 disagree with its header raises StoreCorruptError naming the file and
 * byte offset; nothing is dropped silently. The only exception is a torn final journal line (no LF): the process died
 * mid-write, so it was never acknowledged; it is dropped with a warning and truncated away.
 *
 * After a failed write or fsync the journal can no longer be trusted: writes are refused (StoreUnavailableError) and
 * ping() rejects until a compaction (attempted at most once a second on the next write) has rewritten the state from
 * memory — which holds exactly the acknowledged writes — into a new generation.
 */
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { silentLogger, type Logger } from '../ops/log.js';
import {
  compareRegistrations,
  compareStrings,
  copyRegistration,
  isLive,
  normalizeInput,
  normalizeToken,
  parseRegistration,
  validateTtl,
  validateUser,
} from './common.js';
import { acquireDirLock, type DirLock } from './lock.js';
import { FORMAT, corrupt, encodeLine, parseLines, type RecordBase } from './records.js';
import {
  StoreUnavailableError,
  type Registration,
  type RegistrationInput,
  type RegistrationStore,
} from './types.js';

export interface EmbeddedStoreOptions {
  dataDir: string;
  ttlMs: number;
  logger?: Logger;
  /** Clock for reads and for writes without an explicit time (ms since epoch). */
  clock?: () => number;
  /** Compact once the journal is larger than this and than the last snapshot (default 4 MiB). */
  compactMinBytes?: number;
  /** Most mutations in one group commit (default 1024). */
  maxBatch?: number;
}

const JOURNAL = 'store.journal';
const SNAPSHOT = 'store.snapshot';

type Fields = Omit<Registration, 'firstSeen' | 'lastSeen'>;
interface Pending<T> { resolve: (v: T) => void; reject: (e: unknown) => void }
type Intent =
  | ({ kind: 'upsert'; reg: Fields; now: number } & Pending<{ created: boolean; registration: Registration }>)
  | ({ kind: 'remove'; user: string; token: string; unlessSeenAfter: number | undefined; now: number } & Pending<boolean>)
  | ({ kind: 'purge'; now: number } & Pending<number>);

type State = Map<string, Map<string, Registration>>;

function regKey(user: string, token: string): string {
  return JSON.stringify([user, token]);
}

async function fsyncDir(dir: string): Promise<void> {
  let fh: FileHandle | undefined;
  try {
    fh = await fsp.open(dir, 'r');
    await fh.sync();
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'EISDIR' && code !== 'EINVAL' && code !== 'EPERM') throw err;
  } finally {
    await fh?.close();
  }
}

/** Writes and fsyncs `<file>.tmp`; returns its name. Failing here leaves `file` untouched. */
async function writeTemp(file: string, data: Buffer): Promise<string> {
  const tmp = `${file}.tmp`;
  const fh = await fsp.open(tmp, 'w', 0o600);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  return tmp;
}

/** Renames the temp file over `file` and fsyncs the directory. */
async function install(tmp: string, file: string): Promise<void> {
  await fsp.rename(tmp, file);
  await fsyncDir(path.dirname(file));
}

/** Writes `data` to `file` via a temp file: write, fsync, rename, directory fsync. */
async function writeFileDurably(file: string, data: Buffer): Promise<void> {
  await install(await writeTemp(file, data), file);
}

async function readIfExists(file: string): Promise<Buffer | null> {
  try {
    return await fsp.readFile(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

function setReg(state: State, reg: Registration): void {
  let m = state.get(reg.user);
  if (!m) state.set(reg.user, (m = new Map()));
  m.set(reg.deviceToken, reg);
}

function deleteReg(state: State, user: string, token: string): void {
  const m = state.get(user);
  if (m && m.delete(token) && m.size === 0) state.delete(user);
}

export class EmbeddedRegistrationStore implements RegistrationStore {
  readonly kind = 'embedded' as const;
  readonly dir: string;
  private readonly ttlMs: number;
  private readonly clock: () => number;
  private readonly log: Logger;
  private readonly compactMinBytes: number;
  private readonly maxBatch: number;
  private readonly lock: DirLock;
  private state: State;
  private gen: number;
  private journal: FileHandle;
  private journalSize: number;
  private snapshotSize: number;
  private queue: Intent[] = [];
  private compactWaiters: Array<Pending<void>> = [];
  private running = false;
  private idle: Array<() => void> = [];
  private closing = false;
  private closePromise: Promise<void> | undefined;
  /** Set when the journal can no longer be trusted (failed write/fsync); cleared by a successful compaction. */
  private failure: Error | null = null;
  private nextRecoveryAt = 0;
  private nextAutoCompactAt = 0;

  private constructor(init: {
    dir: string; opts: EmbeddedStoreOptions; log: Logger; lock: DirLock; state: State; gen: number;
    journal: FileHandle; journalSize: number; snapshotSize: number;
  }) {
    this.dir = init.dir;
    this.ttlMs = validateTtl(init.opts.ttlMs);
    this.clock = init.opts.clock ?? Date.now;
    this.log = init.log;
    this.compactMinBytes = init.opts.compactMinBytes ?? 4 * 1024 * 1024;
    this.maxBatch = Math.max(1, init.opts.maxBatch ?? 1024);
    this.lock = init.lock;
    this.state = init.state;
    this.gen = init.gen;
    this.journal = init.journal;
    this.journalSize = init.journalSize;
    this.snapshotSize = init.snapshotSize;
  }

  get journalFile(): string {
    return path.join(this.dir, JOURNAL);
  }

  get snapshotFile(): string {
    return path.join(this.dir, SNAPSHOT);
  }

  /**
   * Opens (creating if needed) the store in `dataDir`. Throws StoreLockedError when another process holds the
   * directory and StoreCorruptError when its files are damaged.
   */
  static async open(opts: EmbeddedStoreOptions): Promise<EmbeddedRegistrationStore> {
    validateTtl(opts.ttlMs);
    const log = (opts.logger ?? silentLogger()).child({ component: 'store', store: 'embedded' });
    await fsp.mkdir(opts.dataDir, { recursive: true, mode: 0o700 });
    const dir = await fsp.realpath(opts.dataDir);
    const lock = await acquireDirLock(dir, log);
    try {
      for (const name of [`${JOURNAL}.tmp`, `${SNAPSHOT}.tmp`]) await fsp.rm(path.join(dir, name), { force: true });
      const state: State = new Map();
      const snapFile = path.join(dir, SNAPSHOT);
      const journalFile = path.join(dir, JOURNAL);
      const snap = await readIfExists(snapFile);
      const snapGen = snap ? loadSnapshot(snap, snapFile, state) : 0;
      let journalBuf = await readIfExists(journalFile);
      if (journalBuf === null) {
        if (snap) {
          throw corrupt(journalFile, 0, `journal is missing but snapshot ${snapFile} exists (gen ${snapGen}); acknowledged writes may be lost`);
        }
        await writeFileDurably(journalFile, encodeLine({ type: 'journal', format: FORMAT, gen: 0 }));
        journalBuf = await fsp.readFile(journalFile);
      }
      let journalSize = journalBuf.length;
      const { gen: journalGen, replay, torn } = readJournal(journalBuf, journalFile);
      const gen = snapGen;
      if (journalGen > snapGen) {
        throw corrupt(journalFile, 0, snap
          ? `journal generation ${journalGen} is newer than snapshot generation ${snapGen}`
          : `journal generation ${journalGen} needs snapshot ${snapFile}, which is missing`);
      }
      if (journalGen < snapGen) {
        // Crash between the snapshot rename and the journal rename: the snapshot already holds all of it.
        log.info({ journalGen, snapGen }, 'ignoring a journal superseded by the snapshot');
        await writeFileDurably(journalFile, encodeLine({ type: 'journal', format: FORMAT, gen: snapGen }));
        journalSize = (await fsp.stat(journalFile)).size;
      } else {
        for (const line of replay) applyRecord(state, line.rec, journalFile, line.offset);
        if (torn) {
          log.warn(
            { file: journalFile, offset: torn.offset, bytes: torn.bytes },
            'dropping a torn final journal record (the process died while writing it; it was never acknowledged)',
          );
          journalSize = torn.offset;
        }
      }
      const journal = await fsp.open(journalFile, 'r+');
      if (torn && journalGen === snapGen) {
        await journal.truncate(journalSize);
        await journal.datasync();
      }
      const store = new EmbeddedRegistrationStore({
        dir, opts, log, lock, state, gen, journal, journalSize, snapshotSize: snap?.length ?? 0,
      });
      log.info({ dir, registrations: store.size(), journalBytes: journalSize }, 'embedded registration store opened');
      if (store.compactDue()) {
        // An optimisation only: on failure the store still works from the journal it has.
        await store.compact().catch((err: unknown) => log.warn({ err: String(err) }, 'compaction at open failed'));
      }
      return store;
    } catch (err) {
      await lock.release();
      throw err;
    }
  }

  private size(): number {
    let n = 0;
    for (const m of this.state.values()) n += m.size;
    return n;
  }

  // ---------------------------------------------------------------- writes

  upsert(input: RegistrationInput): Promise<{ created: boolean; registration: Registration }> {
    let reg: Fields;
    try {
      reg = normalizeInput(input);
    } catch (err) {
      return Promise.reject(err);
    }
    const now = input.now ?? this.clock();
    return new Promise((resolve, reject) => this.enqueue({ kind: 'upsert', reg, now, resolve, reject }));
  }

  remove(user: string, deviceToken: string, opts: { unlessSeenAfter?: number } = {}): Promise<boolean> {
    try {
      validateUser(user);
      if (opts.unlessSeenAfter !== undefined && (typeof opts.unlessSeenAfter !== 'number' || !Number.isFinite(opts.unlessSeenAfter))) {
        throw new TypeError('unlessSeenAfter must be ms since epoch');
      }
    } catch (err) {
      return Promise.reject(err);
    }
    const token = normalizeToken(deviceToken);
    const now = this.clock();
    return new Promise((resolve, reject) =>
      this.enqueue({ kind: 'remove', user, token, unlessSeenAfter: opts.unlessSeenAfter, now, resolve, reject }));
  }

  purgeExpired(now?: number): Promise<number> {
    const at = now ?? this.clock();
    return new Promise((resolve, reject) => this.enqueue({ kind: 'purge', now: at, resolve, reject }));
  }

  /** Rewrites the state into a new snapshot and an empty journal (also done automatically). */
  compact(): Promise<void> {
    if (this.closing) return Promise.reject(new StoreUnavailableError('embedded registration store is closed'));
    return new Promise((resolve, reject) => {
      this.compactWaiters.push({ resolve, reject });
      this.kick();
    });
  }

  private enqueue(intent: Intent): void {
    if (this.closing) {
      intent.reject(new StoreUnavailableError('embedded registration store is closed'));
      return;
    }
    this.queue.push(intent);
    this.kick();
  }

  private kick(): void {
    if (this.running) return;
    this.running = true;
    void this.drain();
  }

  private async drain(): Promise<void> {
    try {
      while (this.queue.length > 0 || this.compactWaiters.length > 0) {
        if (this.queue.length > 0) await this.commit(this.queue.splice(0, this.maxBatch));
        const waiters = this.compactWaiters.splice(0);
        if (waiters.length > 0 || (this.failure === null && this.compactDue() && Date.now() >= this.nextAutoCompactAt)) {
          try {
            await this.compactNow();
            for (const w of waiters) w.resolve();
          } catch (err) {
            this.nextAutoCompactAt = Date.now() + 60_000;
            this.log.error({ err: String(err) }, 'store compaction failed');
            for (const w of waiters) w.reject(err);
          }
        }
      }
    } catch (err) {
      // commit() settles its own intents; this is a bug guard.
      this.log.error({ err: String(err) }, 'store writer failed');
      for (const i of this.queue.splice(0)) i.reject(err);
    } finally {
      this.running = false;
      for (const f of this.idle.splice(0)) f();
    }
  }

  private compactDue(): boolean {
    return this.journalSize > Math.max(this.compactMinBytes, this.snapshotSize);
  }

  /** Decides every intent of the batch against memory + earlier intents, writes once, fsyncs once, then applies. */
  private async commit(batch: Intent[]): Promise<void> {
    if (this.failure !== null && !(await this.recover())) {
      const err = new StoreUnavailableError(`embedded store cannot write to ${this.journalFile}: ${this.failure.message}`);
      for (const i of batch) i.reject(err);
      return;
    }
    const overlay = new Map<string, Registration | null>();
    const lookup = (user: string, token: string): Registration | null => {
      const k = regKey(user, token);
      return overlay.has(k) ? (overlay.get(k) as Registration | null) : this.state.get(user)?.get(token) ?? null;
    };
    const lines: Buffer[] = [];
    const results: Array<() => void> = [];
    for (const intent of batch) {
      switch (intent.kind) {
        case 'upsert': {
          const old = lookup(intent.reg.user, intent.reg.deviceToken);
          const live = old !== null && isLive(old, this.ttlMs, intent.now);
          const reg: Registration = { ...intent.reg, firstSeen: live ? old.firstSeen : intent.now, lastSeen: intent.now };
          overlay.set(regKey(reg.user, reg.deviceToken), reg);
          lines.push(encodeLine({ type: 'reg.put', reg }));
          const res = { created: !live, registration: copyRegistration(reg) };
          results.push(() => intent.resolve(res));
          break;
        }
        case 'remove': {
          const old = lookup(intent.user, intent.token);
          let removed = false;
          if (old !== null && (intent.unlessSeenAfter === undefined || old.lastSeen <= intent.unlessSeenAfter)) {
            removed = isLive(old, this.ttlMs, intent.now);
            overlay.set(regKey(intent.user, intent.token), null);
            lines.push(encodeLine({ type: 'reg.del', user: intent.user, token: intent.token }));
          }
          results.push(() => intent.resolve(removed));
          break;
        }
        case 'purge': {
          let n = 0;
          const consider = (reg: Registration | null): void => {
            if (reg !== null && !isLive(reg, this.ttlMs, intent.now)) {
              overlay.set(regKey(reg.user, reg.deviceToken), null);
              lines.push(encodeLine({ type: 'reg.del', user: reg.user, token: reg.deviceToken }));
              n++;
            }
          };
          for (const m of this.state.values()) {
            for (const reg of m.values()) {
              const k = regKey(reg.user, reg.deviceToken);
              consider(overlay.has(k) ? (overlay.get(k) as Registration | null) : reg);
            }
          }
          for (const [k, reg] of [...overlay]) {
            if (reg !== null && !this.state.get(reg.user)?.has(reg.deviceToken) && overlay.get(k) === reg) consider(reg);
          }
          if (n > 0) this.log.info({ purged: n }, 'purged expired registrations');
          results.push(() => intent.resolve(n));
          break;
        }
      }
    }
    if (lines.length > 0) {
      const buf = Buffer.concat(lines);
      try {
        await this.append(buf);
      } catch (err) {
        const e = new StoreUnavailableError(`embedded store could not write ${this.journalFile}: ${(err as Error).message}`);
        for (const i of batch) i.reject(e);
        return;
      }
    }
    for (const [k, reg] of overlay) {
      if (reg !== null) setReg(this.state, reg);
      else {
        const [user, token] = JSON.parse(k) as [string, string];
        deleteReg(this.state, user, token);
      }
    }
    for (const r of results) r();
  }

  /** One positional write and one fdatasync; on failure the journal is truncated back or marked untrustworthy. */
  private async append(buf: Buffer): Promise<void> {
    const at = this.journalSize;
    try {
      let done = 0;
      while (done < buf.length) {
        const { bytesWritten } = await this.journal.write(buf, done, buf.length - done, at + done);
        done += bytesWritten;
      }
    } catch (err) {
      try {
        await this.journal.truncate(at);
        this.log.error({ err: String(err), file: this.journalFile }, 'journal write failed; nothing was acknowledged');
      } catch (err2) {
        this.fail(err2 as Error);
      }
      throw err;
    }
    try {
      await this.journal.datasync();
    } catch (err) {
      // After a failed fsync the kernel may have dropped the pages: nothing in the file is certain any more.
      this.fail(err as Error);
      throw err;
    }
    this.journalSize = at + buf.length;
  }

  private fail(err: Error): void {
    if (this.failure === null) {
      this.log.error({ err: String(err), file: this.journalFile }, 'journal can no longer be trusted; refusing writes until it is rewritten');
    }
    this.failure = err;
  }

  private async recover(): Promise<boolean> {
    const now = Date.now();
    if (now < this.nextRecoveryAt) return false;
    this.nextRecoveryAt = now + 1000;
    try {
      await this.compactNow();
      this.log.info({ file: this.journalFile }, 'store rewritten after a write failure; accepting writes again');
      return true;
    } catch (err) {
      this.log.error({ err: String(err) }, 'store rewrite after a write failure failed');
      return false;
    }
  }

  /** Snapshot of gen+1 (dropping expired registrations), then a fresh journal of gen+1. */
  private async compactNow(): Promise<void> {
    const gen = this.gen + 1;
    const now = this.clock();
    const live: State = new Map();
    const body: Buffer[] = [];
    const users = [...this.state.keys()].sort(compareStrings);
    let records = 0;
    for (const user of users) {
      const m = this.state.get(user) as Map<string, Registration>;
      for (const token of [...m.keys()].sort(compareStrings)) {
        const reg = m.get(token) as Registration;
        if (!isLive(reg, this.ttlMs, now)) continue;
        setReg(live, reg);
        body.push(encodeLine({ type: 'reg.put', reg }));
        records++;
      }
    }
    const bodyBuf = Buffer.concat(body);
    const header = encodeLine({
      type: 'snapshot', format: FORMAT, gen, records, bodyBytes: bodyBuf.length,
      sha256: createHash('sha256').update(bodyBuf).digest('hex'), created: Date.now(),
    });
    const snap = Buffer.concat([header, bodyBuf]);
    const jh = encodeLine({ type: 'journal', format: FORMAT, gen });
    const snapTmp = await writeTemp(this.snapshotFile, snap);
    // From the rename on, the old journal may be obsolete: if the rest fails, appending to it could lose writes on
    // restart, so the store refuses writes until a compaction succeeds.
    let newJournal: FileHandle;
    let newSize: number;
    try {
      await install(snapTmp, this.snapshotFile);
      await writeFileDurably(this.journalFile, jh);
      newJournal = await fsp.open(this.journalFile, 'r+');
      newSize = jh.length;
    } catch (err) {
      this.gen = Math.max(this.gen, gen);
      this.fail(err as Error);
      throw err;
    }
    const old = this.journal;
    this.journal = newJournal;
    this.journalSize = newSize;
    this.snapshotSize = snap.length;
    this.gen = gen;
    this.state = live;
    this.failure = null;
    await old.close().catch(() => undefined);
    this.log.debug({ gen, records, snapshotBytes: snap.length }, 'store compacted');
  }

  // ---------------------------------------------------------------- reads

  private checkOpen(): void {
    if (this.closing) throw new StoreUnavailableError('embedded registration store is closed');
  }

  async get(user: string, deviceToken: string): Promise<Registration | null> {
    this.checkOpen();
    validateUser(user);
    const reg = this.state.get(user)?.get(normalizeToken(deviceToken));
    return reg && isLive(reg, this.ttlMs, this.clock()) ? copyRegistration(reg) : null;
  }

  async listByUser(user: string): Promise<Registration[]> {
    this.checkOpen();
    validateUser(user);
    const now = this.clock();
    const out: Registration[] = [];
    for (const reg of this.state.get(user)?.values() ?? []) {
      if (isLive(reg, this.ttlMs, now)) out.push(copyRegistration(reg));
    }
    return out.sort(compareRegistrations);
  }

  async listUsers(): Promise<string[]> {
    this.checkOpen();
    const now = this.clock();
    const out: string[] = [];
    for (const [user, m] of this.state) {
      for (const reg of m.values()) {
        if (isLive(reg, this.ttlMs, now)) {
          out.push(user);
          break;
        }
      }
    }
    return out.sort(compareStrings);
  }

  async listAll(): Promise<Registration[]> {
    this.checkOpen();
    const now = this.clock();
    const out: Registration[] = [];
    for (const m of this.state.values()) {
      for (const reg of m.values()) if (isLive(reg, this.ttlMs, now)) out.push(copyRegistration(reg));
    }
    return out.sort(compareRegistrations);
  }

  async counts(): Promise<{ users: number; registrations: number }> {
    this.checkOpen();
    const now = this.clock();
    let users = 0;
    let registrations = 0;
    for (const m of this.state.values()) {
      let n = 0;
      for (const reg of m.values()) if (isLive(reg, this.ttlMs, now)) n++;
      if (n > 0) users++;
      registrations += n;
    }
    return { users, registrations };
  }

  async ping(): Promise<void> {
    this.checkOpen();
    if (this.failure !== null) {
      throw new StoreUnavailableError(`embedded store cannot write to ${this.journalFile}: ${this.failure.message}`);
    }
    try {
      await this.journal.stat();
    } catch (err) {
      throw new StoreUnavailableError(`embedded store journal ${this.journalFile} is unusable: ${(err as Error).message}`);
    }
  }

  /** Finishes queued writes, closes the journal and releases the directory lock. */
  close(): Promise<void> {
    this.closePromise ??= (async () => {
      this.closing = true;
      if (this.running) await new Promise<void>((r) => this.idle.push(r));
      try {
        await this.journal.close();
      } finally {
        await this.lock.release();
        this.log.debug({ dir: this.dir }, 'embedded registration store closed');
      }
    })();
    return this.closePromise;
  }
}

/** Loads a snapshot into `state`; returns its generation. */
function loadSnapshot(buf: Buffer, file: string, state: State): number {
  const nl = buf.indexOf(0x0a);
  if (nl < 0) throw corrupt(file, 0, `truncated snapshot header (${buf.length} bytes, no complete line)`);
  const { lines } = parseLines(buf.subarray(0, nl + 1), file);
  const h = lines[0]?.rec as RecordBase;
  if (h.type !== 'snapshot') throw corrupt(file, 0, `not a snapshot header (type "${String(h.type)}")`);
  if (h.format !== FORMAT) throw corrupt(file, 0, `unsupported snapshot format ${String(h.format)} (written by a newer version?)`);
  const { gen, records, bodyBytes, sha256 } = h;
  if (!Number.isSafeInteger(gen) || !Number.isSafeInteger(records) || !Number.isSafeInteger(bodyBytes) || typeof sha256 !== 'string') {
    throw corrupt(file, 0, 'malformed snapshot header');
  }
  const start = nl + 1;
  const have = buf.length - start;
  if (have < (bodyBytes as number)) {
    throw corrupt(file, buf.length, `snapshot truncated: header announces ${String(bodyBytes)} bytes of records, only ${have} present`);
  }
  if (have > (bodyBytes as number)) {
    throw corrupt(file, start + (bodyBytes as number), `unexpected ${have - (bodyBytes as number)} bytes after the last snapshot record`);
  }
  const parsed = parseLines(buf, file, start);
  if (parsed.torn) throw corrupt(file, parsed.torn.offset, 'snapshot ends in the middle of a record');
  if (parsed.lines.length !== records) {
    throw corrupt(file, buf.length, `snapshot has ${parsed.lines.length} records, its header announces ${String(records)}`);
  }
  if (createHash('sha256').update(buf.subarray(start)).digest('hex') !== sha256) {
    throw corrupt(file, start, 'snapshot records do not match the SHA-256 in its header');
  }
  for (const line of parsed.lines) {
    if (line.rec.type !== 'reg.put') throw corrupt(file, line.offset, `unexpected record type "${line.rec.type}" in a snapshot`);
    applyRecord(state, line.rec, file, line.offset);
  }
  return gen as number;
}

/** Checks the journal header and returns the records to replay (the header is not among them). */
function readJournal(buf: Buffer, file: string): { gen: number; replay: Array<{ offset: number; rec: RecordBase }>; torn?: { offset: number; bytes: number } } {
  const parsed = parseLines(buf, file);
  const first = parsed.lines[0];
  if (!first) {
    throw corrupt(file, 0, buf.length === 0 ? 'journal is empty (no header)' : 'journal header is incomplete');
  }
  const h = first.rec;
  if (h.type !== 'journal') throw corrupt(file, 0, `not a journal header (type "${h.type}")`);
  if (h.format !== FORMAT) throw corrupt(file, 0, `unsupported journal format ${String(h.format)} (written by a newer version?)`);
  if (!Number.isSafeInteger(h.gen) || (h.gen as number) < 0) throw corrupt(file, 0, 'malformed journal header');
  const out: { gen: number; replay: Array<{ offset: number; rec: RecordBase }>; torn?: { offset: number; bytes: number } } = {
    gen: h.gen as number,
    replay: parsed.lines.slice(1),
  };
  if (parsed.torn) out.torn = parsed.torn;
  return out;
}

function applyRecord(state: State, rec: RecordBase, file: string, offset: number): void {
  switch (rec.type) {
    case 'reg.put': {
      const reg = parseRegistration(rec.reg);
      if (!reg) throw corrupt(file, offset, 'malformed registration record');
      setReg(state, reg);
      return;
    }
    case 'reg.del': {
      if (typeof rec.user !== 'string' || typeof rec.token !== 'string') throw corrupt(file, offset, 'malformed delete record');
      deleteReg(state, rec.user, rec.token);
      return;
    }
    case 'journal':
    case 'snapshot':
      throw corrupt(file, offset, `unexpected ${rec.type} header in the middle of the file`);
    default:
      throw corrupt(file, offset, `unknown record type "${rec.type}" (written by a newer version?)`);
  }
}
