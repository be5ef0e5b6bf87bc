/**
 * `xaps-proxy cert …`: the Mail push certificate.
 *
 *   cert show [FILE…] [--passphrase P] [--json]   what a certificate holds, and whether its key matches
 *   cert csr --out DIR [--subject /CN=…] [--force] key + CSR for Apple's developer portal (today's route)
 *   cert request --out DIR [--force]              historical PushCertRequest (refused by Apple since 2024-10-29)
 *   cert renew [--out DIR] [--force]              renew the configured certificate that way, 30 days ahead
 *
 * Exit codes: 0 OK; 1 the certificate is unusable / the request failed; 2 bad command line
 * or configuration. Key material is never printed.
 */
import { hostname } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { mkdir } from 'node:fs/promises';
import { configWarnings, getOption, loadConfig, optionsHelp, type ConfigFor } from '../config/index.js';
import {
  CertificateError,
  certificateForKey,
  certificateInfo,
  createCsrPem,
  DAY_MS,
  EXPIRY_WARNING_DAYS,
  generateRsaKeyPem,
  loadMailPushCredentials,
  missingPushCertSettings,
  parseSubject,
  pushCertAccountFromSettings,
  readCredentialFile,
  renewMailPushCertificate,
  requestNewMailPushCertificate,
  validityProblems,
  writeFileAtomic,
  KEY_FILE_MODE,
  CERT_FILE_MODE,
  type CredentialTarget,
  type FileContents,
  type PushCertSettings,
} from '../cert/index.js';
import { fileExists } from '../cert/files.js';
import { isoDate } from '../cert/x509.js';
import { PROG, takeLocalFlags, UsageError, wantsHelp, type CliIO, type LocalFlagKind } from './args.js';

type CertConfig = ConfigFor<'cert'>;

export const CERT_USAGE = `Usage: ${PROG} cert <command> [options]
  show [FILE…] [--passphrase P] [--json]
        Subject, topic(s), issuer, serial, validity, days left and key match of PEM,
        DER (.cer) or PKCS#12 files (a key file among the FILEs is matched against the
        certificate). Without FILEs: the configured --apns-cert/--apns-key or --apns-p12.
        Exit 1 when the certificate is not usable (expired, no topic, key mismatch).
  csr --out DIR [--subject "/CN=…/O=…/C=…"] [--force]
        New RSA-2048 key (DIR/mail-push.key, 0600) and a SHA-256 CSR (DIR/mail-push.csr) to
        request a Mail push certificate in Apple's developer portal; prints the next steps
        (docs/certificates.md).
  request --out DIR [--force]
        Apple's historical PushCertRequest (macOS Server): five CSRs signed with the vendor
        key; stores DIR/mail.pem and DIR/mail.key (0600). Needs --cert-apple-id,
        --cert-password-file, --cert-vendor-cert, --cert-vendor-key. Apple has refused these
        requests since 2024-10-29.
  renew [--out DIR] [--force]
        Renew the configured certificate (--apns-cert/--apns-key or --apns-p12; default
        --cert-out DIR/mail.pem) the same way, with the same keys and the old serial, when
        it expires within ${EXPIRY_WARNING_DAYS} days (--force: now). Written in place unless --out is given.
`;

export function certHelp(): string {
  return `${CERT_USAGE}\n${optionsHelp('cert')}`;
}

const LOCAL: Record<string, Record<string, LocalFlagKind>> = {
  show: { json: 'boolean', passphrase: 'string' },
  csr: { out: 'string', subject: 'string', force: 'boolean' },
  request: { out: 'string', force: 'boolean' },
  renew: { out: 'string', force: 'boolean' },
};

