/**
 * Read-only view of an embedded store, for administration while the proxy owns the data directory: it does not take
 * store.lock and never writes, creates, truncates or deletes anything (not even the temp files or the torn journal
 * tail the writable open cleans up). Reads come from a point-in-time load of snapshot + journal, made at open.
 *
 * The owner may append and compact meanwhile:
 *   - a torn final journal line is a write in progress: ignored (lines complete but not yet fsync'ed are shown);
 *   - a compaction renames the snapshot, then the journal. The journal is read first, so a compaction between the
 *     two reads shows as a journal older than the snapshot (never newer); the load is then retried (a few times, with
 *     a short back-off) to get a matching pair, and if none comes, the snapshot alone is used — it holds everything
 *     the older journal did, so it is a consistent state too;
 *   - anything else that fails to load (StoreCorruptError) is retried the same way, in case it was read mid-change,
 *     and thrown if it persists: real damage is reported, as by the writable store.
 * Writes reject with StoreReadOnlyError (a StoreUnavailableError) naming the directory and the owner's pid.
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { silentLogger, type Logger } from '../ops/log.js';
import { validateTtl } from './common.js';
import { EmbeddedStateReader, JOURNAL, LOCK, SNAPSHOT, loadState, readIfExists, type LoadedState } from './embedded-state.js';
import {
  StoreCorruptError,
  StoreUnavailableError,
  type MailboxStatus,
  type Registration,
  type RegistrationInput,
  type RegistrationStore,
} from './types.js';

export interface EmbeddedReadOnlyOptions {
  dataDir: string;
  ttlMs: number;
  logger?: Logger;
  /** Clock for reads (ms since epoch). */
  clock?: () => number;
  /** Pid of the process owning the directory (as StoreLockedError reported it); default: read from store.lock. */
  holderPid?: number;
  /** Loads tried before giving up on a matching snapshot + journal pair or on damage (default 5). */
  loadAttempts?: number;
}

/** A write was attempted through a read-only view. */
export class StoreReadOnlyError extends StoreUnavailableError {
  readonly dir: string;
  readonly pid: number | undefined;
  constructor(message: string, details: { dir: string; pid?: number }) {
    super(message);
    this.name = 'StoreReadOnlyError';
    this.dir = details.dir;
    this.pid = details.pid;
  }
}

async function lockHolderPid(dir: string): Promise<number | undefined> {
  try {
    const v = JSON.parse(await fsp.readFile(path.join(dir, LOCK), 'utf8')) as { pid?: unknown };
    return typeof v.pid === 'number' && Number.isSafeInteger(v.pid) && v.pid > 0 ? v.pid : undefined;
  } catch {
    return undefined;
  }
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

export class EmbeddedReadOnlyStore extends EmbeddedStateReader implements RegistrationStore {
  readonly readOnly = true as const;
  readonly dir: string;
  /** The process owning the directory when the view was loaded, when known. */
  readonly holderPid: number | undefined;
  /** Generation of the snapshot the view was loaded from (0: none yet). */
  readonly gen: number;
  private closed = false;

  private constructor(dir: string, opts: EmbeddedReadOnlyOptions, holderPid: number | undefined, loaded: LoadedState) {
    super(loaded.state, opts.ttlMs, opts.clock);
    this.dir = dir;
    this.holderPid = holderPid;
    this.gen = loaded.gen;
  }

  /**
   * Loads the store in `dataDir` without locking it. Throws StoreUnavailableError when the directory does not exist
   * and StoreCorruptError when its files are damaged.
   */
  static async open(opts: EmbeddedReadOnlyOptions): Promise<EmbeddedReadOnlyStore> {
    validateTtl(opts.ttlMs);
    const log = (opts.logger ?? silentLogger()).child({ component: 'store', store: 'embedded', readOnly: true });
    let dir: string;
    try {
      dir = await fsp.realpath(opts.dataDir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        throw new StoreUnavailableError(`no embedded store in ${opts.dataDir}: the directory does not exist`);
      }
      throw err;
    }
    const holderPid = opts.holderPid ?? (await lockHolderPid(dir));
    const files = { snapshot: path.join(dir, SNAPSHOT), journal: path.join(dir, JOURNAL) };
    const attempts = Math.max(1, opts.loadAttempts ?? 5);
    for (let attempt = 1; ; attempt++) {
      let loaded: LoadedState;
      try {
        // Journal first: a compaction renames the snapshot before the journal (see the header comment).
        const journal = await readIfExists(files.journal);
        const snap = await readIfExists(files.snapshot);
        loaded = loadState(snap, journal, files);
      } catch (err) {
        if (!(err instanceof StoreCorruptError) || attempt >= attempts) throw err;
        log.debug({ attempt, err: err.message }, 'store files did not load; retrying');
        await sleep(10 * 2 ** (attempt - 1));
        continue;
      }
      if (loaded.superseded && attempt < attempts) {
        log.debug({ attempt, snapGen: loaded.gen, journalGen: loaded.journalGen }, 'store compacted while loading; retrying');
        await sleep(10 * 2 ** (attempt - 1));
        continue;
      }
      const view = new EmbeddedReadOnlyStore(dir, opts, holderPid, loaded);
      log.info(
        {
          dir, gen: loaded.gen, registrations: view.size(), holderPid, attempts: attempt,
          ...(loaded.superseded ? { journalIgnored: loaded.journalGen } : {}),
          ...(loaded.torn ? { tornBytes: loaded.torn.bytes } : {}),
        },
        'embedded registration store opened read-only',
      );
      return view;
    }
  }

  private readOnlyError(op: string): StoreReadOnlyError {
    const why = this.holderPid !== undefined
      ? `the store is in use by the running proxy (pid ${this.holderPid})`
      : 'it was opened without the store lock';
    return new StoreReadOnlyError(
      `read-only view of ${this.dir}: ${why}; ${op} needs exclusive access: stop the proxy first, ` +
        'or use Redis (--redis-url) for live administration',
      { dir: this.dir, ...(this.holderPid !== undefined ? { pid: this.holderPid } : {}) },
    );
  }

  private reject<T>(op: string): Promise<T> {
    try {
      this.checkOpen();
    } catch (err) {
      return Promise.reject(err);
    }
    return Promise.reject(this.readOnlyError(op));
  }

  upsert(_input: RegistrationInput): Promise<{ created: boolean; registration: Registration }> {
    return this.reject('upsert');
  }

  remove(_user: string, _deviceToken: string, _opts?: { unlessSeenAfter?: number }): Promise<boolean> {
    return this.reject('remove');
  }

  purgeExpired(_now?: number): Promise<number> {
    return this.reject('purgeExpired');
  }

  setMailboxState(_user: string, _mailbox: string, _status: MailboxStatus): Promise<void> {
    return this.reject('setMailboxState');
  }

  protected checkOpen(): void {
    if (this.closed) throw new StoreUnavailableError('embedded registration store (read-only view) is closed');
  }

  /** Resolves while open: the view can serve reads (it never takes writes). */
  async ping(): Promise<void> {
    this.checkOpen();
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}
