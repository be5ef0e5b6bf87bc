import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { PushCertRefusedError } from '../../../src/cert/errors.js';
import { registerCertificateMetrics } from '../../../src/cert/metrics.js';
import { CertificateRenewer } from '../../../src/cert/renew.js';
import { CertificateSource } from '../../../src/cert/watch.js';
import { mailCert, tempDir } from './helpers.js';

describe('certificate metrics', () => {
  it('exports the expiry of the certificate in use, reload and renewal outcomes', async () => {
    const a = mailCert();
    const dir = tempDir({ 'mail.pem': a.certPem + a.keyPem });
    const source = await CertificateSource.open({ certPath: join(dir, 'mail.pem'), watch: false });
    const registry = new Registry();
    const metrics = registerCertificateMetrics(registry);
    metrics.observeSource(source);
    const renewer = new CertificateRenewer({
      source,
      target: { kind: 'pem', certPath: join(dir, 'mail.pem') },
      renew: () => Promise.reject(new PushCertRefusedError({ errorCode: -80010, errorMessage: 'ServiceType is Invalid', errorDescription: '' })),
      renewBeforeMs: 400 * 86_400_000,
    });
    metrics.observeRenewer(renewer);
    try {
      writeFileSync(join(dir, 'mail.pem'), 'junk');
      await source.reload();
      const b = mailCert();
      writeFileSync(join(dir, 'mail.pem'), b.certPem + b.keyPem);
      await source.reload();
      expect(await renewer.checkNow()).toBe('failed');

      const text = await registry.metrics();
      const expiry = Math.floor(source.current().notAfter.getTime() / 1000);
      expect(text).toContain(`xaps_apns_certificate_expiry_timestamp_seconds ${expiry}`);
      expect(text).toContain('xaps_apns_certificate_reloads_total{result="changed"} 1');
      expect(text).toContain('xaps_apns_certificate_reloads_total{result="error"} 1');
      expect(text).toContain('xaps_apns_certificate_renewals_total{result="refused"} 1');
    } finally {
      renewer.stop();
      source.close();
    }
  });
});