/** Split local flags, configuration options (with their values) and positional FILEs. */
function splitArgs(argv: readonly string[], spec: Record<string, LocalFlagKind>) {
  const { values, rest } = takeLocalFlags(argv, spec);
  const configArgs: string[] = [];
  const files: string[] = [];
  for (let i = 0; i < rest.length; i++) {
    const arg = rest[i]!;
    if (arg === '--') {
      files.push(...rest.slice(i + 1));
      break;
    }
    if (arg.startsWith('-') && arg.length > 1) {
      configArgs.push(arg);
      const name = arg.startsWith('--') ? arg.slice(2).split('=')[0]! : '';
      const spec2 = getOption(name);
      if (!arg.includes('=') && spec2?.type.arity === 'value' && i + 1 < rest.length) configArgs.push(rest[++i]!);
      continue;
    }
    files.push(arg);
  }
  return { values: values as Record<string, string | boolean | undefined>, configArgs, files };
}

function loadCertConfig(configArgs: readonly string[], io: CliIO): CertConfig {
  const config = loadConfig({ argv: configArgs, env: io.env, cwd: io.cwd, command: 'cert' });
  for (const warning of configWarnings(config)) io.stderr.write(`${PROG}: warning: ${warning}\n`);
  return config;
}

export async function runCert(argv: readonly string[], io: CliIO): Promise<number> {
  const [sub, ...rest] = argv;
  if (sub === undefined) {
    io.stderr.write(CERT_USAGE);
    return 2;
  }
  if (sub === 'help' || sub === '--help' || sub === '-h' || wantsHelp(rest)) {
    io.stdout.write(certHelp());
    return 0;
  }
  const spec = LOCAL[sub];
  if (!spec) throw new UsageError(`unknown cert command "${sub}" (expected show, csr, request or renew)`);
  const { values, configArgs, files } = splitArgs(rest, spec);
  if (sub !== 'show' && files.length > 0) throw new UsageError(`cert ${sub}: unexpected argument ${JSON.stringify(files[0])}`);
  const config = loadCertConfig(configArgs, io);
  const resolvePath = (p: string) => resolve(io.cwd, p);
  try {
    switch (sub) {
      case 'show':
        return await show(files.map(resolvePath), config, values, io);
      case 'csr':
        return await csr(config, values, io, resolvePath);
      case 'request':
        return await request(config, values, io, resolvePath);
      default:
        return await renew(config, values, io, resolvePath);
    }
  } catch (err) {
    if (err instanceof CertificateError) {
      io.stderr.write(`${PROG}: ${err.message}\n`);
      return 1;
    }
    throw err;
  }
}

// ---------------------------------------------------------------------------------------------
// show

interface ShownCertificate {
  file: string;
  subject: string;
  topic: string | null;
  topics: string[];
  issuer: string;
  serial: string;
  notBefore: string;
  notAfter: string;
  daysLeft: number;
  status: 'valid' | 'expires-soon' | 'expired' | 'not-yet-valid';
  fingerprint256: string;
  /** Other certificates in the file (chain). */
  chain: number;
  key: { given: boolean; matches: boolean; file: string | null };
  usable: boolean;
  problems: string[];
}

