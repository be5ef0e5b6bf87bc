/**
 * The soak: a real IMAP server (./upstream.ts: Dovecot, or Cyrus for idle mode; generated users, a master user), the
 * mock APNs (TLS + HTTP/2) and xaps-proxy as its own process (embedded store or Redis), in one of three watch modes:
 *
 *   notify  --watch notify against Dovecot: one NOTIFY connection per user (the default);
 *   idle    --watch idle, by default against Cyrus 3.6 (the server idle mode is for): an EXAMINE + IDLE connection
 *           per mailbox up to --idle-max-per-user (2 here, so that users with INBOX, Lists and Work have Work
 *           polled with STATUS every pollIntervalMs), the rest polled; `upstream: 'dovecot'` runs it against Dovecot;
 *   events  --watch events against Dovecot with the shipped push_notification Lua driver posting each delivery to the
 *           proxy's events listener (no upstream connections);
 *
 * driven for N minutes at steady rates by
 *
 *   churn       short IMAP sessions through the proxy (plain and TLS): LOGIN, SELECT, FETCH, LOGOUT — some cut off
 *               mid-session, some trimming INBOX with EXPUNGE;
 *   sticky      long-lived clients that IDLE, wake up, NOOP, and reconnect after a while;
 *   re-reg      devices registering again (XAPPLEPUSHSERVICE), mostly with the same mailboxes, sometimes adding or
 *               dropping Work/Lists;
 *   turnover    a new device now and then (maybe for a user nobody watched yet), and a device retired now and then
 *               (the mock APNs answers 410 for it from then on, so the proxy forgets it);
 *   deliveries  LMTP deliveries: mostly to registered and armed mailboxes, some to any mailbox of any user, some to
 *               "Archive", which nobody ever registers;
 *
 * while the proxy's RSS, CPU and V8 heap are sampled. Then a drain, and the oracle (./oracle.ts) decides what was
 * lost, duplicated or wrong; ./memory.ts decides whether memory stayed flat. Used by `npm run soak` (scripts/soak.ts)
 * and test/integration/soak.test.ts.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { cyrusAvailable } from '../../src/testbed/cyrus.js';
import { startRedis, type RedisInstance } from '../../src/testbed/redis.js';
import { startMockApns, type MockApns, type MockAnswer, type RecordedRequest } from '../../src/testbed/mock-apns.js';
import { createTestCa, issueMailPushCert } from '../../src/testbed/apns-certs.js';
import { freePorts } from '../../src/testbed/ports.js';
import { RawImap } from '../helpers/raw-imap.js';
import { lmtpDeliver } from '../helpers/lmtp.js';
import {
  analyze,
  modeTimings,
  SOAK_MAILBOXES,
  type DeliveryRecord,
  type DeviceRecord,
  type Interval,
  type OracleResult,
  type PushRecord,
} from './oracle.js';
import { memoryVerdict, metricByLabel, metricSum, readCpuMs, readRss, verdictWindows, type MemorySample, type MemoryVerdict } from './memory.js';
import { InspectorClient } from './inspector.js';
import { startProxyProcess, type ProxyEntry, type ProxyLogStats, type ProxyProcess } from './proxy-process.js';
import { startSoakUpstream, type SoakUpstream, type SoakUpstreamKind } from './upstream.js';
import { prng } from '../../src/testbed/random.js';

export type SoakWatchMode = 'notify' | 'idle' | 'events';

export interface SoakOptions {
  /** Length of the load phase. */
  minutes: number;
  /** The proxy's --watch. */
  watch: SoakWatchMode;
  /** The IMAP server: 'auto' is Cyrus for idle mode (Dovecot when Cyrus is not installed), Dovecot otherwise. */
  upstream: SoakUpstreamKind | 'auto';
  /** Idle mode: the proxy's --idle-max-per-user (mailboxes beyond it are polled). */
  idleMaxPerUser: number;
  /** Idle mode: the proxy's --poll-interval. */
  pollIntervalMs: number;
  /** Generated users (user0001…). */
  users: number;
  /** Users with a device when the load starts. */
  registeredShare: number;
  /** Of those, users with a second device. */
  secondDeviceShare: number;
  /** Devices that push Work or Lists besides INBOX. */
  extraMailboxShare: number;
  /** Short IMAP sessions started per second, and at most this many at once (beyond: skipped and counted). */
  churnRate: number;
  churnConcurrency: number;
  /** Share of churn and registration sessions over the TLS listener. */
  tlsShare: number;
  /** Share of churn sessions cut off without LOGOUT. */
  abortShare: number;
  /** Long-lived IDLE clients. */
  stickyClients: number;
  /** LMTP deliveries per second, at most this many at once. */
  deliveryRate: number;
  deliveryConcurrency: number;
  /** Re-registrations of existing devices per second. */
  reregRate: number;
  /** Device turnover per second: a new device and a retirement, alternately. */
  turnoverRate: number;
  /** --push-coalesce-window of the proxy. */
  coalesceWindowMs: number;
  /** A registration made during the load counts for deliveries this long after its OK. */
  armDelayMs: number;
  /** Share of APNs requests the mock answers 503 (the proxy retries them). */
  apnsErrorRate: number;
  store: 'embedded' | 'redis';
  entry: ProxyEntry;
  /** Memory sampling interval; 0: 2 s, shorter for short runs (at least ~6 samples per verdict window, >= 0.5 s). */
  sampleIntervalMs: number;
  /** Memory may grow by this share after the warm-up. */
  tolerance: number;
  /** Longest wait after the load for the last pushes. */
  drainMaxMs: number;
  seed: number;
  /** Keep the soak's temp dir (proxy data) afterwards. */
  keepDir: boolean;
  /** Put every delivery, push and device record into the result (`records`), for post-mortems. */
  records: boolean;
  progressIntervalMs: number;
  /** Progress lines (default: none). */
  log: (line: string) => void;
}

