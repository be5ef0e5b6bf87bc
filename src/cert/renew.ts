/**
 * Getting and renewing a Mail push certificate through the historical PushCertRequest
 * service (./pushcert.ts), and the auto-renewer `serve` can run when the operator has
 * configured vendor signing material.
 *
 * The renewer renews 30 days before expiry, sends at most one request at a time, backs
 * off exponentially after a failure or refusal (1 h, 2 h, 4 h … capped at 24 h) and waits
 * at least the initial back-off between any two requests, so it can never loop (xapsd's
 * loops flooded accounts with certificates and got an IP blocked: #31, #41). New files are
 * written atomically; the CertificateSource watching them picks them up (and is asked to
 * reload directly as well).
 */
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { dirname, join } from 'node:path';
import type { Logger } from '../ops/log.js';
import { CertificateError, PushCertRefusedError } from './errors.js';
import { writeMailCredentials, type CredentialTarget } from './files.js';
import { DAY_MS, EXPIRY_WARNING_DAYS, type LoadedCertificate } from './load.js';
import {
  readCompanionKeys,
  requestPushCertificates,
  writeCompanionFiles,
  type PushCertIssue,
  type VendorMaterial,
} from './pushcert.js';
import { certificateInfo, isoDate } from './x509.js';

/** Operator-supplied inputs of the PushCertRequest flow. */
export interface PushCertAccount {
  appleId: string;
  /** Hex SHA-256 of the Apple ID password. */
  passwordHash: string;
  vendor: VendorMaterial;
  /** …/caservice/new URL (default Apple's). */
  serviceUrl?: string;
  /** PEM CA(s) trusted for the service (tests, a mock). */
  ca?: string;
  timeoutMs?: number;
  /** Host name for the request's Descriptions. */
  description?: string;
}

export interface IssuedMailCertificate {
  certPem: string;
  keyPem: string;
  topic: string;
  serial: string;
  notAfter: Date;
  /** Files written. */
  written: string[];
}

/** Check an issued Mail certificate before anything is written: matches the key, has a topic, is valid now. */
export function checkIssuedMailCertificate(certPem: string, keyPem: string, now = new Date()): { topic: string; serial: string; notAfter: Date } {
  const cert = new X509Certificate(certPem);
  if (!cert.checkPrivateKey(createPrivateKey(keyPem))) {
    throw new CertificateError('the issued Mail certificate does not match its key', { code: 'service' });
  }
  const info = certificateInfo(cert);
  if (!info.topic) throw new CertificateError('the issued Mail certificate has no topic (no subject UID)', { code: 'service' });
  if (info.notAfter.getTime() <= now.getTime() || info.notBefore.getTime() > now.getTime() + DAY_MS) {
    throw new CertificateError(
      `the issued Mail certificate is not valid now (${isoDate(info.notBefore)} – ${isoDate(info.notAfter)})`,
      { code: 'service' },
    );
  }
  return { topic: info.topic, serial: info.serial, notAfter: info.notAfter };
}

async function store(issue: PushCertIssue, target: CredentialTarget, companionDir: string, keyUnchanged: boolean): Promise<IssuedMailCertificate> {
  const checked = checkIssuedMailCertificate(issue.mail.certPem, issue.mail.keyPem);
  const written = await writeCompanionFiles(companionDir, issue);
  written.push(...(await writeMailCredentials(target, issue.mail.certPem, issue.mail.keyPem, { keyUnchanged })));
  return { ...issue.mail, ...checked, written };
}

/**
 * `cert request`: five new keys, one request to …/new, and the Mail certificate + key
 * stored in `outDir` (mail.pem, mail.key 0600; the other services' files beside them).
 */
export async function requestNewMailPushCertificate(
  account: PushCertAccount,
  outDir: string,
): Promise<IssuedMailCertificate> {
  const issue = await requestPushCertificates({ mode: 'new', ...account });
  return store(issue, { kind: 'pem', certPath: join(outDir, 'mail.pem'), keyPath: join(outDir, 'mail.key') }, outDir, false);
}

/**
 * Renewal: the same keys (the Mail key of `current`, the other services' keys read from
 * `companionDir` when present, default the target's directory) with the old serials, one
 * request to …/renew, the result written to `target` (the other services' files beside it).
 */
export async function renewMailPushCertificate(
  account: PushCertAccount,
  current: Pick<LoadedCertificate, 'keyPem' | 'serial'>,
  target: CredentialTarget,
  companionDir: string = defaultCompanionDir(target),
): Promise<IssuedMailCertificate> {
  const keys = await readCompanionKeys(companionDir);
  keys.Mail = { keyPem: current.keyPem, serial: current.serial };
  const issue = await requestPushCertificates({ mode: 'renew', ...account, keys });
  // The other services' renewed files go next to the Mail certificate's new home.
  return store(issue, target, defaultCompanionDir(target), true);
}

