/**
 * Metrics of push delivery (./dispatcher). Labels are bounded: results, statuses and reasons come from fixed lists
 * (anything else is `other`); never users, tokens or mailbox names.
 *
 *   xaps_pushes_total{result}                      what became of each push (see PUSH_RESULTS)
 *   xaps_apns_responses_total{status,reason}       every APNs answer; status "transport" + reason = error kind when
 *                                                  no answer came
 *   xaps_push_latency_seconds                      change detected → APNs answered 200
 *   xaps_push_queue_depth                          pushes waiting (for a send slot, a window end, a retry, credentials)
 *   xaps_push_in_flight                            requests handed to the transport and not answered yet
 *   xaps_push_queue_dropped_total{kind}            pushes dropped by the queue bound (followup | other) or at shutdown
 *   xaps_apns_alarm{kind}                          1 while a configuration fault is active (wrong_topic, bad_certificate)
 *   xaps_registrations_removed_total{reason}       registrations removed on APNs' word (unregistered, bad_token)
 *   xaps_registration_remove_errors_total          such removals that the store could not do
 *   xaps_push_changes_total{result}                mailbox changes handed to notify()
 *   xaps_push_guard_errors_total                   change-guard failures (the change was pushed anyway: fail open)
 *
 * One dispatcher per registry (the gauges are its state); calling this twice on one registry returns the same metrics.
 */
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

export const PUSH_RESULTS = [
  'delivered',
  'unregistered',
  'bad_token',
  'wrong_topic',
  'bad_certificate',
  'throttled',
  'retried',
  'failed',
  'rejected',
  'dropped',
  'no_topic',
  'deduplicated',
] as const;
export type PushResult = (typeof PUSH_RESULTS)[number];

/** Reasons APNs documents (https://developer.apple.com/documentation/usernotifications/handling-notification-responses-from-apns). */
export const APNS_REASONS = [
  'BadCollapseId',
  'BadDeviceToken',
  'BadExpirationDate',
  'BadMessageId',
  'BadPriority',
  'BadTopic',
  'DeviceTokenNotForTopic',
  'DuplicateHeaders',
  'IdleTimeout',
  'InvalidPushType',
  'MissingDeviceToken',
  'MissingTopic',
  'PayloadEmpty',
  'TopicDisallowed',
  'BadCertificate',
  'BadCertificateEnvironment',
  'ExpiredProviderToken',
  'Forbidden',
  'InvalidProviderToken',
  'MissingProviderToken',
  'UnrelatedKeyIdInToken',
  'BadEnvironmentKeyIdInToken',
  'BadPath',
  'MethodNotAllowed',
  'ExpiredToken',
  'Unregistered',
  'PayloadTooLarge',
  'TooManyProviderTokenUpdates',
  'TooManyRequests',
  'InternalServerError',
  'ServiceUnavailable',
  'Shutdown',
] as const;

const TRANSPORT_KINDS = ['timeout', 'connect', 'tls', 'reset', 'closed', 'protocol'] as const;
const STATUSES = ['200', '400', '403', '404', '405', '410', '413', '429', '500', '503'] as const;

export const ALARM_KINDS = ['wrong_topic', 'bad_certificate'] as const;
export type AlarmKind = (typeof ALARM_KINDS)[number];

export const REMOVAL_REASONS = ['unregistered', 'bad_token'] as const;
export type RemovalReason = (typeof REMOVAL_REASONS)[number];

export const DROP_KINDS = ['followup', 'other', 'shutdown'] as const;
export type DropKind = (typeof DROP_KINDS)[number];

export const CHANGE_RESULTS = ['scheduled', 'no_device', 'deduplicated', 'store_error', 'invalid', 'closed'] as const;
export type ChangeResult = (typeof CHANGE_RESULTS)[number];

const REASON_SET = new Set<string>(APNS_REASONS);
const KIND_SET = new Set<string>(TRANSPORT_KINDS);
const STATUS_SET = new Set<string>(STATUSES);

/** The bounded `status` label for an HTTP status. */
export function statusLabel(status: number): string {
  const s = String(status);
  if (STATUS_SET.has(s)) return s;
  if (Number.isInteger(status) && status >= 100 && status <= 599) return `${Math.floor(status / 100)}xx`;
  return 'other';
}

/** The bounded `reason` label: a documented APNs reason, `none` when absent, else `other`. */
export function reasonLabel(reason: unknown): string {
  if (reason === undefined || reason === null || reason === '') return 'none';
  return typeof reason === 'string' && REASON_SET.has(reason) ? reason : 'other';
}

export function transportKindLabel(kind: unknown): string {
  return typeof kind === 'string' && KIND_SET.has(kind) ? kind : 'other';
}

