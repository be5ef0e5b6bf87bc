/** A minimal LMTP client (RFC 2033), to deliver test mail the way an MTA does. */
import net from 'node:net';

export async function lmtpDeliver(port: number, user: string, message: string, host = '127.0.0.1'): Promise<void> {
  const socket = net.connect({ host, port });
  let buffer = '';
  const waiters: Array<() => void> = [];
  socket.setEncoding('utf8');
  socket.on('data', (d: string) => {
    buffer += d;
    waiters.splice(0).forEach((w) => w());
  });
  const failed = new Promise<never>((_, reject) => socket.once('error', reject));
  const reply = async (): Promise<string> => {
    for (;;) {
      // a complete reply: lines "ddd-" … then "ddd "
      const m = /^(?:\d{3}-[^\r\n]*\r\n)*\d{3} [^\r\n]*\r\n/.exec(buffer);
      if (m) {
        buffer = buffer.slice(m[0].length);
        return m[0];
      }
      await Promise.race([new Promise<void>((r) => waiters.push(r)), failed]);
    }
  };
  const expect = async (code: string, what: string) => {
    const r = await reply();
    if (!r.startsWith(code)) throw new Error(`LMTP ${what}: ${r.trim()}`);
  };
  try {
    await expect('220', 'greeting');
    socket.write('LHLO test.example\r\n');
    await expect('250', 'LHLO');
    socket.write('MAIL FROM:<sender@example.org>\r\n');
    await expect('250', 'MAIL FROM');
    socket.write(`RCPT TO:<${user}>\r\n`);
    await expect('250', 'RCPT TO');
    socket.write('DATA\r\n');
    await expect('354', 'DATA');
    const body = message.replace(/\r?\n/g, '\r\n').replace(/^\./gm, '..');
    socket.write(`${body.endsWith('\r\n') ? body : `${body}\r\n`}.\r\n`);
    await expect('250', 'delivery');
    socket.write('QUIT\r\n');
  } finally {
    socket.end();
  }
}
