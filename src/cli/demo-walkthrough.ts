/** The scripted part of the demo: what iOS Mail does against the proxy, shown line by line. */
import tls from 'node:tls';
import type { RegistrationStore } from '../store/types.js';
import type { App } from '../app.js';
import type { MockApns } from '../testbed/mock-apns.js';
import { ApnsTransportError } from '../apns/types.js';

export interface WalkthroughInput {
  port: number;
  ca: string;
  deviceToken: string;
  accountId: string;
  store: RegistrationStore;
  say(line?: string): void;
}

class Conversation {
  private buffer = '';
  private waiters: Array<() => void> = [];
  constructor(private readonly socket: tls.TLSSocket, private readonly say: (l: string) => void) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.buffer += d;
      this.waiters.splice(0).forEach((w) => w());
    });
  }

  private async until(done: (text: string) => boolean): Promise<string> {
    const deadline = Date.now() + 15_000;
    while (!done(this.buffer)) {
      if (Date.now() > deadline) throw new Error(`demo: no answer from the proxy (got ${JSON.stringify(this.buffer)})`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, 200);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    const text = this.buffer;
    this.buffer = '';
    return text;
  }

  async greeting(): Promise<string> {
    const text = await this.until((t) => t.includes('\r\n'));
    this.show('S', text);
    return text;
  }

  async command(tag: string, line: string, shown = line): Promise<string> {
    this.say(`  C: ${tag} ${shown}`);
    this.socket.write(`${tag} ${line}\r\n`);
    const text = await this.until((t) => new RegExp(`(^|\\r\\n)${tag} (OK|NO|BAD)`).test(t) && t.endsWith('\r\n'));
    this.show('S', text);
    return text;
  }

  private show(who: string, text: string): void {
    for (const l of text.split('\r\n').filter(Boolean)) this.say(`  ${who}: ${l.length > 160 ? `${l.slice(0, 157)}...` : l}`);
  }
}

export async function demoWalkthrough(w: WalkthroughInput): Promise<void> {
  const socket = tls.connect({ host: '127.0.0.1', port: w.port, ca: w.ca, servername: 'localhost' });
  await new Promise<void>((resolve, reject) => {
    socket.once('secureConnect', resolve);
    socket.once('error', reject);
  });
  const c = new Conversation(socket, w.say);
  w.say('An iPhone connects over TLS; the capability list now includes XAPPLEPUSHSERVICE:');
  await c.greeting();
  await c.command('a1', 'LOGIN alice alicepw', 'LOGIN alice ********');
  w.say();
  w.say('It registers its device token and the mailboxes it wants pushed, exactly as iOS 26 sends it;');
  w.say('the reply carries the topic of the Mail push certificate, which the phone subscribes to:');
  const reply = await c.command(
    'a2',
    `XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "${w.accountId}" "aps-device-token" "${w.deviceToken}" "aps-subtopic" "com.apple.mobilemail" "mailboxes" ("INBOX" "Sent")`,
  );
  await c.command('a3', 'LOGOUT');
  socket.destroy();
  if (!/\r\na2 OK/.test(`\r\n${reply}`)) throw new Error('demo: the registration was not accepted');
  const stored = await w.store.listByUser('alice');
  w.say();
  w.say(`The registration is stored (${w.store.kind} store):`);
  for (const r of stored) {
    w.say(`  user=${r.user} token=${r.deviceToken.slice(0, 8)}… account=${r.accountId} mailboxes=${r.mailboxes.map((m) => m.name).join(', ')}`);
  }
  w.say('Dovecot never saw the XAPPLEPUSHSERVICE command; everything else was relayed byte for byte.');
}

/** A push to the registered device, as `xaps-proxy test-push` sends it, and what the APNs stand-in received. */
export async function demoPush(input: { app: App; apns: MockApns; user: string; say(line?: string): void }): Promise<void> {
  const { app, apns, user, say } = input;
  const dispatcher = app.push?.dispatcher;
  const [reg] = (await app.store?.listByUser(user)) ?? [];
  if (!dispatcher || !reg) throw new Error('demo: push delivery is not running');
  say('A push to that device over HTTP/2 with the Mail push certificate (what `xaps-proxy test-push` does):');
  const answer = await dispatcher.sendNow(reg, { mailboxes: ['Sent'] });
  if (answer instanceof ApnsTransportError) throw new Error(`demo: APNs stand-in did not answer: ${answer.message}`);
  const req = apns.requests.at(-1);
  if (!req) throw new Error('demo: the APNs stand-in recorded no request');
  say(`  ${req.method} ${req.path.replace(/[0-9a-f]{56}$/, '…')}`);
  for (const h of ['apns-topic', 'apns-push-type', 'apns-priority', 'apns-expiration', 'apns-collapse-id']) {
    say(`  ${h}: ${req.headers[h]}`);
  }
  say(`  body: ${req.rawBody}`);
  say(`  answer: ${answer.status}${answer.apnsId ? ` apns-id ${answer.apnsId}` : ''}`);
  say('"m" carries the MD5 of "Sent", so the phone refreshes exactly that mailbox.');
}
