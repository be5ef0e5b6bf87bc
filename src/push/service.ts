/**
 * Push delivery assembled from the configuration: the APNs credentials (the Mail
 * push certificate, re-read on SIGHUP and on change; or a .p8 token key), the
 * HTTP/2 client, and the dispatcher. Its topic is what XAPPLEPUSHSERVICE replies
 * announce, so the topic iOS subscribes to is always the one pushes go out on.
 */
import { readFile } from 'node:fs/promises';
import type { Logger } from '../ops/log.js';
import type { Registry } from '../ops/metrics.js';
import type { RegistrationStore } from '../store/types.js';
import { RedisRegistrationStore } from '../store/redis.js';
import { Http2ApnsClient } from '../apns/client.js';
import type { ApnsCredentials, ApnsTransport } from '../apns/types.js';
import { PushDispatcher, dispatcherSettings } from '../apns/dispatcher.js';
import { LocalChangeGuard, RedisChangeGuard, type ChangeGuard } from '../apns/change-guard.js';
import { CertificateSource } from '../cert/watch.js';
import { CertificateRenewer } from '../cert/renew.js';
import { pushCertAccountFromSettings } from '../cert/account.js';
import { registerCertificateMetrics } from '../cert/metrics.js';
import type { LoadedCertificate } from '../cert/load.js';

/** The configuration push delivery reads (a subset of serve's and test-push's). */
export interface PushSettings {
  readonly apnsTopic?: string;
  readonly apnsCert?: string;
  readonly apnsKey?: string;
  readonly apnsP12?: string;
  readonly apnsP12Passphrase?: string;
  readonly apnsTokenKey?: string;
  readonly apnsKeyId?: string;
  readonly apnsTeamId?: string;
  readonly apnsEndpoint: string;
  readonly apnsCa?: string;
  readonly apnsPushType: 'background' | 'alert';
  readonly apnsPriority: string;
  readonly apnsExpiration: number;
  readonly apnsConnections: number;
  readonly apnsRequestTimeout: number;
  readonly apnsMaxAttempts: number;
  readonly pushCoalesceWindow?: number;
  readonly pushQueueSize?: number;
  readonly certAppleId?: string;
  readonly certPasswordFile?: string;
  readonly certVendorCert?: string;
  readonly certVendorKey?: string;
  readonly certServiceUrl?: string;
  readonly certServiceCa?: string;
}

export class PushConfigError extends Error {}

export interface PushServiceDeps {
  store: RegistrationStore;
  registry: Registry;
  log: Logger;
  /** Replaces the HTTP/2 client (tests of the layers above). */
  transport?: ApnsTransport;
}

export class PushService {
  private constructor(
    private readonly settings: PushSettings,
    private readonly certificate: CertificateSource | null,
    readonly transport: ApnsTransport | null,
    readonly dispatcher: PushDispatcher | null,
    private readonly renewer: CertificateRenewer | null,
  ) {}

  /** The topic pushes go out on: the certificate's, else --apns-topic; null when push is off. */
  topic(): string | null {
    return this.certificate?.topic() ?? this.settings.apnsTopic ?? null;
  }

  /** True when pushes can actually be sent (credentials loaded). */
  get sending(): boolean {
    return this.dispatcher !== null;
  }

  get currentCertificate(): LoadedCertificate | null {
    return this.certificate?.current() ?? null;
  }

  /** SIGHUP: re-read the certificate files; a broken new file keeps the old certificate. */
  async reload(): Promise<void> {
    const result = await this.certificate?.reload();
    if (result?.error) throw result.error;
  }

  async close(opts: { flushMs?: number } = {}): Promise<void> {
    this.renewer?.stop();
    this.certificate?.close();
    await this.dispatcher?.close({ flushMs: opts.flushMs ?? 0 });
    await this.transport?.close();
  }

  /** Push is configured when a topic can be known (a certificate, or --apns-topic). */
  static configured(s: PushSettings): boolean {
    return Boolean(s.apnsTopic || s.apnsCert || s.apnsP12);
  }

