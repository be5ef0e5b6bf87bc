/** Helpers for the events listener tests: plain HTTP requests and a raw socket to script byte by byte. */
import http from 'node:http';
import net from 'node:net';
import { EventsListener, type EventsListenerOptions } from '../../../src/watch/events.js';
import type { MailboxChange } from '../../../src/watch/types.js';

export interface Started {
  listener: EventsListener;
  port: number;
  changes: MailboxChange[];
}

export async function startListener(opts: Partial<EventsListenerOptions> = {}): Promise<Started> {
  const changes: MailboxChange[] = [];
  const listener = new EventsListener({
    listen: { host: '127.0.0.1', port: 0 },
    onChange: (c) => changes.push(c),
    ...opts,
  });
  const { port } = await listener.start();
  return { listener, port, changes };
}

export interface Reply {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
  json: Record<string, unknown> | undefined;
}

export function request(
  port: number,
  opts: { method?: string; path?: string; headers?: Record<string, string>; body?: string | Buffer; agent?: http.Agent | false },
): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const body = opts.body === undefined ? undefined : Buffer.isBuffer(opts.body) ? opts.body : Buffer.from(opts.body, 'utf8');
    const expectContinue = Object.entries(opts.headers ?? {}).some(([k, v]) => k.toLowerCase() === 'expect' && /100-continue/i.test(v));
    const req = http.request(
      {
        host: '127.0.0.1',
        port,
        method: opts.method ?? 'POST',
        path: opts.path ?? '/events',
        headers: { ...(body !== undefined ? { 'Content-Length': String(body.length) } : {}), ...(opts.headers ?? {}) },
        agent: opts.agent ?? false,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let json: Record<string, unknown> | undefined;
          try {
            json = JSON.parse(text) as Record<string, unknown>;
          } catch {
            json = undefined;
          }
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text, json });
        });
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    if (expectContinue) {
      req.on('continue', () => req.end(body));
    } else {
      req.end(body);
    }
  });
}

/** A raw TCP client: write bytes, read everything the server sends. */
export class RawHttp {
  data = '';
  closed = false;
  private waiters: Array<() => void> = [];
  private constructor(readonly socket: net.Socket) {
    socket.setEncoding('latin1');
    socket.on('data', (d: string) => {
      this.data += d;
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => undefined);
  }
  static connect(port: number): Promise<RawHttp> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ host: '127.0.0.1', port });
      s.once('error', reject);
      s.once('connect', () => {
        s.off('error', reject);
        resolve(new RawHttp(s));
      });
    });
  }
  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
  write(s: string | Buffer): void {
    if (!this.socket.destroyed) this.socket.write(s);
  }
  async until(pred: (data: string) => boolean, timeoutMs = 5000, what = 'server data'): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    while (!pred(this.data)) {
      if (this.closed) throw new Error(`connection closed waiting for ${what}; got ${JSON.stringify(this.data)}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timeout waiting for ${what}; got ${JSON.stringify(this.data)}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    return this.data;
  }
  async waitClosed(timeoutMs = 5000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed) {
      if (Date.now() > deadline) throw new Error(`connection not closed; got ${JSON.stringify(this.data)}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  close(): void {
    this.socket.destroy();
  }
}

export const luaBody = (over: Record<string, unknown> = {}): string =>
  JSON.stringify({ user: 'alice', event: 'MessageNew', mailbox: 'INBOX', uid: 1, uidvalidity: 42, from: 'a@b', subject: 's', ...over });

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
