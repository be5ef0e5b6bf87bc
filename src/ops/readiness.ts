/**
 * Readiness of a running proxy for /readyz: its listeners are bound, the upstream
 * IMAP server answers with a greeting, the registration store answers, and the
 * APNs certificate (when push has one) has not expired. Results are cached for
 * about a second so that frequent scrapes cannot hammer the upstream or the store.
 */
import { openUpstream, type UpstreamSettings } from '../proxy/upstream.js';
import type { RegistrationStore } from '../store/types.js';
import type { LoadedCertificate } from '../cert/load.js';

export interface CheckResult {
  ok: boolean;
  error?: string;
}

export interface CertificateCheck extends CheckResult {
  notAfter?: string;
  daysLeft?: number;
}

export interface ReadinessReport {
  ready: boolean;
  checks: {
    listeners: CheckResult;
    upstream: CheckResult;
    /** Absent when no store is configured (push disabled). */
    store?: CheckResult;
    /** Absent when push has no certificate (disabled, or token authentication). */
    certificate?: CertificateCheck;
  };
}

export interface ReadinessSources {
  /** The configured listeners and whether each is bound. */
  listeners: () => { name: string; bound: boolean }[];
  upstream: UpstreamSettings;
  store: RegistrationStore | null;
  /** The current APNs certificate, or null when there is none. */
  certificate: () => LoadedCertificate | null;
  /** True while shutting down: not ready, whatever else holds, so load balancers stop sending. */
  draining?: () => boolean;
  /** Per-check time limit (default 2 s). */
  timeoutMs?: number;
  /** How long a report is reused (default 1 s). */
  cacheMs?: number;
  now?: () => number;
}

const DAY_MS = 86_400_000;

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not answer within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Opens an upstream connection exactly as a session would (TCP, implicit TLS or STARTTLS
 * with the configured verification, PROXY v2 header when configured) and requires an
 * `* OK`/`* PREAUTH` greeting; then logs out. The IMAP ID command is not sent.
 */
export async function checkUpstream(s: UpstreamSettings, timeoutMs: number): Promise<CheckResult> {
  try {
    const conn = await openUpstream(
      { ...s, connectTimeoutMs: Math.min(s.connectTimeoutMs, timeoutMs), clientIp: s.clientIp === 'proxy-v2' ? 'proxy-v2' : 'none' },
      { clientIp: '127.0.0.1', clientPort: 0, localIp: '127.0.0.1', localPort: 0, sessionId: 'readyz', tlsVersion: null },
    );
    const { socket, greetingStatus, greeting } = conn;
    socket.on('error', () => undefined);
    if (greetingStatus === 'BYE') {
      socket.destroy();
      return { ok: false, error: `upstream refused: ${greeting.toString('latin1', 0, 80).trim()}` };
    }
    socket.end('Z LOGOUT\r\n');
    setTimeout(() => socket.destroy(), 1_000).unref();
    return { ok: true };
  } catch (err) {
    return { ok: false, error: message(err) };
  }
}

export function checkCertificate(cert: LoadedCertificate, now: number): CertificateCheck {
  const notAfter = cert.notAfter.getTime();
  const daysLeft = Math.floor((notAfter - now) / DAY_MS);
  const base = { notAfter: cert.notAfter.toISOString(), daysLeft };
  if (now > notAfter) return { ok: false, ...base, error: 'APNs certificate has expired' };
  if (now < cert.notBefore.getTime()) return { ok: false, ...base, error: 'APNs certificate is not valid yet' };
  return { ok: true, ...base };
}

export class Readiness {
  private cached: { at: number; draining: boolean; report: ReadinessReport } | null = null;
  private running: Promise<ReadinessReport> | null = null;

  constructor(private readonly src: ReadinessSources) {}

  /** The cached report when fresh, else a new one (concurrent callers share one run). */
  check(): Promise<ReadinessReport> {
    const now = (this.src.now ?? Date.now)();
    const cached = this.cached;
    // a report cached before the drain began must not keep saying "ready"
    if (cached && now - cached.at < (this.src.cacheMs ?? 1_000) && cached.draining === this.draining()) {
      return Promise.resolve(cached.report);
    }
    if (!this.running) {
      this.running = this.run().finally(() => {
        this.running = null;
      });
    }
    return this.running;
  }

  private draining(): boolean {
    return this.src.draining?.() ?? false;
  }

  private async run(): Promise<ReadinessReport> {
    const timeoutMs = this.src.timeoutMs ?? 2_000;
    const draining = this.draining();
    const listeners = ((): CheckResult => {
      if (draining) return { ok: false, error: 'draining: shutting down, new connections are refused' };
      const down = this.src.listeners().filter((l) => !l.bound).map((l) => l.name);
      return down.length === 0 ? { ok: true } : { ok: false, error: `not listening: ${down.join(', ')}` };
    })();
    const store = this.src.store;
    const [upstream, storeCheck] = await Promise.all([
      checkUpstream(this.src.upstream, timeoutMs),
      store
        ? withTimeout(store.ping(), timeoutMs, 'store').then(
            (): CheckResult => ({ ok: true }),
            (err: unknown): CheckResult => ({ ok: false, error: message(err) }),
          )
        : Promise.resolve(undefined),
    ]);
    const now = (this.src.now ?? Date.now)();
    let certificate: CertificateCheck | undefined;
    try {
      const cert = this.src.certificate();
      certificate = cert ? checkCertificate(cert, now) : undefined;
    } catch (err) {
      certificate = { ok: false, error: message(err) };
    }
    const checks: ReadinessReport['checks'] = { listeners, upstream };
    if (storeCheck) checks.store = storeCheck;
    if (certificate) checks.certificate = certificate;
    const ready = Object.values(checks).every((c) => c.ok);
    const report: ReadinessReport = { ready, checks };
    this.cached = { at: (this.src.now ?? Date.now)(), draining, report };
    return report;
  }
}
