/**
 * Metrics of the watch supervisor (./supervisor.ts): how many users this instance watches, whether --max-watchers
 * turns users away, and how leases move between instances. No labels (never usernames).
 *
 * Several supervisors may share one registry (tests): the metrics are created once per registry, the gauges sum (or,
 * for the cap flag, OR) over every supervisor registered as a source.
 */
import { Counter, Gauge, type Registry } from 'prom-client';

export interface SupervisorGaugeSource {
  /** Users with a watcher here. */
  watched: number;
  /** Users left unwatched here because of the cap (as of the last pass). */
  capped: number;
}

export interface SupervisorMetrics {
  /** A user left unwatched here because this instance was at --max-watchers (once per user until it is watched). */
  readonly capHits: Counter;
  /**
   * A lease taken for a user last seen leased elsewhere: another instance died, stopped or dropped the user (or it was
   * ours, lost while Redis was unreachable, and nobody took it meanwhile).
   */
  readonly handovers: Counter;
  /** A lease we held that another instance has now, or that ran out while Redis was unreachable. */
  readonly losses: Counter;
  addSource(source: () => SupervisorGaugeSource): () => void;
}

const byRegistry = new WeakMap<Registry, SupervisorMetrics>();

/** The supervisor metrics on `registry` (created on first use), or unregistered ones without it. */
export function supervisorMetrics(registry?: Registry): SupervisorMetrics {
  if (registry) {
    const existing = byRegistry.get(registry);
    if (existing) return existing;
  }
  const registers = registry ? [registry] : [];
  const sources = new Set<() => SupervisorGaugeSource>();
  const read = (): SupervisorGaugeSource[] => [...sources].map((s) => s());

  new Gauge({
    name: 'xaps_watched_users',
    help: 'Users whose mailboxes this instance watches (holds the lease and runs a watcher for).',
    registers,
    collect() {
      this.set(read().reduce((n, s) => n + s.watched, 0));
    },
  });
  new Gauge({
    name: 'xaps_watchers_capped',
    help: '1 while users are left unwatched by this instance because it watches --max-watchers users already, else 0.',
    registers,
    collect() {
      this.set(read().some((s) => s.capped > 0) ? 1 : 0);
    },
  });
  const capHits = new Counter({
    name: 'xaps_watchers_cap_hits_total',
    help: 'Users this instance left unwatched because it was at --max-watchers (counted once per user until watched).',
    registers,
  });
  const handovers = new Counter({
    name: 'xaps_lease_handovers_total',
    help: 'Watcher leases this instance took over for users last seen leased elsewhere (another instance died or stopped).',
    registers,
  });
  const losses = new Counter({
    name: 'xaps_lease_losses_total',
    help: 'Watcher leases this instance lost (another instance holds them, or they ran out while Redis was unreachable).',
    registers,
  });

  const metrics: SupervisorMetrics = {
    capHits,
    handovers,
    losses,
    addSource(source) {
      sources.add(source);
      return () => {
        sources.delete(source);
      };
    },
  };
  if (registry) byRegistry.set(registry, metrics);
  return metrics;
}
