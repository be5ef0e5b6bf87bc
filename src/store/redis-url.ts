/**
 * `--redis-url` parsing. Accepted forms (user and password percent-encoded when they contain `:`, `@`, `/`, `%`,
 * `?` or `,`; the username may be omitted: `redis://:pass@host`):
 *
 *   redis://[user:pass@]host[:port][/db]                          one server (port 6379, db 0 by default)
 *   rediss://[user:pass@]host[:port][/db]                         the same over TLS
 *   redis+sentinel://[user:pass@]h1[:26379],h2[:26379]/<masterName>[?db=N]
 *                                                                 Sentinel; user:pass authenticate to the master and
 *                                                                 replicas; sentinels themselves take
 *                                                                 ?sentinelUsername=…&sentinelPassword=… if they need auth
 *   rediss+sentinel://…                                           Sentinel, TLS to the sentinels and the master
 *   redis+cluster://[user:pass@]h1[:6379],h2[:6379],…             Redis Cluster seed nodes (db is always 0)
 *   rediss+cluster://…                                            Cluster over TLS
 *
 * IPv6 hosts go in brackets: `redis://[::1]:6379`. Parse errors throw an Error naming `--redis-url` and the problem;
 * the password is never echoed (see `redactRedisUrl`).
 */

export interface RedisHostPort { host: string; port: number }

interface Common {
  tls: boolean;
  username?: string;
  password?: string;
}
export type RedisTarget =
  | (Common & { mode: 'standalone'; host: string; port: number; db: number })
  | (Common & {
      mode: 'sentinel';
      sentinels: RedisHostPort[];
      masterName: string;
      db: number;
      sentinelUsername?: string;
      sentinelPassword?: string;
    })
  | (Common & { mode: 'cluster'; nodes: RedisHostPort[] });

const SCHEMES: Record<string, { mode: RedisTarget['mode']; tls: boolean; port: number }> = {
  'redis': { mode: 'standalone', tls: false, port: 6379 },
  'rediss': { mode: 'standalone', tls: true, port: 6379 },
  'redis+sentinel': { mode: 'sentinel', tls: false, port: 26379 },
  'rediss+sentinel': { mode: 'sentinel', tls: true, port: 26379 },
  'redis+cluster': { mode: 'cluster', tls: false, port: 6379 },
  'rediss+cluster': { mode: 'cluster', tls: true, port: 6379 },
};

/** The URL with its password (and any `*pass*` query value) replaced by `***`; safe to log. */
export function redactRedisUrl(url: string): string {
  if (typeof url !== 'string') return '';
  const schemeEnd = url.indexOf('://');
  const start = schemeEnd >= 0 ? schemeEnd + 3 : 0;
  let out = url;
  const at = url.lastIndexOf('@');
  if (at >= start) {
    const userinfo = url.slice(start, at);
    const colon = userinfo.indexOf(':');
    if (colon >= 0) out = `${url.slice(0, start)}${userinfo.slice(0, colon)}:***${url.slice(at)}`;
  }
  const q = out.indexOf('?', at >= 0 ? out.lastIndexOf('@') : 0);
  if (q >= 0) {
    const query = out
      .slice(q + 1)
      .split('&')
      .map((kv) => {
        const eq = kv.indexOf('=');
        return eq >= 0 && /pass|secret|token/i.test(kv.slice(0, eq)) ? `${kv.slice(0, eq)}=***` : kv;
      })
      .join('&');
    out = `${out.slice(0, q)}?${query}`;
  }
  return out;
}

function fail(url: string, problem: string): never {
  throw new Error(`invalid --redis-url ${JSON.stringify(redactRedisUrl(url))}: ${problem}`);
}

function decode(url: string, s: string, what: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    return fail(url, `${what} has a bad percent-encoding`);
  }
}

