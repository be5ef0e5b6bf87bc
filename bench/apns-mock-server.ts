/**
 * The mock APNs of bench/apns-throughput.ts, in its own process so that its CPU is not
 * counted against the pusher being measured. Forked by the benchmark with an IPC channel;
 * not meant to be run by hand.
 *
 *   → {id, type: 'start', clientCa, distDir}   ← {url, caPem}
 *   → {id, type: 'snapshot'}          ← MockSnapshot (and the per-token counts start over)
 *   → {id, type: 'stop'}              ← {}  then the process exits
 *
 * Requests are not recorded (`record: false`); the answer handler only counts pushes per
 * device token, so that the benchmark can check that every device got exactly one push per
 * round (none lost, none duplicated).
 */
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import type { MockAnswer, MockApns } from '../src/testbed/mock-apns.js';

export interface MockSnapshot {
  /** Requests received since the mock started (refused ones included). */
  requestsReceived: number;
  /** Requests since the previous snapshot. */
  requests: number;
  /** Distinct device tokens pushed since the previous snapshot. */
  distinctTokens: number;
  /** Tokens pushed more than once since the previous snapshot. */
  duplicatedTokens: number;
  /** Process CPU (user + system, all threads) since the mock started, µs. */
  cpuUs: number;
  sessionsOpened: number;
  sessionErrors: number;
  refusedStreams: number;
  tlsFailures: number;
}

type Request = { id: number; type: 'start'; clientCa: string; distDir: string } | { id: number; type: 'snapshot' } | { id: number; type: 'stop' };

const OK: MockAnswer = { status: 200 };
let mock: MockApns | undefined;
let perToken = new Map<string, number>();
let requestsAtLastSnapshot = 0;

function snapshot(): MockSnapshot {
  if (!mock) throw new Error('mock APNs not started');
  const stats = mock.stats();
  let duplicated = 0;
  for (const n of perToken.values()) if (n > 1) duplicated++;
  const cpu = process.cpuUsage();
  const out: MockSnapshot = {
    requestsReceived: stats.requestsReceived,
    requests: stats.requestsReceived - requestsAtLastSnapshot,
    distinctTokens: perToken.size,
    duplicatedTokens: duplicated,
    cpuUs: cpu.user + cpu.system,
    sessionsOpened: stats.sessionsOpened,
    sessionErrors: stats.sessionErrors,
    refusedStreams: stats.refusedStreams,
    tlsFailures: stats.tlsFailures,
  };
  requestsAtLastSnapshot = stats.requestsReceived;
  perToken = new Map();
  return out;
}

async function handle(req: Request): Promise<unknown> {
  switch (req.type) {
    case 'start': {
      if (mock) throw new Error('mock APNs already started');
      // The compiled mock (dist/, built by `npm run bench:apns`), like the code under test (see Lib in apns-throughput.ts).
      const url = pathToFileURL(path.join(req.distDir, 'testbed', 'mock-apns.js')).href;
      const { startMockApns } = (await import(url)) as typeof import('../src/testbed/mock-apns.js');
      mock = await startMockApns({ clientCa: req.clientCa, record: false });
      mock.respond((r) => {
        perToken.set(r.deviceToken, (perToken.get(r.deviceToken) ?? 0) + 1);
        return OK;
      });
      return { url: mock.url, caPem: mock.caPem };
    }
    case 'snapshot':
      return snapshot();
    case 'stop':
      await mock?.close();
      return {};
  }
}

if (!process.send) {
  process.stderr.write('bench/apns-mock-server.ts is started by bench/apns-throughput.ts (it needs an IPC channel)\n');
  process.exit(2);
}

process.on('message', (msg: Request) => {
  handle(msg).then(
    (result) => {
      process.send!({ id: msg.id, ok: true, result }, () => {
        if (msg.type === 'stop') process.exit(0);
      });
    },
    (err: unknown) => {
      process.send!({ id: msg.id, ok: false, error: err instanceof Error ? (err.stack ?? err.message) : String(err) });
    },
  );
});
// The parent went away (crashed, or killed): do not linger.
process.on('disconnect', () => process.exit(0));
