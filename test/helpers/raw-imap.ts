/**
 * A raw IMAP client over a socket for tests: writes exactly the bytes it is given
 * and records exactly the bytes it receives, so transcripts can be compared byte
 * for byte between a direct connection and one through the proxy.
 */
import net from 'node:net';
import tls from 'node:tls';

export interface RawOptions {
  host?: string;
  port: number;
  tls?: boolean;
  ca?: string | Buffer;
  /** Local address to connect from (e.g. 127.0.0.2 to look like another client). */
  localAddress?: string;
}

export class RawImap {
  private received: Buffer[] = [];
  private size = 0;
  private readPos = 0;
  private waiters: Array<() => void> = [];
  closed = false;

  private constructor(public socket: net.Socket) {
    this.attach(socket);
  }

  private attach(socket: net.Socket): void {
    socket.on('data', (d: Buffer) => {
      this.received.push(d);
      this.size += d.length;
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => undefined);
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    w.forEach((f) => f());
  }

  static connect(opts: RawOptions): Promise<RawImap> {
    return new Promise((resolve, reject) => {
      const host = opts.host ?? '127.0.0.1';
      const tcp = net.connect({ host, port: opts.port, localAddress: opts.localAddress });
      const socket = opts.tls ? tls.connect({ socket: tcp, ca: opts.ca, servername: 'localhost' }) : tcp;
      socket.once('error', reject);
      socket.once(opts.tls ? 'secureConnect' : 'connect', () => {
        socket.off('error', reject);
        resolve(new RawImap(socket));
      });
    });
  }

  /** Everything received so far. */
  all(): Buffer {
    return Buffer.concat(this.received);
  }

  /** Bytes received since the last read mark. */
  unread(): Buffer {
    return this.all().subarray(this.readPos);
  }

  send(data: string | Buffer): void {
    this.socket.write(data);
  }

  /** Waits until `pred` holds on the unread bytes; returns them and moves the mark. */
  async until(pred: (text: string) => boolean, timeoutMs = 20_000, what = 'condition'): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const text = this.unread().toString('latin1');
      if (pred(text)) {
        this.readPos = this.size;
        return text;
      }
      if (this.closed) throw new Error(`connection closed while waiting for ${what}; got: ${text.slice(-500)}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timeout waiting for ${what}; got: ${text.slice(-500)}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  /** Waits for the tagged completion of `tag`. */
  tagged(tag: string, timeoutMs?: number): Promise<string> {
    const re = new RegExp(`(^|\\r\\n)${tag.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} (OK|NO|BAD)[^\\r\\n]*\\r\\n`);
    return this.until((t) => re.test(t), timeoutMs, `tagged ${tag}`);
  }

  /** Sends a command and waits for its tagged completion. */
  async command(tag: string, text: string, timeoutMs?: number): Promise<string> {
    this.send(`${tag} ${text}\r\n`);
    return this.tagged(tag, timeoutMs);
  }

  greeting(): Promise<string> {
    return this.until((t) => t.includes('\r\n'), 20_000, 'greeting');
  }

  /** Upgrades the connection after a STARTTLS OK. */
  async starttls(ca?: string | Buffer): Promise<void> {
    const raw = this.socket;
    raw.removeAllListeners('data');
    raw.removeAllListeners('close');
    const secure = tls.connect({ socket: raw, ca, servername: 'localhost' });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve);
      secure.once('error', reject);
    });
    this.socket = secure;
    this.attach(secure);
  }

  waitClosed(timeoutMs = 20_000): Promise<string> {
    return this.until(() => this.closed, timeoutMs, 'close');
  }

  close(): void {
    this.socket.destroy();
  }
}
