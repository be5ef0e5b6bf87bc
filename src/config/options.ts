/**
 * THE list of configuration options. Everything else — the command-line parser, the
 * environment reader, the YAML reader, `--help`, `config check` output and the `Config`
 * type — is derived from `OPTIONS` (plus the cross-option `RULES` below).
 *
 * To add an option, add one entry to OPTIONS:
 *
 *   'metrics-listen': option({
 *     group: 'Operations',
 *     type: v.hostPort(),
 *     commands: ['serve'],
 *     description: 'Serve Prometheus metrics on http://HOST:PORT/metrics.',
 *   }),
 *
 * and it becomes `--metrics-listen`, `XAPS_METRICS_LISTEN`, the YAML key `metrics-listen`
 * and `config.metricsListen: HostPort | undefined` (non-optional when it has a `default`
 * or `required: true`). Only when it constrains other options does it also need a RULES entry.
 */
import { createSecureContext } from 'node:tls';
import { z } from 'zod';
import * as v from './values.js';
import type { HostPort, ValueType } from './values.js';

/** Subcommands that read configuration; each validates only the options it lists. */
export const COMMANDS = ['serve', 'devices', 'test-push', 'cert'] as const;
export type Command = (typeof COMMANDS)[number];

export interface OptionSpec<T = unknown> {
  /** How a raw value is parsed, printed and shown in help. */
  readonly type: ValueType<T>;
  /** Help text (one paragraph). */
  readonly description: string;
  /** Subcommands that use the option; it is neither accepted as a flag nor validated elsewhere. */
  readonly commands: readonly Command[];
  /** Heading under which help lists the option. */
  readonly group: string;
  /** Default, written as a user would (parsed like any input). */
  readonly default?: string;
  /** What an unset optional option means, for help and `config check` (e.g. "the upstream host"). */
  readonly unsetMeans?: string;
  /** Must be set (for every command that uses it). */
  readonly required?: boolean;
  /** Bears a secret: masked whenever printed. */
  readonly secret?: boolean;
  /** false: cannot be a key of the config file (only `config` itself). */
  readonly inFile?: boolean;
}

/** Identity helper that keeps the literal types of an entry (commands, default, required). */
function option<const D extends OptionSpec<any>>(spec: D): D {
  return spec;
}

/**
 * Default --tls-ciphers: forward-secret AEAD suites only. OpenSSL expands it to ECDHE-{ECDSA,RSA}-AES256-GCM-SHA384,
 * ECDHE-{ECDSA,RSA}-AES128-GCM-SHA256 and ECDHE-{ECDSA,RSA}-CHACHA20-POLY1305, in that order (the server's order
 * wins). Node's own default list also allows RSA key exchange (no forward secrecy) and CBC suites.
 */
export const DEFAULT_TLS_CIPHERS = 'ECDHE+AESGCM:ECDHE+CHACHA20';

export const TLS_MIN_VERSIONS = ['TLSv1.2', 'TLSv1.3'] as const;
export type TlsMinVersion = (typeof TLS_MIN_VERSIONS)[number];

/** Why OpenSSL refuses a cipher list (undefined: it is usable). */
function cipherListProblem(ciphers: string): string | undefined {
  try {
    createSecureContext({ ciphers });
    return undefined;
  } catch (err) {
    const reason = String((err as Error).message ?? err).replace(/^error:[0-9A-F]+:[^:]*::/i, '');
    return `not a usable OpenSSL cipher list (${reason})`;
  }
}

const ALL = ['serve', 'devices', 'test-push', 'cert'] as const;
const SERVE = ['serve'] as const;
/** Commands that send pushes. */
const SENDERS = ['serve', 'test-push'] as const;
/** Commands that read the Mail push certificate. */
const CERT_USERS = ['serve', 'test-push', 'cert'] as const;

