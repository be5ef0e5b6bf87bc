/**
 * Mailbox watching assembled from the configuration: the event source chosen by
 * --watch (NOTIFY, IDLE, or the events HTTP listener), the supervisor that starts
 * a watcher per registered user (under a lease when instances share Redis), and
 * the path from a change to the push dispatcher.
 */
import type { Logger } from '../ops/log.js';
import type { Registry } from '../ops/metrics.js';
import type { RegistrationStore } from '../store/types.js';
import { RedisRegistrationStore } from '../store/redis.js';
import type { UpstreamSettings } from '../proxy/upstream.js';
import type { PushDispatcher } from '../apns/dispatcher.js';
import { hostname } from 'node:os';
import { ImapConnection } from './imap-connection.js';
import { MasterCredentials, masterLogin } from './login.js';
import { NotifyWatcherFactory } from './notify.js';
import { IdleWatcherFactory } from './idle.js';
import { EventsListener, eventsListenerOptionsFromConfig } from './events.js';
import { WatchSupervisor } from './supervisor.js';
import { watchMetrics } from './watch-metrics.js';
import { LocalLeaseManager, RedisLeaseManager } from './leases.js';
import type { ChangeSink, MailboxChange, UserWatcher, WatcherContext, WatcherFactory } from './types.js';

export interface WatchSettings {
  readonly watch: 'auto' | 'notify' | 'idle' | 'events';
  readonly masterUser?: string;
  readonly masterPasswordFile?: string;
  readonly masterLogin: 'plain-authzid' | 'separator';
  readonly masterSeparator: string;
  readonly idleMaxPerUser: number;
  readonly pollInterval: number;
  readonly maxWatchers: number;
  readonly eventsListen: { host: string; port: number };
  readonly eventsSecretFile?: string;
  readonly instanceId?: string;
}

export interface WatchDeps {
  store: RegistrationStore;
  dispatcher: PushDispatcher;
  upstream: UpstreamSettings;
  registry: Registry;
  log: Logger;
}

type FactoryWithClose = WatcherFactory & { close?(): Promise<void> };

export class WatchService {
  private constructor(
    readonly mode: WatchSettings['watch'],
    private readonly supervisor: WatchSupervisor | null,
    private readonly events: EventsListener | null,
    private readonly factories: FactoryWithClose[],
  ) {}

  /** Where the events listener listens (events mode). */
  get eventsAddress(): { host: string; port: number } | null {
    return this.events?.boundAddress ?? null;
  }

  /** The user's mailboxes are being watched right now (always true in events mode). */
  isWatching(user: string): boolean {
    return this.events !== null || (this.supervisor?.isConnected(user) ?? false);
  }

  /** A registration was stored: start or update that user's watcher now. */
  registrationChanged(user: string): void {
    void this.supervisor?.registrationChanged(user);
  }

  async stop(): Promise<void> {
    await this.supervisor?.stop();
    await this.events?.stop();
    await Promise.all(this.factories.map((f) => f.close?.()));
  }

