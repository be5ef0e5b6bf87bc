/**
 * Metrics of the client-facing proxy (./server, ./session, ./upstream):
 *
 *   xaps_client_connections{listener,tls}            client sessions open now; a STARTTLS moves one from tls="false"
 *                                                    to tls="true"
 *   xaps_client_connections_total{listener}          connections accepted
 *   xaps_client_starttls_total                       STARTTLS handshakes completed
 *   xaps_client_connections_rejected_total{reason}   connections refused before a session began
 *   xaps_upstream_connect_failures_total{reason}     sessions whose upstream leg could not be opened
 *   xaps_imap_commands_total{command}                client commands, XAPPLEPUSHSERVICE (answered here) included
 *   xaps_tls_certificate_expiry_timestamp_seconds    notAfter of the client-facing certificate in use
 *
 * The command label is the command name only when it is on a fixed list of IMAP commands; anything else a client
 * types becomes "other", so no client-chosen string ever becomes a label value.
 *
 * Created once per registry: two servers on one registry (tests) add up.
 */
import { Counter, Gauge, type Registry } from 'prom-client';
import { certificateInfo } from '../cert/x509.js';
import type { SessionEvents } from './session.js';
import { UPSTREAM_FAILURE_REASONS, UpstreamUnavailableError, type UpstreamFailureReason } from './upstream.js';

export const LISTENERS = ['listen', 'listen-tls'] as const;
export type ListenerName = (typeof LISTENERS)[number];

/**
 * Why a connection was refused before a session began: the proxy is stopping, --max-connections was reached, or
 * --max-connections-per-ip for the client's address (IPv6: its /64).
 */
export const REJECT_REASONS = ['shutting_down', 'total_limit', 'per_address_limit'] as const;
export type RejectReason = (typeof REJECT_REASONS)[number];

/** RFC 3501 and 9051 commands, and the extensions clients and Dovecot commonly use. */
export const IMAP_COMMANDS = [
  'CAPABILITY', 'NOOP', 'LOGOUT', 'STARTTLS', 'AUTHENTICATE', 'LOGIN', 'UNAUTHENTICATE',
  'SELECT', 'EXAMINE', 'CREATE', 'DELETE', 'RENAME', 'SUBSCRIBE', 'UNSUBSCRIBE', 'LIST', 'LSUB', 'XLIST',
  'NAMESPACE', 'STATUS', 'APPEND', 'CHECK', 'CLOSE', 'UNSELECT', 'EXPUNGE', 'SEARCH', 'FETCH', 'STORE',
  'COPY', 'MOVE', 'REPLACE', 'SORT', 'THREAD', 'IDLE', 'ID', 'ENABLE', 'COMPRESS', 'NOTIFY',
  'GETQUOTA', 'GETQUOTAROOT', 'SETQUOTA', 'GETACL', 'SETACL', 'DELETEACL', 'LISTRIGHTS', 'MYRIGHTS',
  'GETMETADATA', 'SETMETADATA', 'URLFETCH', 'GENURLAUTH', 'RESETKEY', 'CANCELUPDATE',
  'XAPPLEPUSHSERVICE',
] as const;

/** Commands that take the UID prefix; counted as "UID FETCH" and so on. */
export const UID_COMMANDS = ['FETCH', 'STORE', 'COPY', 'MOVE', 'SEARCH', 'EXPUNGE', 'SORT', 'THREAD', 'REPLACE'] as const;

/** Every value the command label can take. */
export const COMMAND_LABELS: readonly string[] = [...IMAP_COMMANDS, ...UID_COMMANDS.map((c) => `UID ${c}`), 'other'];

const COMMAND_SET = new Set<string>(IMAP_COMMANDS);
const UID_SET = new Set<string>(UID_COMMANDS);
/** How far into a `UID` command line its subcommand is looked for. */
const UID_SCAN = 64;

function isAsciiLetter(c: number): boolean {
  return (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a);
}

/** `<tag> UID <command>` (UID in any case): the command, 1 to 16 letters ending at SP, CR, LF or the scan limit. */
function uidSubcommand(line: Buffer): string | null {
  const limit = Math.min(line.length, UID_SCAN);
  const sp = line.indexOf(0x20);
  if (sp <= 0 || sp + 4 >= limit || line[sp + 4] !== 0x20) return null;
  if (line.toString('latin1', sp + 1, sp + 4).toUpperCase() !== 'UID') return null;
  const start = sp + 5;
  let end = start;
  while (end < limit && isAsciiLetter(line[end])) end++;
  if (end === start || end - start > 16) return null;
  if (end < limit && line[end] !== 0x20 && line[end] !== 0x0d && line[end] !== 0x0a) return null;
  return line.toString('latin1', start, end).toUpperCase();
}

/** The bounded label for a command that commandHead named `name` (null: not a command). */
export function commandLabel(name: string | null, line: Buffer): string {
  if (name === null) return 'other';
  if (name !== 'UID') return COMMAND_SET.has(name) ? name : 'other';
  const sub = uidSubcommand(line);
  return sub !== null && UID_SET.has(sub) ? `UID ${sub}` : 'other';
}

export function upstreamFailureLabel(err: unknown): UpstreamFailureReason {
  return err instanceof UpstreamUnavailableError ? err.reason : 'other';
}