export function defaultCompanionDir(target: CredentialTarget): string {
  return dirname(target.kind === 'pkcs12' ? target.p12Path : target.certPath);
}

/** Is `cert` due for renewal at `now` (within `beforeMs` of expiry)? */
export function renewalDue(cert: Pick<LoadedCertificate, 'notAfter'>, now: number, beforeMs = EXPIRY_WARNING_DAYS * DAY_MS): boolean {
  return cert.notAfter.getTime() - beforeMs <= now;
}

// ---------------------------------------------------------------------------------------------
// Auto-renewal

export interface RenewerClock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export const systemClock: RenewerClock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => {
    const t = setTimeout(fn, ms);
    t.unref();
    return t;
  },
  clearTimeout: (h) => clearTimeout(h as NodeJS.Timeout),
};

export interface CertificateRenewerOptions {
  /** The certificate in use (a CertificateSource). `reload` is called after new files are written. */
  source: { current(): LoadedCertificate; reload(): Promise<unknown> };
  /** Where the renewed certificate goes: the files the source reads. */
  target: CredentialTarget;
  /** Required unless `renew` is given. */
  account?: PushCertAccount;
  /** Directory with the other services' keys (default: the target's directory). */
  companionDir?: string;
  /** Renew this long before expiry (default 30 days). */
  renewBeforeMs?: number;
  /** First back-off after a failure, and the least time between two requests (default 1 h). */
  backoffInitialMs?: number;
  /** Longest back-off (default 24 h). */
  backoffMaxMs?: number;
  /** Re-check at least this often (default 12 h; timers cannot exceed 24.8 days anyway). */
  maxSleepMs?: number;
  clock?: RenewerClock;
  logger?: Logger;
  /** The renewal itself (default: renewMailPushCertificate with `account`); a seam for tests. */
  renew?: (current: LoadedCertificate) => Promise<unknown>;
}

export type RenewerState = 'stopped' | 'waiting' | 'renewing' | 'backoff';
export type RenewOutcome = 'not-due' | 'renewed' | 'failed' | 'busy' | 'backoff' | 'stopped';

export interface RenewerStatus {
  state: RenewerState;
  /** Failures since the last success. */
  failures: number;
  nextCheckAt: Date | undefined;
  /** No request before this time (back-off / spacing). */
  notBefore: Date | undefined;
  lastError: string | undefined;
  lastRenewedAt: Date | undefined;
  /** Requests sent since start. */
  attempts: number;
}

export interface CertificateRenewerEvents {
  renewed: [cert: LoadedCertificate];
  failed: [error: Error, retryInMs: number];
}

export class CertificateRenewer extends EventEmitter<CertificateRenewerEvents> {
  readonly #opts: CertificateRenewerOptions;
  readonly #clock: RenewerClock;
  readonly #renewBeforeMs: number;
  readonly #initialMs: number;
  readonly #maxMs: number;
  readonly #maxSleepMs: number;
  readonly #renew: (current: LoadedCertificate) => Promise<unknown>;
  #timer: unknown;
  #running = false;
  #inFlight: Promise<RenewOutcome> | undefined;
  #failures = 0;
  #attempts = 0;
  #notBefore = 0;
  #nextCheckAt: number | undefined;
  #lastError: string | undefined;
  #lastRenewedAt: number | undefined;

  constructor(opts: CertificateRenewerOptions) {
    super();
    if (!opts.renew && !opts.account) throw new Error('CertificateRenewer: `account` (or `renew`) is required');
    this.#opts = opts;
    this.#clock = opts.clock ?? systemClock;
    this.#renewBeforeMs = opts.renewBeforeMs ?? EXPIRY_WARNING_DAYS * DAY_MS;
    this.#initialMs = opts.backoffInitialMs ?? 3_600_000;
    this.#maxMs = Math.max(this.#initialMs, opts.backoffMaxMs ?? DAY_MS);
    this.#maxSleepMs = Math.min(opts.maxSleepMs ?? 12 * 3_600_000, 2 ** 31 - 1);
    const account = opts.account;
    const companionDir = opts.companionDir ?? defaultCompanionDir(opts.target);
    this.#renew = opts.renew ?? ((current) => renewMailPushCertificate(account!, current, opts.target, companionDir));
  }

