// Container health check: GET /healthz on xaps-proxy's operations listener; exit 0 when it
// answers 200. The address is XAPS_METRICS_LISTEN (as the proxy reads it) or the default
// 127.0.0.1:9925; a wildcard host (0.0.0.0, [::]) is reached through loopback.
// Set XAPS_METRICS_LISTEN when metrics-listen is changed in a config file only.
const listen = (process.env.XAPS_METRICS_LISTEN || '127.0.0.1:9925').trim();
const match = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(listen);
if (!match) {
  console.error(`healthcheck: cannot parse XAPS_METRICS_LISTEN=${listen}`);
  process.exit(1);
}
let host = match[1] ?? match[2];
if (host === '' || host === '0.0.0.0') host = '127.0.0.1';
else if (host === '::') host = '::1';
const url = `http://${host.includes(':') ? `[${host}]` : host}:${match[3]}/healthz`;
try {
  const res = await fetch(url, { signal: AbortSignal.timeout(4000) });
  process.exit(res.status === 200 ? 0 : 1);
} catch (err) {
  console.error(`healthcheck: ${url}: ${err?.cause?.code ?? err?.message ?? err}`);
  process.exit(1);
}
