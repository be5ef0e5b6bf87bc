/**
 * Metrics of the events HTTP listener (./events): what the mail server's event sources (Dovecot Lua
 * driver, Dovecot OX driver, Cyrus notify_external shim) sent, what was refused and why, and how
 * many mailbox changes came out of it. Labels are bounded: formats, outcomes and reasons are fixed
 * sets; never users or mailbox names.
 *
 * Several listeners may share one registry: the metrics are created once per registry.
 */
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

/** How a request ended (the HTTP status it got, in words). */
export type EventsRequestOutcome =
  | 'accepted'
  | 'bad_request'
  | 'unauthorized'
  | 'not_found'
  | 'method_not_allowed'
  | 'too_large'
  | 'rate_limited'
  | 'overloaded'
  | 'timeout'
  | 'aborted';
export const EVENTS_REQUEST_OUTCOMES: readonly EventsRequestOutcome[] = [
  'accepted',
  'bad_request',
  'unauthorized',
  'not_found',
  'method_not_allowed',
  'too_large',
  'rate_limited',
  'overloaded',
  'timeout',
  'aborted',
];

/** Which event source a body came from. */
export type EventsFormat = 'dovecot_lua' | 'dovecot_ox' | 'cyrus';
export const EVENTS_FORMATS: readonly EventsFormat[] = ['dovecot_lua', 'dovecot_ox', 'cyrus'];

/** Why an accepted event made no change. */
export type EventsIgnoredReason = 'event_type' | 'not_personal' | 'sink_error';
export const EVENTS_IGNORED_REASONS: readonly EventsIgnoredReason[] = ['event_type', 'not_personal', 'sink_error'];

export interface EventsMetrics {
  readonly requests: Counter<'outcome'>;
  readonly changes: Counter<'format'>;
  readonly ignored: Counter<'reason'>;
  /** `Expect: 100-continue` requests answered with 100 (after the secret and the length were checked). */
  readonly continues: Counter;
  readonly inFlight: Gauge;
  /** Seconds from the request's arrival to its answer (the sender waits this long). */
  readonly answerDuration: Histogram;
}

const byRegistry = new WeakMap<Registry, EventsMetrics>();

/** The listener metrics on `registry` (created on first use), or unregistered ones without it. */
export function eventsMetrics(registry?: Registry): EventsMetrics {
  if (registry) {
    const existing = byRegistry.get(registry);
    if (existing) return existing;
  }
  const registers = registry ? [registry] : [];
  const requests = new Counter({
    name: 'xaps_events_requests_total',
    help: 'HTTP requests to the events listener, by outcome (accepted = 202).',
    labelNames: ['outcome'] as const,
    registers,
  });
  for (const outcome of EVENTS_REQUEST_OUTCOMES) requests.inc({ outcome }, 0);
  const changes = new Counter({
    name: 'xaps_events_changes_total',
    help: 'Mailbox changes (new mail) reported by event sources, by body format.',
    labelNames: ['format'] as const,
    registers,
  });
  for (const format of EVENTS_FORMATS) changes.inc({ format }, 0);
  const ignored = new Counter({
    name: 'xaps_events_ignored_total',
    help: 'Accepted events that made no change: not new mail (event_type), a shared mailbox (not_personal), or the sink threw.',
    labelNames: ['reason'] as const,
    registers,
  });
  for (const reason of EVENTS_IGNORED_REASONS) ignored.inc({ reason }, 0);
  const metrics: EventsMetrics = {
    requests,
    changes,
    ignored,
    continues: new Counter({
      name: 'xaps_events_continues_total',
      help: 'Requests with Expect: 100-continue answered with 100 Continue.',
      registers,
    }),
    inFlight: new Gauge({
      name: 'xaps_events_in_flight',
      help: 'Requests to the events listener being received or answered.',
      registers,
    }),
    answerDuration: new Histogram({
      name: 'xaps_events_answer_duration_seconds',
      help: 'Time from the arrival of an event request until its answer was written.',
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5],
      registers,
    }),
  };
  if (registry) byRegistry.set(registry, metrics);
  return metrics;
}