export interface DispatcherMetrics {
  pushes: Counter<'result'>;
  responses: Counter<'status' | 'reason'>;
  latency: Histogram;
  queueDepth: Gauge;
  inFlight: Gauge;
  queueDropped: Counter<'kind'>;
  alarm: Gauge<'kind'>;
  removed: Counter<'reason'>;
  removeErrors: Counter;
  changes: Counter<'result'>;
  guardErrors: Counter;
}

function getOrCreate<M>(registry: Registry, name: string, make: () => M): M {
  return (registry.getSingleMetric(name) as M | undefined) ?? make();
}

export function createDispatcherMetrics(registry: Registry): DispatcherMetrics {
  const registers = [registry];
  const m: DispatcherMetrics = {
    pushes: getOrCreate(registry, 'xaps_pushes_total', () => new Counter({
      name: 'xaps_pushes_total',
      help: 'Pushes by outcome: delivered, unregistered (410), bad_token, wrong_topic, bad_certificate (403), throttled (429), retried, failed (gave up), rejected (other 4xx), dropped (queue bound or shutdown), no_topic, deduplicated (another instance pushed the change).',
      labelNames: ['result'] as const,
      registers,
    })),
    responses: getOrCreate(registry, 'xaps_apns_responses_total', () => new Counter({
      name: 'xaps_apns_responses_total',
      help: 'APNs answers by HTTP status and reason (documented reasons only, else "other"); status "transport" when no answer came (reason = error kind).',
      labelNames: ['status', 'reason'] as const,
      registers,
    })),
    latency: getOrCreate(registry, 'xaps_push_latency_seconds', () => new Histogram({
      name: 'xaps_push_latency_seconds',
      help: 'From the mailbox change being detected to APNs accepting the push (200).',
      buckets: [0.05, 0.1, 0.25, 0.5, 1, 2, 2.5, 3, 5, 10, 30, 60, 300],
      registers,
    })),
    queueDepth: getOrCreate(registry, 'xaps_push_queue_depth', () => new Gauge({
      name: 'xaps_push_queue_depth',
      help: 'Pushes waiting: for a send slot, the end of a coalescing window, a retry or throttle back-off, or valid credentials.',
      registers,
    })),
    inFlight: getOrCreate(registry, 'xaps_push_in_flight', () => new Gauge({
      name: 'xaps_push_in_flight',
      help: 'Push requests handed to the APNs transport and not answered yet.',
      registers,
    })),
    queueDropped: getOrCreate(registry, 'xaps_push_queue_dropped_total', () => new Counter({
      name: 'xaps_push_queue_dropped_total',
      help: 'Pushes dropped because the queue was full (followup: a merged follow-up of a device already pushed in its window; other: anything else) or left at shutdown.',
      labelNames: ['kind'] as const,
      registers,
    })),
    alarm: getOrCreate(registry, 'xaps_apns_alarm', () => new Gauge({
      name: 'xaps_apns_alarm',
      help: '1 while an APNs configuration fault is active: wrong_topic (BadTopic, TopicDisallowed, DeviceTokenNotForTopic without recent deliveries), bad_certificate (403: sending is paused).',
      labelNames: ['kind'] as const,
      registers,
    })),
    removed: getOrCreate(registry, 'xaps_registrations_removed_total', () => new Counter({
      name: 'xaps_registrations_removed_total',
      help: 'Registrations removed because APNs said the token is gone (unregistered: 410 and not re-registered since) or invalid (bad_token).',
      labelNames: ['reason'] as const,
      registers,
    })),
    removeErrors: getOrCreate(registry, 'xaps_registration_remove_errors_total', () => new Counter({
      name: 'xaps_registration_remove_errors_total',
      help: 'Removals asked by an APNs answer that the store could not do (it will be asked again on the next push).',
      registers,
    })),
    changes: getOrCreate(registry, 'xaps_push_changes_total', () => new Counter({
      name: 'xaps_push_changes_total',
      help: 'Mailbox changes received by the dispatcher: scheduled, no_device (no registration pushes that mailbox), deduplicated, store_error, invalid, closed.',
      labelNames: ['result'] as const,
      registers,
    })),
    guardErrors: getOrCreate(registry, 'xaps_push_guard_errors_total', () => new Counter({
      name: 'xaps_push_guard_errors_total',
      help: 'Change-guard (duplicate suppression across instances) failures; the change was pushed anyway.',
      registers,
    })),
  };
  for (const r of PUSH_RESULTS) m.pushes.inc({ result: r }, 0);
  for (const k of ALARM_KINDS) m.alarm.set({ kind: k }, 0);
  for (const r of REMOVAL_REASONS) m.removed.inc({ reason: r }, 0);
  for (const k of DROP_KINDS) m.queueDropped.inc({ kind: k }, 0);
  for (const r of CHANGE_RESULTS) m.changes.inc({ result: r }, 0);
  m.queueDepth.set(0);
  m.inFlight.set(0);
  return m;
}
