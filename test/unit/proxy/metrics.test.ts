/**
 * The proxy's metric helpers: command labels from a fixed list, the connection gauge
 * following a session through STARTTLS and close, and why an upstream leg failed
 * (against loopback servers that misbehave in each way).
 */
import { afterEach, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import net from 'node:net';
import { Registry } from 'prom-client';
import { COMMAND_LABELS, UID_COMMANDS, commandLabel, proxyMetrics } from '../../../src/proxy/metrics.js';
import { fuzzRuns } from '../../helpers/fuzz.js';
import { openUpstream, type UpstreamSettings } from '../../../src/proxy/upstream.js';
import { freePort } from '../../../src/testbed/ports.js';
import type { Session } from '../../../src/proxy/session.js';

const line = (s: string) => Buffer.from(s, 'latin1');

describe('commandLabel', () => {
  it('keeps listed commands, names UID variants, and turns everything else into "other"', () => {
    expect(commandLabel('FETCH', line('a1 FETCH 1 (FLAGS)\r\n'))).toBe('FETCH');
    expect(commandLabel('XAPPLEPUSHSERVICE', line('x XAPPLEPUSHSERVICE "aps-version" "2"\r\n'))).toBe('XAPPLEPUSHSERVICE');
    expect(commandLabel('UID', line('a2 uid fetch 1:* FLAGS\r\n'))).toBe('UID FETCH');
    expect(commandLabel('UID', line('a3 UID EXPUNGE 4\r\n'))).toBe('UID EXPUNGE');
    expect(commandLabel('UID', line('a4 UID FROBNICATE 1\r\n'))).toBe('other');
    expect(commandLabel('UID', line('a5 UID\r\n'))).toBe('other');
    expect(commandLabel('UID', line('a6 UID FETCHX 1\r\n'))).toBe('other');
    expect(commandLabel('FOOBAR', line('a7 FOOBAR\r\n'))).toBe('other');
    expect(commandLabel(null, line('garbage\r\n'))).toBe('other');
  });

  it('only ever answers values of COMMAND_LABELS', () => {
    const allowed = new Set(COMMAND_LABELS);
    const words = ['FETCH', 'UID', 'uid', 'X', '', 'LOGIN', 'ÄÖÜ', 'UID FETCH', 'A'.repeat(300)];
    for (const name of words) {
      for (const rest of ['', ' FETCH', ' fetch 1', ' STORE\r\n', ' ' + 'Z'.repeat(100)]) {
        expect(allowed.has(commandLabel(name, line(`t ${name}${rest}\r\n`)))).toBe(true);
      }
    }
  });
});

describe('proxyMetrics', () => {
  async function gauge(registry: Registry): Promise<Record<string, number>> {
    const m = (await registry.getMetricsAsJSON()).find((x) => x.name === 'xaps_client_connections')!;
    return Object.fromEntries(m.values.map((v) => [`${v.labels.listener}/${v.labels.tls}`, v.value]));
  }
  const session = {} as Session;

  it('moves a session from tls="false" to tls="true" on STARTTLS and removes it once on close', async () => {
    const registry = new Registry();
    const metrics = proxyMetrics(registry);
    expect(proxyMetrics(registry)).toBe(metrics);
    const plain = metrics.opened('listen', false);
    const other = metrics.opened('listen', false);
    const secure = metrics.opened('listen-tls', true);
    expect(await gauge(registry)).toEqual({ 'listen/false': 2, 'listen/true': 0, 'listen-tls/true': 1 });
    plain.tlsStarted!(session);
    expect(await gauge(registry)).toEqual({ 'listen/false': 1, 'listen/true': 1, 'listen-tls/true': 1 });
    plain.closed!(session);
    plain.closed!(session);
    other.closed!(session);
    secure.closed!(session);
    expect(await gauge(registry)).toEqual({ 'listen/false': 0, 'listen/true': 0, 'listen-tls/true': 0 });
    const total = (await registry.getMetricsAsJSON()).find((x) => x.name === 'xaps_client_connections_total')!;
    expect(total.values.map((v) => [v.labels.listener, v.value])).toEqual([['listen', 2], ['listen-tls', 1]]);
  });
});

describe('upstream failure reasons', () => {
  const servers: net.Server[] = [];
  const accepted: net.Socket[] = [];
  afterEach(async () => {
    for (const s of accepted.splice(0)) s.destroy();
    await Promise.all(servers.splice(0).map((s) => new Promise((r) => s.close(r))));
  });

  async function serve(onConnection: (s: net.Socket) => void): Promise<number> {
    const server = net.createServer((s) => {
      accepted.push(s);
      s.on('error', () => undefined);
      onConnection(s);
    });
    servers.push(server);
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    return (server.address() as net.AddressInfo).port;
  }

  const client = { clientIp: '127.0.0.1', clientPort: 1, localIp: '127.0.0.1', localPort: 2, sessionId: 't', tlsVersion: null };
  const settings = (port: number, extra: Partial<UpstreamSettings> = {}): UpstreamSettings => ({
    host: '127.0.0.1',
    port,
    tls: 'none',
    connectTimeoutMs: 5_000,
    clientIp: 'none',
    ...extra,
  });
  const reason = (s: UpstreamSettings) =>
    openUpstream(s, client).then(
      () => 'connected',
      (err: { reason?: string }) => err.reason,
    );

  it('refused: nobody listens', async () => {
    expect(await reason(settings(await freePort()))).toBe('refused');
  });

  it('closed: the server hangs up before greeting', async () => {
    expect(await reason(settings(await serve((s) => s.end())))).toBe('closed');
  });

  it('greeting: the server answers with something that is no IMAP greeting', async () => {
    expect(await reason(settings(await serve((s) => s.write('220 smtp.example ESMTP\r\n'))))).toBe('greeting');
  });

  it('timeout: the server never greets; the connection is not left open', async () => {
    let closed!: Promise<void>;
    const port = await serve((s) => {
      closed = new Promise((r) => s.once('close', () => r()));
    });
    expect(await reason(settings(port, { connectTimeoutMs: 200 }))).toBe('timeout');
    await closed;
  });

  it('tls: implicit TLS to a server that speaks plain IMAP', async () => {
    const port = await serve((s) => s.write('* OK plain IMAP here\r\n'));
    expect(await reason(settings(port, { tls: 'tls' }))).toBe('tls');
  });

  it('tls: the server refuses STARTTLS', async () => {
    const port = await serve((s) => {
      s.write('* OK ready\r\n');
      s.on('data', (d: Buffer) => {
        if (d.toString().startsWith('S STARTTLS')) s.write('S NO not here\r\n');
      });
    });
    expect(await reason(settings(port, { tls: 'starttls' }))).toBe('tls');
  });
});

describe('commandLabel for UID commands, by bytes', () => {
  /** The same rule as a regular expression over the first 64 characters. */
  function byRegex(l: Buffer): string {
    const m = /^[^ ]+ UID ([A-Za-z]{1,16})(?:[ \r\n]|$)/i.exec(l.toString('latin1', 0, Math.min(l.length, 64)));
    const sub = m?.[1]?.toUpperCase();
    return sub !== undefined && (UID_COMMANDS as readonly string[]).includes(sub) ? `UID ${sub}` : 'other';
  }
  const pieces = ['a1', ' ', '  ', 'UID', 'uid', 'Uid', 'FETCH', 'fetch', 'STORE', 'EXPUNGE', 'x', '\r', '\n', '\t', '1:*', 'é', 'A'.repeat(15), 'B'.repeat(50)];
  it('agrees with the regular-expression reading on generated lines', () => {
    fc.assert(
      fc.property(fc.array(fc.constantFrom(...pieces), { maxLength: 10 }), (parts) => {
        const l = Buffer.from(parts.join(''), 'latin1');
        expect(commandLabel('UID', l)).toBe(byRegex(l));
      }),
      { numRuns: fuzzRuns(3000) },
    );
  });
});