  static async start(s: PushSettings, deps: PushServiceDeps): Promise<PushService> {
    const { log, registry } = deps;
    let certificate: CertificateSource | null = null;
    let credentials: ApnsCredentials | null = null;
    let certificateMetrics: ReturnType<typeof registerCertificateMetrics> | null = null;
    if (s.apnsCert || s.apnsP12) {
      certificate = await CertificateSource.open({
        certPath: s.apnsCert,
        keyPath: s.apnsKey,
        p12Path: s.apnsP12,
        p12Passphrase: s.apnsP12Passphrase,
        logger: log,
      });
      const certMetrics = registerCertificateMetrics(registry);
      certMetrics.observeSource(certificate);
      certificateMetrics = certMetrics;
      const cert = certificate.current();
      credentials = { kind: 'certificate', certPem: cert.certPem, keyPem: cert.keyPem };
      if (s.apnsTopic && s.apnsTopic !== cert.topic) {
        log.warn({ configured: s.apnsTopic, certificate: cert.topic }, '--apns-topic differs from the certificate; using the certificate topic');
      }
      log.info({ topic: cert.topic, notAfter: cert.notAfter.toISOString(), daysLeft: cert.daysLeft }, 'Mail push certificate loaded');
    } else if (s.apnsTokenKey) {
      if (!s.apnsKeyId || !s.apnsTeamId || !s.apnsTopic) {
        throw new PushConfigError('--apns-token-key needs --apns-key-id, --apns-team-id and --apns-topic');
      }
      credentials = { kind: 'token', signingKeyPem: await readFile(s.apnsTokenKey, 'utf8'), keyId: s.apnsKeyId, teamId: s.apnsTeamId };
    } else {
      log.warn('no APNs credentials (--apns-cert, --apns-p12 or --apns-token-key): registrations are stored, no pushes are sent');
    }

    let transport: ApnsTransport | null = null;
    let dispatcher: PushDispatcher | null = null;
    if (credentials) {
      transport =
        deps.transport ??
        new Http2ApnsClient({
          endpoint: s.apnsEndpoint,
          credentials,
          ca: s.apnsCa ? await readFile(s.apnsCa, 'utf8') : undefined,
          connections: s.apnsConnections,
          requestTimeoutMs: s.apnsRequestTimeout,
          registry,
          log,
        });
      const guard: ChangeGuard =
        deps.store instanceof RedisRegistrationStore ? RedisChangeGuard.forStore(deps.store) : new LocalChangeGuard();
      const service: { topic: () => string | null } = { topic: () => null };
      dispatcher = new PushDispatcher({
        store: deps.store,
        transport,
        topic: () => service.topic(),
        guard,
        registry,
        logger: log,
        ...dispatcherSettings(s),
      });
      const renewer = certificate && s.certVendorCert ? await startRenewer(s, certificate, log) : null;
      if (renewer) certificateMetrics?.observeRenewer(renewer);
      const push = new PushService(s, certificate, transport, dispatcher, renewer);
      service.topic = () => push.topic();
      certificate?.on('change', (cert) => {
        transport!.setCredentials({ kind: 'certificate', certPem: cert.certPem, keyPem: cert.keyPem });
        dispatcher!.credentialsChanged();
        log.info({ topic: cert.topic, notAfter: cert.notAfter.toISOString() }, 'Mail push certificate reloaded');
      });
      return push;
    }
    return new PushService(s, certificate, null, null, null);
  }
}

async function startRenewer(s: PushSettings, certificate: CertificateSource, log: Logger): Promise<CertificateRenewer> {
  const account = await pushCertAccountFromSettings(s);
  const target = s.apnsP12
    ? ({ kind: 'pkcs12', p12Path: s.apnsP12, passphrase: s.apnsP12Passphrase ?? '' } as const)
    : ({ kind: 'pem', certPath: s.apnsCert!, keyPath: s.apnsKey } as const);
  const renewer = new CertificateRenewer({ source: certificate, target, account, logger: log });
  renewer.start();
  return renewer;
}
