/**
 * The operations HTTP listener (--metrics-listen): GET /metrics (Prometheus text),
 * /healthz (the process is alive) and /readyz (200 or 503 with the readiness checks
 * as JSON). GET and HEAD only; request bodies are ignored; a failing handler answers
 * 500 and never takes the process down.
 */
import http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import type { Registry } from 'prom-client';
import type { Logger } from './log.js';
import type { ReadinessReport } from './readiness.js';

export interface OpsServerOptions {
  listen: { host: string; port: number };
  registry: Registry;
  readiness: () => Promise<ReadinessReport>;
  log: Logger;
}

export interface OpsServer {
  /** The bound address (useful with port 0). */
  readonly address: { host: string; port: number };
  stop(): Promise<void>;
}

const JSON_TYPE = 'application/json; charset=utf-8';

export async function startOpsServer(opts: OpsServerOptions): Promise<OpsServer> {
  const { registry, readiness, log } = opts;
  const sockets = new Set<Socket>();

  const send = (req: http.IncomingMessage, res: http.ServerResponse, status: number, type: string, body: string): void => {
    res.writeHead(status, {
      'content-type': type,
      'content-length': Buffer.byteLength(body),
      'cache-control': 'no-store',
    });
    res.end(req.method === 'HEAD' ? undefined : body);
  };
  const sendJson = (req: http.IncomingMessage, res: http.ServerResponse, status: number, value: unknown): void =>
    send(req, res, status, JSON_TYPE, JSON.stringify(value) + '\n');

  const handle = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
    req.resume(); // bodies are not read
    const path = (req.url ?? '/').split('?', 1)[0];
    const known = path === '/metrics' || path === '/healthz' || path === '/readyz';
    if (!known) return sendJson(req, res, 404, { error: 'not found' });
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.setHeader('allow', 'GET, HEAD');
      return sendJson(req, res, 405, { error: 'method not allowed' });
    }
    if (path === '/healthz') return sendJson(req, res, 200, { status: 'ok' });
    if (path === '/metrics') {
      const text = await registry.metrics();
      return send(req, res, 200, registry.contentType, text);
    }
    const report = await readiness();
    return sendJson(req, res, report.ready ? 200 : 503, report);
  };

  const server = http.createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      log.warn({ err: String(err), url: req.url }, 'operations request failed');
      if (!res.headersSent) sendJson(req, res, 500, { error: 'internal error' });
      else res.destroy();
    });
  });
  server.headersTimeout = 10_000;
  server.requestTimeout = 15_000;
  server.keepAliveTimeout = 5_000;
  server.maxHeadersCount = 50;
  server.on('clientError', (_err, socket) => {
    if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n');
    else socket.destroy();
  });
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.listen.port, opts.listen.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', (err) => log.warn({ err: String(err) }, 'operations listener error'));
  const a = server.address() as AddressInfo;
  const address = { host: a.address, port: a.port };
  log.info({ listen: `${address.host}:${address.port}` }, 'operations listener (metrics, healthz, readyz)');
  return {
    address,
    stop: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      }),
  };
}
