/**
 * In-memory state of the embedded store, shared by the writable store (embedded.ts) and the lock-free read-only
 * view (embedded-readonly.ts): how it is loaded from snapshot + journal (`loadState`, pure: reads buffers, writes
 * nothing) and how it is read (`EmbeddedStateReader`, the get/list/counts methods of RegistrationStore).
 * File formats and damage rules: header comments of embedded.ts and records.ts.
 */
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import {
  compareRegistrations,
  compareStrings,
  copyRegistration,
  isLive,
  normalizeToken,
  parseRegistration,
  validateTtl,
  validateUser,
} from './common.js';
import { FORMAT, corrupt, parseLines, type RecordBase } from './records.js';
import { mailboxStateRecord, parseMailboxStatus, type MailboxStatus, type Registration, type RegistrationStore } from './types.js';

export const JOURNAL = 'store.journal';
export const SNAPSHOT = 'store.snapshot';
export const LOCK = 'store.lock';

/**
 * regs: user → device token → registration (expired ones included until purged or compacted away).
 * mbx:  user → mailbox → last status a watcher stored; only for users in `regs` (dropped with their last registration).
 */
export interface State {
  regs: Map<string, Map<string, Registration>>;
  mbx: Map<string, Map<string, MailboxStatus>>;
}

export function emptyState(): State {
  return { regs: new Map(), mbx: new Map() };
}

export function setReg(state: State, reg: Registration): void {
  let m = state.regs.get(reg.user);
  if (!m) state.regs.set(reg.user, (m = new Map()));
  m.set(reg.deviceToken, reg);
}

/** Removes one registration; the user's last one takes the user's mailbox states with it. */
export function deleteReg(state: State, user: string, token: string): void {
  const m = state.regs.get(user);
  if (m && m.delete(token) && m.size === 0) {
    state.regs.delete(user);
    state.mbx.delete(user);
  }
}

export function setMailboxStatus(state: State, user: string, mailbox: string, status: MailboxStatus): void {
  let m = state.mbx.get(user);
  if (!m) state.mbx.set(user, (m = new Map()));
  m.set(mailbox, status);
}