async function show(files: string[], config: CertConfig, values: Record<string, string | boolean | undefined>, io: CliIO): Promise<number> {
  const passphrase = (values.passphrase as string | undefined) ?? config.apnsP12Passphrase;
  if (files.length === 0) {
    for (const p of [config.apnsCert, config.apnsKey, config.apnsP12]) if (p) files.push(p);
  }
  if (files.length === 0) throw new UsageError('cert show: give FILE(s), or configure --apns-cert [--apns-key] or --apns-p12');
  const contents: FileContents[] = [];
  for (const f of files) contents.push(await readCredentialFile(f, passphrase));
  const keysOf = (list: FileContents[]) => list.flatMap((c) => c.keys.map((key) => ({ key, file: c.path })));
  // Key-only files are matched against every certificate; a file's own key against its certificate.
  const keyFiles = keysOf(contents.filter((c) => c.certs.length === 0));
  const shown: ShownCertificate[] = [];
  const now = new Date();
  for (const c of contents) {
    if (c.certs.length === 0) continue;
    // The leaf: the certificate matching the file's own key (PKCS#12, combined PEM), else the first.
    const own = c.keys[0] ? certificateForKey(c.certs, c.keys[0]) : undefined;
    const leaf = own ?? c.certs[0]!;
    const info = certificateInfo(leaf);
    const v = validityProblems(info, now);
    const keys = c.keys.length > 0 ? keysOf([c]) : keyFiles;
    const match = keys.find((k) => certificateForKey([leaf], k.key)) ?? keyFiles.find((k) => certificateForKey([leaf], k.key));
    const problems: string[] = [];
    const status: ShownCertificate['status'] = v.expired ? 'expired' : v.notYetValid ? 'not-yet-valid' : v.expiresSoon ? 'expires-soon' : 'valid';
    if (v.expired) problems.push(`expired on ${isoDate(info.notAfter)}`);
    if (v.notYetValid) problems.push(`not valid before ${isoDate(info.notBefore)}`);
    if (!info.topic) problems.push('no APNs topic (no subject UID, no topics extension 1.2.840.113635.100.6.3.6)');
    if (keys.length > 0 && !match) problems.push(`the private key${keys.length > 1 ? 's' : ''} given (${[...new Set(keys.map((k) => k.file))].join(', ')}) do${keys.length > 1 ? '' : 'es'} not match`);
    shown.push({
      file: c.path,
      subject: info.subject,
      topic: info.topic ?? null,
      topics: info.topics,
      issuer: info.issuer,
      serial: info.serial,
      notBefore: isoDate(info.notBefore),
      notAfter: isoDate(info.notAfter),
      daysLeft: v.daysLeft,
      status,
      fingerprint256: info.fingerprint256,
      chain: c.certs.length - 1,
      key: { given: keys.length > 0, matches: match !== undefined, file: match?.file ?? null },
      usable: problems.length === 0,
      problems,
    });
  }
  if (shown.length === 0) {
    throw new CertificateError(`no certificate in ${files.join(', ')} (only private keys)`, { code: 'not-a-certificate' });
  }
  if (values.json) {
    io.stdout.write(`${JSON.stringify(shown, null, 2)}\n`);
  } else {
    io.stdout.write(shown.map(formatShown).join('\n'));
  }
  return shown.every((s) => s.usable) ? 0 : 1;
}

function formatShown(s: ShownCertificate): string {
  const statusText =
    s.status === 'expired'
      ? `EXPIRED on ${s.notAfter}`
      : s.status === 'not-yet-valid'
        ? `NOT YET VALID (from ${s.notBefore})`
        : s.status === 'expires-soon'
          ? `valid, EXPIRES SOON: ${s.daysLeft} day${s.daysLeft === 1 ? '' : 's'} left — renew it`
          : `valid, ${s.daysLeft} days left`;
  const key = !s.key.given ? 'not given (nothing to match)' : s.key.matches ? `matches (${s.key.file})` : 'DOES NOT MATCH';
  const rows: Array<[string, string]> = [
    ['file', s.file],
    ['subject', s.subject],
    ['topic', s.topic ?? 'NONE (not a Mail push certificate?)'],
  ];
  if (s.topics.length > 1) rows.push(['topics', s.topics.join(', ')]);
  rows.push(
    ['issuer', s.issuer],
    ['serial', s.serial],
    ['not before', s.notBefore],
    ['not after', s.notAfter],
    ['status', statusText],
    ['key', key],
    ['sha256', s.fingerprint256],
  );
  if (s.chain > 0) rows.push(['chain', `${s.chain} more certificate${s.chain === 1 ? '' : 's'} in the file`]);
  if (!s.usable) rows.push(['problems', s.problems.join('; ')]);
  return `${rows.map(([k, v]) => `${`${k}:`.padEnd(12)}${v}`).join('\n')}\n`;
}

// ---------------------------------------------------------------------------------------------
// csr

const DEFAULT_SUBJECT = '/CN=xaps-proxy Mail push/C=US';