export const SOAK_DEFAULTS: Omit<SoakOptions, 'log'> = {
  minutes: 2,
  watch: 'notify',
  upstream: 'auto',
  idleMaxPerUser: 2,
  pollIntervalMs: 10_000,
  users: 100,
  registeredShare: 0.8,
  secondDeviceShare: 0.4,
  extraMailboxShare: 0.4,
  churnRate: 20,
  churnConcurrency: 64,
  tlsShare: 0.3,
  abortShare: 0.1,
  stickyClients: 20,
  deliveryRate: 5,
  deliveryConcurrency: 16,
  reregRate: 1,
  turnoverRate: 0.05,
  coalesceWindowMs: 2000,
  armDelayMs: 10_000,
  apnsErrorRate: 0.01,
  store: 'embedded',
  entry: 'dist',
  sampleIntervalMs: 0,
  tolerance: 0.1,
  drainMaxMs: 30_000,
  seed: 1,
  keepDir: false,
  records: false,
  progressIntervalMs: 15_000,
};

export interface LoadMinimums {
  sessions: number;
  registrations: number;
  deliveries: number;
  expected: number;
  pushes: number;
}

/**
 * What a working load generator surely reaches in `loadMs` at the configured rates: half of every target (the
 * machine may be shared and slow), and pushes for at least a quarter of the deliveries (70 % go to registered,
 * armed mailboxes; coalescing merges only deliveries to one device within a window).
 */
export function loadMinimums(o: Pick<SoakOptions, 'churnRate' | 'reregRate' | 'deliveryRate'>, loadMs: number): LoadMinimums {
  const s = loadMs / 1000;
  return {
    sessions: Math.floor(0.5 * o.churnRate * s),
    registrations: Math.floor(0.5 * o.reregRate * s),
    deliveries: Math.floor(0.5 * o.deliveryRate * s),
    expected: Math.floor(0.25 * o.deliveryRate * s),
    pushes: Math.floor(0.25 * o.deliveryRate * s),
  };
}

export interface SoakResult {
  ok: boolean;
  /** Why not ok (empty when ok). */
  failures: string[];
  options: Omit<SoakOptions, 'log'>;
  timing: { setupMs: number; loadMs: number; drainMs: number; totalMs: number };
  load: {
    sessions: { started: number; completed: number; aborted: number; failed: number; skipped: number; tls: number };
    sticky: { connects: number; idleCycles: number; failed: number };
    registrations: { initial: number; during: number; ok: number; failed: number; mailboxChanges: number; newDevices: number; retired: number; skipped: number };
    deliveries: { attempted: number; ok: number; failed: number; skipped: number; targeted: number; anyMailbox: number; archive: number };
    devices: { atStart: number; atEnd: number; watchedUsersAtStart: number | null };
    minimums: LoadMinimums;
  };
  apns: { requests: number; ok200: number; injected503: number; answered410: number };
  oracle: OracleResult;
  memory: MemoryVerdict;
  samples: MemorySample[];
  proxy: {
    pid: number;
    entry: ProxyEntry;
    aliveAtEnd: boolean;
    diedAt: number | null;
    exit: { code: number | null; signal: NodeJS.Signals | null } | null;
    cpuMs: number | null;
    logs: ProxyLogStats;
    metrics: Record<string, number | Record<string, number>>;
  };
  /** Client-side errors by kind ("session: timeout waiting for tagged a2", "lmtp: …"). */
  errors: Record<string, number>;
  dir: string | null;
  /** With `records`: the raw material of the oracle (times in ms since epoch; loadStart to relate them). */
  records?: {
    loadStart: number;
    deliveries: DeliveryRecord[];
    pushes: PushRecord[];
    devices: Array<Omit<DeviceRecord, 'intervals'> & { intervals: Record<string, Interval[]> }>;
  };
}

// ------------------------------------------------------------------ helpers ---

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function md5(s: string): string {
  return createHash('md5').update(s, 'utf8').digest('hex');
}