export async function readIfExists(file: string): Promise<Buffer | null> {
  try {
    return await fsp.readFile(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

export interface LoadedState {
  state: State;
  /** Generation of the snapshot (0 without one): the generation of the store. */
  gen: number;
  snapshotBytes: number;
  /** Generation in the journal header. */
  journalGen: number;
  /** Bytes of the journal up to its last complete line (the torn tail excluded). */
  journalBytes: number;
  /** A final journal line without LF (being written, or the writer died writing it); not applied. */
  torn?: { offset: number; bytes: number };
  /**
   * The journal is older than the snapshot (a crash between the two renames of a compaction, or a compaction
   * running right now): its content is all in the snapshot, so only the snapshot was loaded.
   */
  superseded: boolean;
}

/**
 * Builds the state from the contents of store.snapshot and store.journal (null: the file does not exist). Both absent
 * is an empty store. Throws StoreCorruptError for damage, a missing journal next to a snapshot, or a journal newer
 * than the snapshot. Writes nothing: what to do about a torn tail or a superseded journal is the caller's business.
 */
export function loadState(
  snap: Buffer | null,
  journal: Buffer | null,
  files: { snapshot: string; journal: string },
): LoadedState {
  const state = emptyState();
  const gen = snap ? loadSnapshot(snap, files.snapshot, state) : 0;
  const snapshotBytes = snap?.length ?? 0;
  if (journal === null) {
    if (snap) {
      throw corrupt(files.journal, 0, `journal is missing but snapshot ${files.snapshot} exists (gen ${gen}); acknowledged writes may be lost`);
    }
    return { state, gen, snapshotBytes, journalGen: 0, journalBytes: 0, superseded: false };
  }
  const { gen: journalGen, replay, torn } = readJournal(journal, files.journal);
  if (journalGen > gen) {
    throw corrupt(files.journal, 0, snap
      ? `journal generation ${journalGen} is newer than snapshot generation ${gen}`
      : `journal generation ${journalGen} needs snapshot ${files.snapshot}, which is missing`);
  }
  if (journalGen < gen) return { state, gen, snapshotBytes, journalGen, journalBytes: journal.length, superseded: true };
  for (const line of replay) applyRecord(state, line.rec, files.journal, line.offset);
  const out: LoadedState = { state, gen, snapshotBytes, journalGen, journalBytes: torn ? torn.offset : journal.length, superseded: false };
  if (torn) out.torn = torn;
  return out;
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
    if (line.rec.type !== 'reg.put' && line.rec.type !== 'mbx.put') {
      throw corrupt(file, line.offset, `unexpected record type "${line.rec.type}" in a snapshot`);
    }
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

/** Applies one journal or snapshot record to `state` (also how the writer updates memory after an fsync). */
export function applyRecord(state: State, rec: RecordBase, file: string, offset: number): void {
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
    case 'mbx.put': {
      const status = parseMailboxStatus(rec.status);
      if (typeof rec.user !== 'string' || typeof rec.mailbox !== 'string' || rec.mailbox === '' || !status) {
        throw corrupt(file, offset, 'malformed mailbox state record');
      }
      setMailboxStatus(state, rec.user, rec.mailbox, status);
      return;
    }
    case 'journal':
    case 'snapshot':
      throw corrupt(file, offset, `unexpected ${rec.type} header in the middle of the file`);
    default:
      throw corrupt(file, offset, `unknown record type "${rec.type}" (written by a newer version?)`);
  }
}

/**
 * The read side of RegistrationStore over a `State`, expiring by `ttlMs` against `clock`. Subclasses own how the
 * state is kept (the writable store replaces it on compaction) and say in `checkOpen` whether reads are allowed.
 */
export abstract class EmbeddedStateReader
  implements Pick<RegistrationStore, 'kind' | 'get' | 'listByUser' | 'listUsers' | 'listAll' | 'counts' | 'getMailboxStates'> {
  readonly kind = 'embedded' as const;
  protected readonly ttlMs: number;
  protected readonly clock: () => number;
  protected state: State;

  protected constructor(state: State, ttlMs: number, clock: (() => number) | undefined) {
    this.state = state;
    this.ttlMs = validateTtl(ttlMs);
    this.clock = clock ?? Date.now;
  }

  /** Throws when reads are no longer allowed (closed). */
  protected abstract checkOpen(): void;

  /** Registrations held, expired ones included. */
  protected size(): number {
    let n = 0;
    for (const m of this.state.regs.values()) n += m.size;
    return n;
  }

  /** Users with stored mailbox states. */
  protected mailboxStateUsers(): number {
    return this.state.mbx.size;
  }

  async getMailboxStates(user: string): Promise<Record<string, MailboxStatus>> {
    this.checkOpen();
    validateUser(user);
    const m = this.state.mbx.get(user);
    return mailboxStateRecord([...(m ?? [])].map(([mailbox, s]) => [mailbox, { uidValidity: s.uidValidity, uidNext: s.uidNext, messages: s.messages }] as const));
  }

  async get(user: string, deviceToken: string): Promise<Registration | null> {
    this.checkOpen();
    validateUser(user);
    const reg = this.state.regs.get(user)?.get(normalizeToken(deviceToken));
    return reg && isLive(reg, this.ttlMs, this.clock()) ? copyRegistration(reg) : null;
  }

  async listByUser(user: string): Promise<Registration[]> {
    this.checkOpen();
    validateUser(user);
    const now = this.clock();
    const out: Registration[] = [];
    for (const reg of this.state.regs.get(user)?.values() ?? []) {
      if (isLive(reg, this.ttlMs, now)) out.push(copyRegistration(reg));
    }
    return out.sort(compareRegistrations);
  }

  async listUsers(): Promise<string[]> {
    this.checkOpen();
    const now = this.clock();
    const out: string[] = [];
    for (const [user, m] of this.state.regs) {
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
    for (const m of this.state.regs.values()) {
      for (const reg of m.values()) if (isLive(reg, this.ttlMs, now)) out.push(copyRegistration(reg));
    }
    return out.sort(compareRegistrations);
  }

  async counts(): Promise<{ users: number; registrations: number }> {
    this.checkOpen();
    const now = this.clock();
    let users = 0;
    let registrations = 0;
    for (const m of this.state.regs.values()) {
      let n = 0;
      for (const reg of m.values()) if (isLive(reg, this.ttlMs, now)) n++;
      if (n > 0) users++;
      registrations += n;
    }
    return { users, registrations };
  }
}