async function csr(
  config: CertConfig,
  values: Record<string, string | boolean | undefined>,
  io: CliIO,
  resolvePath: (p: string) => string,
): Promise<number> {
  const out = outDir(config, values, resolvePath, 'csr');
  let subject: ReturnType<typeof parseSubject>;
  try {
    subject = parseSubject((values.subject as string | undefined) ?? DEFAULT_SUBJECT);
  } catch (err) {
    throw err instanceof CertificateError ? new UsageError(err.message) : err;
  }
  const keyPath = join(out, 'mail-push.key');
  const csrPath = join(out, 'mail-push.csr');
  if (!values.force && (await fileExists(keyPath))) {
    throw new CertificateError(
      `${keyPath} exists; not replacing it (a certificate issued for that key would no longer match). Use --force to replace it`,
      { code: 'bad-input', file: keyPath },
    );
  }
  await mkdir(out, { recursive: true, mode: 0o700 });
  const keyPem = await generateRsaKeyPem(2048);
  const csrPem = createCsrPem({ keyPem, subject, hash: 'sha256' });
  await writeFileAtomic(keyPath, keyPem, KEY_FILE_MODE);
  await writeFileAtomic(csrPath, csrPem, CERT_FILE_MODE);
  io.stdout.write(`wrote ${keyPath} (RSA-2048 private key, mode 0600: keep it secret, keep it safe)
wrote ${csrPath} (certificate signing request, SHA-256)

Next steps (details: docs/certificates.md):
  1. Have Apple grant your team an explicit App ID com.apple.mobilemail.push.<your reverse domain>
     (ad hoc, through Apple Developer Relations; the self-service route closed on 2024-10-29).
  2. developer.apple.com → Certificates, Identifiers & Profiles → Certificates → "+" →
     "Apple Push Notification service SSL (Sandbox & Production)" → that App ID →
     upload ${csrPath}.
  3. Download the certificate (aps.cer) and convert it to PEM:
       openssl x509 -inform der -in aps.cer -out ${join(out, 'mail-push.pem')}
  4. Check it:  ${PROG} cert show ${join(out, 'mail-push.pem')} ${keyPath}
  5. Configure: --apns-cert ${join(out, 'mail-push.pem')} --apns-key ${keyPath}
     (the topic is read from the certificate).
`);
  return 0;
}

function outDir(
  config: CertConfig,
  values: Record<string, string | boolean | undefined>,
  resolvePath: (p: string) => string,
  sub: string,
): string {
  const out = (values.out as string | undefined) !== undefined ? resolvePath(values.out as string) : config.certOut;
  if (!out) throw new UsageError(`cert ${sub}: --out DIR (or --cert-out) is required`);
  return out;
}

// ---------------------------------------------------------------------------------------------
// request / renew (historical PushCertRequest)

function settingsOf(config: CertConfig): PushCertSettings {
  return {
    certAppleId: config.certAppleId,
    certPasswordFile: config.certPasswordFile,
    certVendorCert: config.certVendorCert,
    certVendorKey: config.certVendorKey,
    certServiceUrl: config.certServiceUrl,
    certServiceCa: config.certServiceCa,
  };
}

function requireSettings(config: CertConfig, sub: string): void {
  const missing = missingPushCertSettings(settingsOf(config));
  if (missing.length > 0) {
    throw new UsageError(
      `cert ${sub}: ${missing.map((m) => `--${m}`).join(', ')} ${missing.length === 1 ? 'is' : 'are'} required ` +
        `(the vendor signing material is not shipped with ${PROG}; Apple has refused these requests since 2024-10-29: ` +
        `"${PROG} cert csr" and docs/certificates.md describe today's route)`,
    );
  }
}

