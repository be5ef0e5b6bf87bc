/**
 * Test helper: real redis-server children on 127.0.0.1, each in its own temp dir on a free port, in the foreground
 * (we hold the pid; stopped by that pid only). Installs Debian's redis-server when it is missing and we are root.
 * Also builds a 3-master Redis Cluster with `redis-cli --cluster create`.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, promises as fsp } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

export interface RedisServer {
  readonly host: '127.0.0.1';
  readonly port: number;
  readonly dir: string;
  /** redis://127.0.0.1:PORT (with `:password@` when a password was set). */
  readonly url: string;
  readonly pid: number | undefined;
  readonly running: boolean;
  /** Graceful stop (SIGTERM: Redis flushes its AOF); resolves when the process is gone. */
  stop(): Promise<void>;
  /** SIGKILL: a crash. */
  kill(): Promise<void>;
  /** Start again on the same port and dir. */
  start(): Promise<void>;
  /** SIGSTOP / SIGCONT: a hung server that keeps its connections open. */
  pause(): void;
  resume(): void;
  /** Stop and remove the dir. */
  destroy(): Promise<void>;
  /** Run redis-cli against this server; returns stdout. */
  cli(...args: string[]): string;
}

export interface RedisServerOptions {
  appendonly?: boolean;
  /** appendfsync always (every acknowledged write survives SIGKILL); default everysec. */
  fsyncAlways?: boolean;
  password?: string;
  cluster?: boolean;
  /** Port to use (default: a free one; for clusters also port + 10000 free). */
  port?: number;
  /** Run as a Sentinel monitoring this master (quorum 1) instead of as a data server. */
  sentinelOf?: { masterName: string; port: number; password?: string };
}

let installed = false;

/** Makes sure redis-server and redis-cli exist, installing Debian's package when root. */
export function ensureRedisInstalled(): void {
  if (installed) return;
  const have = (bin: string): boolean => spawnSync(bin, ['--version'], { stdio: 'ignore' }).status === 0;
  if (!have('redis-server') || !have('redis-cli')) {
    if (process.getuid?.() !== 0) throw new Error('redis-server is not installed and we are not root to install it');
    const policy = '/usr/sbin/policy-rc.d';
    const made = !existsSync(policy);
    if (made) spawnSync('sh', ['-c', `printf '#!/bin/sh\\nexit 101\\n' > ${policy} && chmod 755 ${policy}`], { stdio: 'ignore' });
    try {
      const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
      spawnSync('apt-get', ['update', '-o', 'Dpkg::Use-Pty=0'], { stdio: 'ignore', env, timeout: 300_000 });
      const r = spawnSync('apt-get', ['install', '-y', '--no-install-recommends', '-o', 'Dpkg::Use-Pty=0', 'redis-server'], {
        encoding: 'utf8', env, timeout: 300_000,
      });
      if (r.status !== 0) throw new Error(`apt-get install redis-server failed: ${r.stderr}`);
    } finally {
      if (made) spawnSync('rm', ['-f', policy]);
    }
  }
  installed = true;
}

function canListen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once('error', () => resolve(false));
    srv.listen({ host: '127.0.0.1', port, exclusive: true }, () => srv.close(() => resolve(true)));
  });
}

