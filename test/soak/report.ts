/** The soak's summary as text (the JSON form is the SoakResult itself, minus nothing). */
import type { SoakResult } from './runner.js';
import type { SeriesVerdict } from './memory.js';

const MB = 1024 * 1024;
const mb = (b: number) => `${(b / MB).toFixed(1)} MB`;
const pct = (r: number) => `${r >= 1 ? '+' : ''}${((r - 1) * 100).toFixed(1)}%`;
const sec = (ms: number) => `${(ms / 1000).toFixed(0)} s`;

function series(name: string, s: SeriesVerdict | null): string {
  if (!s) return `  ${name.padEnd(10)} no verdict`;
  return (
    `  ${name.padEnd(10)} start ${mb(s.start.median)} (median of ${s.start.samples}, ${sec(s.start.fromMs)}–${sec(s.start.toMs)}), ` +
    `end ${mb(s.end.median)} (median of ${s.end.samples}, ${sec(s.end.fromMs)}–${sec(s.end.toMs)}), ${pct(s.ratio)}`
  );
}

export function formatSummary(r: SoakResult): string {
  const { load, oracle, memory, proxy } = r;
  const perSec = (n: number) => (n / (r.timing.loadMs / 1000)).toFixed(1);
  const lines: string[] = [];
  lines.push(`soak ${r.ok ? 'PASSED' : 'FAILED'}: ${r.options.minutes} min of load (${sec(r.timing.loadMs)}), setup ${sec(r.timing.setupMs)}, drain ${sec(r.timing.drainMs)}, total ${sec(r.timing.totalMs)}`);
  for (const f of r.failures) lines.push(`  FAIL ${f}`);
  const o = r.options;
  const upstream = o.upstream === 'cyrus' ? 'Cyrus' : 'Dovecot';
  const mode =
    o.watch === 'idle'
      ? `idle mode (--idle-max-per-user ${o.idleMaxPerUser}, --poll-interval ${sec(o.pollIntervalMs)})`
      : o.watch === 'events'
        ? 'events mode (Dovecot push_notification Lua)'
        : `${o.watch} mode`;
  lines.push(
    `setup: ${mode}, ${o.users} ${upstream} users, ${o.store} store, proxy from ${proxy.entry} (pid ${proxy.pid}), ` +
      `coalescing window ${o.coalesceWindowMs} ms, ${(o.apnsErrorRate * 100).toFixed(1)}% of APNs requests answered 503`,
  );
  const s = load.sessions;
  lines.push(
    `sessions: ${s.started} started (${perSec(s.started)}/s, ${s.tls} TLS), ${s.completed} completed, ${s.aborted} cut off on purpose, ` +
      `${s.failed} failed, ${s.skipped} skipped (concurrency cap); sticky: ${load.sticky.connects} connects, ${load.sticky.idleCycles} IDLE cycles, ${load.sticky.failed} failed`,
  );
  const g = load.registrations;
  lines.push(
    `registrations: ${g.initial} before the load, ${g.during} during it (${g.mailboxChanges} changed mailboxes, ${g.newDevices} new devices), ` +
      `${g.ok} ok, ${g.failed} failed; ${g.retired} devices retired (APNs 410); devices ${load.devices.atStart} → ${load.devices.atEnd}, ` +
      (o.watch === 'events' ? 'no watchers (events)' : `${load.devices.watchedUsersAtStart ?? '?'} users watched at the start`),
  );
  const conns = r.samples.map((x) => x.watcherConnections).filter((x): x is number => typeof x === 'number');
  const clients = r.samples.map((x) => x.clientConnections).filter((x): x is number => typeof x === 'number');
  lines.push(
    `connections: client connections at the proxy max ${clients.length > 0 ? Math.max(...clients) : '?'}; ` +
      `upstream watcher connections ${conns.length > 0 ? `${conns[0]} at the start, max ${Math.max(...conns)}, ${conns[conns.length - 1]} at the end` : '?'}`,
  );
  const d = load.deliveries;
  lines.push(
    `deliveries: ${d.attempted} (${perSec(d.attempted)}/s; ${d.targeted} to registered mailboxes, ${d.anyMailbox} to any mailbox, ${d.archive} to the never-registered Archive), ` +
      `${d.ok} ok, ${d.failed} failed, ${d.skipped} skipped`,
  );
  if (o.watch === 'events') {
    const requests = proxy.metrics.events_requests_total;
    const byOutcome = typeof requests === 'object' ? requests : {};
    const refused = Object.entries(byOutcome).filter(([k, n]) => k !== 'accepted' && n > 0);
    lines.push(
      `events: ${byOutcome.accepted ?? '?'} requests accepted (${String(proxy.metrics.events_changes_total ?? '?')} changes) for ${d.ok} deliveries` +
        (refused.length > 0 ? `; refused ${JSON.stringify(Object.fromEntries(refused))}` : ''),
    );
  }
  lines.push(
    `pushes: ${oracle.pushes} delivered (200) for ${oracle.expected} (delivery, device) pairs that required one — ` +
      `${(oracle.pushes / Math.max(1, oracle.expected)).toFixed(2)} pushes per pair; APNs requests ${r.apns.requests}, ${r.apns.injected503} answered 503, ${r.apns.answered410} answered 410`,
  );
  const lat = oracle.latencyMs;
  lines.push(
    `  lost ${oracle.lost} (must be 0)   wrong ${oracle.wrong} (must be 0)   duplicates ${oracle.duplicates}   late (> ${oracle.lateAfterMs} ms) ${oracle.late}` +
      (lat ? `   delivery → push p50 ${lat.p50} ms, p90 ${lat.p90} ms, p99 ${lat.p99} ms, max ${lat.max} ms` : ''),
  );
  if (oracle.wrong > 0) lines.push(`  wrong by kind: ${JSON.stringify(oracle.wrongByKind)}`);
  for (const l of oracle.lostExamples.slice(0, 5)) {
    lines.push(`  lost: delivery ${l.delivery} to ${l.user}/${l.mailbox} at ${new Date(l.startAt).toISOString()} for device ${l.token.slice(0, 8)}… (${l.pushesForMailbox} pushes for that mailbox in all)`);
  }
  for (const w of oracle.wrongExamples.slice(0, 5)) lines.push(`  wrong: ${w.kind} to ${w.token.slice(0, 8)}…${w.mailbox ? ` for ${w.mailbox}` : ''}${w.detail ? ` (${w.detail})` : ''}`);
  for (const x of oracle.slowest.slice(0, 3).filter((x) => x.latencyMs > 5000)) {
    lines.push(`  slow: delivery ${x.delivery} to ${x.user}/${x.mailbox} pushed after ${x.latencyMs} ms (registration armed ${Math.round((x.startAt - x.armedAt) / 1000)} s before the delivery)`);
  }
  for (const x of oracle.duplicateExamples.slice(0, 3)) lines.push(`  duplicate: push ${x.pushesSoFar} for ${x.token.slice(0, 8)}…/${x.mailbox} with ${x.deliveriesBefore} deliveries before it`);
  lines.push(
    `memory (warm-up ${sec(memory.warmupMs)}, windows of ${sec(memory.windowMs)}; flat = live memory within ${(memory.tolerance * 100).toFixed(0)}%): ${memory.flat ? 'flat' : 'NOT flat'}`,
  );
  lines.push(series('live', memory.live) + ' — heap used + external right after a forced full GC: decides');
  lines.push(series('live heap', memory.liveHeap));
  lines.push(series('live ext.', memory.liveExternal));
  lines.push(series('RSS', memory.rss) + ' — reported only');
  lines.push(series('heap used', memory.heapUsed) + ' — as sampled (between GCs), reported only');
  for (const n of memory.notes) lines.push(`  note: ${n}`);
  const exit = proxy.exit ? (proxy.exit.signal ?? `exit ${proxy.exit.code}`) : 'not stopped';
  lines.push(
    `proxy: ${proxy.aliveAtEnd ? 'alive at the end' : `DIED${proxy.diedAt ? ` at ${new Date(proxy.diedAt).toISOString()}` : ''}`}, stopped with SIGTERM → ${exit}; ` +
      `CPU ${proxy.cpuMs !== null ? `${(proxy.cpuMs / 1000).toFixed(1)} s` : '?'}; log lines ${JSON.stringify(proxy.logs.byLevel)}`,
  );
  const logMessages = Object.entries(proxy.logs.messages).sort((a, b) => b[1] - a[1]);
  for (const [msg, n] of logMessages.slice(0, 8)) lines.push(`  proxy log ${n}× ${msg}`);
  const errs = Object.entries(r.errors).sort((a, b) => b[1] - a[1]);
  lines.push(`client errors: ${errs.length === 0 ? 'none' : ''}`);
  for (const [k, n] of errs.slice(0, 10)) lines.push(`  ${n}× ${k}`);
  lines.push(`proxy metrics: ${JSON.stringify(proxy.metrics)}`);
  if (r.dir) lines.push(`kept: ${r.dir}`);
  return lines.join('\n');
}
