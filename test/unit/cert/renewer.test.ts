import { describe, expect, it } from 'vitest';
import { CertificateError, PushCertRefusedError } from '../../../src/cert/errors.js';
import type { LoadedCertificate } from '../../../src/cert/load.js';
import { CertificateRenewer, type RenewerClock } from '../../../src/cert/renew.js';

const HOUR = 3_600_000;
const DAY = 24 * HOUR;
const T0 = Date.UTC(2030, 0, 1);

/** A manual clock: timers fire only in advance(). */
class FakeClock implements RenewerClock {
  t = T0;
  #next = 1;
  timers = new Map<number, { at: number; fn: () => void }>();
  now(): number {
    return this.t;
  }
  setTimeout(fn: () => void, ms: number): unknown {
    const id = this.#next++;
    this.timers.set(id, { at: this.t + ms, fn });
    return id;
  }
  clearTimeout(handle: unknown): void {
    this.timers.delete(handle as number);
  }
  /** Time until the earliest pending timer. */
  pending(): number | undefined {
    const ats = [...this.timers.values()].map((x) => x.at);
    return ats.length ? Math.min(...ats) - this.t : undefined;
  }
  advance(ms: number): void {
    const until = this.t + ms;
    for (;;) {
      const due = [...this.timers.entries()].filter(([, x]) => x.at <= until).sort((a, b) => a[1].at - b[1].at)[0];
      if (!due) break;
      this.timers.delete(due[0]);
      this.t = due[1].at;
      due[1].fn();
    }
    this.t = until;
  }
}

let serial = 1;
function cert(notAfter: number): LoadedCertificate {
  const n = serial++;
  return {
    certPem: '',
    keyPem: '',
    topic: 'com.apple.mail.XServer.TEST',
    topics: ['com.apple.mail.XServer.TEST'],
    subject: 'UID=com.apple.mail.XServer.TEST',
    issuer: 'CN=test',
    serial: `0${n}`,
    notBefore: new Date(notAfter - 365 * DAY),
    notAfter: new Date(notAfter),
    fingerprint256: `FP:${n}`,
    daysLeft: 0,
    warnings: [],
    source: 'test',
    files: {},
  };
}

function setup(opts: { expiresIn: number; renew: (c: LoadedCertificate) => Promise<unknown> }) {
  const clock = new FakeClock();
  let current = cert(T0 + opts.expiresIn);
  const calls: number[] = [];
  const renewer = new CertificateRenewer({
    source: { current: () => current, reload: async () => undefined },
    target: { kind: 'pem', certPath: '/nonexistent/mail.pem' },
    clock,
    renew: async (c) => {
      calls.push(clock.now());
      await opts.renew(c);
    },
  });
  return {
    clock,
    renewer,
    calls,
    setCurrent: (c: LoadedCertificate) => {
      current = c;
    },
  };
}

const refusal = () =>
  Promise.reject(new PushCertRefusedError({ errorCode: -80010, errorMessage: 'ServiceType is Invalid', errorDescription: '' }));

