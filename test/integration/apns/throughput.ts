/**
 * Throughput of one Http2ApnsClient against the mock APNs (report only, not a test):
 *
 *   npx tsx test/integration/apns/throughput.ts [--total 200000] [--window 4000]
 *        [--connections 2] [--same-process] [--profile]
 *
 * By default the mock runs in a child process (its CPU is not ours); --same-process
 * runs both in one. Sends `total` notifications keeping `window` in flight and prints
 * sends/second plus the client process's CPU time per send.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { Session } from 'node:inspector/promises';
import fs from 'node:fs';
import { Http2ApnsClient } from '../../../src/apns/client.js';
import { createTestCa, issueMailPushCert } from '../../../src/testbed/apns-certs.js';
import { startMockApns } from '../../../src/testbed/mock-apns.js';

function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}
const flag = (name: string): boolean => process.argv.includes(`--${name}`);

async function serve(): Promise<void> {
  const clientCa = fs.readFileSync(0, 'utf8');
  const mock = await startMockApns({ clientCa, record: false });
  process.stdout.write(`${JSON.stringify({ url: mock.url, caPem: mock.caPem })}\n`);
  process.on('SIGTERM', () => {
    const cpu = process.cpuUsage();
    process.stderr.write(`${JSON.stringify({ mockCpuSeconds: Number(((cpu.user + cpu.system) / 1e6).toFixed(2)), mockRequests: mock.stats().requestsReceived })}\n`);
    void mock.close().then(() => process.exit(0));
  });
}

async function main(): Promise<void> {
  const total = arg('total', 200_000);
  const windowSize = arg('window', 4_000);
  const connections = arg('connections', 2);
  const ca = createTestCa();
  const cert = issueMailPushCert(ca);

  let url: string;
  let caPem: string;
  let stop: () => Promise<void>;
  if (flag('same-process')) {
    const mock = await startMockApns({ clientCa: ca.certPem, record: false });
    url = mock.url;
    caPem = mock.caPem;
    stop = () => mock.close();
  } else {
    const child = spawn(process.execPath, [...process.execArgv, fileURLToPath(import.meta.url), '--serve'], { stdio: ['pipe', 'pipe', 'inherit'] });
    child.stdin.end(ca.certPem);
    const line = await new Promise<string>((resolve) => {
      let buf = '';
      child.stdout.on('data', (d: Buffer) => {
        buf += d.toString();
        const nl = buf.indexOf('\n');
        if (nl >= 0) resolve(buf.slice(0, nl));
      });
    });
    ({ url, caPem } = JSON.parse(line) as { url: string; caPem: string });
    stop = async () => {
      child.kill('SIGTERM');
      await new Promise((r) => child.once('exit', r));
    };
  }

  const client = new Http2ApnsClient({
    endpoint: url,
    ca: caPem,
    connections,
    credentials: { kind: 'certificate', certPem: cert.certPem, keyPem: cert.keyPem },
  });
  const tokens = Array.from({ length: 10_000 }, (_, i) => i.toString(16).padStart(64, '0'));
  const payload = JSON.stringify({ aps: { 'account-id': '7F3A4E1B-0000-4000-8000-000000000000' } });
  const send = (i: number) =>
    client.send({ deviceToken: tokens[i % tokens.length]!, topic: cert.topic, pushType: 'background', priority: 5, expiration: 0, collapseId: 'acct', payload });

  // warm-up
  await Promise.all(Array.from({ length: 2_000 }, (_, i) => send(i)));

  let profiler: Session | undefined;
  if (flag('profile')) {
    profiler = new Session();
    profiler.connect();
    await profiler.post('Profiler.enable');
    await profiler.post('Profiler.start');
  }

  let sent = 0;
  let done = 0;
  let failed = 0;
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  await new Promise<void>((resolve) => {
    const pumpSends = (): void => {
      while (sent < total && sent - done < windowSize) {
        send(sent++).then(
          (r) => {
            if (r.status !== 200) failed++;
            finish();
          },
          () => {
            failed++;
            finish();
          },
        );
      }
    };
    const finish = (): void => {
      done++;
      if (done === total) resolve();
      else pumpSends();
    };
    pumpSends();
  });
  const secs = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  if (profiler) {
    const { profile } = await profiler.post('Profiler.stop');
    fs.writeFileSync('/tmp/apns-client.cpuprofile', JSON.stringify(profile));
    console.log('profile: /tmp/apns-client.cpuprofile');
  }
  console.log(
    JSON.stringify({
      mode: flag('same-process') ? 'same-process' : 'mock-in-child-process',
      total,
      window: windowSize,
      connections,
      seconds: Number(secs.toFixed(2)),
      sendsPerSecond: Math.round(total / secs),
      failed,
      clientCpuMicrosPerSend: Number(((cpu.user + cpu.system) / total).toFixed(1)),
    }),
  );
  await client.close();
  await stop();
}

if (flag('serve')) void serve();
else
  main().catch((err: unknown) => {
    console.error(err);
    process.exit(1);
  });
