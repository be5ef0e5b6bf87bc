/**
 * The current Mail push certificate, kept up to date: re-read on `reload()` (the app calls
 * it on SIGHUP) and when the files change on disk. Editors and certbot replace files by
 * rename, which a watch on the file itself does not see (it follows the old inode), so the
 * directories are watched as well; events are debounced (200 ms) into one reload. A new
 * certificate that fails to load (half-written, key mismatch, expired, …) is logged and
 * the previous one stays in use.
 *
 * Events: `change` (cert: LoadedCertificate, previous: LoadedCertificate) when the
 * certificate (fingerprint) changed; `invalid` (error: CertificateError) when a reload failed.
 */
import { EventEmitter } from 'node:events';
import { watch, type FSWatcher } from 'node:fs';
import { basename, dirname, resolve } from 'node:path';
import type { Logger } from '../ops/log.js';
import { CertificateError } from './errors.js';
import { DAY_MS, EXPIRY_WARNING_DAYS, loadMailPushCredentials, type CredentialFiles, type LoadedCertificate } from './load.js';
import { isoDate } from './x509.js';

export interface CertificateSourceOptions extends CredentialFiles {
  logger?: Logger;
  /** Watch the files and their directories (default true). */
  watch?: boolean;
  /** Quiet time after the last file event before reloading (default 200 ms). */
  debounceMs?: number;
  /** How often to re-check expiry and log warnings (default 12 h; 0 = never). */
  expiryCheckMs?: number;
  /** Clock (tests). */
  now?: () => Date;
}

export interface ExpiryInfo {
  notAfter: Date;
  daysLeft: number;
  /** Within 30 days of expiry. */
  expiresSoon: boolean;
  expired: boolean;
}

export interface ReloadResult {
  changed: boolean;
  error?: CertificateError;
}

export interface CertificateSourceEvents {
  change: [cert: LoadedCertificate, previous: LoadedCertificate];
  invalid: [error: CertificateError];
}

export class CertificateSource extends EventEmitter<CertificateSourceEvents> {
  readonly #files: CredentialFiles;
  readonly #logger: Logger | undefined;
  readonly #debounceMs: number;
  readonly #now: () => Date;
  #cert: LoadedCertificate;
  #dirWatchers: FSWatcher[] = [];
  #fileWatchers: FSWatcher[] = [];
  #watching = false;
  #debounce: NodeJS.Timeout | undefined;
  #expiryTimer: NodeJS.Timeout | undefined;
  #reloading: Promise<ReloadResult> | undefined;
  #again = false;
  #closed = false;

  /** Load the certificate (throws CertificateError when it is unusable) and start watching. */
  static async open(opts: CertificateSourceOptions): Promise<CertificateSource> {
    const now = opts.now ?? (() => new Date());
    const cert = await loadMailPushCredentials(opts, { now: now() });
    const source = new CertificateSource(opts, cert);
    for (const w of cert.warnings) source.#logger?.warn({ source: cert.source }, w);
    return source;
  }

