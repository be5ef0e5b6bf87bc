/**
 * A scripted stand-in for an IMAP server, for cases Dovecot cannot produce
 * (chunking under test control, hostile bytes). It greets, answers the proxy's
 * own ID, then runs a per-connection script and records what it receives.
 */
import net from 'node:net';

export interface FakeConnection {
  socket: net.Socket;
  /** Bytes received after the proxy's ID exchange. */
  received(): Buffer;
  /** Resolves once `n` bytes have been received after the ID exchange. */
  waitFor(n: number, timeoutMs?: number): Promise<void>;
}

export interface FakeUpstream {
  port: number;
  connections: FakeConnection[];
  /** Resolves with the next connection once its ID exchange is done. */
  nextConnection(): Promise<FakeConnection>;
  close(): Promise<void>;
}

export const FAKE_GREETING = '* OK [CAPABILITY IMAP4rev1 LITERAL+ ID IDLE AUTH=PLAIN] fake ready\r\n';

export async function startFakeUpstream(greeting = FAKE_GREETING): Promise<FakeUpstream> {
  const connections: FakeConnection[] = [];
  const waiting: Array<(c: FakeConnection) => void> = [];
  const ready: FakeConnection[] = [];
  const server = net.createServer((socket) => {
    socket.on('error', () => undefined);
    let buf = Buffer.alloc(0);
    let idDone = false;
    const chunks: Buffer[] = [];
    let size = 0;
    let notify: (() => void) | null = null;
    const conn: FakeConnection = {
      socket,
      received: () => Buffer.concat(chunks),
      waitFor: (n, timeoutMs = 10_000) =>
        new Promise((resolve, reject) => {
          const deadline = setTimeout(() => reject(new Error(`fake upstream got ${size} of ${n} bytes`)), timeoutMs);
          const check = () => {
            if (size >= n) {
              clearTimeout(deadline);
              notify = null;
              resolve();
            } else notify = check;
          };
          check();
        }),
    };
    connections.push(conn);
    socket.write(greeting);
    socket.on('data', (d: Buffer) => {
      if (!idDone) {
        buf = Buffer.concat([buf, d]);
        const eol = buf.indexOf('\r\n');
        if (eol < 0) return;
        const first = buf.subarray(0, eol).toString('latin1');
        if (!/^I ID /.test(first)) throw new Error(`expected the proxy's ID first, got ${first}`);
        idDone = true;
        socket.write('* ID NIL\r\nI OK ID completed.\r\n');
        d = buf.subarray(eol + 2);
        const w = waiting.shift();
        if (w) w(conn);
        else ready.push(conn);
      }
      if (d.length > 0) {
        chunks.push(d);
        size += d.length;
        notify?.();
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  return {
    port,
    connections,
    nextConnection: () =>
      new Promise((resolve) => {
        const c = ready.shift();
        if (c) resolve(c);
        else waiting.push(resolve);
      }),
    close: () =>
      new Promise((resolve) => {
        for (const c of connections) c.socket.destroy();
        server.close(() => resolve());
      }),
  };
}

/** Writes `data` in the given pieces, yielding to the event loop between them. */
export async function writeInPieces(socket: net.Socket, data: Buffer, cuts: number[]): Promise<void> {
  const points = [...new Set(cuts.filter((c) => c > 0 && c < data.length))].sort((a, b) => a - b);
  let prev = 0;
  for (const p of [...points, data.length]) {
    socket.write(data.subarray(prev, p));
    prev = p;
    await new Promise((r) => setImmediate(r));
  }
}
