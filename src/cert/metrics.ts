/**
 * Certificate metrics (src/ops/metrics.ts conventions): expiry of the Mail push
 * certificate in use, reload outcomes and renewal outcomes. No labels beyond `result`.
 */
import { Counter, Gauge, type Registry } from 'prom-client';
import type { CertificateRenewer } from './renew.js';
import type { CertificateSource } from './watch.js';
import { PushCertRefusedError } from './errors.js';

export interface CertificateMetrics {
  /** Follow a certificate source (expiry gauge, reload counter). */
  observeSource(source: CertificateSource): void;
  /** Count a renewer's outcomes. */
  observeRenewer(renewer: CertificateRenewer): void;
}

export function registerCertificateMetrics(registry: Registry): CertificateMetrics {
  let source: CertificateSource | undefined;
  new Gauge({
    name: 'xaps_apns_certificate_expiry_timestamp_seconds',
    help: 'notAfter of the Mail push certificate in use, UNIX seconds.',
    registers: [registry],
    collect() {
      if (source) this.set(Math.floor(source.current().notAfter.getTime() / 1000));
    },
  });
  const reloads = new Counter({
    name: 'xaps_apns_certificate_reloads_total',
    help: 'Reloads of the Mail push certificate: result="changed" (new certificate in use) or "error" (kept the previous one).',
    labelNames: ['result'] as const,
    registers: [registry],
  });
  const renewals = new Counter({
    name: 'xaps_apns_certificate_renewals_total',
    help: 'Automatic renewal attempts: result="ok", "refused" (the service said no) or "error".',
    labelNames: ['result'] as const,
    registers: [registry],
  });
  return {
    observeSource(s) {
      source = s;
      s.on('change', () => reloads.inc({ result: 'changed' }));
      s.on('invalid', () => reloads.inc({ result: 'error' }));
    },
    observeRenewer(r) {
      r.on('renewed', () => renewals.inc({ result: 'ok' }));
      r.on('failed', (err) => renewals.inc({ result: err instanceof PushCertRefusedError ? 'refused' : 'error' }));
    },
  };
}
