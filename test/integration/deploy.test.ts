/**
 * The deployment files (deploy/, docker-compose.yml, .dockerignore) checked against the code and
 * against the real tools, so that they cannot drift from what the proxy is:
 *
 * - systemd: `systemd-analyze verify` of deploy/systemd/xaps-proxy.service (installed from Debian
 *   when missing), its sandbox exposure, and stop timeouts longer than the drain timeout;
 * - configuration: deploy/systemd/config.yaml, the Kubernetes ConfigMap's config.yaml and the
 *   compose file's XAPS_* environment load with the project's own loader, without warnings;
 * - Dovecot: the test bed's generated dovecot.conf includes deploy/dovecot/xaps-trial.conf, the
 *   very file docker-compose.yml mounts; the conf.d snippets work in a real Dovecot (master user
 *   with allow_nets, PROXY-protocol listener) and the pod's dovecot.conf passes doveconf;
 * - Kubernetes: every manifest parses, kustomization lists exactly the manifests, references
 *   (volumes, ConfigMaps, Secrets, keys, selectors, probes) resolve, securityContext is strict;
 * - Prometheus rules and the Grafana dashboard use only metric names the source code defines;
 * - Docker: COPY sources exist and survive .dockerignore, the health check script works;
 * - deploy/README.md mentions every file.
 * Needs `node scripts/bootstrap.mjs test` (Dovecot) and root or systemd-analyze.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import fs from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse as parseYaml, parseAllDocuments, stringify as stringifyYaml } from 'yaml';
import { configWarnings, loadConfig } from '../../src/config/load.js';
import { getOption, parseDuration, type Config } from '../../src/config/index.js';
import { createRegistry } from '../../src/ops/metrics.js';
import { proxyV2Header } from '../../src/proxy/proxy-protocol.js';
import { DOVECOT_TRIAL_CONFIG_PATH, DOVECOT_TRIAL_DIR_VARIABLE } from '../../src/testbed/dovecot.js';
import { findBinary, freePort, runCommand, startDovecot, type DovecotInstance } from '../../src/testbed/index.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const DEPLOY = path.join(ROOT, 'deploy');
const read = (rel: string): string => readFileSync(path.join(ROOT, rel), 'utf8');

type Json = Record<string, any>;

// ------------------------------------------------------------------------------ helpers ---

const cleanups: Array<() => Promise<unknown>> = [];
afterAll(async () => {
  for (const c of cleanups.reverse()) await c().catch(() => undefined);
});

async function tempDir(prefix: string): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir().length > 40 ? '/tmp' : os.tmpdir(), prefix));
  // Dovecot's unprivileged processes read files in here
  await fs.chmod(dir, 0o755);
  cleanups.push(() => fs.rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Every file under `dir`, relative to it. */
function walk(dir: string, base = dir): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    const full = path.join(dir, name);
    if (statSync(full).isDirectory()) out.push(...walk(full, base));
    else out.push(path.relative(base, full));
  }
  return out;
}

/** Seconds of a duration such as "30s", "45s" or a bare number of seconds (systemd, Kubernetes). */
function seconds(v: string | number): number {
  if (typeof v === 'number') return v;
  const ms = parseDuration(v.trim());
  if (ms === undefined) throw new Error(`not a duration: ${v}`);
  return ms / 1000;
}

/**
 * Loads a configuration (YAML text or XAPS_* environment) with the project's loader, with every
 * file option pointed at a stub in a temp dir (the real paths exist only where it is deployed).
 */
async function loadWithStubs(source: { yaml: string } | { env: Record<string, string> }): Promise<Config> {
  const dir = await tempDir('xaps-deploy-cfg-');
  const stub = async (option: string, value: unknown): Promise<unknown> => {
    const kind = getOption(option)?.type.kind;
    if (kind === 'file' || kind === 'secret-file') {
      const file = path.join(dir, `${option}.stub`);
      await fs.writeFile(file, 'stub\n');
      return file;
    }
    if (kind === 'directory') return path.join(dir, option);
    return value;
  };
  if ('yaml' in source) {
    const doc = parseYaml(source.yaml) as Record<string, unknown>;
    for (const [k, v] of Object.entries(doc)) doc[k] = await stub(k, v);
    const file = path.join(dir, 'config.yaml');
    await fs.writeFile(file, stringifyYaml(doc));
    return loadConfig({ argv: ['--config', file], env: {}, cwd: dir });
  }
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(source.env)) {
    const option = k.startsWith('XAPS_') ? k.slice(5).toLowerCase().replace(/_/g, '-') : '';
    env[k] = String(await stub(option, v));
  }
  return loadConfig({ argv: [], env, cwd: dir });
}

// ---- metric names the code defines

interface KnownMetrics {
  names: Set<string>;
  /** name → where it is defined (for messages) */
  missing(used: Iterable<string>): string[];
}

