/**
 * Free TCP ports on loopback, chosen by the kernel (listen on port 0, read it, close).
 * There is a small window between close and the caller's own bind in which another process
 * could take the port; on a test machine that is rare enough, and callers fail loudly if so.
 */
import net from 'node:net';

function listenOnZero(host: string): Promise<net.Server> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', reject);
    srv.listen({ host, port: 0, exclusive: true }, () => resolve(srv));
  });
}

function portOf(srv: net.Server): number {
  const addr = srv.address();
  if (addr === null || typeof addr === 'string') throw new Error('unexpected server address');
  return addr.port;
}

function close(srv: net.Server): Promise<void> {
  return new Promise((resolve) => srv.close(() => resolve()));
}

/** One free TCP port on `host` (default 127.0.0.1). */
export async function freePort(host = '127.0.0.1'): Promise<number> {
  const srv = await listenOnZero(host);
  const port = portOf(srv);
  await close(srv);
  return port;
}

/** `n` distinct free TCP ports on `host` (all held open together, then released). */
export async function freePorts(n: number, host = '127.0.0.1'): Promise<number[]> {
  const servers: net.Server[] = [];
  try {
    for (let i = 0; i < n; i++) servers.push(await listenOnZero(host));
    return servers.map(portOf);
  } finally {
    await Promise.all(servers.map(close));
  }
}
