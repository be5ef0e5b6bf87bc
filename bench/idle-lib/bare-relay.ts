/**
 * The floor for the idle-capacity benchmark: the least a Node.js TLS-terminating relay can hold
 * per session — `tls.createServer`, one `net.connect` upstream per client, `pipe()` both ways,
 * nothing else (no IMAP framing, no logging, no metrics). Runs in its own process (forked by
 * bench/idle-capacity.ts). xaps-proxy minus this is what the proxy's own code costs per session.
 *
 * Requests: { type: 'start', cert, key, upstreamPort } → { port }; { type: 'memory' } → process.memoryUsage().
 */
import net from 'node:net';
import tls from 'node:tls';
import { serveRequests } from '../lib/peer.js';

serveRequests(async (msg) => {
  if (msg.type === 'memory') return process.memoryUsage();
  if (msg.type !== 'start') throw new Error(`unknown request ${msg.type}`);
  const upstreamPort = Number(msg.upstreamPort);
  const server = tls.createServer({ cert: String(msg.cert), key: String(msg.key) }, (client) => {
    const up = net.connect({ host: '127.0.0.1', port: upstreamPort });
    client.pipe(up);
    up.pipe(client);
    const end = () => {
      client.destroy();
      up.destroy();
    };
    client.on('error', end);
    up.on('error', end);
    client.on('close', end);
    up.on('close', end);
  });
  server.on('tlsClientError', () => undefined);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: '127.0.0.1', port: 0, backlog: 4096 }, () => resolve());
  });
  return { port: (server.address() as net.AddressInfo).port };
});