export interface ProxyMetrics {
  /**
   * A session accepted on `listener`: counts it and returns the session hooks that follow it (commands, STARTTLS,
   * upstream failure) until `closed`.
   */
  opened(listener: ListenerName, tls: boolean): SessionEvents;
  rejected(reason: RejectReason): void;
}

const byRegistry = new WeakMap<Registry, ProxyMetrics>();

export function proxyMetrics(registry?: Registry): ProxyMetrics {
  if (registry) {
    const existing = byRegistry.get(registry);
    if (existing) return existing;
  }
  const registers = registry ? [registry] : [];
  const current = new Gauge({
    name: 'xaps_client_connections',
    help: 'Client sessions open now, by listener and whether the client leg is TLS (STARTTLS moves a session to tls="true").',
    labelNames: ['listener', 'tls'] as const,
    registers,
  });
  current.set({ listener: 'listen', tls: 'false' }, 0);
  current.set({ listener: 'listen', tls: 'true' }, 0);
  current.set({ listener: 'listen-tls', tls: 'true' }, 0);
  const accepted = new Counter({
    name: 'xaps_client_connections_total',
    help: 'Client connections accepted, by listener.',
    labelNames: ['listener'] as const,
    registers,
  });
  for (const listener of LISTENERS) accepted.inc({ listener }, 0);
  const starttls = new Counter({
    name: 'xaps_client_starttls_total',
    help: 'STARTTLS handshakes completed on the plain listener.',
    registers,
  });
  const rejected = new Counter({
    name: 'xaps_client_connections_rejected_total',
    help:
      'Client connections refused before a session began, by reason (shutting_down: the proxy is stopping; total_limit: ' +
      '--max-connections reached; per_address_limit: --max-connections-per-ip reached for the client address or IPv6 /64).',
    labelNames: ['reason'] as const,
    registers,
  });
  for (const reason of REJECT_REASONS) rejected.inc({ reason }, 0);
  const upstreamFailures = new Counter({
    name: 'xaps_upstream_connect_failures_total',
    help: 'Client sessions whose upstream connection failed, by reason (refused, timeout, tls, greeting: unusable or BYE greeting, closed, other).',
    labelNames: ['reason'] as const,
    registers,
  });
  for (const reason of UPSTREAM_FAILURE_REASONS) upstreamFailures.inc({ reason }, 0);
  // counted in plain numbers and handed to prom-client at scrape time: a labelled inc() per command hashes its labels
  const commandCounts = new Map<string, number>(COMMAND_LABELS.map((command) => [command, 0]));
  const commandsReported = new Map<string, number>();
  const commands = new Counter({
    name: 'xaps_imap_commands_total',
    help: 'Client IMAP commands, by command (a fixed list of IMAP commands, UID variants as "UID FETCH" etc.; anything else "other").',
    labelNames: ['command'] as const,
    registers,
    collect() {
      for (const [command, n] of commandCounts) {
        const delta = n - (commandsReported.get(command) ?? 0);
        if (delta <= 0) continue;
        this.inc({ command }, delta);
        commandsReported.set(command, n);
      }
    },
  });
  for (const command of COMMAND_LABELS) commands.inc({ command }, 0);
  const countCommand = (label: string) => commandCounts.set(label, (commandCounts.get(label) ?? 0) + 1);

  const metrics: ProxyMetrics = {
    opened(listener, tls) {
      accepted.inc({ listener });
      let secure = tls;
      let open = true;
      current.inc({ listener, tls: String(secure) });
      return {
        command: (_s, name, line) => countCommand(commandLabel(name, line)),
        tlsStarted: () => {
          starttls.inc();
          if (!open || secure) return;
          current.dec({ listener, tls: 'false' });
          secure = true;
          current.inc({ listener, tls: 'true' });
        },
        upstreamFailed: (_s, err) => upstreamFailures.inc({ reason: upstreamFailureLabel(err) }),
        closed: () => {
          if (!open) return;
          open = false;
          current.dec({ listener, tls: String(secure) });
        },
      };
    },
    rejected(reason) {
      rejected.inc({ reason });
    },
  };
  if (registry) byRegistry.set(registry, metrics);
  return metrics;
}

const tlsSources = new WeakMap<Registry, { pem: () => Buffer | null }>();

/**
 * The client-facing certificate's expiry, read at scrape time from `pem` (the chain in use, leaf first), so that a
 * reload shows at the next scrape. Call only when a certificate is configured: without one there is no series.
 */
export function observeTlsCertificate(registry: Registry, pem: () => Buffer | null): void {
  const existing = tlsSources.get(registry);
  if (existing) {
    existing.pem = pem;
    return;
  }
  const source = { pem };
  tlsSources.set(registry, source);
  let parsed: { pem: Buffer; notAfter: number } | null = null;
  new Gauge({
    name: 'xaps_tls_certificate_expiry_timestamp_seconds',
    help: 'notAfter of the client-facing TLS certificate in use (--tls-cert, re-read on SIGHUP), UNIX seconds.',
    registers: [registry],
    collect() {
      const buf = source.pem();
      if (!buf) return;
      // parsed again only after a reload, which replaces the buffer
      if (parsed?.pem !== buf) {
        let notAfter: number;
        try {
          notAfter = Math.floor(certificateInfo(buf).notAfter.getTime() / 1000);
        } catch {
          return; // TLS accepted it, our decoder did not: no value rather than a failed scrape
        }
        parsed = { pem: buf, notAfter };
      }
      this.set(parsed.notAfter);
    },
  });
}
