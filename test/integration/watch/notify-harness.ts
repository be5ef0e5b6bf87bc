/**
 * Shared pieces of the NOTIFY and IDLE watcher tests: an in-memory MailboxStateStore, a
 * collecting ChangeSink, a captured logger, and a TCP relay that can cut the watchers off their
 * upstream (to make "mail while nobody watched" deterministic: Dovecot's LDA and Cyrus'
 * deliver both need the running server, so mail cannot arrive while the server is down).
 */
import net from 'node:net';
import { Writable } from 'node:stream';
import { createLogger, type Logger } from '../../../src/ops/log.js';
import type { UpstreamSettings } from '../../../src/proxy/upstream.js';
import { waitFor } from '../../../src/testbed/index.js';
import type { MailboxChange, MailboxStateStore, MailboxStatus, WatcherContext } from '../../../src/watch/types.js';

export class MemoryStates implements MailboxStateStore {
  readonly data = new Map<string, Record<string, MailboxStatus>>();

  async getMailboxStates(user: string): Promise<Record<string, MailboxStatus>> {
    return { ...(this.data.get(user) ?? {}) };
  }

  async setMailboxState(user: string, mailbox: string, status: MailboxStatus): Promise<void> {
    const m = this.data.get(user) ?? {};
    m[mailbox] = { ...status };
    this.data.set(user, m);
  }

  get(user: string, mailbox: string): MailboxStatus | undefined {
    return this.data.get(user)?.[mailbox];
  }
}

export class Collector {
  readonly changes: MailboxChange[] = [];
  readonly sink = (c: MailboxChange): void => {
    this.changes.push(c);
  };

  of(user: string, mailbox?: string): MailboxChange[] {
    return this.changes.filter((c) => c.user === user && (mailbox === undefined || c.mailbox === mailbox));
  }

  /** Waits until `user` (and `mailbox`) has `count` changes; returns them. */
  async waitFor(user: string, mailbox: string | undefined, count: number, timeoutMs = 20_000): Promise<MailboxChange[]> {
    await waitFor(() => this.of(user, mailbox).length >= count, {
      timeoutMs,
      what: `${count} change(s) for ${user}${mailbox ? `/${mailbox}` : ''} (have ${JSON.stringify(this.of(user, mailbox))})`,
    });
    return this.of(user, mailbox);
  }
}

export function captureLogger(): { log: Logger; text: () => string } {
  const chunks: string[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, cb) {
      chunks.push(chunk.toString('utf8'));
      cb();
    },
  });
  return { log: createLogger({ level: 'debug', pretty: false, destination }), text: () => chunks.join('') };
}

export function context(collector: Collector, states: MailboxStateStore, log: Logger): WatcherContext {
  return { onChange: collector.sink, states, log };
}

export function upstream(host: string, port: number): UpstreamSettings {
  return { host, port, tls: 'none', connectTimeoutMs: 5000, clientIp: 'none' };
}

export function message(subject: string): string {
  return `From: Sender <sender@example.org>\r\nTo: user@example.org\r\nSubject: ${subject}\r\n\r\nbody\r\n`;
}

/** A loopback TCP relay to `targetPort` that can be cut (all connections dropped, new ones refused). */
export class Relay {
  private blocked = false;
  /** While set, what the server sends is queued instead of relayed (holdReplies/releaseReplies). */
  private held: Array<[net.Socket, Buffer]> | null = null;
  private readonly sockets = new Set<net.Socket>();
  /** Bytes the clients (the watchers) sent so far. */
  clientBytes = 0;
  /** What the clients sent, as latin1 text (the watchers' commands; tests only). */
  clientText = '';

  private constructor(
    private readonly server: net.Server,
    readonly port: number,
  ) {}

  static async start(targetHost: string, targetPort: number): Promise<Relay> {
    let relay: Relay | undefined;
    const server = net.createServer((client) => {
      client.on('error', () => undefined);
      if (!relay || relay.blocked) {
        client.destroy();
        return;
      }
      const up = net.connect({ host: targetHost, port: targetPort });
      up.on('error', () => client.destroy());
      client.on('close', () => up.destroy());
      up.on('close', () => client.destroy());
      client.on('data', (d: Buffer) => {
        relay!.clientBytes += d.length;
        relay!.clientText += d.toString('latin1');
      });
      client.pipe(up);
      up.on('data', (d: Buffer) => {
        if (relay!.held) relay!.held.push([client, d]);
        else client.write(d);
      });
      relay.sockets.add(client).add(up);
      client.on('close', () => relay?.sockets.delete(client));
      up.on('close', () => relay?.sockets.delete(up));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
    relay = new Relay(server, (server.address() as net.AddressInfo).port);
    return relay;
  }

  /** Drops every relayed connection and refuses new ones. */
  block(): void {
    this.blocked = true;
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
  }

  unblock(): void {
    this.blocked = false;
  }

  /** Keeps the server's answers back (the watcher waits on a command) until releaseReplies. */
  holdReplies(): void {
    this.held ??= [];
  }

  releaseReplies(): void {
    const held = this.held ?? [];
    this.held = null;
    for (const [client, d] of held) if (!client.destroyed) client.write(d);
  }

  async close(): Promise<void> {
    this.block();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