describe('CertificateRenewer', () => {
  it('does nothing before the renewal window and re-checks at least every 12 h', async () => {
    const { clock, renewer, calls } = setup({ expiresIn: 90 * DAY, renew: async () => undefined });
    renewer.start();
    clock.advance(0);
    await renewer.whenIdle();
    expect(calls).toEqual([]);
    expect(clock.pending()).toBe(12 * HOUR);
    expect(await renewer.checkNow()).toBe('not-due');
    renewer.stop();
    expect(clock.timers.size).toBe(0);
  });

  it('renews 30 days ahead: the first check inside the window sends one request', async () => {
    const { clock, renewer, calls } = setup({ expiresIn: 30 * DAY + 5 * HOUR, renew: refusal });
    renewer.start();
    clock.advance(0);
    await renewer.whenIdle();
    expect(calls).toEqual([]);
    expect(clock.pending()).toBe(5 * HOUR);
    clock.advance(5 * HOUR - 1);
    await renewer.whenIdle();
    expect(calls).toEqual([]);
    clock.advance(1);
    await renewer.whenIdle();
    expect(calls).toEqual([T0 + 5 * HOUR]);
    renewer.stop();
  });

  it('backs off exponentially after refusals, from an hour to a day, never faster', async () => {
    const failures: Array<[string, number]> = [];
    const { clock, renewer, calls } = setup({ expiresIn: 10 * DAY, renew: refusal });
    renewer.on('failed', (err, retryIn) => failures.push([err.constructor.name, retryIn]));
    renewer.start();
    clock.advance(0);
    await renewer.whenIdle();
    expect(calls).toHaveLength(1);

    const expected = [1, 2, 4, 8, 16, 24, 24].map((h) => h * HOUR);
    for (const [i, delay] of expected.entries()) {
      // Long sleeps are cut into 12 h pieces (timers cannot sleep longer than 24.8 days anyway).
      expect(clock.pending()).toBe(Math.min(delay, 12 * HOUR));
      expect(renewer.status()).toMatchObject({ state: 'backoff', failures: i + 1 });
      expect(renewer.status().notBefore).toEqual(new Date(clock.now() + delay));
      // Asking early changes nothing: still in back-off, no request.
      expect(await renewer.checkNow()).toBe('backoff');
      clock.advance(delay - 1);
      await renewer.whenIdle();
      expect(calls).toHaveLength(i + 1);
      clock.advance(1);
      await renewer.whenIdle();
      expect(calls).toHaveLength(i + 2);
    }
    expect(failures.every(([name]) => name === 'PushCertRefusedError')).toBe(true);
    expect(failures.map(([, d]) => d / HOUR)).toEqual([1, 2, 4, 8, 16, 24, 24, 24]);
    expect(renewer.status().lastError).toContain('Apple has refused these requests since 2024-10-29');
    renewer.stop();
  });

  it('sends at most one request at a time', async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const { renewer, calls } = setup({ expiresIn: 5 * DAY, renew: () => gate });
    const first = renewer.checkNow();
    expect(await renewer.checkNow()).toBe('busy');
    expect(await renewer.checkNow()).toBe('busy');
    expect(renewer.status().state).toBe('stopped');
    release();
    // The source still holds the old certificate: a "renewal" that did not take is a failure.
    expect(await first).toBe('failed');
    expect(calls).toHaveLength(1);
    expect(renewer.status().lastError).toMatch(/not in use/);
  });

  it('after a renewal, schedules the next one from the new expiry and does not loop', async () => {
    const h = setup({ expiresIn: 2 * DAY, renew: async () => h.setCurrent(cert(T0 + 367 * DAY)) });
    const renewed: string[] = [];
    h.renewer.on('renewed', (c) => renewed.push(c.serial));
    h.renewer.start();
    h.clock.advance(0);
    await h.renewer.whenIdle();
    expect(h.calls).toHaveLength(1);
    expect(renewed).toHaveLength(1);
    expect(h.renewer.status()).toMatchObject({ failures: 0, state: 'waiting', lastRenewedAt: new Date(T0) });
    expect(await h.renewer.checkNow()).toBe('backoff');
    h.clock.advance(30 * DAY);
    await h.renewer.whenIdle();
    expect(h.calls).toHaveLength(1);
    h.renewer.stop();
  });

  it('treats a renewed certificate that is still inside the window as a failure', async () => {
    const h = setup({ expiresIn: 2 * DAY, renew: async () => h.setCurrent(cert(T0 + 10 * DAY)) });
    expect(await h.renewer.checkNow()).toBe('failed');
    expect(h.renewer.status().lastError).toMatch(/still within the renewal window/);
    expect(await h.renewer.checkNow()).toBe('backoff');
    expect(h.calls).toHaveLength(1);
  });

  it('resets the back-off after a success', async () => {
    let fail = true;
    const h = setup({
      expiresIn: 3 * DAY,
      renew: async () => {
        if (fail) throw new CertificateError('certificate service http://127.0.0.1:1: connect ECONNREFUSED', { code: 'service' });
        h.setCurrent(cert(T0 + 400 * DAY));
      },
    });
    h.renewer.start();
    h.clock.advance(0);
    await h.renewer.whenIdle();
    h.clock.advance(HOUR);
    await h.renewer.whenIdle();
    expect(h.renewer.status().failures).toBe(2);
    fail = false;
    h.clock.advance(2 * HOUR);
    await h.renewer.whenIdle();
    expect(h.renewer.status()).toMatchObject({ failures: 0, attempts: 3, lastError: undefined });
    h.renewer.stop();
  });
});