function parseHostPort(url: string, s: string, defaultPort: number): RedisHostPort {
  let host: string;
  let portStr: string | undefined;
  if (s.startsWith('[')) {
    const close = s.indexOf(']');
    if (close < 0) fail(url, `unterminated IPv6 address in "${s}"`);
    host = s.slice(1, close);
    const rest = s.slice(close + 1);
    if (rest !== '') {
      if (!rest.startsWith(':')) fail(url, `unexpected "${rest}" after IPv6 address`);
      portStr = rest.slice(1);
    }
  } else {
    const colon = s.lastIndexOf(':');
    if (colon >= 0) {
      if (s.indexOf(':') !== colon) fail(url, `IPv6 addresses must be in brackets ("[${s}]")`);
      host = s.slice(0, colon);
      portStr = s.slice(colon + 1);
    } else {
      host = s;
    }
  }
  if (host === '') fail(url, 'missing host');
  if (/[\s/?#@]/.test(host)) fail(url, `bad host "${host}"`);
  let port = defaultPort;
  if (portStr !== undefined) {
    if (!/^\d{1,5}$/.test(portStr) || Number(portStr) < 1 || Number(portStr) > 65535) {
      fail(url, `port "${portStr}" is not a number from 1 to 65535`);
    }
    port = Number(portStr);
  }
  return { host, port };
}

function parseDb(url: string, s: string): number {
  if (!/^\d{1,5}$/.test(s)) fail(url, `database "${s}" is not a non-negative integer`);
  return Number(s);
}

export function parseRedisUrl(url: string): RedisTarget {
  if (typeof url !== 'string' || url.trim() === '') fail(String(url ?? ''), 'empty');
  const schemeEnd = url.indexOf('://');
  if (schemeEnd < 0) fail(url, 'expected a scheme such as redis://, rediss://, redis+sentinel:// or redis+cluster://');
  const scheme = url.slice(0, schemeEnd).toLowerCase();
  const spec = SCHEMES[scheme];
  if (!spec) {
    fail(url, `unknown scheme "${scheme}://" (use redis, rediss, redis+sentinel, rediss+sentinel, redis+cluster or rediss+cluster)`);
  }
  let rest = url.slice(schemeEnd + 3);
  if (rest.includes('#')) fail(url, 'fragments (#…) are not allowed; percent-encode "#" in passwords as %23');

  // Userinfo: everything up to the LAST '@', so an unencoded '@' or '/' in a password still works.
  let username: string | undefined;
  let password: string | undefined;
  const at = rest.lastIndexOf('@');
  if (at >= 0) {
    const userinfo = rest.slice(0, at);
    rest = rest.slice(at + 1);
    const colon = userinfo.indexOf(':');
    const u = colon >= 0 ? userinfo.slice(0, colon) : userinfo;
    const p = colon >= 0 ? userinfo.slice(colon + 1) : undefined;
    if (u !== '') username = decode(url, u, 'username');
    if (p !== undefined && p !== '') password = decode(url, p, 'password');
    if (username !== undefined && password === undefined) {
      fail(url, 'a username needs a password (redis://user:password@host; a password alone: redis://:password@host)');
    }
  }

  let query = '';
  const q = rest.indexOf('?');
  if (q >= 0) {
    query = rest.slice(q + 1);
    rest = rest.slice(0, q);
  }
  let path = '';
  const slash = rest.indexOf('/');
  if (slash >= 0) {
    path = rest.slice(slash + 1);
    rest = rest.slice(0, slash);
  }
  if (rest === '') fail(url, 'missing host');
  const hostStrs = rest.split(',');
  if (hostStrs.some((h) => h === '')) fail(url, 'empty host in the host list');
  const hosts = hostStrs.map((h) => parseHostPort(url, h, spec.port));

  const params = new Map<string, string>();
  if (query !== '') {
    for (const kv of query.split('&')) {
      if (kv === '') continue;
      const eq = kv.indexOf('=');
      const k = eq >= 0 ? kv.slice(0, eq) : kv;
      const v = eq >= 0 ? kv.slice(eq + 1) : '';
      if (params.has(k)) fail(url, `query parameter "${k}" given twice`);
      params.set(k, decode(url, v, `query parameter "${k}"`));
    }
  }
  const allowed = spec.mode === 'sentinel' ? ['db', 'sentinelUsername', 'sentinelPassword'] : spec.mode === 'standalone' ? ['db'] : [];
  for (const k of params.keys()) {
    if (!allowed.includes(k)) {
      fail(url, allowed.length
        ? `unknown query parameter "${k}" (allowed: ${allowed.join(', ')})`
        : `query parameters are not supported for ${scheme}://`);
    }
  }
  const common: Common = { tls: spec.tls };
  if (username !== undefined) common.username = username;
  if (password !== undefined) common.password = password;

  switch (spec.mode) {
    case 'standalone': {
      if (hosts.length !== 1) fail(url, `${scheme}:// takes one host; use redis+sentinel:// or redis+cluster:// for several`);
      const h = hosts[0] as RedisHostPort;
      const pathDb = path.replace(/\/+$/, '');
      if (pathDb !== '' && params.has('db')) fail(url, 'database given both in the path and as ?db=');
      const db = pathDb !== '' ? parseDb(url, pathDb) : params.has('db') ? parseDb(url, params.get('db') as string) : 0;
      return { ...common, mode: 'standalone', host: h.host, port: h.port, db };
    }
    case 'sentinel': {
      const masterName = decode(url, path.replace(/\/+$/, ''), 'master name');
      if (masterName === '') fail(url, 'missing master name: redis+sentinel://host1:26379,host2:26379/<masterName>');
      if (masterName.includes('/')) fail(url, `bad master name "${masterName}"`);
      const db = params.has('db') ? parseDb(url, params.get('db') as string) : 0;
      const t: RedisTarget = { ...common, mode: 'sentinel', sentinels: hosts, masterName, db };
      if (params.has('sentinelUsername')) t.sentinelUsername = params.get('sentinelUsername') as string;
      if (params.has('sentinelPassword')) t.sentinelPassword = params.get('sentinelPassword') as string;
      return t;
    }
    case 'cluster': {
      if (path.replace(/\/+$/, '') !== '') fail(url, 'Redis Cluster has only database 0; remove the path');
      return { ...common, mode: 'cluster', nodes: hosts };
    }
  }
}