/** The first line of an error, without the numbers that make each one unique. */
function errorKind(err: unknown): string {
  const text = err instanceof Error ? err.message : String(err);
  return text.split('\n')[0]!.replace(/got: .*/, '').replace(/\d+/g, 'N').slice(0, 120).trim();
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

function expectOk(reply: string, tag: string, what: string): void {
  if (!new RegExp(`(^|\\r\\n)${tag} OK`).test(reply)) {
    const line = reply.split('\r\n').find((l) => l.startsWith(`${tag} `)) ?? reply.slice(-200);
    throw new Error(`${what} failed: ${line}`);
  }
}

/** Starts `task` `rate` times a second (spread evenly), never more than `max` at once: the rest is skipped. */
class SteadyRate {
  launched = 0;
  skipped = 0;
  private inFlight = 0;
  private timer: NodeJS.Timeout | undefined;
  private readonly running = new Set<Promise<void>>();

  constructor(
    private readonly rate: number,
    private readonly max: number,
    private readonly task: (n: number) => Promise<void>,
  ) {}

  start(t0: number): void {
    if (this.rate <= 0) return;
    this.timer = setInterval(() => {
      const due = Math.floor(((Date.now() - t0) / 1000) * this.rate);
      while (this.launched < due) {
        const n = this.launched++;
        if (this.inFlight >= this.max) {
          this.skipped++;
          continue;
        }
        this.inFlight++;
        const p: Promise<void> = this.task(n)
          .catch(() => undefined)
          .finally(() => {
            this.inFlight--;
            this.running.delete(p);
          });
        this.running.add(p);
      }
    }, 20);
  }

  stop(): void {
    clearInterval(this.timer);
  }

  /** Waits for the tasks still running (at most `ms`). */
  async drain(ms: number): Promise<void> {
    await Promise.race([Promise.allSettled([...this.running]), sleep(ms)]);
  }
}

interface SimDevice {
  rec: DeviceRecord;
  /** Registered mailboxes now (INBOX first); empty until the first registration. */
  current: string[];
  /** What its first registration asks for. */
  initial: string[];
  busy: boolean;
  /** Neither retired nor tainted. */
  active: boolean;
}

const EXTRAS = ['Work', 'Lists'] as const;
const ARCHIVE = 'Archive';

// ---------------------------------------------------------------------- run ---

export async function runSoak(input: Partial<SoakOptions> & { minutes: number }): Promise<SoakResult> {
  const { log = () => undefined, ...rest } = input;
  const o: Omit<SoakOptions, 'log'> = { ...SOAK_DEFAULTS, ...rest };
  if (!(o.minutes > 0)) throw new Error('minutes must be > 0');
  if (!(o.users >= 2)) throw new Error('users must be >= 2');
  if (!['notify', 'idle', 'events'].includes(o.watch)) throw new Error('watch must be notify, idle or events');
  if (o.watch === 'idle' && !(o.idleMaxPerUser >= 1 && o.pollIntervalMs >= 1000)) throw new Error('idle mode needs idleMaxPerUser >= 1 and pollIntervalMs >= 1000');
  const autoNote =
    o.upstream === 'auto' && o.watch === 'idle' && !cyrusAvailable() ? 'Cyrus is not installed here: idle mode runs against Dovecot' : undefined;
  const upstreamKind: SoakUpstreamKind = o.upstream === 'auto' ? (o.watch === 'idle' && !autoNote ? 'cyrus' : 'dovecot') : o.upstream;
  if (upstreamKind === 'cyrus' && o.watch !== 'idle') throw new Error(`${o.watch} mode runs against Dovecot only (upstream must be dovecot or auto)`);
  o.upstream = upstreamKind;
  const upstreamName = upstreamKind === 'cyrus' ? 'Cyrus' : 'Dovecot';
  const t0 = Date.now();
  const rand = prng(o.seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
  const hex = (n: number) => Array.from({ length: n }, () => Math.floor(rand() * 16).toString(16)).join('');
  const uuid = () => `${hex(8)}-${hex(4)}-4${hex(3)}-a${hex(3)}-${hex(12)}`.toUpperCase();
  const say = (what: string) => log(`[soak +${((Date.now() - t0) / 1000).toFixed(0)}s] ${what}`);

  const users = Array.from({ length: o.users }, (_, i) => `user${String(i + 1).padStart(4, '0')}`);
  const errors: Record<string, number> = {};
  const countError = (where: string, err: unknown) => {
    const k = `${where}: ${errorKind(err)}`;
    errors[k] = (errors[k] ?? 0) + 1;
  };

  let dir: string | null = null;
  let upstream: SoakUpstream | undefined;
  let redis: RedisInstance | undefined;
  let mock: MockApns | undefined;
  let proxy: ProxyProcess | undefined;
  let inspector: InspectorClient | undefined;
  try {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'xaps-soak-'));
    if (autoNote) say(autoNote);
    say(`setting up in ${dir}: ${o.watch} mode, ${upstreamName} with ${o.users} users, mock APNs, ${o.store} store`);

    // ------------------------------------------------------------ servers ---
    const ca = createTestCa('xaps soak CA');
    const cert = issueMailPushCert(ca);
    // one after the other: each is in the cleanup below as soon as it runs
    mock = await startMockApns({ clientCa: ca.certPem, record: false });
    if (o.store === 'redis') redis = await startRedis();
    // events mode: the listener's port goes into Dovecot's Lua settings, so it is picked first
    const events = o.watch === 'events' ? { port: (await freePorts(1))[0]!, secret: `soak-${randomBytes(12).toString('hex')}` } : undefined;
    upstream = await startSoakUpstream({
      kind: upstreamKind,
      users,
      // every user gets every mailbox up front: the watchers see them exist from their first snapshot
      mailboxes: SOAK_MAILBOXES.filter((m) => m !== 'INBOX'),
      dir,
      ca,
      ...(events ? { events: { url: `http://127.0.0.1:${events.port}/events`, secret: events.secret } } : {}),
    });
    const dc = upstream;
    const files = {
      cert: path.join(dir, 'mail.pem'),
      key: path.join(dir, 'mail.key'),
      apnsCa: path.join(dir, 'apns-ca.pem'),
      master: path.join(dir, 'master.pw'),
      eventsSecret: path.join(dir, 'events.secret'),
      data: path.join(dir, 'data'),
    };
    await fs.writeFile(files.cert, cert.certPem);
    await fs.writeFile(files.key, cert.keyPem, { mode: 0o600 });
    await fs.writeFile(files.apnsCa, mock.caPem);
    await fs.writeFile(files.master, `${dc.masterPassword}\n`, { mode: 0o600 });
    if (events) await fs.writeFile(files.eventsSecret, `${events.secret}\n`, { mode: 0o600 });
    await fs.mkdir(files.data);
    const clientCa = dc.clientCaPem;

    // ------------------------------------------------------ the mock APNs ---
    const pushes: PushRecord[] = [];
    const retired = new Set<string>();
    const apns = { requests: 0, ok200: 0, injected503: 0, answered410: 0 };
    mock.respond((req: RecordedRequest): MockAnswer => {
      apns.requests++;
      if (retired.has(req.deviceToken)) {
        apns.answered410++;
        return { status: 410, reason: 'Unregistered' };
      }
      if (rand() < o.apnsErrorRate) {
        apns.injected503++;
        return { status: 503, reason: 'ServiceUnavailable' };
      }
      apns.ok200++;
      const aps = (req.body as { aps?: { 'account-id'?: unknown; m?: unknown } } | undefined)?.aps;
      pushes.push({
        at: req.at,
        token: req.deviceToken,
        topic: req.headers['apns-topic'],
        accountId: typeof aps?.['account-id'] === 'string' ? aps['account-id'] : undefined,
        m: Array.isArray(aps?.m) ? aps.m.map(String) : null,
      });
      return { status: 200 };
    });

    // ------------------------------------------------------------ the proxy ---
    const [plainPort, tlsPort, metricsPort, inspectPort] = (await freePorts(4)) as [number, number, number, number];
    const storeArgs = redis ? ['--redis-url', redis.url, '--data-dir', files.data] : ['--data-dir', files.data];
    const watchArgs =
      o.watch === 'events'
        ? ['--watch', 'events', '--events-listen', `127.0.0.1:${events!.port}`, '--events-secret-file', files.eventsSecret]
        : [
            '--watch', o.watch,
            '--master-user', dc.masterUser,
            '--master-password-file', files.master,
            ...(o.watch === 'idle' ? ['--idle-max-per-user', String(o.idleMaxPerUser), '--poll-interval', `${o.pollIntervalMs}ms`] : []),
          ];
    proxy = await startProxyProcess({
      entry: o.entry,
      // the live-memory probe (./inspector.ts); loopback only
      nodeArgs: [`--inspect=127.0.0.1:${inspectPort}`],
      onText: (line) => /^(Debugger (listening|attached|ending)|For help, see: https:\/\/nodejs\.org|Waiting for the debugger)/.test(line),
      plainPort,
      tlsPort,
      metricsPort,
      args: [
        '--tls-cert', dc.tlsCertPath,
        '--tls-key', dc.tlsKeyPath,
        '--upstream', `127.0.0.1:${dc.imapPort}`,
        ...watchArgs,
        '--apns-cert', files.cert,
        '--apns-key', files.key,
        '--apns-endpoint', mock.url,
        '--apns-ca', files.apnsCa,
        '--push-coalesce-window', `${o.coalesceWindowMs}ms`,
        '--log-level', 'warn',
        ...storeArgs,
      ],
    });
    const px = proxy;
    inspector = await InspectorClient.connect(inspectPort);
    const probe = inspector;
    say(`proxy pid ${px.pid} (${o.entry}) on ${plainPort} (plain) and ${tlsPort} (TLS), metrics on ${metricsPort}`);

    // --------------------------------------------------------- the model ---
    const devices: SimDevice[] = [];
    const counters = {
      sessions: { started: 0, completed: 0, aborted: 0, failed: 0, skipped: 0, tls: 0 },
      sticky: { connects: 0, idleCycles: 0, failed: 0 },
      registrations: { initial: 0, during: 0, ok: 0, failed: 0, mailboxChanges: 0, newDevices: 0, retired: 0, skipped: 0 },
      deliveries: { attempted: 0, ok: 0, failed: 0, skipped: 0, targeted: 0, anyMailbox: 0, archive: 0 },
    };
    const deliveries: DeliveryRecord[] = [];

    const connect = (tls: boolean) => RawImap.connect({ port: tls ? px.tlsPort : px.plainPort, tls, ca: clientCa });

    const newDevice = (user: string): SimDevice => {
      const initial = ['INBOX'];
      if (rand() < o.extraMailboxShare) initial.push(pick(EXTRAS));
      const dev: SimDevice = { rec: { token: hex(64), user, accountId: uuid(), intervals: new Map() }, current: [], initial, busy: false, active: true };
      devices.push(dev);
      return dev;
    };

    /** Records a registration of `next` sent at sentAt and confirmed at okAt. */
    const applyRegistration = (dev: SimDevice, next: string[], sentAt: number, okAt: number, armedAt: number) => {
      for (const mb of next) {
        if (dev.current.includes(mb)) continue;
        const list = dev.rec.intervals.get(mb) ?? [];
        list.push({ sentAt, okAt, armedAt });
        dev.rec.intervals.set(mb, list);
      }
      for (const mb of dev.current) {
        if (next.includes(mb)) continue;
        const open = (dev.rec.intervals.get(mb) ?? []).find((iv) => iv.endSentAt === undefined);
        if (open) {
          open.endSentAt = sentAt;
          open.endOkAt = okAt;
        }
      }
      dev.current = [...next];
    };

    /** One registration session; false when it failed (the device is then tainted if the command was sent). */
    const register = async (dev: SimDevice, next: string[], armedAt: (okAt: number) => number): Promise<boolean> => {
      dev.busy = true;
      let sentAt: number | undefined;
      let c: RawImap | undefined;
      try {
        c = await connect(rand() < o.tlsShare);
        await c.greeting();
        expectOk(await c.command('l', `LOGIN ${dev.rec.user} password`), 'l', 'LOGIN');
        const list = next.map((m) => `"${m}"`).join(' ');
        sentAt = Date.now();
        const reply = await c.command(
          'x',
          `XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "${dev.rec.accountId}" "aps-device-token" "${dev.rec.token}" "aps-subtopic" "com.apple.mobilemail" "mailboxes" (${list})`,
        );
        const okAt = Date.now();
        expectOk(reply, 'x', 'XAPPLEPUSHSERVICE');
        for (const mb of next) {
          if (!reply.includes(`* XAPPLEPUSHSERVICE "mailbox" "${mb}"`)) throw new Error(`XAPPLEPUSHSERVICE did not confirm ${mb}`);
        }
        applyRegistration(dev, next, sentAt, okAt, armedAt(okAt));
        counters.registrations.ok++;
        await c.command('o', 'LOGOUT').catch(() => undefined);
        return true;
      } catch (err) {
        counters.registrations.failed++;
        countError('registration', err);
        if (sentAt !== undefined) {
          // sent but not confirmed: from now on this device's state is unknown
          dev.rec.taintedAt = sentAt;
          dev.active = false;
          for (const mb of next) {
            if (dev.current.includes(mb)) continue;
            const list = dev.rec.intervals.get(mb) ?? [];
            list.push({ sentAt, okAt: Number.POSITIVE_INFINITY, armedAt: Number.POSITIVE_INFINITY });
            dev.rec.intervals.set(mb, list);
          }
        }
        return false;
      } finally {
        c?.close();
        dev.busy = false;
      }
    };

    // --------------------------------------------- initial registrations ---
    const registeredUsers = users.filter(() => rand() < o.registeredShare);
    for (const u of registeredUsers) {
      newDevice(u);
      if (rand() < o.secondDeviceShare) newDevice(u);
    }
    {
      let next = 0;
      const initial = [...devices];
      await Promise.all(
        Array.from({ length: 8 }, async () => {
          while (next < initial.length) {
            const dev = initial[next++]!;
            counters.registrations.initial++;
            await register(dev, dev.initial, () => Number.POSITIVE_INFINITY);
          }
        }),
      );
    }
    const usersWithDevices = new Set(devices.filter((d) => d.active).map((d) => d.rec.user)).size;
    let watchedAtStart: number | null = null;
    if (o.watch === 'events') {
      // no watchers: a registration counts from its OK (the store has it; every later event finds it)
      say(`${devices.length} devices of ${usersWithDevices} users registered`);
    } else {
      say(`${devices.length} devices of ${usersWithDevices} users registered; waiting for their watchers`);
      const deadline = Date.now() + 90_000;
      for (;;) {
        const text = await px.http('/metrics').then((r) => r.body).catch(() => '');
        watchedAtStart = metricSum(text, 'xaps_watchers') ?? null;
        if (watchedAtStart !== null && watchedAtStart >= usersWithDevices) break;
        if (!px.alive()) throw new Error(`the proxy died during setup:\n${px.logs().tail.join('\n')}`);
        if (Date.now() > deadline) {
          countError('setup', new Error(`only ${watchedAtStart} of ${usersWithDevices} users watched after 90 s`));
          break;
        }
        await sleep(250);
      }
    }
    // the watchers took their baselines: from now on, mail to the initially registered mailboxes must be pushed
    const readyAt = Date.now();
    for (const d of devices) {
      for (const list of d.rec.intervals.values()) {
        for (const iv of list) if (iv.armedAt === Number.POSITIVE_INFINITY && iv.okAt !== Number.POSITIVE_INFINITY) iv.armedAt = Math.max(iv.okAt, readyAt);
      }
    }
    const devicesAtStart = devices.filter((d) => d.active).length;
    const setupMs = Date.now() - t0;
    say(`${o.watch === 'events' ? 'no watchers (events)' : `${watchedAtStart} users watched`}; load for ${o.minutes} min`);

    // --------------------------------------------------------------- load ---
    const loadStart = Date.now();
    const loadMs = Math.round(o.minutes * 60_000);
    let stopping = false;
    let wake: () => void = () => undefined;
    const stopped = new Promise<void>((r) => (wake = r));
    const nap = (ms: number) => Promise.race([sleep(ms), stopped]);

    const armedMailboxes = (dev: SimDevice, now: number): string[] =>
      dev.current.filter((mb) => {
        const open = (dev.rec.intervals.get(mb) ?? []).find((iv) => iv.endSentAt === undefined);
        return open !== undefined && open.armedAt <= now;
      });
    const activeIdle = () => devices.filter((d) => d.active && !d.busy);

    const churn = new SteadyRate(o.churnRate, o.churnConcurrency, async () => {
      const user = pick(users);
      const tls = rand() < o.tlsShare;
      const abort = rand() < o.abortShare;
      const mailbox = rand() < 0.8 ? 'INBOX' : pick(EXTRAS);
      counters.sessions.started++;
      if (tls) counters.sessions.tls++;
      let c: RawImap | undefined;
      try {
        c = await connect(tls);
        await c.greeting();
        expectOk(await c.command('a1', `LOGIN ${user} password`), 'a1', 'LOGIN');
        const sel = await c.command('a2', `SELECT ${mailbox}`);
        expectOk(sel, 'a2', 'SELECT');
        const exists = Number(/\* (\d+) EXISTS/.exec(sel)?.[1] ?? 0);
        if (abort && rand() < 0.5) {
          counters.sessions.aborted++;
          return; // gone without a word, right after SELECT
        }
        if (exists > 0) {
          expectOk(await c.command('a3', 'FETCH 1:* (UID FLAGS)'), 'a3', 'FETCH');
          expectOk(await c.command('a4', `FETCH ${exists} (BODY.PEEK[])`), 'a4', 'FETCH BODY');
        }
        if (abort) {
          counters.sessions.aborted++;
          return;
        }
        if (mailbox === 'INBOX' && exists > 40) {
          // keep INBOX small on long runs (an expunge is no news: it must not push)
          expectOk(await c.command('a5', 'STORE 1:20 +FLAGS.SILENT (\\Deleted)'), 'a5', 'STORE');
          expectOk(await c.command('a6', 'EXPUNGE'), 'a6', 'EXPUNGE');
        }
        expectOk(await c.command('a9', 'LOGOUT'), 'a9', 'LOGOUT');
        counters.sessions.completed++;
      } catch (err) {
        counters.sessions.failed++;
        countError('session', err);
      } finally {
        c?.close();
      }
    });

    const reregs = new SteadyRate(o.reregRate, 8, async () => {
      const candidates = activeIdle();
      if (candidates.length === 0) {
        counters.registrations.skipped++;
        return;
      }
      const dev = pick(candidates);
      let next = dev.current.length > 0 ? [...dev.current] : [...dev.initial];
      if (rand() < 0.25) {
        const has = next.filter((m) => m !== 'INBOX');
        const lacks = EXTRAS.filter((m) => !next.includes(m));
        if (has.length > 0 && (lacks.length === 0 || rand() < 0.5)) next = next.filter((m) => m !== pick(has));
        else if (lacks.length > 0) next.push(pick(lacks));
      }
      if (next.join() !== dev.current.join()) counters.registrations.mailboxChanges++;
      counters.registrations.during++;
      await register(dev, next, (okAt) => okAt + o.armDelayMs);
    });

    const turnover = new SteadyRate(o.turnoverRate, 2, async (n) => {
      if (n % 2 === 0) {
        const dev = newDevice(pick(users));
        counters.registrations.newDevices++;
        counters.registrations.during++;
        await register(dev, dev.initial, (okAt) => okAt + o.armDelayMs);
        return;
      }
      const candidates = activeIdle();
      if (candidates.length <= 1) return;
      const dev = pick(candidates);
      const now = Date.now();
      dev.active = false;
      dev.rec.retiredAt = now;
      retired.add(dev.rec.token);
      for (const list of dev.rec.intervals.values()) {
        for (const iv of list) {
          if (iv.endSentAt === undefined) {
            iv.endSentAt = now;
            iv.endOkAt = now;
          }
        }
      }
      counters.registrations.retired++;
    });

    let deliveryId = 0;
    const deliver = new SteadyRate(o.deliveryRate, o.deliveryConcurrency, async () => {
      const r = rand();
      let user: string;
      let mailbox: string;
      const now = Date.now();
      const candidates = r < 0.7 ? devices.filter((d) => d.active) : [];
      if (candidates.length > 0) {
        const dev = pick(candidates);
        user = dev.rec.user;
        const armed = armedMailboxes(dev, now);
        mailbox = armed.length > 0 ? pick(armed) : 'INBOX';
        counters.deliveries.targeted++;
      } else if (r < 0.85) {
        user = pick(users);
        mailbox = pick(['INBOX', ...EXTRAS]);
        counters.deliveries.anyMailbox++;
      } else {
        user = pick(users);
        mailbox = ARCHIVE;
        counters.deliveries.archive++;
      }
      const id = ++deliveryId;
      counters.deliveries.attempted++;
      const rcpt = mailbox === 'INBOX' ? user : `${user}+${mailbox}`;
      const body = `From: soak@example.org\r\nTo: ${user}@example.org\r\nSubject: soak ${id} for ${mailbox}\r\nMessage-ID: <soak-${id}@example.org>\r\n\r\n${`delivery ${id} `.repeat(100)}\r\n`;
      const startAt = Date.now();
      let ok = false;
      try {
        await withTimeout(lmtpDeliver(dc.lmtpPort, rcpt, body), 30_000, 'LMTP delivery');
        ok = true;
        counters.deliveries.ok++;
      } catch (err) {
        counters.deliveries.failed++;
        countError('lmtp', err);
      }
      deliveries.push({ id, user, mailbox, startAt, endAt: Date.now(), ok });
    });

    const stickyLoop = async (i: number): Promise<void> => {
      await nap(Math.floor(rand() * 2000)); // spread the first logins
      while (!stopping) {
        const user = users[(i * 7) % users.length]!;
        const lifetime = 20_000 + rand() * 40_000;
        const born = Date.now();
        let c: RawImap | undefined;
        try {
          c = await connect(rand() < o.tlsShare);
          counters.sticky.connects++;
          await c.greeting();
          expectOk(await c.command('s1', `LOGIN ${user} password`), 's1', 'LOGIN');
          expectOk(await c.command('s2', 'SELECT INBOX'), 's2', 'SELECT');
          let n = 0;
          while (!stopping && Date.now() - born < lifetime) {
            const tag = `i${++n}`;
            c.send(`${tag} IDLE\r\n`);
            await c.until((t) => /(^|\r\n)\+ /.test(t), 20_000, 'IDLE continuation');
            await nap(3000 + rand() * 7000);
            c.send('DONE\r\n');
            expectOk(await c.tagged(tag), tag, 'IDLE');
            expectOk(await c.command(`n${n}`, 'NOOP'), `n${n}`, 'NOOP');
            counters.sticky.idleCycles++;
          }
          expectOk(await c.command('s9', 'LOGOUT'), 's9', 'LOGOUT');
        } catch (err) {
          counters.sticky.failed++;
          countError('sticky', err);
          await nap(1000);
        } finally {
          c?.close();
        }
      }
    };

    // memory, CPU and a few gauges, every sampleIntervalMs
    const samples: MemorySample[] = [];
    let lastMetrics = '';
    let sampling = false;
    const sample = async () => {
      if (sampling) return;
      sampling = true;
      try {
        const t = Date.now() - loadStart;
        const rss = readRss(px.pid) ?? null;
        const cpuMs = readCpuMs(px.pid) ?? null;
        const text = await px.http('/metrics', 5000).then((r) => r.body).catch(() => '');
        if (text) lastMetrics = text;
        // after the scrape: the forced GC must not flatten the sampled heap figure
        const live = await probe.liveMemory().catch((err: unknown) => {
          countError('inspector', err);
          return null;
        });
        samples.push({
          t,
          rssBytes: rss,
          heapUsedBytes: metricSum(text, 'xaps_nodejs_heap_size_used_bytes') ?? null,
          heapTotalBytes: metricSum(text, 'xaps_nodejs_heap_size_total_bytes') ?? null,
          externalBytes: metricSum(text, 'xaps_nodejs_external_memory_bytes') ?? null,
          cpuMs,
          liveBytes: live ? live.heapUsed + live.external : null,
          liveHeapBytes: live?.heapUsed ?? null,
          liveExternalBytes: live?.external ?? null,
          clientConnections: metricSum(text, 'xaps_client_connections') ?? null,
          watchers: metricSum(text, 'xaps_watchers') ?? null,
          watcherConnections: metricSum(text, 'xaps_watcher_connections') ?? null,
        });
      } finally {
        sampling = false;
      }
    };
    await sample();
    const sampleEvery = o.sampleIntervalMs > 0 ? o.sampleIntervalMs : Math.min(2000, Math.max(500, verdictWindows(loadMs).windowMs / 6));
    const sampler = setInterval(() => void sample(), sampleEvery);

    const mb = (b: number | null | undefined) => (b === null || b === undefined ? '?' : `${(b / 1048576).toFixed(1)} MB`);
    const progress = setInterval(() => {
      const s = samples[samples.length - 1];
      say(
        `sessions ${counters.sessions.started} (failed ${counters.sessions.failed}, skipped ${churn.skipped}), ` +
          `registrations ${counters.registrations.ok}, deliveries ${counters.deliveries.attempted}, pushes ${apns.ok200}, ` +
          `rss ${mb(s?.rssBytes)}, heap ${mb(s?.heapUsedBytes)}, clients ${s?.clientConnections ?? '?'}, watched ${s?.watchers ?? '?'} (${s?.watcherConnections ?? '?'} upstream connections)`,
      );
    }, o.progressIntervalMs);

    let diedAt: number | null = null;
    try {
      churn.start(loadStart);
      reregs.start(loadStart);
      turnover.start(loadStart);
      deliver.start(loadStart);
      const sticky = Array.from({ length: o.stickyClients }, (_, i) => stickyLoop(i));
      while (Date.now() - loadStart < loadMs) {
        await sleep(Math.min(500, loadMs - (Date.now() - loadStart)));
        if (!px.alive()) {
          diedAt = Date.now();
          say(`the proxy died (${JSON.stringify(px.exit())}): ending the load early`);
          break;
        }
      }
      const loadEnd = Date.now();
      stopping = true;
      wake();
      churn.stop();
      reregs.stop();
      turnover.stop();
      deliver.stop();
      await Promise.all([churn.drain(30_000), reregs.drain(30_000), turnover.drain(30_000), deliver.drain(30_000)]);
      await Promise.race([Promise.allSettled(sticky), sleep(30_000)]);
      counters.sessions.skipped = churn.skipped;
      counters.registrations.skipped += reregs.skipped + turnover.skipped;
      counters.deliveries.skipped = deliver.skipped;
      const actualLoadMs = Math.min(loadMs, loadEnd - loadStart);
      say(`load done after ${(actualLoadMs / 1000).toFixed(0)} s; draining`);

      // ------------------------------------------------------------- drain ---
      const drainStart = Date.now();
      const oracleOpts = {
        topic: cert.topic,
        mailboxByMd5: new Map(SOAK_MAILBOXES.map((m) => [md5(m), m] as [string, string])),
        ...modeTimings(o.watch, o),
      };
      while (Date.now() - drainStart < o.drainMaxMs && px.alive()) {
        if (analyze(devices.map((d) => d.rec), deliveries, pushes, oracleOpts).lost === 0) break;
        await sleep(500);
      }
      // one more window and a margin: a duplicate or wrong push would arrive by then
      await sleep(o.coalesceWindowMs + 3000);
      if (diedAt === null && !px.alive()) diedAt = px.exit()?.at ?? Date.now();
      const aliveAtEnd = px.alive();
      await sample();
      const drainMs = Date.now() - drainStart;
      clearInterval(sampler);
      clearInterval(progress);

      const oracle = analyze(devices.map((d) => d.rec), deliveries, pushes, oracleOpts);
      const finalMetrics = lastMetrics;
      const cpuMs = readCpuMs(px.pid) ?? null;
      const memory = memoryVerdict(samples, actualLoadMs, { tolerance: o.tolerance });
      probe.close();
      // more than its own drain timeout (30 s): a clean exit 0 is part of the verdict
      const exit = await px.stop(40_000);
      const minimums = loadMinimums(o, actualLoadMs);

      const failures: string[] = [];
      if (oracle.lost > 0) failures.push(`${oracle.lost} lost pushes`);
      if (oracle.wrong > 0) failures.push(`${oracle.wrong} wrong pushes`);
      if (diedAt !== null || !aliveAtEnd) failures.push(`the proxy died (${JSON.stringify(px.exit())})`);
      else if (exit.code !== 0) failures.push(`the proxy did not exit cleanly on SIGTERM (${exit.signal ?? `exit ${exit.code}`})`);
      // a run too short to judge memory says so (notes) but does not fail for it; a longer one must have a verdict
      const judgeable = actualLoadMs - memory.warmupMs >= 60_000;
      if (!memory.live) {
        if (judgeable) failures.push(`no memory verdict: ${memory.notes.join('; ')}`);
      } else if (!memory.flat) failures.push(`live memory grew ${((memory.live.ratio - 1) * 100).toFixed(1)}% after the warm-up (limit ${o.tolerance * 100}%)`);
      const sessionsDone = counters.sessions.completed + counters.sessions.aborted;
      if (sessionsDone < minimums.sessions) failures.push(`only ${sessionsDone} sessions (minimum ${minimums.sessions})`);
      if (counters.registrations.during < minimums.registrations) failures.push(`only ${counters.registrations.during} registrations during the load (minimum ${minimums.registrations})`);
      if (counters.deliveries.ok < minimums.deliveries) failures.push(`only ${counters.deliveries.ok} deliveries (minimum ${minimums.deliveries})`);
      if (oracle.expected < minimums.expected) failures.push(`only ${oracle.expected} deliveries required a push (minimum ${minimums.expected})`);
      if (oracle.pushes < minimums.pushes) failures.push(`only ${oracle.pushes} pushes (minimum ${minimums.pushes})`);

      const metrics: Record<string, number | Record<string, number>> = {
        client_connections_total: metricSum(finalMetrics, 'xaps_client_connections_total') ?? -1,
        pushes_total: metricByLabel(finalMetrics, 'xaps_pushes_total', 'result'),
        push_changes_total: metricByLabel(finalMetrics, 'xaps_push_changes_total', 'result'),
        watch_changes_total: metricByLabel(finalMetrics, 'xaps_watch_changes_total', 'source'),
        push_queue_dropped_total: metricSum(finalMetrics, 'xaps_push_queue_dropped_total') ?? -1,
        registrations_removed_total: metricByLabel(finalMetrics, 'xaps_registrations_removed_total', 'reason'),
        watcher_reconnects_total: metricSum(finalMetrics, 'xaps_watcher_reconnects_total') ?? -1,
        watcher_connections: metricSum(finalMetrics, 'xaps_watcher_connections') ?? -1,
        ...(o.watch === 'events'
          ? {
              events_requests_total: metricByLabel(finalMetrics, 'xaps_events_requests_total', 'outcome'),
              events_changes_total: metricSum(finalMetrics, 'xaps_events_changes_total') ?? -1,
            }
          : {}),
      };

      return {
        ok: failures.length === 0,
        failures,
        options: o,
        timing: { setupMs, loadMs: actualLoadMs, drainMs, totalMs: Date.now() - t0 },
        load: {
          ...counters,
          devices: { atStart: devicesAtStart, atEnd: devices.filter((d) => d.active).length, watchedUsersAtStart: watchedAtStart },
          minimums,
        },
        apns,
        oracle,
        memory,
        samples,
        proxy: { pid: px.pid, entry: o.entry, aliveAtEnd, diedAt, exit, cpuMs, logs: px.logs(), metrics },
        errors,
        dir: o.keepDir ? dir : null,
        ...(o.records
          ? {
              records: {
                loadStart,
                deliveries,
                pushes,
                devices: devices.map((d) => ({ ...d.rec, intervals: Object.fromEntries(d.rec.intervals) })),
              },
            }
          : {}),
      };
    } finally {
      stopping = true;
      wake();
      clearInterval(sampler);
      clearInterval(progress);
      churn.stop();
      reregs.stop();
      turnover.stop();
      deliver.stop();
    }
  } finally {
    inspector?.close();
    await proxy?.stop(5000).catch(() => undefined);
    await mock?.close().catch(() => undefined);
    await upstream?.destroy().catch(() => undefined);
    await redis?.destroy().catch(() => undefined);
    if (dir && !o.keepDir) await fs.rm(dir, { recursive: true, force: true }).catch(() => undefined);
  }
}