  /** Start checking (right away, then as due). Idempotent. */
  start(): void {
    if (this.#running) return;
    this.#running = true;
    this.#schedule(0);
  }

  /** Stop: no further checks; a request in flight completes but schedules nothing. */
  stop(): void {
    this.#running = false;
    this.#cancel();
    this.#nextCheckAt = undefined;
  }

  status(): RenewerStatus {
    const state: RenewerState = !this.#running
      ? 'stopped'
      : this.#inFlight
        ? 'renewing'
        : this.#failures > 0 && this.#clock.now() < this.#notBefore
          ? 'backoff'
          : 'waiting';
    return {
      state,
      failures: this.#failures,
      nextCheckAt: this.#nextCheckAt !== undefined ? new Date(this.#nextCheckAt) : undefined,
      notBefore: this.#notBefore > 0 ? new Date(this.#notBefore) : undefined,
      lastError: this.#lastError,
      lastRenewedAt: this.#lastRenewedAt !== undefined ? new Date(this.#lastRenewedAt) : undefined,
      attempts: this.#attempts,
    };
  }

  /** Resolves when no renewal is in flight. */
  async whenIdle(): Promise<void> {
    while (this.#inFlight) await this.#inFlight.catch(() => undefined);
  }

  /**
   * Check now: renew if due and allowed (not in back-off, no request in flight).
   * The schedule continues from the outcome when the renewer is running.
   */
  checkNow(): Promise<RenewOutcome> {
    if (this.#inFlight) return Promise.resolve('busy');
    const now = this.#clock.now();
    if (now < this.#notBefore) {
      this.#schedule(this.#notBefore - now);
      return Promise.resolve('backoff');
    }
    const current = this.#opts.source.current();
    if (!renewalDue(current, now, this.#renewBeforeMs)) {
      this.#schedule(current.notAfter.getTime() - this.#renewBeforeMs - now);
      return Promise.resolve('not-due');
    }
    this.#cancel();
    this.#inFlight = this.#attempt(current).finally(() => {
      this.#inFlight = undefined;
    });
    return this.#inFlight;
  }

  async #attempt(current: LoadedCertificate): Promise<RenewOutcome> {
    const log = this.#opts.logger;
    this.#attempts++;
    log?.info(
      { serial: current.serial, notAfter: isoDate(current.notAfter) },
      `renewing the Mail push certificate (expires ${isoDate(current.notAfter)})`,
    );
    try {
      await this.#renew(current);
      await this.#opts.source.reload();
      const next = this.#opts.source.current();
      if (next.fingerprint256 === current.fingerprint256) {
        throw new CertificateError('the renewed certificate was written but is not in use (it did not load; see the reload error)', {
          code: 'service',
        });
      }
      const now = this.#clock.now();
      if (renewalDue(next, now, this.#renewBeforeMs)) {
        throw new CertificateError(`the renewed certificate expires on ${isoDate(next.notAfter)}, which is still within the renewal window`, {
          code: 'service',
        });
      }
      this.#failures = 0;
      this.#lastError = undefined;
      this.#lastRenewedAt = now;
      // Spacing: never two requests within the initial back-off, whatever the certificate says.
      this.#notBefore = now + this.#initialMs;
      log?.info({ serial: next.serial, notAfter: isoDate(next.notAfter), topic: next.topic }, `Mail push certificate renewed (expires ${isoDate(next.notAfter)})`);
      this.emit('renewed', next);
      if (this.#running) this.#schedule(Math.max(this.#initialMs, next.notAfter.getTime() - this.#renewBeforeMs - now));
      return 'renewed';
    } catch (err) {
      const error = err instanceof Error ? err : new Error(String(err));
      this.#failures++;
      const delay = Math.min(this.#initialMs * 2 ** Math.min(this.#failures - 1, 30), this.#maxMs);
      this.#notBefore = this.#clock.now() + delay;
      this.#lastError = error.message;
      const refused = error instanceof PushCertRefusedError;
      log?.error(
        { failures: this.#failures, retryInMs: delay, ...(refused ? { errorCode: error.errorCode } : {}) },
        `Mail push certificate renewal failed (attempt ${this.#failures}; next try in ${Math.round(delay / 60_000)} min): ${error.message}`,
      );
      this.emit('failed', error, delay);
      if (this.#running) this.#schedule(delay);
      return 'failed';
    }
  }

  #schedule(delayMs: number): void {
    if (!this.#running) return;
    this.#cancel();
    const delay = Math.max(0, Math.min(delayMs, this.#maxSleepMs));
    this.#nextCheckAt = this.#clock.now() + delay;
    this.#timer = this.#clock.setTimeout(() => {
      this.#timer = undefined;
      if (this.#running) void this.checkNow();
    }, delay);
  }

  #cancel(): void {
    if (this.#timer !== undefined) this.#clock.clearTimeout(this.#timer);
    this.#timer = undefined;
  }
}
