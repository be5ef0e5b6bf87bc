import { once } from 'node:events';
import { renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { CertificateError } from '../../../src/cert/errors.js';
import type { LoadedCertificate } from '../../../src/cert/load.js';
import { CertificateSource } from '../../../src/cert/watch.js';
import { DAY, mailCert, tempDir } from './helpers.js';

const sources: CertificateSource[] = [];
afterEach(() => {
  for (const s of sources.splice(0)) s.close();
});

async function open(opts: Parameters<typeof CertificateSource.open>[0]): Promise<CertificateSource> {
  const s = await CertificateSource.open({ debounceMs: 50, ...opts });
  sources.push(s);
  return s;
}

/** Replace `path` the way editors and certbot do: write a temporary file, rename it over. */
function replaceByRename(path: string, content: string): void {
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, content);
  renameSync(tmp, path);
}

/** The next `change` event (10 s is a hang guard, not a timing requirement). */
function nextChange(s: CertificateSource): Promise<[LoadedCertificate, LoadedCertificate]> {
  return once(s, 'change', { signal: AbortSignal.timeout(10_000) }) as Promise<[LoadedCertificate, LoadedCertificate]>;
}
function nextInvalid(s: CertificateSource): Promise<[CertificateError]> {
  return once(s, 'invalid', { signal: AbortSignal.timeout(10_000) }) as Promise<[CertificateError]>;
}

describe('CertificateSource', () => {
  it('picks up a certificate file replaced by rename', async () => {
    const a = mailCert();
    const b = mailCert();
    const dir = tempDir({ 'mail.pem': a.certPem + a.keyPem });
    const source = await open({ certPath: join(dir, 'mail.pem') });
    expect(source.topic()).toBe(a.topic);

    const changed = nextChange(source);
    replaceByRename(join(dir, 'mail.pem'), b.certPem + b.keyPem);
    const [cert, previous] = await changed;
    expect(cert.topic).toBe(b.topic);
    expect(previous.topic).toBe(a.topic);
    expect(source.topic()).toBe(b.topic);
    expect(source.current().fingerprint256).toBe(cert.fingerprint256);

    // A second replacement is seen as well (the file watch is re-armed on the new inode).
    const again = nextChange(source);
    replaceByRename(join(dir, 'mail.pem'), a.certPem + a.keyPem);
    expect((await again)[0].topic).toBe(a.topic);
  });

  it('picks up separate certificate and key files replaced one after the other', async () => {
    const a = mailCert();
    const b = mailCert();
    const dir = tempDir({ 'mail.pem': a.certPem, 'mail.key': a.keyPem });
    const source = await open({ certPath: join(dir, 'mail.pem'), keyPath: join(dir, 'mail.key') });
    const changed = nextChange(source);
    replaceByRename(join(dir, 'mail.key'), b.keyPem);
    replaceByRename(join(dir, 'mail.pem'), b.certPem);
    expect((await changed)[0].topic).toBe(b.topic);
  });

  it('picks up an in-place rewrite', async () => {
    const a = mailCert();
    const b = mailCert();
    const dir = tempDir({ 'mail.pem': a.certPem + a.keyPem });
    const source = await open({ certPath: join(dir, 'mail.pem') });
    const changed = nextChange(source);
    writeFileSync(join(dir, 'mail.pem'), b.certPem + b.keyPem);
    expect((await changed)[0].topic).toBe(b.topic);
  });

  it('keeps the previous certificate when the new file is broken, and takes the next good one', async () => {
    const a = mailCert();
    const b = mailCert();
    const other = mailCert();
    const dir = tempDir({ 'mail.pem': a.certPem + a.keyPem });
    const source = await open({ certPath: join(dir, 'mail.pem') });

    const invalid = nextInvalid(source);
    replaceByRename(join(dir, 'mail.pem'), '-----BEGIN CERTIFICATE-----\nnot base64\n');
    const [error] = await invalid;
    expect(error.code).toBe('not-a-certificate');
    expect(source.topic()).toBe(a.topic);

    const mismatch = nextInvalid(source);
    replaceByRename(join(dir, 'mail.pem'), b.certPem + other.keyPem);
    expect((await mismatch)[0].code).toBe('key-mismatch');
    expect(source.current().topic).toBe(a.topic);

    const changed = nextChange(source);
    replaceByRename(join(dir, 'mail.pem'), b.certPem + b.keyPem);
    expect((await changed)[0].topic).toBe(b.topic);
  });

  it('reload() re-reads on demand (SIGHUP) and reports whether anything changed', async () => {
    const a = mailCert();
    const b = mailCert({ extensionTopics: ['com.apple.mobilemail.push.org.example'], uidTopic: null });
    const dir = tempDir({ 'mail.pem': a.certPem, 'mail.key': a.keyPem });
    const source = await open({ certPath: join(dir, 'mail.pem'), keyPath: join(dir, 'mail.key'), watch: false });
    expect(await source.reload()).toEqual({ changed: false });

    writeFileSync(join(dir, 'mail.pem'), b.certPem);
    const bad = await source.reload();
    expect(bad.changed).toBe(false);
    expect(bad.error?.code).toBe('key-mismatch');
    expect(source.topic()).toBe(a.topic);

    writeFileSync(join(dir, 'mail.key'), b.keyPem);
    const events: string[] = [];
    source.on('change', (c) => events.push(c.topic));
    expect(await source.reload()).toEqual({ changed: true });
    expect(source.topic()).toBe('com.apple.mobilemail.push.org.example');
    expect(events).toEqual(['com.apple.mobilemail.push.org.example']);
  });

  it('refuses to open with an unusable certificate and reports expiry', async () => {
    const expired = mailCert({ notBefore: new Date(Date.now() - 400 * DAY), notAfter: new Date(Date.now() - DAY) });
    const dir = tempDir({ 'old.pem': expired.certPem + expired.keyPem });
    await expect(CertificateSource.open({ certPath: join(dir, 'old.pem'), watch: false })).rejects.toMatchObject({ code: 'expired' });

    const soon = mailCert({ notAfter: new Date(Date.now() + 20 * DAY + 3_600_000) });
    const dir2 = tempDir({ 'soon.pem': soon.certPem + soon.keyPem });
    const source = await open({ certPath: join(dir2, 'soon.pem'), watch: false, now: () => new Date(Date.now()) });
    expect(source.expiry()).toMatchObject({ daysLeft: 20, expiresSoon: true, expired: false });
    expect(source.current().warnings).toHaveLength(1);
  });
});
