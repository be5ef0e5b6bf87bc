/**
 * Metrics of the HTTP/2 APNs client (./client). Per-status push counters belong to the
 * dispatcher; these describe the wire: how long requests take, how many sessions are
 * open, and how often APNs sends GOAWAY, refuses streams or makes us reconnect.
 *
 * Several clients may share one registry: the metrics are created once per registry
 * and the session gauge sums over every client registered as a source.
 */
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

export type RequestOutcome = 'answered' | 'timeout' | 'transport_error';
export const REQUEST_OUTCOMES: readonly RequestOutcome[] = ['answered', 'timeout', 'transport_error'];

export interface SessionCounts {
  ready: number;
  connecting: number;
  draining: number;
}

/** GOAWAY `reason`s Apple documents; anything else is counted as `other`. */
const KNOWN_GOAWAY_REASONS = new Set([
  'BadCertificate',
  'BadCertificateEnvironment',
  'ExpiredProviderToken',
  'Forbidden',
  'IdleTimeout',
  'InternalServerError',
  'InvalidProviderToken',
  'MissingProviderToken',
  'ServiceUnavailable',
  'Shutdown',
  'TooManyProviderTokenUpdates',
  'TooManyRequests',
]);

/** A bounded label value for a GOAWAY reason. */
export function goawayReasonLabel(reason: string | undefined): string {
  if (reason === undefined || reason === '') return 'none';
  return KNOWN_GOAWAY_REASONS.has(reason) ? reason : 'other';
}

export interface ApnsClientMetrics {
  /** Seconds from send() to its outcome (answer of any status, timeout, transport error). */
  readonly requestDuration: Histogram<'outcome'>;
  readonly goaways: Counter<'reason'>;
  /** Sessions opened to replace one that was lost, retired or refused. */
  readonly reconnects: Counter;
  /** Requests re-sent because APNs refused them unprocessed (GOAWAY, REFUSED_STREAM). */
  readonly retriedRefusedStreams: Counter;
  readonly connectFailures: Counter<'kind'>;
  readonly pingTimeouts: Counter;
  /** Adds a client's session counts to `xaps_apns_sessions`; returns the removal. */
  addSessionSource(source: () => SessionCounts): () => void;
}

const byRegistry = new WeakMap<Registry, ApnsClientMetrics>();

/** The client metrics on `registry` (created on first use), or unregistered ones without it. */
export function apnsClientMetrics(registry?: Registry): ApnsClientMetrics {
  if (registry) {
    const existing = byRegistry.get(registry);
    if (existing) return existing;
  }
  const registers = registry ? [registry] : [];
  const sources = new Set<() => SessionCounts>();

  const requestDuration = new Histogram({
    name: 'xaps_apns_request_duration_seconds',
    help: 'Time from handing a notification to the APNs client until its outcome (answered = any HTTP status).',
    labelNames: ['outcome'] as const,
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers,
  });
  for (const outcome of REQUEST_OUTCOMES) requestDuration.zero({ outcome });

  new Gauge({
    name: 'xaps_apns_sessions',
    help: 'HTTP/2 sessions to APNs: ready (taking requests), connecting, draining (retired, finishing in-flight streams).',
    labelNames: ['state'] as const,
    registers,
    collect() {
      const total: SessionCounts = { ready: 0, connecting: 0, draining: 0 };
      for (const source of sources) {
        const c = source();
        total.ready += c.ready;
        total.connecting += c.connecting;
        total.draining += c.draining;
      }
      this.set({ state: 'ready' }, total.ready);
      this.set({ state: 'connecting' }, total.connecting);
      this.set({ state: 'draining' }, total.draining);
    },
  });

  const metrics: ApnsClientMetrics = {
    requestDuration,
    goaways: new Counter({
      name: 'xaps_apns_goaways_total',
      help: 'GOAWAY frames received from APNs, by the reason in their debug data.',
      labelNames: ['reason'] as const,
      registers,
    }),
    reconnects: new Counter({
      name: 'xaps_apns_reconnects_total',
      help: 'HTTP/2 sessions opened to APNs to replace one that was lost or retired.',
      registers,
    }),
    retriedRefusedStreams: new Counter({
      name: 'xaps_apns_retried_refused_streams_total',
      help: 'Requests APNs refused unprocessed (GOAWAY, REFUSED_STREAM) and the client re-sent.',
      registers,
    }),
    connectFailures: new Counter({
      name: 'xaps_apns_connect_failures_total',
      help: 'Failed connection attempts to APNs, by kind (connect, tls).',
      labelNames: ['kind'] as const,
      registers,
    }),
    pingTimeouts: new Counter({
      name: 'xaps_apns_ping_timeouts_total',
      help: 'APNs sessions destroyed because a PING went unanswered.',
      registers,
    }),
    addSessionSource(source) {
      sources.add(source);
      return () => {
        sources.delete(source);
      };
    },
  };
  if (registry) byRegistry.set(registry, metrics);
  return metrics;
}
