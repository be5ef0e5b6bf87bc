import { createPrivateKey, createPublicKey, verify, X509Certificate } from 'node:crypto';
import forge from 'node-forge';
import * as plist from 'plist';
import { describe, expect, it } from 'vitest';
import { createCsrPem, generateRsaKeyPem, parseSubject } from '../../../src/cert/csr.js';
import { parseHttpResponse } from '../../../src/cert/http.js';
import {
  buildInnerPlist,
  buildSignedRequest,
  parsePushCertResponse,
  passwordHash,
  PUSH_SERVICES,
  serviceUrlFor,
} from '../../../src/cert/pushcert.js';
import { decodeTopicsExtension, splitDer } from '../../../src/cert/x509.js';
import { createVendorMaterial } from '../../../src/testbed/mock-cert-service.js';
import { certError, mailCert } from './helpers.js';

const asn1 = forge.asn1;
const utf8 = (s: string) => asn1.create(asn1.Class.UNIVERSAL, asn1.Type.UTF8, false, forge.util.encodeUtf8(s));
const seq = (items: forge.asn1.Asn1[]) => asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SEQUENCE, true, items);

describe('topics extension (1.2.840.113635.100.6.3.6)', () => {
  it('returns the UTF8Strings and skips the SEQUENCEs between them', () => {
    const der = asn1
      .toDer(seq([utf8('com.apple.mobilemail.push.org.example'), seq([utf8('app')]), utf8('com.example.voip'), seq([utf8('voip')])]))
      .getBytes();
    expect(decodeTopicsExtension(der)).toEqual(['com.apple.mobilemail.push.org.example', 'com.example.voip']);
  });

  it('is empty for an empty SEQUENCE', () => {
    expect(decodeTopicsExtension(asn1.toDer(seq([])).getBytes())).toEqual([]);
  });
});

describe('DER chains', () => {
  it('splits concatenated certificates', () => {
    const a = new X509Certificate(mailCert().certPem).raw;
    const b = new X509Certificate(mailCert().certPem).raw;
    const parts = splitDer(Buffer.concat([a, b]));
    expect(parts.map((p) => p.equals(a) || p.equals(b))).toEqual([true, true]);
    expect(parts[0]!.equals(a)).toBe(true);
    expect(() => splitDer(Buffer.concat([a.subarray(0, a.length - 3)]))).toThrow(/truncated/);
  });
});

