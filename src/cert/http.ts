/**
 * One HTTP/1.1 POST with a tolerant response parser, for Apple's PushCertRequest service.
 *
 * Why not node:https / undici: Apple's certificate service answered with malformed
 * response headers, which Node's strict parser (llhttp) rejects with
 * HPE_INVALID_HEADER_TOKEN (Forward Email switched to libcurl for it; Go ≥ 1.20 rejected
 * them too, and xapsd then looped, flooding accounts with certificates and getting its IP
 * blocked: freswa/dovecot-xaps-daemon#41, #25). The usual remedy, node:https with
 * `insecureHTTPParser: true`, only goes so far: measured on Node 20.20, it accepts control
 * characters in header values but still rejects malformed header names (a space in the
 * name, a line without a colon), and Forward Email reports it did not help them on
 * Node ≥ 18. Retrying with another client is no option either: every request may issue
 * certificates. So this module sends the request once over node:net / node:tls (TLS
 * verification as usual) and parses the answer itself, skipping header lines it cannot
 * read instead of failing.
 */
import { connect as netConnect, isIP, type Socket } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { CertificateError } from './errors.js';

export interface PostOptions {
  headers?: Record<string, string>;
  /** PEM CA(s) to trust for an https URL (default: the system trust store). */
  ca?: string;
  /** Give up after this long without the whole answer (default 60 s). */
  timeoutMs?: number;
  /** Largest accepted response body (default 10 MiB). */
  maxBytes?: number;
}

export interface HttpAnswer {
  status: number;
  /** Lower-case names; header lines that could not be parsed are skipped. */
  headers: Record<string, string>;
  body: Buffer;
}

const CRLFCRLF = Buffer.from('\r\n\r\n');
const LFLF = Buffer.from('\n\n');

/** Parse whatever has arrived; `complete` when the body is known to be whole. */
export function parseHttpResponse(raw: Buffer, eof: boolean): { answer?: HttpAnswer; complete: boolean; error?: string } {
  let start = 0;
  for (;;) {
    let end = raw.indexOf(CRLFCRLF, start);
    let sep = 4;
    const lf = raw.indexOf(LFLF, start);
    if (lf >= 0 && (end < 0 || lf < end)) {
      end = lf;
      sep = 2;
    }
    if (end < 0) return eof ? { complete: false, error: 'the connection closed before the response headers ended' } : { complete: false };
    const lines = raw.subarray(start, end).toString('latin1').split(/\r?\n/);
    const m = /^HTTP\/\d(?:\.\d)?\s+(\d{3})/.exec(lines[0] ?? '');
    if (!m) return { complete: false, error: `not an HTTP response (${JSON.stringify((lines[0] ?? '').slice(0, 40))})` };
    const status = Number(m[1]);
    const headers: Record<string, string> = {};
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(':');
      if (colon <= 0) continue; // malformed: skip
      const name = line.slice(0, colon).trim().toLowerCase();
      if (!name) continue;
      const value = line.slice(colon + 1).trim();
      headers[name] = name in headers ? `${headers[name]}, ${value}` : value;
    }
    const bodyStart = end + sep;
    if (status >= 100 && status < 200) {
      start = bodyStart; // interim answer (100 Continue): the real one follows
      continue;
    }
    const rest = raw.subarray(bodyStart);
    if (/\bchunked\b/i.test(headers['transfer-encoding'] ?? '')) {
      const chunks: Buffer[] = [];
      let i = 0;
      for (;;) {
        const nl = rest.indexOf('\n', i);
        if (nl < 0) break;
        const size = parseInt(rest.subarray(i, nl).toString('latin1').trim().split(';')[0] ?? '', 16);
        if (!Number.isFinite(size)) return { complete: false, error: 'malformed chunked body' };
        if (size === 0) return { answer: { status, headers, body: Buffer.concat(chunks) }, complete: true };
        const dataStart = nl + 1;
        if (rest.length < dataStart + size) break;
        chunks.push(rest.subarray(dataStart, dataStart + size));
        i = dataStart + size;
        if (rest[i] === 0x0d) i++;
        if (rest[i] === 0x0a) i++;
      }
      return eof ? { answer: { status, headers, body: Buffer.concat(chunks) }, complete: true } : { complete: false };
    }
    const lengthText = headers['content-length'];
    if (lengthText !== undefined && /^\d+$/.test(lengthText.split(',')[0]!.trim())) {
      const length = Number(lengthText.split(',')[0]!.trim());
      if (rest.length >= length) return { answer: { status, headers, body: rest.subarray(0, length) }, complete: true };
      return eof ? { complete: false, error: `the connection closed after ${rest.length} of ${length} body bytes` } : { complete: false };
    }
    return eof ? { answer: { status, headers, body: rest }, complete: true } : { complete: false };
  }
}

/** POST `body` to `url` once and return the answer (any status). Network problems: CertificateError 'service'. */
export function postOnce(url: string, body: string | Buffer, opts: PostOptions = {}): Promise<HttpAnswer> {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    return Promise.reject(new CertificateError(`invalid certificate service URL ${JSON.stringify(url)}`, { code: 'bad-input' }));
  }
  if (u.protocol !== 'https:' && u.protocol !== 'http:') {
    return Promise.reject(new CertificateError(`certificate service URL must be http(s): ${url}`, { code: 'bad-input' }));
  }
  const https = u.protocol === 'https:';
  const host = u.hostname.replace(/^\[(.*)\]$/, '$1');
  const port = Number(u.port || (https ? 443 : 80));
  const payload = typeof body === 'string' ? Buffer.from(body, 'utf8') : body;
  const headerLines = [
    `POST ${u.pathname}${u.search} HTTP/1.1`,
    `Host: ${u.host}`,
    ...Object.entries(opts.headers ?? {}).map(([k, v]) => `${k}: ${v}`),
    `Content-Length: ${payload.length}`,
    'Connection: close',
  ];
  const request = Buffer.concat([Buffer.from(`${headerLines.join('\r\n')}\r\n\r\n`, 'latin1'), payload]);
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const maxBytes = opts.maxBytes ?? 10 * 1024 * 1024;

  return new Promise<HttpAnswer>((resolvePromise, rejectPromise) => {
    let settled = false;
    const received: Buffer[] = [];
    let size = 0;
    const socket: Socket = https
      ? tlsConnect({ host, port, ...(isIP(host) ? {} : { servername: host }), ...(opts.ca ? { ca: opts.ca } : {}) })
      : netConnect({ host, port });
    const fail = (message: string, cause?: unknown) => {
      if (settled) return;
      settled = true;
      socket.destroy();
      rejectPromise(new CertificateError(`certificate service ${u.origin}: ${message}`, { code: 'service', cause }));
    };
    const done = (answer: HttpAnswer) => {
      if (settled) return;
      settled = true;
      socket.destroy();
      resolvePromise(answer);
    };
    const check = (eof: boolean) => {
      const r = parseHttpResponse(Buffer.concat(received), eof);
      if (r.error) fail(r.error);
      else if (r.answer && r.complete) done(r.answer);
      else if (eof) fail('incomplete response');
    };
    socket.setTimeout(timeoutMs, () => fail(`no complete answer within ${Math.round(timeoutMs / 1000)} s`));
    socket.once(https ? 'secureConnect' : 'connect', () => socket.write(request));
    socket.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > maxBytes) return fail(`response larger than ${maxBytes} bytes`);
      received.push(chunk);
      check(false);
    });
    socket.on('end', () => check(true));
    socket.on('close', () => check(true));
    socket.on('error', (err) => fail((err as Error).message, err));
  });
}