  static async start(s: WatchSettings, deps: WatchDeps): Promise<WatchService | null> {
    const { log, registry, store, dispatcher } = deps;
    // Resolves once the push is done with: the watchers store the mailbox state only then (./tracker.ts). A catch-up
    // change skips the change guard: the state it was compared with says its push never went out, though a watcher
    // that died before pushing may have claimed it (Redis keeps the claim; the catch-up would be lost behind it).
    const onChange: ChangeSink = (c: MailboxChange) =>
      dispatcher.notifyAndWait({
        user: c.user,
        mailbox: c.mailbox,
        changeId: c.source === 'catch-up' ? undefined : c.changeId,
        detectedAt: c.detectedAt,
      });
    if (s.watch === 'events') {
      // the watchers count their changes by source in their tracker; events bypass it
      const changes = watchMetrics(registry).changes;
      const counted: ChangeSink = (c) => {
        changes.inc({ source: c.source });
        return onChange(c);
      };
      const events = new EventsListener(await eventsListenerOptionsFromConfig(s, { onChange: counted, log, registry }));
      const at = await events.start();
      log.info({ listen: `${at.host}:${at.port}` }, 'listening for new-mail events');
      return new WatchService('events', null, events, []);
    }
    if (!s.masterUser || !s.masterPasswordFile) {
      log.warn('no --master-user/--master-password-file: mailboxes are not watched (or use --watch events)');
      return null;
    }
    const credentials = MasterCredentials.fromFile(s.masterPasswordFile, {
      user: s.masterUser,
      mode: s.masterLogin,
      separator: s.masterSeparator,
    });
    const common = { upstream: deps.upstream, credentials, registry };
    const notify = new NotifyWatcherFactory({ ...common, pollIntervalMs: s.pollInterval });
    const idle = new IdleWatcherFactory({ ...common, idleMaxPerUser: s.idleMaxPerUser, pollIntervalMs: s.pollInterval });
    const factory: WatcherFactory =
      s.watch === 'notify' ? notify : s.watch === 'idle' ? idle : new AutoWatcherFactory(notify, idle, common, log);
    const instanceId = s.instanceId ?? `${hostname()}-${process.pid}`;
    const leases =
      store instanceof RedisRegistrationStore ? RedisLeaseManager.forStore(store, { instanceId, logger: log }) : new LocalLeaseManager({ instanceId });
    const supervisor = new WatchSupervisor({ store, factory, leases, onChange, maxWatchers: s.maxWatchers, log, registry });
    await supervisor.start();
    log.info({ mode: s.watch, instanceId }, 'watching registered mailboxes');
    return new WatchService(s.watch, supervisor, null, [notify, idle]);
  }
}

/**
 * --watch auto: NOTIFY when the upstream offers it after login (Dovecot), else IDLE
 * (Cyrus 3.6). Decided once, on the first user's connection, then for everyone.
 */
class AutoWatcherFactory implements WatcherFactory {
  private decided: Promise<WatcherFactory> | null = null;

  constructor(
    private readonly notify: WatcherFactory,
    private readonly idle: WatcherFactory,
    private readonly settings: { upstream: UpstreamSettings; credentials: MasterCredentials },
    private readonly log: Logger,
  ) {}

  get mode(): 'notify' | 'idle' {
    return 'notify';
  }

  private decide(user: string): Promise<WatcherFactory> {
    if (!this.decided) {
      this.decided = this.probe(user).catch((err: unknown) => {
        this.decided = null; // try again with the next watcher
        throw err;
      });
    }
    return this.decided;
  }

  private async probe(user: string): Promise<WatcherFactory> {
    const conn = await ImapConnection.connect({ upstream: this.settings.upstream });
    try {
      await masterLogin(conn, user, this.settings.credentials);
      await conn.refreshCapabilities();
      const factory = conn.hasCapability('NOTIFY') ? this.notify : this.idle;
      this.log.info({ mode: factory.mode }, 'watch mode chosen from the upstream capabilities');
      return factory;
    } finally {
      await conn.logout().catch(() => undefined);
    }
  }

  start(user: string, mailboxes: string[], ctx: WatcherContext): UserWatcher {
    return new DeferredWatcher(user, mailboxes, ctx, (u) => this.decide(u));
  }
}

/** A watcher whose kind is known only once the upstream was asked (auto mode). */
class DeferredWatcher implements UserWatcher {
  private inner: UserWatcher | null = null;
  private stopped = false;
  private retry: NodeJS.Timeout | null = null;

  constructor(
    readonly user: string,
    private mailboxes: string[],
    private readonly ctx: WatcherContext,
    private readonly decide: (user: string) => Promise<WatcherFactory>,
    private delayMs = 1_000,
  ) {
    this.attempt();
  }

  private attempt(): void {
    this.decide(this.user).then(
      (factory) => {
        if (!this.stopped) this.inner = factory.start(this.user, this.mailboxes, this.ctx);
      },
      (err: unknown) => {
        if (this.stopped) return;
        this.ctx.log.warn({ user: this.user, err: (err as Error).message, retryInMs: this.delayMs }, 'could not probe the upstream for NOTIFY');
        this.retry = setTimeout(() => this.attempt(), this.delayMs);
        this.retry.unref();
        this.delayMs = Math.min(this.delayMs * 2, 300_000);
      },
    );
  }

  get connected(): boolean {
    return this.inner?.connected ?? false;
  }

  setMailboxes(mailboxes: string[]): void {
    this.mailboxes = mailboxes;
    this.inner?.setMailboxes(mailboxes);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.retry) clearTimeout(this.retry);
    await this.inner?.stop();
  }
}
