/** The scripted part of the demo: what iOS Mail does against the proxy, shown line by line. */
import tls from 'node:tls';
import type { RegistrationStore } from '../store/types.js';
import type { MockApns } from '../testbed/mock-apns.js';

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

/** Mail arrives at Dovecot; the proxy notices it upstream and the APNs stand-in receives the push. */
export async function demoPush(input: {
  apns: MockApns;
  watching: () => boolean;
  deliver: (mailbox?: string) => Promise<void>;
  say(line?: string): void;
}): Promise<void> {
  const { apns, deliver, say } = input;
  for (const deadline = Date.now() + 15_000; !input.watching(); ) {
    if (Date.now() > deadline) throw new Error('demo: the watcher did not connect to Dovecot');
    await new Promise((r) => setTimeout(r, 50));
  }
  await new Promise((r) => setTimeout(r, 300)); // NOTIFY's first snapshot
  const waitForPush = async (n: number) => {
    const deadline = Date.now() + 15_000;
    while (apns.requests.length < n) {
      if (Date.now() > deadline) throw new Error('demo: no push reached the APNs stand-in');
      await new Promise((r) => setTimeout(r, 50));
    }
    return apns.requests[n - 1]!;
  };
  const show = (req: MockApns['requests'][number], t0: number) => {
    say(`  ${req.method} ${req.path.replace(/[0-9a-f]{56}$/, '…')}  (${req.at - t0} ms after delivery)`);
    for (const h of ['apns-topic', 'apns-push-type', 'apns-priority', 'apns-collapse-id']) say(`  ${h}: ${req.headers[h]}`);
    say(`  body: ${req.rawBody}`);
  };
  say('New mail is delivered to INBOX by Dovecot (dovecot-lda); the proxy sees it through IMAP NOTIFY');
  say('and pushes over HTTP/2 with the Mail push certificate:');
  let t0 = Date.now();
  await deliver();
  show(await waitForPush(1), t0);
  await new Promise((r) => setTimeout(r, 2_500)); // past the coalescing window
  say();
  say('Mail delivered to "Sent": the push names that mailbox by the MD5 of its name, so the phone refreshes just it:');
  t0 = Date.now();
  await deliver('Sent');
  show(await waitForPush(2), t0);
}
