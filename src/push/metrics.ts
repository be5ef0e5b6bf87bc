/**
 * Metrics of push registration and of the push certificate's remaining life:
 *
 *   xaps_push_registrations_total{result}   XAPPLEPUSHSERVICE outcomes: ok (stored), no (not stored: the store failed,
 *                                            push is off, the login name is unknown), bad (malformed, before login)
 *   xaps_apns_certificate_seconds_left      seconds until the Mail push certificate in use expires (negative after)
 *
 * The outcome is read from the tagged status of the reply the client gets, so it cannot disagree with what the
 * device saw, whichever branch of the handler produced it.
 */
import { Counter, Gauge, type Registry } from 'prom-client';
import type { LocalCommand, PushCommandHandler } from '../proxy/session.js';
import type { LoadedCertificate } from '../cert/load.js';

export const REGISTRATION_RESULTS = ['ok', 'no', 'bad'] as const;
export type RegistrationResult = (typeof REGISTRATION_RESULTS)[number];

/** The result a reply announces in its tagged status line (`<tag> OK|NO|BAD …`); `no` when there is none. */
export function registrationResult(tag: string, reply: Buffer): RegistrationResult {
  const prefix = `${tag} `;
  for (const line of reply.toString('latin1').split('\r\n')) {
    if (!line.startsWith(prefix)) continue;
    const status = line.slice(prefix.length, prefix.length + 4).toUpperCase();
    if (status.startsWith('OK')) return 'ok';
    if (status.startsWith('BAD')) return 'bad';
    return 'no';
  }
  return 'no';
}

const counters = new WeakMap<Registry, Counter<'result'>>();

function registrationCounter(registry: Registry): Counter<'result'> {
  const existing = counters.get(registry);
  if (existing) return existing;
  const counter = new Counter({
    name: 'xaps_push_registrations_total',
    help: 'XAPPLEPUSHSERVICE commands by result: ok (registration stored), no (not stored: store failure, push off), bad (malformed, or before login).',
    labelNames: ['result'] as const,
    registers: [registry],
  });
  for (const result of REGISTRATION_RESULTS) counter.inc({ result }, 0);
  counters.set(registry, counter);
  return counter;
}

/** Creates the registration counter (so that it exists from the start, with or without push). */
export function pushRegistrationMetrics(registry: Registry): void {
  registrationCounter(registry);
}

/** `handler`, counting each XAPPLEPUSHSERVICE by the reply it gives (a failure is the session's NO). */
export function instrumentPushHandler(handler: PushCommandHandler, registry: Registry): PushCommandHandler {
  const counter = registrationCounter(registry);
  return {
    get advertised() {
      return handler.advertised;
    },
    async handle(cmd: LocalCommand): Promise<Buffer> {
      let reply: Buffer;
      try {
        reply = await handler.handle(cmd);
      } catch (err) {
        counter.inc({ result: 'no' });
        throw err;
      }
      counter.inc({ result: registrationResult(cmd.tag, reply) });
      return reply;
    },
  };
}

const certificateSources = new WeakMap<Registry, { current: () => LoadedCertificate | null }>();

/**
 * `xaps_apns_certificate_seconds_left`, computed from `current()` at scrape time so that a reloaded certificate
 * shows at once. Call only when push has a certificate: without one there is no series (a 0 would read as expired).
 */
export function observeApnsCertificate(registry: Registry, current: () => LoadedCertificate | null, now: () => number = Date.now): void {
  const existing = certificateSources.get(registry);
  if (existing) {
    existing.current = current;
    return;
  }
  const source = { current };
  certificateSources.set(registry, source);
  new Gauge({
    name: 'xaps_apns_certificate_seconds_left',
    help: 'Seconds until the Mail push certificate in use expires (negative once expired).',
    registers: [registry],
    collect() {
      const cert = source.current();
      if (cert) this.set(Math.floor((cert.notAfter.getTime() - now()) / 1000));
    },
  });
}