async function request(
  config: CertConfig,
  values: Record<string, string | boolean | undefined>,
  io: CliIO,
  resolvePath: (p: string) => string,
): Promise<number> {
  requireSettings(config, 'request');
  const out = outDir(config, values, resolvePath, 'request');
  const certPath = join(out, 'mail.pem');
  if (!values.force && (await fileExists(certPath))) {
    throw new CertificateError(
      `${certPath} exists; not requesting another certificate (each request makes Apple issue new ones). ` +
        `Use "${PROG} cert renew", or --force`,
      { code: 'bad-input', file: certPath },
    );
  }
  const account = await pushCertAccountFromSettings(settingsOf(config));
  await mkdir(out, { recursive: true, mode: 0o700 });
  io.stderr.write(`${PROG}: requesting push certificates from ${new URL(account.serviceUrl!).origin} for ${account.appleId}…\n`);
  const issued = await requestNewMailPushCertificate({ ...account, description: hostname() }, out);
  io.stdout.write(`Mail push certificate issued: topic ${issued.topic}, serial ${issued.serial}, expires ${isoDate(issued.notAfter)}
wrote ${issued.written.join('\n      ')}
Configure: --apns-cert ${certPath} --apns-key ${join(out, 'mail.key')}
Renew it ${EXPIRY_WARNING_DAYS} days before it expires: ${PROG} cert renew --apns-cert ${certPath} --apns-key ${join(out, 'mail.key')} …
`);
  return 0;
}

async function renew(
  config: CertConfig,
  values: Record<string, string | boolean | undefined>,
  io: CliIO,
  resolvePath: (p: string) => string,
): Promise<number> {
  requireSettings(config, 'renew');
  const outFlag = (values.out as string | undefined) !== undefined ? resolvePath(values.out as string) : undefined;
  let files: { certPath?: string; keyPath?: string; p12Path?: string; p12Passphrase?: string };
  let target: CredentialTarget;
  if (config.apnsP12) {
    files = { p12Path: config.apnsP12, p12Passphrase: config.apnsP12Passphrase ?? '' };
    target = { kind: 'pkcs12', p12Path: config.apnsP12, passphrase: config.apnsP12Passphrase ?? '' };
  } else if (config.apnsCert) {
    files = { certPath: config.apnsCert, ...(config.apnsKey ? { keyPath: config.apnsKey } : {}) };
    target = { kind: 'pem', certPath: config.apnsCert, ...(config.apnsKey ? { keyPath: config.apnsKey } : {}) };
  } else {
    const dir = outFlag ?? config.certOut;
    if (!dir) throw new UsageError('cert renew: give the certificate (--apns-cert [--apns-key] or --apns-p12) or --out DIR holding mail.pem and mail.key');
    files = { certPath: join(dir, 'mail.pem'), keyPath: join(dir, 'mail.key') };
    target = { kind: 'pem', certPath: join(dir, 'mail.pem'), keyPath: join(dir, 'mail.key') };
  }
  const current = await loadMailPushCredentials(files, { allowExpired: true });
  const dueAt = new Date(current.notAfter.getTime() - EXPIRY_WARNING_DAYS * DAY_MS);
  if (!values.force && dueAt.getTime() > Date.now()) {
    io.stdout.write(
      `${current.source}: expires on ${isoDate(current.notAfter)} (${current.daysLeft} days left); renewal is due from ` +
        `${isoDate(dueAt)} (${EXPIRY_WARNING_DAYS} days before). Nothing to do (--force renews now).\n`,
    );
    return 0;
  }
  const companionDir = target.kind === 'pkcs12' ? dirname(target.p12Path) : dirname(target.certPath);
  if (outFlag && (config.apnsCert || config.apnsP12)) {
    target = { kind: 'pem', certPath: join(outFlag, 'mail.pem'), keyPath: join(outFlag, 'mail.key') };
    await mkdir(outFlag, { recursive: true, mode: 0o700 });
  }
  const account = await pushCertAccountFromSettings(settingsOf(config));
  io.stderr.write(
    `${PROG}: renewing ${current.source} (topic ${current.topic}, serial ${current.serial}, expires ${isoDate(current.notAfter)})…\n`,
  );
  const issued = await renewMailPushCertificate({ ...account, description: hostname() }, current, target, companionDir);
  io.stdout.write(`Mail push certificate renewed: topic ${issued.topic}, serial ${issued.serial}, expires ${isoDate(issued.notAfter)}
wrote ${issued.written.join('\n      ')}
A running ${PROG} serve picks the new files up by itself (or on SIGHUP).
`);
  return 0;
}
