/**
 * WatchService's change sink (src/watch/service.ts): catch-up changes skip the change guard (a dead instance may
 * hold the claim of a change it never pushed), live changes go through it, and the sink resolves only once the push
 * is done with. The real service, supervisor and dispatcher; the NOTIFY watcher factory is replaced by one that
 * connects nowhere and hands out the watcher context; a recording guard; a fake APNs transport on a manual clock.
 */
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Registry } from 'prom-client';
import { afterEach, describe, expect, it, vi } from 'vitest';
import type { ChangeGuard } from '../../../src/apns/change-guard.js';
import { PushDispatcher } from '../../../src/apns/dispatcher.js';
import { silentLogger } from '../../../src/ops/log.js';
import { WatchService, type WatchSettings } from '../../../src/watch/service.js';
import type { MailboxChange, UserWatcher, WatcherContext } from '../../../src/watch/types.js';
import { FakeTransport, flush, ManualScheduler, register, removeTempDirs, T0, tempStore, token, TOPIC } from '../apns/dispatcher-helpers.js';

const captured = vi.hoisted(() => ({ contexts: new Map<string, WatcherContext>() }));

vi.mock('../../../src/watch/notify.js', async (importOriginal) => {
  const real = await importOriginal<typeof import('../../../src/watch/notify.js')>();
  class CapturingNotifyFactory {
    readonly mode = 'notify' as const;
    constructor(_opts: unknown) {}
    start(user: string, _mailboxes: string[], ctx: WatcherContext): UserWatcher {
      captured.contexts.set(user, ctx);
      return { user, connected: true, setMailboxes: () => undefined, stop: async () => undefined };
    }
    async close(): Promise<void> {}
  }
  return { ...real, NotifyWatcherFactory: CapturingNotifyFactory };
});

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
  captured.contexts.clear();
  await removeTempDirs();
});

async function setUp() {
  const sched = new ManualScheduler();
  const store = await tempStore(sched);
  cleanups.push(() => store.close());
  await register(store, 'alice', 1);
  const transport = new FakeTransport(sched);
  const claims: string[] = [];
  const claimed = new Set<string>();
  const guard: ChangeGuard = {
    claim: async (user, id) => {
      claims.push(id);
      const key = `${user}\u0000${id}`;
      if (claimed.has(key)) return false;
      claimed.add(key);
      return true;
    },
  };
  const dispatcher = new PushDispatcher({ store, transport, topic: () => TOPIC, scheduler: sched, guard, coalesceWindowMs: 0, random: () => 0.5 });
  cleanups.push(async () => {
    transport.release();
    await dispatcher.close();
  });
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'xaps-svc-'));
  cleanups.push(() => fsp.rm(dir, { recursive: true, force: true }));
  const passwordFile = path.join(dir, 'master.pw');
  await fsp.writeFile(passwordFile, 'not-a-real-password\n', { mode: 0o600 });
  const settings: WatchSettings = {
    watch: 'notify',
    masterUser: 'master',
    masterPasswordFile: passwordFile,
    masterLogin: 'plain-authzid',
    masterSeparator: '*',
    idleMaxPerUser: 1,
    pollInterval: 60_000,
    maxWatchers: 10,
    eventsListen: { host: '127.0.0.1', port: 0 },
    instanceId: 'test',
  };
  const service = await WatchService.start(settings, {
    store,
    dispatcher,
    upstream: { host: '127.0.0.1', port: 1, tls: 'none', connectTimeoutMs: 1000, clientIp: 'none' },
    registry: new Registry(),
    log: silentLogger(),
  });
  if (!service) throw new Error('the watch service did not start');
  cleanups.push(() => service.stop());
  const ctx = captured.contexts.get('alice');
  if (!ctx) throw new Error('no watcher started for alice');
  return { sched, transport, dispatcher, claims, claimed, ctx };
}

const change = (changeId: string, source: MailboxChange['source']): MailboxChange => ({
  user: 'alice',
  mailbox: 'INBOX',
  changeId,
  detectedAt: T0,
  source,
});

describe('WatchService change sink', () => {
  it('live changes go through the change guard; catch-up changes skip it, even when the change was claimed', async () => {
    const h = await setUp();
    // another instance claimed INBOX:1:5 and died before pushing it
    h.claimed.add('alice\u0000INBOX:1:5');

    await h.ctx.onChange(change('INBOX:1:5', 'notify'));
    expect(h.claims).toEqual(['INBOX:1:5']);
    expect(h.transport.sent).toHaveLength(0); // deduplicated

    await h.ctx.onChange(change('INBOX:1:5', 'catch-up'));
    expect(h.claims).toEqual(['INBOX:1:5']); // not asked
    expect(h.transport.sent.map((s) => s.n.deviceToken)).toEqual([token(0)]);

    await h.ctx.onChange(change('INBOX:1:6', 'idle'));
    await h.ctx.onChange(change('INBOX:1:6', 'poll'));
    expect(h.claims).toEqual(['INBOX:1:5', 'INBOX:1:6', 'INBOX:1:6']);
    expect(h.transport.sent).toHaveLength(2);
  });

  it('the sink returns a promise that resolves only once the push is answered', async () => {
    const h = await setUp();
    h.transport.manual = true;
    const pushed = h.ctx.onChange(change('INBOX:1:7', 'catch-up'));
    expect(pushed).toBeInstanceOf(Promise);
    let done = false;
    void (pushed as Promise<unknown>).then(() => {
      done = true;
    });
    await h.sched.advance(0);
    expect(h.transport.heldCount).toBe(1);
    expect(done).toBe(false);
    h.transport.release(1, { status: 200 });
    await flush();
    expect(done).toBe(true);
  });
});
