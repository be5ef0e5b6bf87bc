/**
 * A minimal client of the V8 inspector of a process started with `--inspect=127.0.0.1:<port>`, for one thing: the
 * live memory of the proxy — a full garbage collection (HeapProfiler.collectGarbage), then process.memoryUsage()
 * evaluated inside it. Loopback only; the soak's own proxy process only.
 */
import { WebSocket } from 'undici';

export interface LiveMemory {
  /** V8 heap in use right after a full GC: what is reachable. */
  heapUsed: number;
  heapTotal: number;
  /** Memory of Buffers/ArrayBuffers and other objects outside the V8 heap still referenced after that GC. */
  external: number;
  arrayBuffers: number;
  rss: number;
}

export class InspectorClient {
  private nextId = 0;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private closed = false;

  private constructor(private readonly ws: WebSocket) {
    ws.addEventListener('message', (ev) => {
      let msg: { id?: number; result?: unknown; error?: { message?: string } };
      try {
        msg = JSON.parse(String(ev.data)) as typeof msg;
      } catch {
        return;
      }
      if (msg.id === undefined) return; // an event
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      if (msg.error) p.reject(new Error(`inspector: ${msg.error.message ?? 'error'}`));
      else p.resolve(msg.result);
    });
    ws.addEventListener('close', () => {
      this.closed = true;
      for (const p of this.pending.values()) p.reject(new Error('inspector connection closed'));
      this.pending.clear();
    });
  }

  /** Connects to the first target the inspector on 127.0.0.1:port lists (the main thread). */
  static async connect(port: number, timeoutMs = 10_000): Promise<InspectorClient> {
    const deadline = Date.now() + timeoutMs;
    let url: string | undefined;
    for (;;) {
      try {
        const res = await fetch(`http://127.0.0.1:${port}/json/list`, { signal: AbortSignal.timeout(2000) });
        const targets = (await res.json()) as Array<{ type?: string; webSocketDebuggerUrl?: string }>;
        url = targets.find((t) => t.type === 'node' && t.webSocketDebuggerUrl)?.webSocketDebuggerUrl;
      } catch {
        url = undefined;
      }
      if (url) break;
      if (Date.now() > deadline) throw new Error(`no inspector target on 127.0.0.1:${port}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    const ws = new WebSocket(url);
    await new Promise<void>((resolve, reject) => {
      ws.addEventListener('open', () => resolve(), { once: true });
      ws.addEventListener('error', () => reject(new Error(`cannot open ${url}`)), { once: true });
    });
    return new InspectorClient(ws);
  }

  call(method: string, params: Record<string, unknown> = {}, timeoutMs = 10_000): Promise<unknown> {
    if (this.closed) return Promise.reject(new Error('inspector connection closed'));
    const id = ++this.nextId;
    return new Promise<unknown>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`inspector: ${method} timed out`));
      }, timeoutMs);
      this.pending.set(id, {
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      this.ws.send(JSON.stringify({ id, method, params }));
    });
  }

  /** A full GC in the process, then its process.memoryUsage(). */
  async liveMemory(): Promise<LiveMemory> {
    await this.call('HeapProfiler.collectGarbage');
    const r = (await this.call('Runtime.evaluate', { expression: 'process.memoryUsage()', returnByValue: true })) as {
      result?: { value?: Partial<LiveMemory> };
      exceptionDetails?: unknown;
    };
    const v = r.result?.value;
    if (!v || r.exceptionDetails || typeof v.heapUsed !== 'number') throw new Error('inspector: process.memoryUsage() failed');
    return { heapUsed: v.heapUsed, heapTotal: v.heapTotal ?? 0, external: v.external ?? 0, arrayBuffers: v.arrayBuffers ?? 0, rss: v.rss ?? 0 };
  }

  close(): void {
    if (!this.closed) this.ws.close();
  }
}