  private constructor(opts: CertificateSourceOptions, cert: LoadedCertificate) {
    super();
    this.#files = {
      ...(opts.certPath !== undefined ? { certPath: resolve(opts.certPath) } : {}),
      ...(opts.keyPath !== undefined ? { keyPath: resolve(opts.keyPath) } : {}),
      ...(opts.p12Path !== undefined ? { p12Path: resolve(opts.p12Path) } : {}),
      ...(opts.p12Passphrase !== undefined ? { p12Passphrase: opts.p12Passphrase } : {}),
    };
    this.#logger = opts.logger;
    this.#debounceMs = opts.debounceMs ?? 200;
    this.#now = opts.now ?? (() => new Date());
    this.#cert = cert;
    if (opts.watch !== false) {
      this.#watching = true;
      this.#watch();
    }
    const every = opts.expiryCheckMs ?? 12 * 3_600_000;
    if (every > 0) {
      this.#expiryTimer = setInterval(() => this.#logExpiry(), every);
      this.#expiryTimer.unref();
    }
  }

  /** The certificate in use. */
  current(): LoadedCertificate {
    return this.#cert;
  }

  /** APNs topic of the certificate in use. */
  topic(): string {
    return this.#cert.topic;
  }

  /** The files being watched (absolute). */
  files(): Readonly<CredentialFiles> {
    return this.#files;
  }

  expiry(): ExpiryInfo {
    const left = this.#cert.notAfter.getTime() - this.#now().getTime();
    return {
      notAfter: this.#cert.notAfter,
      daysLeft: Math.floor(left / DAY_MS),
      expiresSoon: left > 0 && left <= EXPIRY_WARNING_DAYS * DAY_MS,
      expired: left <= 0,
    };
  }

  /**
   * Re-read the files. A certificate that does not load is reported (logged, `invalid`)
   * and the previous one kept. Concurrent calls share one read (plus one more if asked
   * for during it).
   */
  reload(): Promise<ReloadResult> {
    if (this.#reloading) {
      this.#again = true;
      return this.#reloading;
    }
    const run = async (): Promise<ReloadResult> => {
      let result: ReloadResult;
      do {
        this.#again = false;
        result = await this.#reloadOnce();
      } while (this.#again && !this.#closed);
      return result;
    };
    this.#reloading = run().finally(() => {
      this.#reloading = undefined;
    });
    return this.#reloading;
  }

  async #reloadOnce(): Promise<ReloadResult> {
    let next: LoadedCertificate;
    try {
      next = await loadMailPushCredentials(this.#files, { now: this.#now() });
    } catch (err) {
      const error =
        err instanceof CertificateError ? err : new CertificateError(String((err as Error)?.message ?? err), { code: 'bad-input', cause: err });
      this.#logger?.error(
        { source: this.#cert.source, err: { code: error.code, message: error.message } },
        `Mail push certificate not reloaded, keeping the previous one (${this.#cert.topic}, expires ${isoDate(this.#cert.notAfter)}): ${error.message}`,
      );
      if (this.listenerCount('invalid') > 0) this.emit('invalid', error);
      return { changed: false, error };
    } finally {
      // A replaced file is a new inode: re-arm the file watches.
      if (this.#watching && !this.#closed) this.#watchFiles();
    }
    const previous = this.#cert;
    if (next.fingerprint256 === previous.fingerprint256) return { changed: false };
    this.#cert = next;
    this.#logger?.info(
      { source: next.source, topic: next.topic, serial: next.serial, notAfter: isoDate(next.notAfter) },
      `Mail push certificate reloaded (topic ${next.topic}, expires ${isoDate(next.notAfter)})`,
    );
    for (const w of next.warnings) this.#logger?.warn({ source: next.source }, w);
    this.emit('change', next, previous);
    return { changed: true };
  }

  /** Watch the directories (renames) and the files themselves (in-place writes). */
  #watch(): void {
    const paths = this.#paths();
    const names = new Map<string, Set<string>>();
    for (const p of paths) {
      const dir = dirname(p);
      if (!names.has(dir)) names.set(dir, new Set());
      names.get(dir)!.add(basename(p));
    }
    for (const [dir, wanted] of names) {
      const w = this.#add(dir, (_event, filename) => {
        // Some platforms give no filename: then any event in the directory counts.
        if (filename === null || filename === undefined || wanted.has(String(filename))) this.#schedule();
      });
      if (w) this.#dirWatchers.push(w);
    }
    this.#watchFiles();
  }

  /** (Re-)arm the per-file watches: a replaced file is a new inode. */
  #watchFiles(): void {
    for (const w of this.#fileWatchers) w.close();
    this.#fileWatchers = [];
    for (const p of this.#paths()) {
      const w = this.#add(p, () => this.#schedule());
      if (w) this.#fileWatchers.push(w);
    }
  }

  #paths(): string[] {
    return [this.#files.certPath, this.#files.keyPath, this.#files.p12Path].filter((p): p is string => p !== undefined);
  }

  #add(path: string, listener: (event: string, filename: string | Buffer | null) => void): FSWatcher | undefined {
    try {
      const w = watch(path, { persistent: false }, listener);
      w.on('error', () => {
        // The file was removed or replaced; the directory watch (or the next reload) covers it.
        w.close();
      });
      return w;
    } catch {
      // Missing file (mid-replace) or directory: the other watches still apply.
      return undefined;
    }
  }

  #schedule(): void {
    if (this.#closed) return;
    if (this.#debounce) clearTimeout(this.#debounce);
    this.#debounce = setTimeout(() => {
      this.#debounce = undefined;
      void this.reload();
    }, this.#debounceMs);
    this.#debounce.unref();
  }

  #logExpiry(): void {
    const e = this.expiry();
    if (e.expired) {
      this.#logger?.error({ source: this.#cert.source }, `Mail push certificate expired on ${isoDate(e.notAfter)}; APNs will refuse it`);
    } else if (e.expiresSoon) {
      this.#logger?.warn(
        { source: this.#cert.source },
        `Mail push certificate expires on ${isoDate(e.notAfter)} (${e.daysLeft} days left); renew it`,
      );
    }
  }

  /** Stop watching (idempotent). */
  close(): void {
    this.#closed = true;
    if (this.#debounce) clearTimeout(this.#debounce);
    if (this.#expiryTimer) clearInterval(this.#expiryTimer);
    this.#debounce = undefined;
    this.#expiryTimer = undefined;
    for (const w of [...this.#dirWatchers, ...this.#fileWatchers]) w.close();
    this.#dirWatchers = [];
    this.#fileWatchers = [];
  }
}
