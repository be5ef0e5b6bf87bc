/**
 * Metrics of the mailbox watchers (NOTIFY and IDLE modes, and the change sources). Created
 * once per registry; every watcher factory registers itself as a source of the two gauges,
 * which are computed when scraped. Labels are bounded: mode, reason, source — never users or
 * mailbox names.
 */
import { Counter, Gauge, type Registry } from 'prom-client';
import type { ChangeSource } from './types.js';
import { LOGIN_FAILURE_REASONS, type LoginFailureReason } from './login.js';

export type WatchMode = 'notify' | 'idle';
const MODES: readonly WatchMode[] = ['notify', 'idle'];
const SOURCES: readonly ChangeSource[] = ['notify', 'idle', 'poll', 'events', 'catch-up'];

export interface WatcherCounts {
  /** Users whose watcher is connected and watching. */
  users: number;
  /** Open upstream connections (logged in or being set up). */
  connections: number;
}

export interface WatchMetrics {
  readonly reconnects: Counter<'mode'>;
  readonly loginFailures: Counter<'reason'>;
  readonly changes: Counter<'source'>;
  /** Adds a factory's counts to the gauges; returns the removal. */
  addSource(mode: WatchMode, source: () => WatcherCounts): () => void;
  loginFailed(reason: LoginFailureReason): void;
}

const byRegistry = new WeakMap<Registry, WatchMetrics>();

/** The watcher metrics on `registry` (created on first use), or unregistered ones without it. */
export function watchMetrics(registry?: Registry): WatchMetrics {
  if (registry) {
    const existing = byRegistry.get(registry);
    if (existing) return existing;
  }
  const registers = registry ? [registry] : [];
  const sources = new Set<{ mode: WatchMode; get: () => WatcherCounts }>();
  const sum = (mode: WatchMode, key: keyof WatcherCounts): number => {
    let n = 0;
    for (const s of sources) if (s.mode === mode) n += s.get()[key];
    return n;
  };

  new Gauge({
    name: 'xaps_watchers',
    help: 'Users whose mailbox watcher is connected upstream and watching, by mode.',
    labelNames: ['mode'] as const,
    registers,
    collect() {
      for (const mode of MODES) this.set({ mode }, sum(mode, 'users'));
    },
  });
  new Gauge({
    name: 'xaps_watcher_connections',
    help: 'Open upstream IMAP connections of the mailbox watchers, by mode.',
    labelNames: ['mode'] as const,
    registers,
    collect() {
      for (const mode of MODES) this.set({ mode }, sum(mode, 'connections'));
    },
  });
  const reconnects = new Counter({
    name: 'xaps_watcher_reconnects_total',
    help: 'Watcher connection attempts after a disconnect or an error (failed attempts included), by mode.',
    labelNames: ['mode'] as const,
    registers,
  });
  for (const mode of MODES) reconnects.inc({ mode }, 0);
  const loginFailures = new Counter({
    name: 'xaps_watcher_login_failures_total',
    help: 'Failed master-user logins of the watchers, by reason (authentication, authorization, privacy, unavailable, other).',
    labelNames: ['reason'] as const,
    registers,
  });
  for (const reason of LOGIN_FAILURE_REASONS) loginFailures.inc({ reason }, 0);
  const changes = new Counter({
    name: 'xaps_watch_changes_total',
    help: 'Mailbox changes (new mail) detected, by source (notify, idle, poll, events, catch-up).',
    labelNames: ['source'] as const,
    registers,
  });
  for (const source of SOURCES) changes.inc({ source }, 0);

  const metrics: WatchMetrics = {
    reconnects,
    loginFailures,
    changes,
    addSource(mode, get) {
      const entry = { mode, get };
      sources.add(entry);
      return () => {
        sources.delete(entry);
      };
    },
    loginFailed(reason) {
      loginFailures.inc({ reason });
    },
  };
  if (registry) byRegistry.set(registry, metrics);
  return metrics;
}
