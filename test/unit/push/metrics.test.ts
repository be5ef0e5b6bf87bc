/**
 * Registration outcomes are read from the reply the client gets; a handler failure is
 * the session's NO. The certificate gauge counts down to the certificate in use.
 */
import { describe, expect, it } from 'vitest';
import { Registry } from 'prom-client';
import { instrumentPushHandler, observeApnsCertificate, registrationResult } from '../../../src/push/metrics.js';
import type { LocalCommand, PushCommandHandler } from '../../../src/proxy/session.js';
import type { LoadedCertificate } from '../../../src/cert/load.js';

const cmd = (tag: string): LocalCommand => ({ tag, parts: [], user: 'u', authenticated: true, utf8: false, sessionId: 's' });

async function results(registry: Registry): Promise<Record<string, number>> {
  const m = (await registry.getMetricsAsJSON()).find((x) => x.name === 'xaps_push_registrations_total')!;
  return Object.fromEntries(m.values.map((v) => [String(v.labels.result), v.value]));
}

describe('registrationResult', () => {
  it('reads the tagged status, not untagged lines or another tag', () => {
    const ok = '* XAPPLEPUSHSERVICE "mailbox" "INBOX"\r\n* XAPPLEPUSHSERVICE "aps-version" "2" "aps-topic" "t"\r\nx1 OK XAPPLEPUSHSERVICE completed.\r\n';
    expect(registrationResult('x1', Buffer.from(ok))).toBe('ok');
    expect(registrationResult('x1', Buffer.from('x1 BAD XAPPLEPUSHSERVICE: log in first\r\n'))).toBe('bad');
    expect(registrationResult('x1', Buffer.from('x1 NO [UNAVAILABLE] try again\r\n'))).toBe('no');
    expect(registrationResult('x1', Buffer.from('x10 OK other tag\r\nx1 bad lower case\r\n'))).toBe('bad');
    expect(registrationResult('x1', Buffer.from('* OK nothing tagged\r\n'))).toBe('no');
  });
});

describe('instrumentPushHandler', () => {
  it('counts each reply by its result, a failure as no, and passes `advertised` through', async () => {
    const registry = new Registry();
    let advertised = false;
    const replies: Array<string | Error> = ['a OK done\r\n', 'b BAD nope\r\n', new Error('store exploded'), 'd NO later\r\n', 'e OK done\r\n'];
    const inner: PushCommandHandler = {
      get advertised() {
        return advertised;
      },
      async handle() {
        const r = replies.shift()!;
        if (r instanceof Error) throw r;
        return Buffer.from(r);
      },
    };
    const handler = instrumentPushHandler(inner, registry);
    expect(handler.advertised).toBe(false);
    advertised = true;
    expect(handler.advertised).toBe(true);
    expect(await results(registry)).toEqual({ ok: 0, no: 0, bad: 0 });
    await handler.handle(cmd('a'));
    await handler.handle(cmd('b'));
    await expect(handler.handle(cmd('c'))).rejects.toThrow('store exploded');
    await handler.handle(cmd('d'));
    expect((await handler.handle(cmd('e'))).toString()).toBe('e OK done\r\n');
    expect(await results(registry)).toEqual({ ok: 2, no: 2, bad: 1 });
  });
});

describe('observeApnsCertificate', () => {
  it('reports seconds until the current certificate expires, following a reload', async () => {
    const registry = new Registry();
    const now = Date.UTC(2030, 0, 1);
    let cert = { notAfter: new Date(now + 90_000_500) } as LoadedCertificate;
    observeApnsCertificate(registry, () => cert, () => now);
    const read = async () => (await registry.getMetricsAsJSON()).find((x) => x.name === 'xaps_apns_certificate_seconds_left')!.values[0]!.value;
    expect(await read()).toBe(90_000);
    cert = { notAfter: new Date(now - 1_000) } as LoadedCertificate;
    expect(await read()).toBe(-1);
  });
});
