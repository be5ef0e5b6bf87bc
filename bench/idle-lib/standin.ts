/**
 * A lightweight upstream stand-in for the idle-capacity benchmark: just enough of an IMAP server
 * for xaps-proxy's upstream leg and an idling client (greeting, ID, CAPABILITY, LOGIN, SELECT,
 * NOOP, IDLE/DONE, LOGOUT), a few hundred bytes per connection. Dovecot on the benchmark machine
 * cannot hold 10,000 sessions (one imap process each); this can. Runs in its own process
 * (forked by bench/idle-capacity.ts), so its memory and CPU are not the proxy's.
 *
 * Requests: { type: 'start' } → { port }; { type: 'stats' } → { open, accepted, idling, logins }.
 */
import net from 'node:net';
import { serveRequests } from '../lib/peer.js';

const CAPS = 'IMAP4rev1 LITERAL+ ID IDLE ENABLE';
const GREETING = Buffer.from(`* OK [CAPABILITY ${CAPS} AUTH=PLAIN] stand-in ready\r\n`);

let open = 0;
let accepted = 0;
let idling = 0;
let logins = 0;

function onConnection(sock: net.Socket): void {
  open++;
  accepted++;
  let buf = '';
  let idleTag: string | null = null;
  sock.setNoDelay(true);
  sock.setEncoding('latin1');
  sock.write(GREETING);
  const reply = (s: string) => sock.write(s);
  sock.on('data', (chunk: string) => {
    buf += chunk;
    for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
      const line = buf.slice(0, i).replace(/\r$/, '');
      buf = buf.slice(i + 1);
      if (idleTag !== null) {
        if (/^DONE$/i.test(line)) {
          reply(`${idleTag} OK Idle completed\r\n`);
          idleTag = null;
          idling--;
        } else {
          reply('* BAD expected DONE\r\n');
        }
        continue;
      }
      const m = /^(\S+) (\S+)/.exec(line);
      if (!m) {
        reply('* BAD no command\r\n');
        continue;
      }
      const tag = m[1]!;
      switch (m[2]!.toUpperCase()) {
        case 'ID':
          reply(`* ID ("name" "xaps-bench-standin")\r\n${tag} OK ID completed\r\n`);
          break;
        case 'CAPABILITY':
          reply(`* CAPABILITY ${CAPS}\r\n${tag} OK Capability completed\r\n`);
          break;
        case 'LOGIN':
          logins++;
          reply(`${tag} OK [CAPABILITY ${CAPS}] Logged in\r\n`);
          break;
        case 'SELECT':
        case 'EXAMINE':
          reply(
            `* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n* 0 EXISTS\r\n* 0 RECENT\r\n` +
              `* OK [UIDVALIDITY 1] UIDs valid\r\n* OK [UIDNEXT 1] Predicted next UID\r\n${tag} OK [READ-WRITE] Select completed\r\n`,
          );
          break;
        case 'NOOP':
        case 'CHECK':
          reply(`${tag} OK ${m[2]!.toUpperCase()} completed\r\n`);
          break;
        case 'IDLE':
          idleTag = tag;
          idling++;
          reply('+ idling\r\n');
          break;
        case 'LOGOUT':
          reply(`* BYE Logging out\r\n${tag} OK Logout completed\r\n`);
          sock.end();
          break;
        default:
          reply(`${tag} BAD Not supported by the stand-in\r\n`);
      }
    }
  });
  sock.on('error', () => undefined);
  sock.on('close', () => {
    open--;
    if (idleTag !== null) idling--;
  });
}

let server: net.Server | undefined;

serveRequests(async (msg) => {
  switch (msg.type) {
    case 'start': {
      server = net.createServer({ noDelay: true }, onConnection);
      server.maxConnections = 1_000_000;
      await new Promise<void>((resolve, reject) => {
        server!.once('error', reject);
        server!.listen({ host: '127.0.0.1', port: 0, backlog: 4096 }, () => resolve());
      });
      const a = server.address() as net.AddressInfo;
      return { port: a.port };
    }
    case 'stats':
      return { open, accepted, idling, logins };
    default:
      throw new Error(`unknown request ${msg.type}`);
  }
});
