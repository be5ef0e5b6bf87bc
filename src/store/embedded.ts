/**
 * Embedded registration store: no server, files in the data directory, all reads from memory.
 *
 *   store.lock      which process owns the directory (lock.ts)
 *   store.snapshot  compacted state of generation G (records.ts); absent until the first compaction
 *   store.journal   mutations since that snapshot, generation G; every acknowledged write is in it or the snapshot
 *
 * Writes are queued; the single writer takes everything queued, appends it to the journal in one write and one
 * fdatasync (group commit), then updates memory and resolves the callers: an upsert resolves only once fsync'ed.
 * Mailbox states (setMailboxState, the watchers' last STATUS per mailbox) take the same path: `mbx.put` lines,
 * batched with everything else, resolved only once fsync'ed; a status equal to the stored one writes nothing, and a
 * user without stored registrations gets none (the call resolves, nothing is written). A user's states are dropped
 * with the user's last registration (the `reg.del` implies it; compaction keeps only the states of users it keeps).
 * When the journal outgrows max(compactMinBytes, last snapshot size), the writer compacts: snapshot of G+1 to a temp
 * file, fsync, rename, directory fsync; then a fresh journal of G+1 the same way. On open, a journal older than the
 * snapshot (crash between the two renames) is ignored, as its content is in the snapshot.
 *
 * Damage: a complete line with a bad checksum, unparseable JSON, an unknown record type, a missing header, or a
 * snapshot whose size, record count or SHA-256 disagree with its header raises StoreCorruptError naming the file and
 * byte offset; nothing is dropped silently. The only exception is a torn final journal line (no LF): the process died
 * mid-write, so it was never acknowledged; it is dropped with a warning and truncated away.
 *
 * Other processes may read the directory without the lock (EmbeddedRegistrationStore.openReadOnly, for `devices list`
 * while the proxy runs): snapshot and journal are only ever replaced by rename, and a journal only changes by appends
 * (and, after a failed write, by truncating away what was never acknowledged) until it is replaced.
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
import { compareStrings, copyRegistration, isLive, normalizeInput, normalizeToken, validateTtl, validateUser } from './common.js';
import { EmbeddedReadOnlyStore, type EmbeddedReadOnlyOptions } from './embedded-readonly.js';
import {
  EmbeddedStateReader,
  JOURNAL,
  SNAPSHOT,
  applyRecord,
  emptyState,
  loadState,
  readIfExists,
  setMailboxStatus,
  setReg,
  type State,
} from './embedded-state.js';
import { acquireDirLock, type DirLock } from './lock.js';
import { FORMAT, encodeLine, type RecordBase } from './records.js';
import {
  StoreUnavailableError,
  checkMailboxStateInput,
  sameMailboxStatus,
  type MailboxStatus,
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

type Fields = Omit<Registration, 'firstSeen' | 'lastSeen'>;
interface Pending<T> { resolve: (v: T) => void; reject: (e: unknown) => void }
type Intent =
  | ({ kind: 'upsert'; reg: Fields; now: number } & Pending<{ created: boolean; registration: Registration }>)
  | ({ kind: 'remove'; user: string; token: string; unlessSeenAfter: number | undefined; now: number } & Pending<boolean>)
  | ({ kind: 'purge'; now: number } & Pending<number>)
  | ({ kind: 'mbx'; user: string; mailbox: string; status: MailboxStatus } & Pending<void>);

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

export class EmbeddedRegistrationStore extends EmbeddedStateReader implements RegistrationStore {
  readonly dir: string;
  private readonly log: Logger;
  private readonly compactMinBytes: number;
  private readonly maxBatch: number;
  private readonly lock: DirLock;
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
    super(init.state, init.opts.ttlMs, init.opts.clock);
    this.dir = init.dir;
    this.log = init.log;
    this.compactMinBytes = init.opts.compactMinBytes ?? 4 * 1024 * 1024;
    this.maxBatch = Math.max(1, init.opts.maxBatch ?? 1024);
    this.lock = init.lock;
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
   * Opens the store in `dataDir` read-only, without the lock, for administration while another process (the proxy)
   * owns it: a point-in-time view whose writes reject (embedded-readonly.ts). Creates and changes nothing.
   */
  static openReadOnly(opts: EmbeddedReadOnlyOptions): Promise<EmbeddedReadOnlyStore> {
    return EmbeddedReadOnlyStore.open(opts);
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
      const snapFile = path.join(dir, SNAPSHOT);
      const journalFile = path.join(dir, JOURNAL);
      const snap = await readIfExists(snapFile);
      let journalBuf = await readIfExists(journalFile);
      if (journalBuf === null && snap === null) {
        await writeFileDurably(journalFile, encodeLine({ type: 'journal', format: FORMAT, gen: 0 }));
        journalBuf = await fsp.readFile(journalFile);
      }
      const loaded = loadState(snap, journalBuf, { snapshot: snapFile, journal: journalFile });
      const { state, gen, torn } = loaded;
      let journalSize = loaded.journalBytes;
      if (loaded.superseded) {
        // Crash between the snapshot rename and the journal rename: the snapshot already holds all of it.
        log.info({ journalGen: loaded.journalGen, snapGen: gen }, 'ignoring a journal superseded by the snapshot');
        await writeFileDurably(journalFile, encodeLine({ type: 'journal', format: FORMAT, gen }));
        journalSize = (await fsp.stat(journalFile)).size;
      } else if (torn) {
        log.warn(
          { file: journalFile, offset: torn.offset, bytes: torn.bytes },
          'dropping a torn final journal record (the process died while writing it; it was never acknowledged)',
        );
      }
      const journal = await fsp.open(journalFile, 'r+');
      if (torn && !loaded.superseded) {
        await journal.truncate(journalSize);
        await journal.datasync();
      }
      const store = new EmbeddedRegistrationStore({
        dir, opts, log, lock, state, gen, journal, journalSize, snapshotSize: loaded.snapshotBytes,
      });
      log.info(
        { dir, registrations: store.size(), mailboxStateUsers: store.mailboxStateUsers(), journalBytes: journalSize },
        'embedded registration store opened',
      );
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

  /**
   * Stores the last status seen of one mailbox; resolves once fsync'ed (batched with other writes). A no-op for a user
   * without stored registrations, and when the status equals the stored one.
   */
  setMailboxState(user: string, mailbox: string, status: MailboxStatus): Promise<void> {
    let st: MailboxStatus;
    try {
      st = checkMailboxStateInput(user, mailbox, status);
    } catch (err) {
      return Promise.reject(err);
    }
    return new Promise((resolve, reject) => this.enqueue({ kind: 'mbx', user, mailbox, status: st, resolve, reject }));
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
    // What the batch changed so far (decisions see memory + earlier intents): registrations by (user, token), with
    // the tokens touched per user, and mailbox states (users whose states an emptied user dropped are in mbxCleared).
    const overlay = new Map<string, Registration | null>();
    const touched = new Map<string, Set<string>>();
    const mbxOverlay = new Map<string, Map<string, MailboxStatus>>();
    const mbxCleared = new Set<string>();
    const lookup = (user: string, token: string): Registration | null => {
      const k = regKey(user, token);
      return overlay.has(k) ? (overlay.get(k) as Registration | null) : this.state.regs.get(user)?.get(token) ?? null;
    };
    const setOverlay = (user: string, token: string, reg: Registration | null): void => {
      overlay.set(regKey(user, token), reg);
      let t = touched.get(user);
      if (!t) touched.set(user, (t = new Set()));
      t.add(token);
    };
    /** Whether the user has any stored registration (live or not yet purged). */
    const hasRegs = (user: string): boolean => {
      const t = touched.get(user);
      if (t) for (const token of t) if (overlay.get(regKey(user, token)) !== null) return true;
      for (const token of this.state.regs.get(user)?.keys() ?? []) if (!t?.has(token)) return true;
      return false;
    };
    const afterDelete = (user: string): void => {
      if (hasRegs(user)) return;
      mbxOverlay.delete(user);
      mbxCleared.add(user);
    };
    const storedStatus = (user: string, mailbox: string): MailboxStatus | undefined => {
      const o = mbxOverlay.get(user)?.get(mailbox);
      if (o !== undefined || mbxCleared.has(user)) return o;
      return this.state.mbx.get(user)?.get(mailbox);
    };
    const records: RecordBase[] = [];
    const lines: Buffer[] = [];
    const write = (rec: RecordBase): void => {
      records.push(rec);
      lines.push(encodeLine(rec));
    };
    const results: Array<() => void> = [];
    for (const intent of batch) {
      switch (intent.kind) {
        case 'upsert': {
          const old = lookup(intent.reg.user, intent.reg.deviceToken);
          const live = old !== null && isLive(old, this.ttlMs, intent.now);
          const reg: Registration = { ...intent.reg, firstSeen: live ? old.firstSeen : intent.now, lastSeen: intent.now };
          setOverlay(reg.user, reg.deviceToken, reg);
          write({ type: 'reg.put', reg });
          const res = { created: !live, registration: copyRegistration(reg) };
          results.push(() => intent.resolve(res));
          break;
        }
        case 'remove': {
          const old = lookup(intent.user, intent.token);
          let removed = false;
          if (old !== null && (intent.unlessSeenAfter === undefined || old.lastSeen <= intent.unlessSeenAfter)) {
            removed = isLive(old, this.ttlMs, intent.now);
            setOverlay(intent.user, intent.token, null);
            write({ type: 'reg.del', user: intent.user, token: intent.token });
            afterDelete(intent.user);
          }
          results.push(() => intent.resolve(removed));
          break;
        }
        case 'purge': {
          let n = 0;
          const emptied = new Set<string>();
          const consider = (reg: Registration | null): void => {
            if (reg !== null && !isLive(reg, this.ttlMs, intent.now)) {
              setOverlay(reg.user, reg.deviceToken, null);
              write({ type: 'reg.del', user: reg.user, token: reg.deviceToken });
              emptied.add(reg.user);
              n++;
            }
          };
          for (const m of this.state.regs.values()) {
            for (const reg of m.values()) {
              const k = regKey(reg.user, reg.deviceToken);
              consider(overlay.has(k) ? (overlay.get(k) as Registration | null) : reg);
            }
          }
          for (const [k, reg] of [...overlay]) {
            if (reg !== null && !this.state.regs.get(reg.user)?.has(reg.deviceToken) && overlay.get(k) === reg) consider(reg);
          }
          for (const user of emptied) afterDelete(user);
          if (n > 0) this.log.info({ purged: n }, 'purged expired registrations');
          results.push(() => intent.resolve(n));
          break;
        }
        case 'mbx': {
          const { user, mailbox, status } = intent;
          const old = storedStatus(user, mailbox);
          if (hasRegs(user) && (old === undefined || !sameMailboxStatus(old, status))) {
            let m = mbxOverlay.get(user);
            if (!m) mbxOverlay.set(user, (m = new Map()));
            m.set(mailbox, status);
            write({ type: 'mbx.put', user, mailbox, status });
          }
          results.push(() => intent.resolve());
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
    // Memory follows the journal exactly: the records just written, applied in order as a replay would.
    try {
      for (const rec of records) applyRecord(this.state, rec, this.journalFile, -1);
    } catch (err) {
      // A bug guard (we wrote these records ourselves): memory and journal may now disagree, so rewrite before
      // taking more writes, and acknowledge nothing of this batch.
      this.fail(err as Error);
      const e = new StoreUnavailableError(`embedded store could not apply its own journal records: ${(err as Error).message}`);
      for (const i of batch) i.reject(e);
      return;
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
    const live: State = emptyState();
    const body: Buffer[] = [];
    const users = [...this.state.regs.keys()].sort(compareStrings);
    let records = 0;
    for (const user of users) {
      const m = this.state.regs.get(user) as Map<string, Registration>;
      for (const token of [...m.keys()].sort(compareStrings)) {
        const reg = m.get(token) as Registration;
        if (!isLive(reg, this.ttlMs, now)) continue;
        setReg(live, reg);
        body.push(encodeLine({ type: 'reg.put', reg }));
        records++;
      }
    }
    // Mailbox states after every registration, only for the users kept.
    for (const user of users) {
      const m = this.state.mbx.get(user);
      if (!m || !live.regs.has(user)) continue;
      for (const mailbox of [...m.keys()].sort(compareStrings)) {
        const status = m.get(mailbox) as MailboxStatus;
        setMailboxStatus(live, user, mailbox, status);
        body.push(encodeLine({ type: 'mbx.put', user, mailbox, status }));
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

  // ---------------------------------------------------------------- reads (get, list…, counts: EmbeddedStateReader)

  protected checkOpen(): void {
    if (this.closing) throw new StoreUnavailableError('embedded registration store is closed');
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
