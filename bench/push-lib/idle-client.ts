/**
 * A plain IMAP client on a raw socket that LOGINs, SELECTs INBOX and IDLEs, recording when each
 * `* n EXISTS` arrives: the baseline "how fast does the server itself tell an IDLE-ing client".
 */
import net from 'node:net';

export interface IdleClient {
  user: string;
  /** EXISTS count right after SELECT. */
  base: number;
  /** Date.now() of the first untagged EXISTS reporting at least n messages, by n. */
  seenAt: Map<number, number>;
  close(): void;
}

export async function startIdleClient(host: string, port: number, user: string, password: string, timeoutMs = 15_000): Promise<IdleClient> {
  const sock = net.connect({ host, port });
  sock.setNoDelay(true);
  let buf = '';
  const seenAt = new Map<number, number>();
  let highest = -1;
  let waiter: { re: RegExp; resolve: (m: RegExpMatchArray) => void } | undefined;
  const lines: string[] = [];
  const onLine = (line: string): void => {
    const m = /^\* (\d+) EXISTS/i.exec(line);
    if (m) {
      const n = Number(m[1]);
      const now = Date.now();
      for (let k = highest + 1; k <= n; k++) if (!seenAt.has(k)) seenAt.set(k, now);
      if (n > highest) highest = n;
    }
    lines.push(line);
    if (waiter) {
      const w = waiter.re.exec(line);
      if (w) {
        const r = waiter.resolve;
        waiter = undefined;
        r(w);
      }
    }
  };
  sock.on('data', (d: Buffer) => {
    buf += d.toString('latin1');
    let i: number;
    while ((i = buf.indexOf('\r\n')) >= 0) {
      onLine(buf.slice(0, i));
      buf = buf.slice(i + 2);
    }
  });
  const closed = new Promise<never>((_, reject) => {
    sock.once('error', (e) => reject(new Error(`IDLE client ${user}: ${e.message}`)));
    sock.once('close', () => reject(new Error(`IDLE client ${user}: connection closed`)));
  });
  closed.catch(() => undefined);
  const expect = (re: RegExp): Promise<RegExpMatchArray> => {
    for (const l of lines.splice(0)) {
      const m = re.exec(l);
      if (m) return Promise.resolve(m);
    }
    return Promise.race([
      new Promise<RegExpMatchArray>((resolve) => {
        waiter = { re, resolve: (m) => { lines.length = 0; resolve(m); } };
      }),
      closed,
      new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`IDLE client ${user}: timeout waiting for ${re}`)), timeoutMs).unref()),
    ]);
  };
  const quote = (s: string) => `"${s.replace(/["\\]/g, '\\$&')}"`;
  await expect(/^\* OK/);
  sock.write(`a LOGIN ${quote(user)} ${quote(password)}\r\n`);
  const login = await expect(/^a (OK|NO|BAD)/);
  if (login[1] !== 'OK') throw new Error(`IDLE client ${user}: LOGIN ${login[1]}`);
  lines.length = 0;
  sock.write('b SELECT INBOX\r\n');
  const sel = await expect(/^b (OK|NO|BAD)/);
  if (sel[1] !== 'OK') throw new Error(`IDLE client ${user}: SELECT ${sel[1]}`);
  const base = Math.max(highest, 0);
  sock.write('c IDLE\r\n');
  await expect(/^\+/);
  return { user, base, seenAt, close: () => sock.destroy() };
}