export const OPTIONS = {
  // ---- General
  config: option({
    group: 'General',
    type: v.readableFile(),
    commands: ALL,
    inFile: false,
    description:
      'YAML configuration file. Its keys are the option names exactly as the flags spell them, without "--" ' +
      '(e.g. "listen-tls: 0.0.0.0:993"); unknown keys are an error. Relative paths in it are resolved ' +
      'against the directory of the file.',
  }),
  'log-level': option({
    group: 'General',
    type: v.oneOf(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']),
    commands: ALL,
    default: 'info',
    description:
      'Log verbosity (the devices commands log only warnings unless this is set). serve applies a changed value on SIGHUP.',
  }),

  // ---- Client side
  listen: option({
    group: 'Listeners',
    type: v.hostPort(),
    commands: SERVE,
    description:
      'Plain IMAP listener (HOST is an IPv4 address, [IPv6] or a name). Offers STARTTLS when --tls-cert ' +
      'and --tls-key are set. At least one of --listen and --listen-tls is required.',
  }),
  'listen-tls': option({
    group: 'Listeners',
    type: v.hostPort(),
    commands: SERVE,
    description: 'Implicit-TLS IMAP listener (IMAPS, usually port 993). Requires --tls-cert and --tls-key.',
  }),
  'tls-cert': option({
    group: 'Listeners',
    type: v.readableFile(),
    commands: SERVE,
    description:
      'PEM certificate chain presented to clients (for --listen-tls and STARTTLS on --listen). Re-read with --tls-key on ' +
      'SIGHUP; open sessions keep theirs.',
  }),
  'tls-key': option({
    group: 'Listeners',
    type: v.readableFile(),
    commands: SERVE,
    description: 'PEM private key of --tls-cert.',
  }),
  'allow-plaintext-auth': option({
    group: 'Listeners',
    type: v.boolean(),
    commands: SERVE,
    default: 'false',
    description:
      'Allow LOGIN/AUTHENTICATE over an unencrypted --listen connection from non-loopback clients ' +
      '(otherwise refused until STARTTLS). For labs only.',
  }),
  'idle-timeout': option({
    group: 'Listeners',
    type: v.duration({
      min: 30 * 60_000,
      minReason: 'IMAP clients re-IDLE every 29 minutes and RFC 3501 autologout is at least 30 minutes',
    }),
    commands: SERVE,
    default: '35m',
    description: 'Close client connections idle for longer than this. At least 30m.',
  }),
  'login-timeout': option({
    group: 'Listeners',
    type: v.duration(),
    commands: SERVE,
    default: '3m',
    description:
      'Close a client connection that has not logged in this long after it was accepted, whatever it sends meanwhile ' +
      '(with "* BYE"); 3m is what Dovecot\'s own login processes allow. The TLS handshake on --listen-tls must ' +
      'complete within the shorter of this and 30s. After login --idle-timeout applies.',
  }),
  'max-connections': option({
    group: 'Listeners',
    type: v.integer({ min: 0, max: 10_000_000 }),
    commands: SERVE,
    default: '20000',
    description:
      'Most client connections open at once, on both listeners together (0: unlimited). Further ones are answered ' +
      '"* BYE [UNAVAILABLE]" and closed. Each session holds two file descriptors: keep this below half the process ' +
      'limit (LimitNOFILE).',
  }),
  'max-connections-per-ip': option({
    group: 'Listeners',
    type: v.integer({ min: 0, max: 10_000_000 }),
    commands: SERVE,
    default: '500',
    description:
      'Most client connections open at once from one address, IPv6 addresses counted per /64 (0: unlimited). ' +
      'Further ones are answered "* BYE [UNAVAILABLE] Too many connections from your address" and closed. The ' +
      'address is the TCP peer\'s: behind a load balancer that hides client addresses, set 0.',
  }),
  'tls-min-version': option({
    group: 'Listeners',
    type: v.text({
      placeholder: TLS_MIN_VERSIONS.join('|'),
      expected: 'a TLS version',
      check: (s) => ((TLS_MIN_VERSIONS as readonly string[]).includes(s) ? undefined : `expected ${TLS_MIN_VERSIONS.join(' or ')}`),
    }),
    commands: SERVE,
    default: 'TLSv1.2',
    description: 'Oldest TLS version accepted from clients (--listen-tls and STARTTLS). Kept across SIGHUP reloads.',
  }),
  'tls-ciphers': option({
    group: 'Listeners',
    type: v.text({ placeholder: 'CIPHERS', expected: 'an OpenSSL cipher list', check: cipherListProblem }),
    commands: SERVE,
    default: DEFAULT_TLS_CIPHERS,
    description:
      'OpenSSL cipher list for client TLS up to 1.2, in order of preference (the server\'s order wins). The default ' +
      'allows only forward-secret AEAD suites: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305, for ECDSA and RSA ' +
      'certificates. TLS 1.3 suites stay OpenSSL\'s defaults. Kept across SIGHUP reloads.',
  }),

  // ---- Upstream
  upstream: option({
    group: 'Upstream',
    type: v.hostPort(),
    commands: SERVE,
    required: true,
    description: 'The real IMAP server (Dovecot, Cyrus, …) every connection is relayed to.',
  }),
  'upstream-tls': option({
    group: 'Upstream',
    type: v.oneOf(['none', 'starttls', 'tls']),
    commands: SERVE,
    default: 'none',
    description: 'How to secure the upstream connection: none, STARTTLS, or implicit TLS.',
  }),
  'upstream-ca': option({
    group: 'Upstream',
    type: v.readableFile(),
    commands: SERVE,
    unsetMeans: 'the system trust store',
    description: 'PEM file of the CA(s) trusted for the upstream certificate.',
  }),
  'upstream-servername': option({
    group: 'Upstream',
    type: v.hostName(),
    commands: SERVE,
    unsetMeans: 'the --upstream host',
    description: 'TLS server name (SNI) sent upstream and checked against its certificate.',
  }),
  'upstream-insecure': option({
    group: 'Upstream',
    type: v.boolean(),
    commands: SERVE,
    default: 'false',
    description: 'Do not verify the upstream certificate. For labs only.',
  }),
  'connect-timeout': option({
    group: 'Upstream',
    type: v.duration(),
    commands: SERVE,
    default: '10s',
    description: 'Give up connecting (TCP and TLS handshake) to the upstream server after this long.',
  }),
  'client-ip': option({
    group: 'Upstream',
    type: v.oneOf(['id', 'proxy-v2', 'none']),
    commands: SERVE,
    default: 'id',
    description:
      'How the client\'s address is passed upstream: "id" (IMAP ID x-originating-ip, as Dovecot login_trusted_networks ' +
      'expects), "proxy-v2" (HAProxy PROXY protocol v2 header), or "none".',
  }),

  // ---- Push
  'apns-topic': option({
    group: 'Push',
    type: v.text({
      placeholder: 'TOPIC',
      expected: 'an APNs topic',
      check: (s) =>
        /^(com\.apple\.mobilemail\.push\.|com\.apple\.mail\.)\S+$/.test(s)
          ? undefined
          : 'must start with "com.apple.mobilemail.push." or "com.apple.mail." (the topic of the Mail push certificate)',
    }),
    commands: SENDERS,
    unsetMeans: 'push disabled, XAPPLEPUSHSERVICE not advertised',
    description: 'APNs topic of the Mail push certificate. When set, push is configured and XAPPLEPUSHSERVICE is advertised.',
  }),
  'apns-cert': option({
    group: 'Push',
    type: v.readableFile(),
    commands: CERT_USERS,
    unsetMeans: 'no certificate (see --apns-p12, --apns-token-key)',
    description:
      'PEM file of the Mail push certificate (it may also hold the key). Its topic replaces --apns-topic. ' +
      'Re-read on SIGHUP and when the file changes.',
  }),
  'apns-key': option({
    group: 'Push',
    type: v.readableFile(),
    commands: CERT_USERS,
    unsetMeans: 'the key is in --apns-cert',
    description: 'PEM private key of --apns-cert.',
  }),
  'apns-p12': option({
    group: 'Push',
    type: v.readableFile(),
    commands: CERT_USERS,
    description: 'PKCS#12 file with the Mail push certificate and its key (instead of --apns-cert/--apns-key).',
  }),
  'apns-p12-passphrase': option({
    group: 'Push',
    type: v.text({ placeholder: 'PASSPHRASE' }),
    commands: CERT_USERS,
    secret: true,
    unsetMeans: 'an empty passphrase',
    description: 'Passphrase of --apns-p12.',
  }),
  'apns-token-key': option({
    group: 'Push',
    type: v.readableFile(),
    commands: SENDERS,
    description:
      'APNs token authentication instead of a certificate: the .p8 signing key (with --apns-key-id, --apns-team-id ' +
      'and --apns-topic). Reported not to work for Mail push topics; the certificate is the working route.',
  }),
  'apns-key-id': option({
    group: 'Push',
    type: v.text({ placeholder: 'KEYID' }),
    commands: SENDERS,
    description: 'Key ID of --apns-token-key.',
  }),
  'apns-team-id': option({
    group: 'Push',
    type: v.text({ placeholder: 'TEAMID' }),
    commands: SENDERS,
    description: 'Apple developer team ID for --apns-token-key.',
  }),
  'apns-endpoint': option({
    group: 'Push',
    type: v.text({
      placeholder: 'production|sandbox|URL',
      check: (s) =>
        s === 'production' || s === 'sandbox' || /^https:\/\/[^\s/]+(:\d+)?\/?$/.test(s)
          ? undefined
          : 'expected production, sandbox or an https://HOST[:PORT] URL',
    }),
    commands: SENDERS,
    default: 'production',
    description: 'APNs server: production (api.push.apple.com, what Mail uses), sandbox, or any https URL (tests).',
  }),
  'apns-ca': option({
    group: 'Push',
    type: v.readableFile(),
    commands: SENDERS,
    unsetMeans: 'the system trust store',
    description: 'PEM CA(s) trusted for the APNs server certificate (for a local mock APNs).',
  }),
  'apns-push-type': option({
    group: 'Push',
    type: v.oneOf(['background', 'alert']),
    commands: SENDERS,
    default: 'background',
    description: 'apns-push-type header of Mail pushes.',
  }),
  'apns-priority': option({
    group: 'Push',
    type: v.oneOf(['5', '10']),
    commands: SENDERS,
    default: '5',
    description: 'apns-priority header (Apple requires 5 for background pushes).',
  }),
  'apns-expiration': option({
    group: 'Push',
    type: v.duration({ min: 0 }),
    commands: SENDERS,
    default: '1d',
    description: 'How long APNs keeps an undelivered push (apns-expiration = now + this; 0: deliver now or never).',
  }),
  'apns-connections': option({
    group: 'Push',
    type: v.integer({ min: 1, max: 32 }),
    commands: SENDERS,
    default: '2',
    description: 'HTTP/2 connections kept open to APNs.',
  }),
  'apns-request-timeout': option({
    group: 'Push',
    type: v.duration(),
    commands: SENDERS,
    default: '15s',
    description: 'Give up on one APNs request after this long (it is then retried).',
  }),
  'apns-max-attempts': option({
    group: 'Push',
    type: v.integer({ min: 1, max: 50 }),
    commands: SENDERS,
    default: '8',
    description: 'Attempts per push on 5xx answers and transport errors (exponential back-off with jitter).',
  }),
  'push-coalesce-window': option({
    group: 'Push',
    type: v.duration(),
    commands: SERVE,
    default: '2s',
    description:
      'The first change for a device is pushed at once; further changes within this window are merged into one push at its end.',
  }),
  'push-queue-size': option({
    group: 'Push',
    type: v.integer({ min: 100, max: 10_000_000 }),
    commands: SERVE,
    default: '100000',
    description: 'Most pushes waiting for APNs; beyond it the oldest merged ones are dropped first (and counted).',
  }),

  // ---- Storage
  'redis-url': option({
    group: 'Storage',
    type: v.redisUrl(),
    commands: ALL,
    secret: true,
    unsetMeans: 'the embedded store in --data-dir',
    description:
      'Redis for device registrations: redis://[USER:PASSWORD@]HOST[:PORT][/DB], rediss://… (TLS), ' +
      'redis+sentinel://H1,H2/MASTER or redis+cluster://H1,H2 (rediss+… for TLS).',
  }),
  'data-dir': option({
    group: 'Storage',
    type: v.directory(),
    commands: ALL,
    default: '/var/lib/xaps-proxy',
    description: 'Directory for state (the embedded registration store when --redis-url is not set).',
  }),
  'registration-ttl': option({
    group: 'Storage',
    type: v.duration(),
    commands: ALL,
    default: '30d',
    description: 'Forget device registrations not renewed for this long.',
  }),

  // ---- Watching the upstream mailboxes
  watch: option({
    group: 'Watching',
    type: v.oneOf(['auto', 'notify', 'idle', 'events']),
    commands: SERVE,
    default: 'auto',
    description:
      'How new mail is noticed: "notify" (one upstream connection per user with IMAP NOTIFY), "idle" (IDLE, for servers ' +
      'without NOTIFY such as Cyrus 3.6), "events" (Dovecot push_notification Lua / Cyrus notify_external POST to ' +
      '--events-listen; no upstream connections), or "auto" (NOTIFY when the upstream offers it, else IDLE).',
  }),
  'master-user': option({
    group: 'Watching',
    type: v.text({ placeholder: 'USER' }),
    commands: SERVE,
    unsetMeans: 'no watchers (only --watch events works)',
    description:
      'Upstream master user the watchers log in as on behalf of each user (Dovecot: a master passdb; Cyrus: in ' +
      'proxyservers). Logs in with SASL PLAIN and the user as authorization id.',
  }),
  'master-password-file': option({
    group: 'Watching',
    type: v.secretFile('the master password'),
    commands: SERVE,
    description: 'File holding the master user password (first line). The password is never logged.',
  }),
  'master-login': option({
    group: 'Watching',
    type: v.oneOf(['plain-authzid', 'separator']),
    commands: SERVE,
    default: 'plain-authzid',
    description:
      'How the master user logs in for a user: "plain-authzid" (AUTHENTICATE PLAIN user\\0master\\0password: Dovecot and ' +
      'Cyrus) or "separator" (LOGIN "user*master" password: Dovecot with auth_master_user_separator).',
  }),
  'master-separator': option({
    group: 'Watching',
    type: v.text({ placeholder: 'CHAR' }),
    commands: SERVE,
    default: '*',
    description: 'Dovecot auth_master_user_separator, for --master-login separator.',
  }),
  'idle-max-per-user': option({
    group: 'Watching',
    type: v.integer({ min: 1, max: 100 }),
    commands: SERVE,
    default: '5',
    description:
      'IDLE mode: upstream connections per user (INBOX first, then other registered mailboxes); mailboxes beyond ' +
      'this are checked with STATUS every --poll-interval.',
  }),
  'poll-interval': option({
    group: 'Watching',
    type: v.duration(),
    commands: SERVE,
    default: '60s',
    description: 'IDLE mode: how often mailboxes without their own IDLE connection are checked with STATUS.',
  }),
  'max-watchers': option({
    group: 'Watching',
    type: v.integer({ min: 1, max: 1_000_000 }),
    commands: SERVE,
    default: '10000',
    description: 'Most users watched by this instance (upstream connections: one per user with NOTIFY).',
  }),
  'events-listen': option({
    group: 'Watching',
    type: v.hostPort(),
    commands: SERVE,
    default: '127.0.0.1:8425',
    description: 'events mode: where the HTTP listener for Dovecot/Cyrus new-mail events listens (keep it on loopback or a private network).',
  }),
  'events-secret-file': option({
    group: 'Watching',
    type: v.secretFile('the events secret'),
    commands: SERVE,
    unsetMeans: 'no shared secret (loopback only)',
    description: 'File holding the shared secret events must carry in the X-Xaps-Secret header (or Authorization: Bearer).',
  }),
  'instance-id': option({
    group: 'Watching',
    type: v.text({ placeholder: 'ID' }),
    commands: SERVE,
    unsetMeans: 'hostname and pid',
    description: 'Name of this instance in watcher leases (several instances sharing Redis watch each user once).',
  }),

  // ---- Operations
  'metrics-listen': option({
    group: 'Operations',
    type: v.hostPort(),
    commands: SERVE,
    default: '127.0.0.1:9925',
    description:
      'Operations HTTP listener: Prometheus metrics on /metrics, liveness on /healthz and readiness (listeners, ' +
      'upstream, store, APNs certificate) on /readyz. Keep it on loopback or a private network.',
  }),
  'drain-timeout': option({
    group: 'Operations',
    type: v.duration({ min: 0 }),
    commands: SERVE,
    default: '30s',
    description:
      'On SIGTERM or SIGINT: stop accepting, let open IMAP sessions end by themselves for up to this long, then close ' +
      'the rest with "* BYE [UNAVAILABLE]". A second SIGTERM ends the wait at once. /readyz answers 503 meanwhile.',
  }),

  // ---- Certificate request: Apple's historical PushCertRequest flow (docs/certificates.md).
  // Used by `cert request|renew`, and by `serve` for auto-renewal when the vendor material is set.
  'cert-apple-id': option({
    group: 'Certificate request (historical PushCertRequest)',
    type: v.text({ placeholder: 'APPLE_ID', expected: 'an Apple ID' }),
    commands: ['serve', 'cert'],
    description:
      'Apple ID for "cert request", "cert renew" and auto-renewal through Apple\'s PushCertRequest service. ' +
      'Apple has refused these requests since 2024-10-29; see docs/certificates.md for the developer-portal route.',
  }),
  'cert-password-file': option({
    group: 'Certificate request (historical PushCertRequest)',
    type: v.secretFile('the Apple ID password'),
    commands: ['serve', 'cert'],
    description:
      'File holding the password of --cert-apple-id (its first line; only its SHA-256 is sent, never printed). Keep it 0600.',
  }),
  'cert-vendor-cert': option({
    group: 'Certificate request (historical PushCertRequest)',
    type: v.readableFile(),
    commands: ['serve', 'cert'],
    unsetMeans: 'no certificate requests, no auto-renewal',
    description:
      'Vendor certificate (chain, PEM or DER) whose key signs PushCertRequests, as macOS Server did. Not shipped ' +
      'with xaps-proxy. With --cert-vendor-key, "serve" renews the Mail push certificate 30 days before it expires.',
  }),
  'cert-vendor-key': option({
    group: 'Certificate request (historical PushCertRequest)',
    type: v.readableFile(),
    commands: ['serve', 'cert'],
    description: 'Private key (PEM or DER) of --cert-vendor-cert.',
  }),
  'cert-service-url': option({
    group: 'Certificate request (historical PushCertRequest)',
    type: v.text({
      placeholder: 'URL',
      check: (s) => (/^https?:\/\/[^\s/]+(\/\S*)?$/.test(s) ? undefined : 'expected an http(s):// URL'),
    }),
    commands: ['serve', 'cert'],
    unsetMeans: "Apple's https://identity.apple.com/pushcert/caservice/new",
    description: 'PushCertRequest service for new certificates; renewals go to the same URL ending in /renew instead of /new.',
  }),
  'cert-service-ca': option({
    group: 'Certificate request (historical PushCertRequest)',
    type: v.readableFile(),
    commands: ['serve', 'cert'],
    unsetMeans: 'the system trust store',
    description: 'PEM CA(s) trusted for --cert-service-url (for a local mock service).',
  }),
  'cert-out': option({
    group: 'Certificate request (historical PushCertRequest)',
    type: v.directory(),
    commands: ['cert'],
    description:
      'Directory "cert csr" and "cert request" write into (same as --out). Without --apns-cert/--apns-p12, ' +
      '"cert renew" renews DIR/mail.pem and DIR/mail.key in place.',
  }),
} as const;

// ---------------------------------------------------------------------------------------------
// Derived types

type Options = typeof OPTIONS;
export type OptionName = keyof Options & string;

/** `listen-tls` → `listenTls`. */
export type CamelCase<S extends string> = S extends `${infer H}-${infer T}` ? `${H}${Capitalize<CamelCase<T>>}` : S;

type ValueOf<D> = D extends { readonly type: ValueType<infer T> } ? T : never;
type AlwaysSet<D> = D extends { readonly required: true } ? true : D extends { readonly default: string } ? true : false;

/** Typed value of an option in a loaded configuration. */
export type OptionValue<N extends OptionName> =
  AlwaysSet<Options[N]> extends true ? ValueOf<Options[N]> : ValueOf<Options[N]> | undefined;

/** The configuration a command sees: its options, camelCase, typed. */
export type ConfigFor<C extends Command> = {
  readonly [N in OptionName as C extends Options[N]['commands'][number] ? CamelCase<N> : never]: OptionValue<N>;
};

/** The configuration of `serve` (and `config check`). Durations are in milliseconds. */
export interface Config extends ConfigFor<'serve'> {}
/** The configuration of the `devices` admin commands. */
export interface DevicesConfig extends ConfigFor<'devices'> {}

export type { HostPort };
export type UpstreamTls = OptionValue<'upstream-tls'>;
export type ClientIpMode = OptionValue<'client-ip'>;
export type LogLevel = OptionValue<'log-level'>;

// ---------------------------------------------------------------------------------------------
// Cross-option rules (errors and warnings). Options with no relation to others need none.

/** Report a problem with `option`; `related` options get their origin shown too. */
export type Report = (option: OptionName, message: string, related?: readonly OptionName[]) => void;

type RuleFor<C extends Command> = {
  readonly command: C;
  readonly severity: 'error' | 'warning';
  readonly check: (config: ConfigFor<C>, report: Report) => void;
};
export type Rule = { [C in Command]: RuleFor<C> }[Command];

export const RULES: readonly Rule[] = [
  {
    command: 'serve',
    severity: 'error',
    check: (c, report) => {
      if (!c.listen && !c.listenTls) {
        report('listen', 'at least one of --listen and --listen-tls is required (flags, XAPS_LISTEN/XAPS_LISTEN_TLS or the config file)');
      }
    },
  },
  {
    command: 'serve',
    severity: 'error',
    check: (c, report) => {
      if (c.listenTls && !c.tlsCert) report('tls-cert', 'required when --listen-tls is set', ['listen-tls']);
      if (c.listenTls && !c.tlsKey) report('tls-key', 'required when --listen-tls is set', ['listen-tls']);
      if (c.tlsCert && !c.tlsKey) report('tls-key', 'required together with --tls-cert', ['tls-cert']);
      if (c.tlsKey && !c.tlsCert) report('tls-cert', 'required together with --tls-key', ['tls-key']);
    },
  },
  {
    command: 'serve',
    severity: 'error',
    check: (c, report) => {
      if (c.listen && c.listenTls && c.listen.host === c.listenTls.host && c.listen.port === c.listenTls.port) {
        report('listen-tls', 'must not be the same address as --listen', ['listen']);
      }
    },
  },
  {
    command: 'serve',
    severity: 'warning',
    check: (c, report) => {
      if (c.upstreamInsecure) {
        report('upstream-insecure', 'upstream certificate verification is DISABLED; use this in a lab only');
      }
      if (c.upstreamTls === 'none') {
        const noEffect = 'has no effect with --upstream-tls none';
        if (c.upstreamCa) report('upstream-ca', noEffect, ['upstream-tls']);
        if (c.upstreamServername) report('upstream-servername', noEffect, ['upstream-tls']);
        if (c.upstreamInsecure) report('upstream-insecure', noEffect, ['upstream-tls']);
      }
      if (c.listen && !c.tlsCert) {
        report(
          'listen',
          c.allowPlaintextAuth
            ? 'no --tls-cert/--tls-key: STARTTLS is not offered and clients send passwords in clear text'
            : 'no --tls-cert/--tls-key: STARTTLS is not offered, so only loopback clients can log in on --listen',
        );
      }
      if (c.allowPlaintextAuth) {
        report('allow-plaintext-auth', 'passwords may cross the network in clear text; use this in a lab only');
      }
      if (!c.apnsTopic && !c.apnsCert && !c.apnsP12) {
        report('apns-topic', 'not set, and no --apns-cert/--apns-p12: push is not configured and XAPPLEPUSHSERVICE is not advertised');
      }
    },
  },
  // Mail push certificate files, and the certificate request flow (src/cert, docs/certificates.md).
  { command: 'serve', severity: 'error', check: checkCertificateFiles },
  { command: 'test-push', severity: 'error', check: checkCertificateFiles },
  { command: 'cert', severity: 'error', check: checkCertificateFiles },
  { command: 'serve', severity: 'warning', check: warnUnusedP12Passphrase },
  { command: 'test-push', severity: 'warning', check: warnUnusedP12Passphrase },
  { command: 'serve', severity: 'error', check: checkVendorPair },
  { command: 'cert', severity: 'error', check: checkVendorPair },
  { command: 'serve', severity: 'error', check: checkAutoRenewal },
  { command: 'serve', severity: 'warning', check: warnAutoRenewal },
];

interface CertificateFileOptions {
  readonly apnsCert?: string | undefined;
  readonly apnsKey?: string | undefined;
  readonly apnsP12?: string | undefined;
  readonly apnsP12Passphrase?: string | undefined;
}

interface CertificateRequestOptions extends CertificateFileOptions {
  readonly certAppleId?: string | undefined;
  readonly certPasswordFile?: string | undefined;
  readonly certVendorCert?: string | undefined;
  readonly certVendorKey?: string | undefined;
}

/** PEM (--apns-cert [--apns-key]) or PKCS#12 (--apns-p12), not both; --apns-key belongs to --apns-cert. */
function checkCertificateFiles(c: CertificateFileOptions, report: Report): void {
  if (c.apnsCert && c.apnsP12) {
    report('apns-p12', 'cannot be combined with --apns-cert: give the Mail push certificate either as PEM (--apns-cert [--apns-key]) or as PKCS#12', ['apns-cert']);
  }
  if (c.apnsKey && !c.apnsCert) {
    report('apns-key', c.apnsP12 ? 'cannot be combined with --apns-p12 (the key is in the PKCS#12 file)' : 'requires --apns-cert', c.apnsP12 ? ['apns-p12'] : []);
  }
}

function warnUnusedP12Passphrase(c: CertificateFileOptions, report: Report): void {
  if (c.apnsP12Passphrase && !c.apnsP12) report('apns-p12-passphrase', 'has no effect without --apns-p12');
}

function checkVendorPair(c: CertificateRequestOptions, report: Report): void {
  if (c.certVendorCert && !c.certVendorKey) report('cert-vendor-key', 'required together with --cert-vendor-cert', ['cert-vendor-cert']);
  if (c.certVendorKey && !c.certVendorCert) report('cert-vendor-cert', 'required together with --cert-vendor-key', ['cert-vendor-key']);
}

/** Auto-renewal is on when the vendor material is set; it then needs the account and a certificate to renew. */
function checkAutoRenewal(c: CertificateRequestOptions, report: Report): void {
  if (!c.certVendorCert || !c.certVendorKey) return;
  const why = 'required for automatic renewal (--cert-vendor-cert/--cert-vendor-key are set)';
  if (!c.certAppleId) report('cert-apple-id', why, ['cert-vendor-cert']);
  if (!c.certPasswordFile) report('cert-password-file', why, ['cert-vendor-cert']);
  if (!c.apnsCert && !c.apnsP12) report('apns-cert', `${why}: the certificate to renew (or --apns-p12)`, ['cert-vendor-cert']);
}

function warnAutoRenewal(c: CertificateRequestOptions, report: Report): void {
  if (c.certVendorCert && c.certVendorKey) {
    report(
      'cert-vendor-cert',
      "automatic renewal through Apple's PushCertRequest service is on, but Apple has refused these requests since 2024-10-29 " +
        '(failures are retried with back-off of up to a day; see docs/certificates.md)',
    );
  } else {
    if (c.certAppleId) report('cert-apple-id', 'has no effect without --cert-vendor-cert and --cert-vendor-key (no automatic renewal)');
    if (c.certPasswordFile) report('cert-password-file', 'has no effect without --cert-vendor-cert and --cert-vendor-key (no automatic renewal)');
  }
}

// ---------------------------------------------------------------------------------------------
// Runtime helpers derived from the names

export function camelCase<S extends string>(name: S): CamelCase<S> {
  return name.replace(/-([a-z0-9])/g, (_, ch: string) => ch.toUpperCase()) as CamelCase<S>;
}

/** `listen-tls` → `XAPS_LISTEN_TLS`. */
export function envVarName(name: string): string {
  return `XAPS_${name.toUpperCase().replace(/-/g, '_')}`;
}

export function optionNames(command?: Command): OptionName[] {
  const all = Object.keys(OPTIONS) as OptionName[];
  return command ? all.filter((n) => (OPTIONS[n].commands as readonly Command[]).includes(command)) : all;
}

export function getOption(name: string): OptionSpec | undefined {
  return Object.hasOwn(OPTIONS, name) ? (OPTIONS[name as OptionName] as OptionSpec) : undefined;
}

/** Issue params marking a missing required option / a cross-option rule (read by the loader). */
export const REQUIRED_ISSUE = 'xaps.required';
export const RULE_ISSUE = 'xaps.rule';

/**
 * The zod schema of a command's configuration: an object keyed by camelCase option name whose
 * input values are raw (string from flags/env, YAML scalar, undefined when unset) and whose
 * output is `ConfigFor<C>`, with the error RULES of the command applied.
 */
export function configSchema<C extends Command>(command: C): z.ZodType<ConfigFor<C>> {
  const shape: Record<string, z.ZodType> = {};
  for (const name of optionNames(command)) {
    const spec = getOption(name)!;
    const schema = spec.type.schema;
    shape[camelCase(name)] = spec.required
      ? z
          .unknown()
          .transform((raw, ctx): unknown => {
            if (raw === undefined) {
              ctx.addIssue({ code: 'custom', message: 'required', params: { [REQUIRED_ISSUE]: true } });
              return z.NEVER;
            }
            return raw;
          })
          .pipe(schema)
      : schema.optional();
  }
  const rules = RULES.filter((r) => r.command === command && r.severity === 'error');
  return z.object(shape).superRefine((config, ctx) => {
    for (const rule of rules) {
      (rule.check as (c: unknown, r: Report) => void)(config, (option, message, related = []) => {
        ctx.addIssue({ code: 'custom', path: [camelCase(option)], message, params: { [RULE_ISSUE]: related } });
      });
    }
  }) as unknown as z.ZodType<ConfigFor<C>>;
}