async function knownMetrics(): Promise<KnownMetrics> {
  const names = new Set<string>();
  const addTyped = (name: string, type: string): void => {
    names.add(name);
    if (type === 'histogram') for (const s of ['_bucket', '_sum', '_count']) names.add(name + s);
    if (type === 'summary') for (const s of ['_sum', '_count']) names.add(name + s);
  };
  const typed = /new\s+(Counter|Gauge|Histogram|Summary)\s*(?:<[^>]*>)?\s*\(\s*\{\s*name:\s*(['"`])(xaps_[a-z0-9_]+)\2/g;
  const any = /\bname:\s*(['"`])(xaps_[a-z0-9_]+)\1/g;
  for (const rel of walk(path.join(ROOT, 'src')).filter((f) => f.endsWith('.ts'))) {
    const text = readFileSync(path.join(ROOT, 'src', rel), 'utf8');
    for (const m of text.matchAll(typed)) addTyped(m[3]!, m[1]!.toLowerCase());
    for (const m of text.matchAll(any)) names.add(m[2]!);
  }
  // the default process metrics, exactly as the proxy registers them (prefix xaps_)
  for (const m of await createRegistry().getMetricsAsJSON()) addTyped(m.name, String(m.type));
  return {
    names,
    missing: (used) => [...new Set(used)].filter((n) => !names.has(n)).sort(),
  };
}

/** xaps_* metric names in a PromQL expression. */
function metricNames(expr: string): string[] {
  return [...expr.matchAll(/\bxaps_[a-z0-9_]+/g)].map((m) => m[0]);
}

// ---- a minimal IMAP client

class Imap {
  private buf = '';
  private waiting: (() => void) | null = null;
  private closed = false;
  private n = 0;
  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('latin1');
    sock.on('data', (d: string) => {
      this.buf += d;
      this.waiting?.();
    });
    sock.on('close', () => {
      this.closed = true;
      this.waiting?.();
    });
    sock.on('error', () => undefined);
  }
  static connect(port: number, opts: { localAddress?: string; preamble?: Buffer } = {}): Promise<Imap> {
    return new Promise((resolve, reject) => {
      const sock = net.connect({ host: '127.0.0.1', port, localAddress: opts.localAddress });
      sock.once('connect', () => {
        if (opts.preamble) sock.write(opts.preamble);
        resolve(new Imap(sock));
      });
      sock.once('error', reject);
    });
  }
  async line(timeoutMs = 10_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.buf.indexOf('\r\n');
      if (i >= 0) {
        const l = this.buf.slice(0, i);
        this.buf = this.buf.slice(i + 2);
        return l;
      }
      if (this.closed) throw new Error('connection closed');
      if (Date.now() > deadline) throw new Error('timeout waiting for a line');
      await new Promise<void>((r) => {
        const t = setTimeout(r, Math.max(1, deadline - Date.now()));
        this.waiting = () => {
          clearTimeout(t);
          this.waiting = null;
          r();
        };
      });
    }
  }
  async command(cmd: string): Promise<string> {
    const tag = `d${++this.n}`;
    this.sock.write(`${tag} ${cmd}\r\n`);
    for (;;) {
      const l = await this.line();
      if (l.startsWith(`${tag} `)) return l.slice(tag.length + 1);
    }
  }
  close(): void {
    this.sock.destroy();
  }
}

const plain = (authzid: string, authcid: string, password: string): string =>
  Buffer.from(`${authzid}\0${authcid}\0${password}`).toString('base64');

// ------------------------------------------------------------------------------- systemd ---

describe('deploy/systemd', () => {
  const unitText = read('deploy/systemd/xaps-proxy.service');
  const directives = (name: string): string[] =>
    [...unitText.matchAll(new RegExp(`^${name}=(.*)$`, 'gm'))].map((m) => m[1]!.trim());
  let analyze: string;
  /** A copy of the unit whose ExecStart names this machine's node and this checkout's dist. */
  let unit: string;

  beforeAll(async () => {
    let found = findBinary('systemd-analyze', ['/usr/bin/systemd-analyze', '/bin/systemd-analyze']);
    if (!found) {
      // Debian's systemd package ships it; installing it starts nothing
      if (process.getuid?.() !== 0 || !findBinary('apt-get')) {
        throw new Error('systemd-analyze is missing: install Debian\'s "systemd" package (as root this test does it)');
      }
      const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
      const install = (): Promise<unknown> =>
        runCommand('apt-get', ['install', '-y', '--no-install-recommends', 'systemd'], { env, timeoutMs: 600_000 });
      await install().catch(async () => {
        await runCommand('apt-get', ['update'], { env, timeoutMs: 600_000 });
        await install();
      });
      found = findBinary('systemd-analyze', ['/usr/bin/systemd-analyze', '/bin/systemd-analyze']);
      if (!found) throw new Error('systemd-analyze still missing after installing systemd');
    }
    analyze = found;
    // verify checks that ExecStart's executable exists: point it at this machine's node
    const dir = await tempDir('xaps-deploy-unit-');
    unit = path.join(dir, 'xaps-proxy.service');
    await fs.writeFile(
      unit,
      unitText
        .replaceAll('/usr/bin/node ', `${process.execPath} `)
        .replaceAll('/opt/xaps-proxy/', `${ROOT}/`),
    );
  }, 900_000);

  it('systemd-analyze verify passes without a word about the unit', async () => {
    expect(directives('ExecStart')).toEqual(['/usr/bin/node /opt/xaps-proxy/dist/cli/main.js serve --config /etc/xaps-proxy/config.yaml']);
    const res = await runCommand(analyze, ['verify', '--man=no', unit], { timeoutMs: 60_000 }).catch((e: Error) => e);
    expect(res).not.toBeInstanceOf(Error);
    const { stdout, stderr } = res as { stdout: string; stderr: string };
    expect(`${stdout}\n${stderr}`.split('\n').filter((l) => /xaps-proxy/.test(l))).toEqual([]);
  });

  it('is sandboxed: exposure at most 2.0 of 10, port 143/993 capability only, no MemoryDenyWriteExecute', async () => {
    // --threshold=20: exit status 1 above an exposure of 2.0
    const res = await runCommand(analyze, ['security', '--offline=yes', '--threshold=20', unit], { timeoutMs: 60_000 }).catch((e: Error) => e);
    expect(res instanceof Error ? res.message : '').toBe('');
    const { stdout, stderr } = res as { stdout: string; stderr: string };
    const exposure = /Overall exposure level for xaps-proxy\.service: (\d+\.\d+)/.exec(`${stdout}\n${stderr}`);
    expect(Number(exposure?.[1])).toBeLessThanOrEqual(2.0);
    expect(directives('CapabilityBoundingSet')).toEqual(['CAP_NET_BIND_SERVICE']);
    expect(directives('AmbientCapabilities')).toEqual(['CAP_NET_BIND_SERVICE']);
    for (const [k, v] of [
      ['NoNewPrivileges', 'yes'],
      ['ProtectSystem', 'strict'],
      ['ProtectHome', 'yes'],
      ['PrivateTmp', 'yes'],
      ['StateDirectory', 'xaps-proxy'],
      ['SystemCallFilter', '@system-service'],
      ['Restart', 'on-failure'],
      ['KillSignal', 'SIGTERM'],
      ['ExecReload', '/bin/kill -HUP $MAINPID'],
    ] as const) {
      expect(directives(k), k).toContain(v);
    }
    expect(directives('RestrictAddressFamilies').join(' ')).toMatch(/AF_INET\b.*AF_INET6/);
    expect(directives('User').length + directives('DynamicUser').length).toBeGreaterThan(0);
    // V8's JIT needs W+X memory
    expect(directives('MemoryDenyWriteExecute')).toEqual([]);
    // the embedded store lives in the StateDirectory
    expect(getOption('data-dir')!.default).toBe('/var/lib/xaps-proxy');
  });

  it('gives the drain more time than the drain timeout (default and the example config)', () => {
    const stop = seconds(directives('TimeoutStopSec')[0]!);
    const example = parseYaml(read('deploy/systemd/config.yaml')) as Record<string, string>;
    expect(stop).toBeGreaterThan(seconds(getOption('drain-timeout')!.default!));
    expect(stop).toBeGreaterThan(seconds(example['drain-timeout'] ?? getOption('drain-timeout')!.default!));
  });

  it('config.yaml is a valid configuration (secret files stubbed), without warnings', async () => {
    const config = await loadWithStubs({ yaml: read('deploy/systemd/config.yaml') });
    expect(configWarnings(config)).toEqual([]);
    expect(config.upstream).toEqual({ host: '127.0.0.1', port: 10143 });
    expect(config.dataDir).toMatch(/data-dir$/);
  });
});

// -------------------------------------------------------------------------------- Dovecot ---

describe('deploy/dovecot and the test bed', () => {
  let doveconf: string;
  beforeAll(() => {
    const found = findBinary('doveconf', ['/usr/bin/doveconf']);
    if (!found) throw new Error('doveconf missing (run: node scripts/bootstrap.mjs test)');
    doveconf = found;
  });

  it('the test bed includes deploy/dovecot/xaps-trial.conf and overrides only per-instance settings', async () => {
    expect(DOVECOT_TRIAL_CONFIG_PATH).toBe(path.join(DEPLOY, 'dovecot/xaps-trial.conf'));
    const d = await startDovecot();
    cleanups.push(() => d.destroy());
    const generated = await fs.readFile(d.configPath, 'utf8');
    const directives = generated.split('\n').filter((l) => l.trim() !== '' && !l.trim().startsWith('#'));
    expect(directives[0]).toBe(`!include ${DOVECOT_TRIAL_CONFIG_PATH}`);
    // what is shared is not repeated
    expect(generated).not.toMatch(/^\s*(passdb|userdb)\s*\{/m);
    expect(generated).not.toMatch(/^\s*mail_location\s*=/m);

    const { stdout, stderr } = await runCommand(doveconf, ['-n', '-c', d.configPath]);
    expect(stderr).toBe('');
    expect(stdout).toMatch(/^listen = 127\.0\.0\.1$/m);
    expect(stdout).toContain(`port = ${d.imapPort}\n`);
    expect(stdout).toContain(`base_dir = ${d.dir}/run`);
    // the trial's "ssl = no" is overridden (yes is the default, so -n does not print it)
    expect(stdout).not.toMatch(/^ssl = no$/m);
    expect(stdout).toContain(`ssl_cert = <${d.caCertPath}`);
    const importEnv = /^import_environment = (.*)$/m.exec(stdout)![1]!.split(/\s+/);
    expect(importEnv.filter((e) => e.startsWith(`${DOVECOT_TRIAL_DIR_VARIABLE}=`)).at(-1)).toBe(`${DOVECOT_TRIAL_DIR_VARIABLE}=${d.dir}`);
    expect(stdout).toContain(`/%{env:${DOVECOT_TRIAL_DIR_VARIABLE}}/master.passwd`);

    // the included passdbs read this instance's files: user and master logins work
    const c = await Imap.connect(d.imapPort);
    try {
      expect(await c.line()).toMatch(/^\* OK/);
      expect(await c.command(`AUTHENTICATE PLAIN ${plain('alice', d.masterUser, d.masterPassword)}`)).toMatch(/^OK/);
    } finally {
      c.close();
    }
  });

  it('the trial configuration parses on its own, as the compose Dovecot reads it', async () => {
    const { stdout, stderr } = await runCommand(doveconf, ['-n', '-c', DOVECOT_TRIAL_CONFIG_PATH]);
    expect(stderr).toBe('');
    expect(stdout).toMatch(/inet_listener imap \{\n\s+port = 10143\n/);
    expect(stdout).toMatch(/inet_listener imaps \{\n\s+port = 0\n/);
    expect(stdout).toMatch(/^login_trusted_networks = 127\.0\.0\.0\/8 ::1$/m);
  });

  it('20-xaps-master-user.conf and 30-xaps-haproxy.conf work in a real Dovecot', async () => {
    const dir = await tempDir('xaps-deploy-dovecot-');
    const masterUsers = path.join(dir, 'master-users');
    await fs.writeFile(masterUsers, 'xaps:{PLAIN}xaps-secret\n', { mode: 0o644 });
    const haproxyPort = await freePort();
    const master = read('deploy/dovecot/20-xaps-master-user.conf');
    const haproxy = read('deploy/dovecot/30-xaps-haproxy.conf');
    expect(master).toContain('args = /etc/dovecot/master-users');
    expect(haproxy).toContain('port = 10144');
    const d: DovecotInstance = await startDovecot({
      extraConfig: [
        master.replaceAll('/etc/dovecot/master-users', masterUsers),
        haproxy.replaceAll('port = 10144', `port = ${haproxyPort}`),
      ].join('\n'),
    });
    cleanups.push(() => d.destroy());

    // the master user, from the proxy's address: both login forms the proxy can use
    let c = await Imap.connect(d.imapPort);
    try {
      await c.line();
      expect(await c.command(`AUTHENTICATE PLAIN ${plain('alice', 'xaps', 'xaps-secret')}`)).toMatch(/^OK/);
    } finally {
      c.close();
    }
    c = await Imap.connect(d.imapPort);
    try {
      await c.line();
      expect(await c.command('LOGIN "bob*xaps" "xaps-secret"')).toMatch(/^OK/);
    } finally {
      c.close();
    }
    // allow_nets: not from elsewhere
    c = await Imap.connect(d.imapPort, { localAddress: '127.0.0.2' });
    try {
      await c.line();
      expect(await c.command(`AUTHENTICATE PLAIN ${plain('alice', 'xaps', 'xaps-secret')}`)).toMatch(/^NO/);
    } finally {
      c.close();
    }

    // the PROXY-protocol listener takes the client's address from the header
    const header = proxyV2Header({ sourceIp: '203.0.113.7', sourcePort: 51234, destIp: '127.0.0.1', destPort: haproxyPort });
    c = await Imap.connect(haproxyPort, { preamble: header });
    try {
      expect(await c.line()).toMatch(/^\* OK/);
      expect(await c.command('LOGIN carol carolpw')).toMatch(/^OK/);
    } finally {
      c.close();
    }
    await expect.poll(() => d.readLog(), { timeout: 5000 }).toMatch(/Login: user=<carol>.*rip=203\.0\.113\.7/);
  });
});

// ----------------------------------------------------------------------------- Kubernetes ---

describe('deploy/kubernetes', () => {
  const dir = path.join(DEPLOY, 'kubernetes');
  const files = readdirSync(dir).filter((f) => /\.ya?ml$/.test(f)).sort();
  const manifests = new Map<string, Json[]>();
  for (const f of files.filter((f) => f !== 'kustomization.yaml')) {
    const docs = parseAllDocuments(readFileSync(path.join(dir, f), 'utf8'));
    manifests.set(
      f,
      docs.map((doc) => {
        if (doc.errors.length) throw new Error(`${f}: ${doc.errors[0]!.message}`);
        return doc.toJS() as Json;
      }),
    );
  }
  const all = [...manifests.values()].flat();
  const find = (kind: string, name: string): Json => {
    const m = all.find((x) => x.kind === kind && x.metadata?.name === name);
    if (!m) throw new Error(`no ${kind} ${name} in deploy/kubernetes`);
    return m;
  };
  const configMapData = (name: string): Record<string, string> => find('ConfigMap', name).data as Record<string, string>;
  const secretKeys = (name: string): string[] => {
    const s = find('Secret', name);
    return Object.keys({ ...(s.data ?? {}), ...(s.stringData ?? {}) });
  };
  const mail = (): Json => find('Deployment', 'mail');
  const container = (name: string): Json => (mail().spec.template.spec.containers as Json[]).find((c) => c.name === name)!;
  const proxyConfig = (): Record<string, string> => parseYaml(configMapData('xaps-proxy')['config.yaml']!) as Record<string, string>;

  it('every manifest parses and has apiVersion, kind and metadata.name', () => {
    expect(files).toContain('kustomization.yaml');
    expect(all.length).toBeGreaterThan(5);
    for (const [f, docs] of manifests) {
      for (const m of docs) {
        expect(typeof m.apiVersion, f).toBe('string');
        expect(typeof m.kind, f).toBe('string');
        expect(typeof m.metadata?.name, `${f} ${m.kind}`).toBe('string');
      }
    }
    const kinds = new Set(all.map((m) => m.kind));
    for (const k of ['Deployment', 'Service', 'ConfigMap', 'Secret']) expect(kinds).toContain(k);
  });

  it('kustomization.yaml lists exactly the manifests, and the images the pods use', () => {
    const k = parseYaml(readFileSync(path.join(dir, 'kustomization.yaml'), 'utf8')) as Json;
    expect(k.kind).toBe('Kustomization');
    const resources = k.resources as string[];
    for (const r of resources) expect(existsSync(path.join(dir, r)), r).toBe(true);
    expect([...resources].sort()).toEqual([...manifests.keys()].sort());
    const images = new Set((k.images as Json[]).map((i) => i.name as string));
    for (const c of mail().spec.template.spec.containers as Json[]) {
      expect(images, c.name).toContain(String(c.image).split(':')[0]);
    }
  });

  it('volumes, ConfigMaps, Secrets and their keys referenced by the pods exist; Services select pods', () => {
    const deployments = all.filter((m) => m.kind === 'Deployment');
    for (const dep of deployments) {
      const spec = dep.spec.template.spec as Json;
      for (const [k, v] of Object.entries(dep.spec.selector.matchLabels as Record<string, string>)) {
        expect(dep.spec.template.metadata.labels[k], `${dep.metadata.name} label ${k}`).toBe(v);
      }
      const volumes = new Map((spec.volumes as Json[]).map((v) => [v.name as string, v]));
      for (const c of spec.containers as Json[]) {
        for (const m of (c.volumeMounts ?? []) as Json[]) expect(volumes.has(m.name), `${c.name} mount ${m.name}`).toBe(true);
      }
      const checkSource = (src: Json, where: string): void => {
        if (src.configMap) {
          const data = configMapData(src.configMap.name);
          for (const item of (src.configMap.items ?? []) as Json[]) expect(Object.keys(data), where).toContain(item.key);
        }
        const secret = src.secret && (src.secret.secretName ?? src.secret.name);
        if (secret) {
          const keys = secretKeys(secret);
          for (const item of (src.secret.items ?? []) as Json[]) expect(keys, where).toContain(item.key);
        }
        if (src.persistentVolumeClaim) find('PersistentVolumeClaim', src.persistentVolumeClaim.claimName);
      };
      for (const v of volumes.values()) {
        checkSource(v, `${dep.metadata.name} volume ${v.name}`);
        for (const s of (v.projected?.sources ?? []) as Json[]) checkSource(s, `${dep.metadata.name} volume ${v.name}`);
      }
    }
    for (const svc of all.filter((m) => m.kind === 'Service')) {
      const sel = svc.spec.selector as Record<string, string>;
      const target = deployments.find((d) => Object.entries(sel).every(([k, v]) => d.spec.template.metadata.labels[k] === v));
      expect(target, `Service ${svc.metadata.name}`).toBeDefined();
      const portNames = new Set((target!.spec.template.spec.containers as Json[]).flatMap((c) => ((c.ports ?? []) as Json[]).map((p) => p.name)));
      for (const p of svc.spec.ports as Json[]) {
        if (typeof p.targetPort === 'string') expect(portNames, `Service ${svc.metadata.name}`).toContain(p.targetPort);
      }
    }
  });

  it('the proxy container: probes on /readyz and /healthz, strict securityContext, metrics scraped', () => {
    const pod = mail().spec.template;
    const proxy = container('xaps-proxy');
    const metricsPort = (proxy.ports as Json[]).find((p) => p.name === 'metrics')!.containerPort;
    expect(proxyConfig()['metrics-listen']).toBe(`0.0.0.0:${metricsPort}`);
    expect(proxy.readinessProbe.httpGet.path).toBe('/readyz');
    expect(proxy.livenessProbe.httpGet.path).toBe('/healthz');
    expect(pod.metadata.annotations).toMatchObject({ 'prometheus.io/scrape': 'true', 'prometheus.io/port': String(metricsPort) });
    const sc = proxy.securityContext as Json;
    expect(sc).toMatchObject({ runAsNonRoot: true, readOnlyRootFilesystem: true, allowPrivilegeEscalation: false });
    expect(sc.capabilities).toEqual({ drop: ['ALL'], add: ['NET_BIND_SERVICE'] });
    expect(proxy.resources?.requests && proxy.resources?.limits).toBeTruthy();
    // the image's uid, and ports below 1024 for it
    expect(sc.runAsUser).toBe(10001);
    expect(read('deploy/docker/Dockerfile')).toMatch(/^USER 10001:10001$/m);
    expect(pod.spec.securityContext.sysctls).toContainEqual({ name: 'net.ipv4.ip_unprivileged_port_start', value: '0' });
    expect((proxy.ports as Json[]).map((p) => p.containerPort)).toEqual(expect.arrayContaining([143, 993]));
  });

  it('stops slower than the drain: grace period > preStop of Dovecot >= drain-timeout', () => {
    const drain = seconds(proxyConfig()['drain-timeout'] ?? getOption('drain-timeout')!.default!);
    const grace = mail().spec.template.spec.terminationGracePeriodSeconds as number;
    const preStop = container('dovecot').lifecycle.preStop.exec.command as string[];
    expect(preStop[0]).toBe('sleep');
    const hold = Number(preStop[1]);
    expect(hold).toBeGreaterThanOrEqual(drain);
    expect(grace).toBeGreaterThan(hold);
  });

  it("the ConfigMap's config.yaml is a valid configuration, and its files are where the Secrets are mounted", async () => {
    const text = configMapData('xaps-proxy')['config.yaml']!;
    const config = await loadWithStubs({ yaml: text });
    expect(configWarnings(config)).toEqual([]);
    const proxy = container('xaps-proxy');
    const spec = mail().spec.template.spec as Json;
    // --config points into the ConfigMap mount
    const args = proxy.args as string[];
    const cfgPath = args[args.indexOf('--config') + 1]!;
    const mountFor = (file: string): Json => {
      const m = (proxy.volumeMounts as Json[]).find((v) => path.dirname(file) === v.mountPath);
      if (!m) throw new Error(`${file} is not in a mounted directory of the xaps-proxy container`);
      return (spec.volumes as Json[]).find((v) => v.name === m.name)!;
    };
    const hasKey = (volume: Json, key: string): boolean => {
      if (volume.configMap) return key in configMapData(volume.configMap.name);
      const items = (volume.secret.items ?? []) as Json[];
      return items.length ? items.some((i) => i.path === key) : secretKeys(volume.secret.secretName).includes(key);
    };
    expect(hasKey(mountFor(cfgPath), path.basename(cfgPath))).toBe(true);
    const doc = parseYaml(text) as Record<string, string>;
    for (const [k, v] of Object.entries(doc)) {
      const kind = getOption(k)?.type.kind;
      if (kind === 'file' || kind === 'secret-file') expect(hasKey(mountFor(v), path.basename(v)), `${k}: ${v}`).toBe(true);
    }
  });

  it("the pod's Dovecot: snippets are deploy/dovecot's, dovecot.conf passes doveconf", async () => {
    const data = configMapData('dovecot');
    for (const f of ['10-xaps-sidecar.conf', '20-xaps-master-user.conf']) {
      expect(data[f], f).toBe(read(`deploy/dovecot/${f}`));
    }
    const etc = await tempDir('xaps-deploy-pod-');
    await fs.mkdir(path.join(etc, 'conf.d'));
    const projected = (mail().spec.template.spec.volumes as Json[]).find((v) => v.name === 'dovecot-etc')!;
    for (const src of projected.projected.sources as Json[]) {
      for (const item of (src.configMap?.items ?? []) as Json[]) {
        await fs.writeFile(path.join(etc, item.path), data[item.key]!);
      }
    }
    const doveconf = findBinary('doveconf', ['/usr/bin/doveconf'])!;
    const { stdout, stderr } = await runCommand(doveconf, ['-n', '-c', path.join(etc, 'dovecot.conf')]);
    expect(stderr).toBe('');
    expect(stdout).toMatch(/inet_listener imap \{\n\s+address = 127\.0\.0\.1\n\s+port = 10143\n/);
    expect(stdout).toContain('master = yes');
    expect(proxyConfig().upstream).toBe('127.0.0.1:10143');
  });
});

// -------------------------------------------------------------- Prometheus and Grafana ---

describe('deploy/prometheus and deploy/grafana use the metric names of the code', () => {
  let known: KnownMetrics;
  beforeAll(async () => {
    known = await knownMetrics();
  });

  it('finds the metric names in the source (sanity)', () => {
    for (const n of ['xaps_pushes_total', 'xaps_push_latency_seconds_bucket', 'xaps_process_cpu_seconds_total', 'xaps_nodejs_eventloop_lag_seconds']) {
      expect(known.names, n).toContain(n);
    }
  });

  it('alerts.yaml: rule groups with alert, expr, severity; known metrics only; every required alert', () => {
    const rules = parseYaml(read('deploy/prometheus/alerts.yaml')) as Json;
    expect(Array.isArray(rules.groups)).toBe(true);
    const groupNames = (rules.groups as Json[]).map((g) => g.name);
    expect(new Set(groupNames).size).toBe(groupNames.length);
    const all = (rules.groups as Json[]).flatMap((g) => g.rules as Json[]);
    const alerts = all.map((r) => r.alert as string);
    expect(new Set(alerts).size).toBe(alerts.length);
    for (const r of all) {
      expect(typeof r.alert, JSON.stringify(r)).toBe('string');
      expect(typeof r.expr, r.alert).toBe('string');
      expect(['warning', 'critical'], r.alert).toContain(r.labels?.severity);
      expect(typeof r.annotations?.summary, r.alert).toBe('string');
    }
    const used = all.flatMap((r) => metricNames(r.expr));
    expect(known.missing(used)).toEqual([]);
    const exprs = all.map((r) => r.expr as string).join('\n');
    for (const needed of [
      'xaps_apns_certificate_seconds_left',
      'xaps_pushes_total',
      'xaps_apns_alarm',
      'xaps_ready{check="upstream"}',
      'xaps_upstream_connect_failures_total',
      'xaps_watchers_capped',
      'xaps_store_errors_total',
      'xaps_push_queue_dropped_total',
    ]) {
      expect(exprs, needed).toContain(needed);
    }
    expect(exprs).toMatch(/\bup\{[^}]*\} == 0/);
    // certificate: a warning under 30 days and a critical one under 7
    expect(exprs).toContain('< 30 * 86400');
    expect(exprs).toContain('< 7 * 86400');
  });

  it('xaps-proxy.json: a Grafana dashboard on a Prometheus data source variable, known metrics only', () => {
    const dash = JSON.parse(read('deploy/grafana/xaps-proxy.json')) as Json;
    expect(dash.schemaVersion).toBeGreaterThanOrEqual(36);
    expect(typeof dash.uid).toBe('string');
    const vars = dash.templating.list as Json[];
    const ds = vars.find((v) => v.type === 'datasource');
    expect(ds).toMatchObject({ query: 'prometheus' });
    const panels = dash.panels as Json[];
    const ids = panels.map((p) => p.id);
    expect(new Set(ids).size).toBe(ids.length);
    const exprs: string[] = vars.filter((v) => v.type === 'query').map((v) => String(v.query?.query ?? v.query));
    for (const p of panels) {
      expect(p.gridPos.x + p.gridPos.w, p.title).toBeLessThanOrEqual(24);
      if (p.type === 'row') continue;
      expect(p.datasource?.uid, p.title).toBe(`\${${ds!.name}}`);
      expect((p.targets as Json[]).length, p.title).toBeGreaterThan(0);
      for (const t of p.targets as Json[]) exprs.push(t.expr);
    }
    expect(known.missing(exprs.flatMap(metricNames))).toEqual([]);
    const text = exprs.join('\n');
    for (const m of [
      'xaps_client_connections{',
      'xaps_client_connections_total',
      'xaps_upstream_connect_failures_total',
      'xaps_imap_commands_total',
      'xaps_push_registrations_total',
      'xaps_registrations{',
      'xaps_watchers{',
      'xaps_watcher_reconnects_total',
      'xaps_watch_changes_total',
      'xaps_pushes_total',
      'xaps_apns_responses_total',
      'xaps_push_latency_seconds_bucket',
      'xaps_apns_request_duration_seconds_bucket',
      'xaps_push_queue_depth',
      'xaps_push_queue_dropped_total',
      'xaps_apns_certificate_seconds_left',
      'xaps_store_errors_total',
      'xaps_lease_handovers_total',
      'xaps_process_cpu_seconds_total',
      'xaps_process_resident_memory_bytes',
      'xaps_nodejs_eventloop_lag',
    ]) {
      expect(text, m).toContain(m);
    }
  });
});

// --------------------------------------------------------------------- Docker and compose ---

/** .dockerignore semantics (enough for this file): last matching pattern wins, "!" re-includes. */
function dockerIgnored(rel: string): boolean {
  const patterns = read('.dockerignore')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'));
  const toRegex = (p: string): RegExp => {
    const body = p
      .replace(/\/$/, '')
      .split(/(\*\*\/|\*\*|\*|\?)/)
      .map((part) =>
        part === '**/' ? '(?:.*/)?' : part === '**' ? '.*' : part === '*' ? '[^/]*' : part === '?' ? '[^/]' : part.replace(/[.+^${}()|[\]\\]/g, '\\$&'),
      )
      .join('');
    return new RegExp(`^${body}$`);
  };
  // a path is matched when it or one of its parent directories is
  const candidates = rel.split('/').map((_, i, parts) => parts.slice(0, i + 1).join('/'));
  let ignored = false;
  for (const raw of patterns) {
    const negate = raw.startsWith('!');
    const re = toRegex(negate ? raw.slice(1) : raw);
    if (candidates.some((c) => re.test(c))) ignored = !negate;
  }
  return ignored;
}

function dockerInstructions(file: string): Array<{ op: string; args: string }> {
  const joined = read(file).replace(/\\\n/g, ' ');
  return joined
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'))
    .map((l) => {
      const m = /^(\w+)\s+(.*)$/.exec(l)!;
      return { op: m[1]!.toUpperCase(), args: m[2]! };
    });
}

describe('deploy/docker and docker-compose.yml', () => {
  it('Dockerfiles: COPY sources exist and are in the build context (.dockerignore)', () => {
    for (const file of ['deploy/docker/Dockerfile', 'deploy/docker/dovecot.Dockerfile']) {
      const copies = dockerInstructions(file).filter((i) => i.op === 'COPY' && !/--from=/.test(i.args));
      expect(copies.length, file).toBeGreaterThan(0);
      for (const c of copies) {
        const parts = c.args.split(/\s+/).filter((p) => !p.startsWith('--'));
        for (const src of parts.slice(0, -1)) {
          const rel = src.replace(/\/$/, '');
          expect(existsSync(path.join(ROOT, rel)), `${file}: COPY ${src}`).toBe(true);
          expect(dockerIgnored(rel), `${file}: COPY ${src} is excluded by .dockerignore`).toBe(false);
        }
      }
    }
    // what the running proxy reads from deploy/ and package.json survives; trial secrets stay out
    for (const rel of ['deploy/dovecot/xaps-push.lua', 'deploy/docker/healthcheck.mjs', 'src/cli/main.ts', 'package-lock.json']) {
      expect(dockerIgnored(rel), rel).toBe(false);
    }
    for (const rel of ['node_modules/yaml/package.json', 'dist/cli/main.js', 'test/integration/deploy.test.ts', '.git/HEAD', 'deploy/docker/trial/master-password']) {
      expect(dockerIgnored(rel), rel).toBe(true);
    }
  });

  it('the proxy image: multi-stage build, production dependencies, non-root, health check, entry point', () => {
    const ins = dockerInstructions('deploy/docker/Dockerfile');
    const froms = ins.filter((i) => i.op === 'FROM').map((i) => i.args);
    expect(froms).toEqual(['${NODE_IMAGE} AS build', '${NODE_IMAGE} AS runtime']);
    expect(ins.find((i) => i.op === 'ARG')!.args).toMatch(/^NODE_IMAGE=node:20-(bookworm-)?slim$/);
    const runtime = ins.slice(ins.findIndex((i) => i.args.endsWith('AS runtime')));
    const runs = runtime.filter((i) => i.op === 'RUN').map((i) => i.args).join('\n');
    expect(runs).toContain('npm ci --omit=dev');
    expect(ins.filter((i) => i.op === 'RUN').map((i) => i.args).join('\n')).toContain('npm run build');
    expect(runtime.find((i) => i.op === 'USER')!.args).not.toMatch(/^(0|root)\b/);
    expect(runtime.find((i) => i.op === 'HEALTHCHECK')!.args).toContain('deploy/docker/healthcheck.mjs');
    expect(runtime.find((i) => i.op === 'ENTRYPOINT')!.args).toBe('["node", "dist/cli/main.js"]');
    expect(runtime.find((i) => i.op === 'CMD')!.args).toBe('["serve"]');
    expect(runtime.find((i) => i.op === 'EXPOSE')!.args.split(/\s+/)).toEqual(expect.arrayContaining(['143', '993', '9925']));
    expect(JSON.parse(read('package.json')).bin['xaps-proxy']).toBe('dist/cli/main.js');
  });

  it('the health check script answers for /healthz', async () => {
    let status = 200;
    const paths: string[] = [];
    const server = http.createServer((req, res) => {
      paths.push(req.url ?? '');
      res.writeHead(status).end();
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    cleanups.push(() => new Promise((r) => server.close(r)));
    const port = (server.address() as net.AddressInfo).port;
    const run = (listen: string): Promise<number> =>
      runCommand(process.execPath, [path.join(DEPLOY, 'docker/healthcheck.mjs')], {
        env: { ...process.env, XAPS_METRICS_LISTEN: listen },
        timeoutMs: 20_000,
      }).then(
        () => 0,
        () => 1,
      );
    expect(await run(`0.0.0.0:${port}`)).toBe(0);
    expect(await run(`127.0.0.1:${port}`)).toBe(0);
    status = 503;
    expect(await run(`0.0.0.0:${port}`)).toBe(1);
    expect(paths).toEqual(['/healthz', '/healthz', '/healthz']);
  });

  it('docker-compose.yml: files it builds from and mounts exist; Dovecot runs the file the test bed includes', () => {
    const compose = parseYaml(read('docker-compose.yml')) as Json;
    const services = compose.services as Record<string, Json>;
    expect(Object.keys(services).sort()).toEqual(['dovecot', 'redis', 'xaps-proxy']);
    const namedVolumes = new Set(Object.keys(compose.volumes ?? {}));
    const binds = new Map<string, string>(); // container path (per service) → host file
    for (const [name, svc] of Object.entries(services)) {
      if (svc.build) {
        const context = path.resolve(ROOT, svc.build.context);
        expect(existsSync(context), `${name} build context`).toBe(true);
        expect(existsSync(path.resolve(context, svc.build.dockerfile)), `${name} dockerfile`).toBe(true);
      }
      for (const v of (svc.volumes ?? []) as string[]) {
        const [src, dst] = v.split(':');
        if (src!.startsWith('.') || src!.startsWith('/')) {
          const host = path.resolve(ROOT, src!);
          expect(existsSync(host), `${name}: ${v}`).toBe(true);
          binds.set(`${name}:${dst}`, host);
        } else {
          expect(namedVolumes, `${name}: ${v}`).toContain(src);
        }
      }
      for (const dep of Object.keys(svc.depends_on ?? {})) expect(services, `${name} depends_on`).toHaveProperty(dep);
      const shared = /^service:(.+)$/.exec(svc.network_mode ?? '');
      if (shared) expect(services, `${name} network_mode`).toHaveProperty(shared[1]!);
    }
    expect(services['dovecot']!.build.dockerfile).toBe('deploy/docker/dovecot.Dockerfile');
    expect(services['xaps-proxy']!.build.dockerfile).toBe('deploy/docker/Dockerfile');
    // THE file: what the compose Dovecot reads is what every test-bed Dovecot includes
    expect(binds.get('dovecot:/etc/dovecot/dovecot.conf')).toBe(DOVECOT_TRIAL_CONFIG_PATH);
    expect(services['dovecot']!.environment[DOVECOT_TRIAL_DIR_VARIABLE]).toBe('/srv/xaps-trial');
    expect(read('deploy/dovecot/xaps-trial.conf')).toContain(`${DOVECOT_TRIAL_DIR_VARIABLE}=/srv/xaps-trial`);
    for (const f of ['users.passwd', 'master.passwd']) {
      expect(binds.get(`dovecot:/srv/xaps-trial/${f}`), f).toBe(path.join(DEPLOY, 'docker/trial', f));
    }
    // the proxy's upstream is the trial Dovecot's listener, in the shared network namespace
    expect(services['xaps-proxy']!.network_mode).toBe('service:dovecot');
    expect(services['xaps-proxy']!.environment.XAPS_UPSTREAM).toBe('127.0.0.1:10143');
    // the drain fits in the stop grace period
    expect(seconds(services['xaps-proxy']!.stop_grace_period)).toBeGreaterThan(seconds(services['xaps-proxy']!.environment.XAPS_DRAIN_TIMEOUT));
  });

  it("docker-compose.yml: the proxy's XAPS_* environment is a valid configuration, without warnings", async () => {
    const compose = parseYaml(read('docker-compose.yml')) as Json;
    const env = compose.services['xaps-proxy'].environment as Record<string, string>;
    const config = await loadWithStubs({ env });
    // the placeholder topic: registrations are answered and stored, pushes are not sent
    expect(configWarnings(config)).toEqual([]);
    expect(config.redisUrl).toBeDefined();
    // the master password the proxy reads is the one in Dovecot's master passdb
    const pw = read('deploy/docker/trial/master-password').split('\n')[0];
    expect(read('deploy/docker/trial/master.passwd')).toContain(`${env.XAPS_MASTER_USER}:{PLAIN}${pw}:`);
  });
});

// ------------------------------------------------------------------------------ README ---

describe('deploy/README.md', () => {
  it('names every file under deploy/, docker-compose.yml and .dockerignore', () => {
    const readme = read('deploy/README.md');
    const missing = walk(DEPLOY)
      .filter((f) => f !== 'README.md')
      .filter((f) => !readme.includes(f));
    expect(missing).toEqual([]);
    expect(readme).toContain('docker-compose.yml');
    expect(readme).toContain('.dockerignore');
    // the honest certificate note
    expect(readme).toMatch(/2024-10-29/);
    expect(readme).toContain('docs/certificates.md');
  });
});