async function freePort(cluster: boolean): Promise<number> {
  for (let i = 0; i < 200; i++) {
    const port = await new Promise<number>((resolve, reject) => {
      const srv = net.createServer();
      srv.once('error', reject);
      srv.listen({ host: '127.0.0.1', port: 0, exclusive: true }, () => {
        const p = (srv.address() as net.AddressInfo).port;
        srv.close(() => resolve(p));
      });
    });
    if (!cluster) return port;
    if (port + 10000 <= 65535 && (await canListen(port + 10000))) return port;
  }
  throw new Error('no free port found');
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export async function startRedisServer(opts: RedisServerOptions = {}): Promise<RedisServer> {
  ensureRedisInstalled();
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'xaps-store-redis-'));
  let port = opts.port ?? (await freePort(Boolean(opts.cluster)));
  let child: ChildProcess | undefined;
  let exited: Promise<void> = Promise.resolve();

  const sentinelConf = path.join(dir, 'sentinel.conf');
  const args = (): string[] => opts.sentinelOf ? [sentinelConf, '--sentinel'] : [
    '--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--daemonize', 'no', '--logfile', '',
    '--save', '', '--appendonly', opts.appendonly ? 'yes' : 'no',
    '--appendfsync', opts.fsyncAlways ? 'always' : 'everysec',
    ...(opts.password ? ['--requirepass', opts.password] : []),
    ...(opts.cluster ? ['--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf', '--cluster-node-timeout', '5000'] : []),
  ];

  const start = async (): Promise<void> => {
    const so = opts.sentinelOf;
    if (so && !existsSync(sentinelConf)) {
      await fsp.writeFile(sentinelConf, [
        `port ${port}`, 'bind 127.0.0.1', `dir ${dir}`, 'logfile ""', 'daemonize no',
        `sentinel monitor ${so.masterName} 127.0.0.1 ${so.port} 1`,
        ...(so.password ? [`sentinel auth-pass ${so.masterName} ${so.password}`] : []),
        `sentinel down-after-milliseconds ${so.masterName} 5000`, '',
      ].join('\n'));
    }
    if (child && child.exitCode === null && child.signalCode === null) throw new Error('redis-server already running');
    const c = spawn('redis-server', args(), { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
    child = c;
    let out = '';
    const onData = (d: Buffer): void => {
      out += d.toString();
      if (out.length > 20_000) out = out.slice(-10_000);
    };
    c.stdout?.on('data', onData);
    c.stderr?.on('data', onData);
    exited = new Promise((resolve) => c.once('exit', () => resolve()));
    const deadline = Date.now() + 30_000;
    const ready = opts.sentinelOf ? /\+monitor master/ : /Ready to accept connections/;
    while (!ready.test(out)) {
      if (c.exitCode !== null || c.signalCode !== null) {
        throw new Error(`redis-server exited during startup (port ${port}):\n${out.slice(-2000)}`);
      }
      if (Date.now() > deadline) {
        c.kill('SIGKILL');
        throw new Error(`redis-server did not become ready (port ${port}):\n${out.slice(-2000)}`);
      }
      await sleep(20);
    }
    // keep draining the pipes so Redis never blocks on a full one
  };

  const stopWith = async (signal: NodeJS.Signals): Promise<void> => {
    const c = child;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    c.kill('SIGCONT');
    c.kill(signal);
    const t = setTimeout(() => c.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(t);
  };

  for (let attempt = 0; ; attempt++) {
    try {
      await start();
      break;
    } catch (err) {
      if (opts.port !== undefined || attempt >= 3 || !/already in use|Address in use/i.test(String(err))) {
        await fsp.rm(dir, { recursive: true, force: true });
        throw err;
      }
      port = await freePort(Boolean(opts.cluster));
    }
  }

  const auth = opts.password ? `:${encodeURIComponent(opts.password)}@` : '';
  return {
    host: '127.0.0.1',
    get port() {
      return port;
    },
    dir,
    get url() {
      return `redis://${auth}127.0.0.1:${port}`;
    },
    get pid() {
      return child?.pid;
    },
    get running() {
      return child !== undefined && child.exitCode === null && child.signalCode === null;
    },
    stop: () => stopWith('SIGTERM'),
    pause: () => void child?.kill('SIGSTOP'),
    resume: () => void child?.kill('SIGCONT'),
    kill: () => stopWith('SIGKILL'),
    start,
    async destroy() {
      await stopWith('SIGTERM');
      await fsp.rm(dir, { recursive: true, force: true });
    },
    cli(...a: string[]): string {
      const r = spawnSync('redis-cli', ['-h', '127.0.0.1', '-p', String(port), ...(opts.password ? ['--no-auth-warning', '-a', opts.password] : []), ...a], {
        encoding: 'utf8', timeout: 30_000,
      });
      if (r.status !== 0) throw new Error(`redis-cli ${a.join(' ')} failed: ${r.stderr}`);
      return r.stdout;
    },
  };
}

export interface RedisCluster {
  nodes: RedisServer[];
  /** redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3 */
  url: string;
  destroy(): Promise<void>;
}

/** Three masters, no replicas, all 16384 slots assigned and every node agreeing that the cluster is ok. */
export async function startRedisCluster(masters = 3): Promise<RedisCluster> {
  const nodes: RedisServer[] = [];
  try {
    for (let i = 0; i < masters; i++) nodes.push(await startRedisServer({ cluster: true }));
    const addrs = nodes.map((n) => `127.0.0.1:${n.port}`);
    const r = spawnSync('redis-cli', ['--cluster', 'create', ...addrs, '--cluster-replicas', '0', '--cluster-yes'], {
      encoding: 'utf8', timeout: 120_000,
    });
    if (r.status !== 0 || !/All 16384 slots covered/.test(r.stdout)) {
      throw new Error(`redis-cli --cluster create failed:\n${r.stdout}\n${r.stderr}`);
    }
    const deadline = Date.now() + 60_000;
    for (;;) {
      const ok = nodes.every((n) => {
        const info = n.cli('cluster', 'info');
        return /cluster_state:ok/.test(info) && /cluster_slots_ok:16384/.test(info) && new RegExp(`cluster_known_nodes:${masters}\\b`).test(info);
      });
      if (ok) break;
      if (Date.now() > deadline) throw new Error('redis cluster did not converge');
      await sleep(100);
    }
  } catch (err) {
    for (const n of nodes) await n.destroy();
    throw err;
  }
  return {
    nodes,
    url: `redis+cluster://${nodes.map((n) => `127.0.0.1:${n.port}`).join(',')}`,
    async destroy() {
      for (const n of nodes) await n.destroy();
    },
  };
}