describe('tolerant HTTP response parser', () => {
  const body = '<plist/>';
  it('skips header lines strict parsers reject', () => {
    const raw = Buffer.from(
      `HTTP/1.1 200 OK\r\nX Bad Name: 1\r\nno colon here\r\nX-Ctl: a\x01b\r\nContent-Type: text/x-xml-plist\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
      'latin1',
    );
    const r = parseHttpResponse(raw, false);
    expect(r.complete).toBe(true);
    expect(r.answer?.status).toBe(200);
    expect(r.answer?.headers['content-type']).toBe('text/x-xml-plist');
    expect(r.answer?.body.toString()).toBe(body);
  });

  it('waits for the rest of a Content-Length body and reports truncation at EOF', () => {
    const raw = Buffer.from(`HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n${body}`);
    expect(parseHttpResponse(raw, false)).toEqual({ complete: false });
    expect(parseHttpResponse(raw, true).error).toMatch(/closed after 8 of 100/);
  });

  it('decodes chunked bodies, skips 100 Continue, reads to EOF without a length', () => {
    const chunked = Buffer.from('HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n<pl\r\n5\r\nist/>\r\n0\r\n\r\n');
    expect(parseHttpResponse(chunked, false).answer?.body.toString()).toBe(body);
    const eof = Buffer.from(`HTTP/1.0 500 Oops\n\n${body}`);
    expect(parseHttpResponse(eof, false).complete).toBe(false);
    expect(parseHttpResponse(eof, true).answer).toMatchObject({ status: 500 });
    expect(parseHttpResponse(Buffer.from('SSH-2.0-OpenSSH\r\n\r\n'), false).error).toMatch(/not an HTTP response/);
  });
});

describe('subjects and CSRs', () => {
  it('parses /CN=…/O=…/C=… with escaped slashes', () => {
    expect(parseSubject('/CN=Mail push\\/IMAP/O=Example Ltd/C=de/emailAddress=ops@example.org')).toEqual([
      { short: 'CN', value: 'Mail push/IMAP' },
      { short: 'O', value: 'Example Ltd' },
      { short: 'C', value: 'de' },
      { short: 'emailAddress', value: 'ops@example.org' },
    ]);
  });

  it('rejects malformed subjects with one-line reasons', async () => {
    for (const bad of ['CN=x', '/CN', '/XX=1', '/C=USA', '/CN=']) {
      const err = await certError(Promise.resolve().then(() => parseSubject(bad)));
      expect(err.code).toBe('bad-input');
      expect(err.message).toMatch(/^--subject: /);
    }
  });

  it('makes SHA-256 and SHA-1 CSRs that verify, with the subject given', async () => {
    const keyPem = await generateRsaKeyPem(2048);
    for (const [hash, oid] of [
      ['sha256', forge.pki.oids.sha256WithRSAEncryption],
      ['sha1', forge.pki.oids.sha1WithRSAEncryption],
    ] as const) {
      const pem = createCsrPem({ keyPem, hash, subject: parseSubject('/CN=Mail push/O=Exämple/C=US') });
      const csr = forge.pki.certificationRequestFromPem(pem);
      expect(csr.verify()).toBe(true);
      expect(csr.siginfo.algorithmOid).toBe(oid);
      expect(forge.util.decodeUtf8(csr.subject.getField('O').value as string)).toBe('Exämple');
      expect(csr.subject.getField('C').value).toBe('US');
      const pub = forge.pki.publicKeyToPem(csr.publicKey!);
      expect(createPublicKey(pub).export({ format: 'der', type: 'spki' })).toEqual(
        createPublicKey(createPrivateKey(keyPem)).export({ format: 'der', type: 'spki' }),
      );
    }
  });
});

describe('PushCertRequest plists', () => {
  it('hashes the password as hex SHA-256', () => {
    expect(passwordHash('password')).toBe('5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8');
  });

  it('derives the renewal URL', () => {
    expect(serviceUrlFor('new', 'https://identity.apple.com/pushcert/caservice/new')).toBe('https://identity.apple.com/pushcert/caservice/new');
    expect(serviceUrlFor('renew', 'https://identity.apple.com/pushcert/caservice/new')).toBe('https://identity.apple.com/pushcert/caservice/renew');
    expect(serviceUrlFor('renew', 'http://127.0.0.1:1234/x/new/')).toBe('http://127.0.0.1:1234/x/renew/');
  });

  it('builds the inner plist with five SHA1withRSA CSRs and signs it with the vendor key (SHA-1)', async () => {
    const vendor = createVendorMaterial();
    const keys = await Promise.all(PUSH_SERVICES.map(() => generateRsaKeyPem(2048)));
    const inner = buildInnerPlist({
      appleId: 'admin@example.org',
      passwordHash: passwordHash('pw'),
      keys: keys.map((keyPem, i) => (i === 2 ? { keyPem, serial: '01ABCDEF' } : { keyPem })),
      description: 'mail.example.org',
    });
    const parsed = plist.parse(inner) as Record<string, any>;
    expect(parsed.Header.ClientApplicationName).toBe('XServer');
    expect(parsed.Header.ClientOSName).toBe('MAC OSX');
    expect(parsed.Header.ClientOSVersion).toBe('2.1');
    expect(parsed.Request).toMatchObject({ ProfileType: 'Production', RequesterType: 'XServer', User: { AccountName: 'admin@example.org', PasswordHash: passwordHash('pw') } });
    const list = parsed.Request.CertRequestList as Array<Record<string, any>>;
    expect(list.map((e) => e.ServiceType)).toEqual(['Service_Calendar', 'Service_Contact', 'Service_Mail', 'Service_Mgmt', 'Service_Alerts']);
    expect(list.map((e) => e.CertRequestNo)).toEqual([0, 1, 2, 3, 4]);
    expect(list.map((e) => e.CertificateSerialNumber)).toEqual([undefined, undefined, '01ABCDEF', undefined, undefined]);
    expect(list[2]!.Description).toBe('mail.example.org - apns:com.apple.mail');
    const cns = list.map((e) => {
      const csr = forge.pki.certificationRequestFromPem(e.CSR as string);
      expect(csr.verify()).toBe(true);
      expect(csr.siginfo.algorithmOid).toBe(forge.pki.oids.sha1WithRSAEncryption);
      expect(csr.subject.getField('C').value).toBe('US');
      return csr.subject.getField('CN').value as string;
    });
    expect(cns).toEqual([
      'com.apple.servermgrd.apns.calendar',
      'com.apple.servermgrd.apns.contact',
      'com.apple.servermgrd.apns.mail',
      'com.apple.servermgrd.apns.mgmt',
      'com.apple.server.apns.alerts',
    ]);

    const outer = plist.parse(buildSignedRequest(inner, { chainDer: vendor.chainDer, key: createPrivateKey(vendor.keyPem), subject: 'v' })) as Record<string, any>;
    expect(outer.PushCertSignedRequest).toBe(true);
    expect(Buffer.from(outer.PushCertCertificateChain as Uint8Array).equals(vendor.chainDer)).toBe(true);
    const innerBytes = Buffer.from(outer.PushCertRequestPlist as Uint8Array);
    expect(innerBytes.toString('utf8')).toBe(inner);
    expect(verify('sha1', innerBytes, createPublicKey(vendor.certPem), Buffer.from(outer.PushCertSignature as Uint8Array))).toBe(true);
  });

  it('reads Response.Status and Response.Certificates', () => {
    const ok = parsePushCertResponse(
      plist.build({ Response: { Status: { ErrorCode: 0, ErrorMessage: '', ErrorDescription: '' }, Certificates: [{ Certificate: 'PEM0' }, { Certificate: 'PEM1' }] } }),
    );
    expect(ok).toEqual({ status: { errorCode: 0, errorMessage: '', errorDescription: '' }, certificates: ['PEM0', 'PEM1'] });
    const refused = parsePushCertResponse(
      plist.build({ Response: { Status: { ErrorCode: -80010, ErrorMessage: 'ServiceType is Invalid', ErrorDescription: '' } } }),
    );
    expect(refused.status).toEqual({ errorCode: -80010, errorMessage: 'ServiceType is Invalid', errorDescription: '' });
    expect(refused.certificates).toEqual([]);
    expect(() => parsePushCertResponse('<html>502</html>')).toThrow(/not a plist|Response\.Status/);
  });
});
