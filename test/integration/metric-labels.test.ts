/**
 * No client-controlled string ever becomes a label value. The whole proxy (startApp, so
 * every metric operators get) runs against a real Dovecot and a mock APNs, and is fed
 * random, unique strings wherever a client, the mail server's event hook or APNs chooses
 * text: usernames, passwords, tags, mailbox names, unknown commands and UID
 * subcommands, ID fields, device tokens, account ids, event bodies, APNs reasons. Then
 * every label of every series must come from a declared finite set for its label name,
 * and none may contain an injected string: labelling by user, mailbox, token or command
 * text fails here.
 *
 * In integration/ because it needs Dovecot (real logins, real mailboxes, NOTIFY).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Registry } from 'prom-client';
import { startDovecot, type DovecotInstance } from '../../src/testbed/dovecot.js';
import { freePort } from '../../src/testbed/ports.js';
import { createRegistry } from '../../src/ops/metrics.js';
import { READY_CHECKS } from '../../src/ops/readiness-metrics.js';
import { COMMAND_LABELS, LISTENERS, REJECT_REASONS } from '../../src/proxy/metrics.js';
import { UPSTREAM_FAILURE_REASONS } from '../../src/proxy/upstream.js';
import { REGISTRATION_RESULTS } from '../../src/push/metrics.js';
import { STORE_OPERATIONS } from '../../src/store/metrics.js';
import {
  ALARM_KINDS,
  APNS_REASONS,
  CHANGE_RESULTS,
  DROP_KINDS,
  PUSH_RESULTS,
  REMOVAL_REASONS,
} from '../../src/apns/dispatcher-metrics.js';
import { REQUEST_OUTCOMES } from '../../src/apns/client-metrics.js';
import { EVENTS_FORMATS, EVENTS_IGNORED_REASONS, EVENTS_REQUEST_OUTCOMES } from '../../src/watch/events-metrics.js';
import { LOGIN_FAILURE_REASONS } from '../../src/watch/login.js';
import { RawImap } from '../helpers/raw-imap.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';
import { apnsFixture, type ApnsFixture } from '../helpers/apns-fixture.js';

/** Every string a client or peer chose, to be searched for in the metrics afterwards. */
const injected: string[] = [];
/** A fresh unique string (lower-case: Dovecot lower-cases usernames), remembered as injected. */
function hostile(prefix = 'q'): string {
  const s = `${prefix}${randomBytes(6).toString('hex')}`;
  injected.push(s);
  return s;
}
function hostileToken(): string {
  const t = randomBytes(32).toString('hex');
  injected.push(t);
  return t;
}

const TRANSPORT_KINDS = ['timeout', 'connect', 'tls', 'reset', 'closed', 'protocol'];
const HTTP_STATUSES = ['200', '400', '403', '404', '405', '410', '413', '429', '500', '503', '1xx', '2xx', '3xx', '4xx', '5xx', 'other', 'transport'];

/** The finite set each label name may take, across all of the proxy's metrics. */
const ALLOWED: Record<string, ReadonlySet<string>> = Object.fromEntries(
  Object.entries({
    listener: LISTENERS,
    tls: ['true', 'false'],
    command: COMMAND_LABELS,
    reason: [
      ...REJECT_REASONS,
      ...UPSTREAM_FAILURE_REASONS,
      ...APNS_REASONS,
      'none',
      'other',
      ...TRANSPORT_KINDS,
      ...REMOVAL_REASONS,
      ...LOGIN_FAILURE_REASONS,
      ...EVENTS_IGNORED_REASONS,
    ],
    result: [...PUSH_RESULTS, ...REGISTRATION_RESULTS, ...CHANGE_RESULTS, 'changed', 'error', 'refused'],
    status: HTTP_STATUSES,
    kind: [...DROP_KINDS, ...ALARM_KINDS, 'connect', 'tls'],
    mode: ['notify', 'idle'],
    source: ['notify', 'idle', 'poll', 'events', 'catch-up'],
    outcome: [...REQUEST_OUTCOMES, ...EVENTS_REQUEST_OUTCOMES],
    format: EVENTS_FORMATS,
    state: ['ready', 'connecting', 'draining'],
    operation: STORE_OPERATIONS,
    check: READY_CHECKS,
  }).map(([name, values]) => [name, new Set<string>(values)]),
);

/** Histogram bucket bounds come from the code (`buckets: [...]`), never from input. */
const BUCKET = /^(?:\+Inf|\d+(?:\.\d+)?(?:e[+-]?\d+)?)$/;

/** Node's own process metrics (collectDefaultMetrics): their labels describe the runtime, not clients. */
async function processMetricNames(): Promise<Set<string>> {
  const json = await createRegistry().getMetricsAsJSON();
  return new Set(json.map((m) => m.name));
}

interface Violation {
  metric: string;
  label: string;
  value: string;
}

/** Every label value that is outside its declared set, or that carries an injected string. */
async function violations(registry: Registry): Promise<Violation[]> {
  const processNames = await processMetricNames();
  const out: Violation[] = [];
  for (const metric of await registry.getMetricsAsJSON()) {
    for (const sample of metric.values) {
      for (const [label, raw] of Object.entries(sample.labels)) {
        const value = String(raw);
        const lower = value.toLowerCase(); // a label may upper-case what it took from input
        const bad =
          injected.some((s) => lower.includes(s.toLowerCase())) ||
          (label === 'le'
            ? !BUCKET.test(value)
            : !processNames.has(metric.name) && !(ALLOWED[label]?.has(value) ?? false));
        if (bad) out.push({ metric: metric.name, label, value });
      }
    }
  }
  return out;
}

async function value(registry: Registry, name: string, labels: Record<string, string> = {}): Promise<number> {
  const metric = (await registry.getMetricsAsJSON()).find((m) => m.name === name);
  const hit = metric?.values.find((v) => Object.entries(labels).every(([k, want]) => String(v.labels[k]) === want));
  return hit?.value ?? 0;
}

async function until(what: string, pred: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`never: ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const register = (token: string, account: string, mailboxes: string[]) =>
  `XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "${account}" "aps-device-token" "${token}" "aps-subtopic" "com.apple.mobilemail" "mailboxes" (${mailboxes.map((m) => `"${m}"`).join(' ')})`;

function account(): string {
  const a = randomUUID();
  injected.push(a);
  return a;
}

describe('metric labels under hostile input', () => {
  const userA = hostile('ua');
  const userB = hostile('ub');
  const passA = hostile('p');
  const passB = hostile('p');
  const boxA = `Box ${hostile('m')}`;
  const boxB = `Work/${hostile('m')}`;
  const okToken = hostileToken();
  const rejectedToken = hostileToken();
  const goneToken = hostileToken();
  const apnsReason = hostile('Bogus');
  let dovecot: DovecotInstance;
  let apns: ApnsFixture;
  let proxy: TestProxy;
  let events: TestProxy;
  let eventsPort: number;

  beforeAll(async () => {
    dovecot = await startDovecot({ users: { [userA]: passA, [userB]: passB } });
    apns = await apnsFixture(['--push-coalesce-window', '200ms']);
    apns.mock.respond((req) => {
      if (req.deviceToken === rejectedToken) return { status: 400, reason: apnsReason };
      if (req.deviceToken === goneToken) return { status: 410, reason: 'Unregistered' };
      return { status: 200 };
    });
    const masterPw = path.join(apns.dir, 'master.pw');
    await fs.writeFile(masterPw, 'masterpw\n', { mode: 0o600 });
    proxy = await startTestProxy({
      upstreamPort: dovecot.imapPort,
      tlsCert: dovecot.caCertPath,
      tlsKey: dovecot.tlsKeyPath,
      flags: [...apns.flags, '--master-user', 'master', '--master-password-file', masterPw],
    });
    eventsPort = await freePort();
    events = await startTestProxy({
      upstreamPort: dovecot.imapPort,
      flags: [...apns.flags, '--watch', 'events', '--events-listen', `127.0.0.1:${eventsPort}`],
    });
  });
  afterAll(async () => {
    await events?.stop();
    await proxy?.stop();
    await apns?.mock.close();
    await dovecot?.destroy();
  });

  it('IMAP clients, the watchers and APNs answers: every label from its declared set, none carrying input', async () => {
    const ca = await fs.readFile(dovecot.caCertPath);

    const a = await RawImap.connect({ port: proxy.plainPort });
    await a.greeting();
    await a.command(hostile('t'), `ID ("name" "${hostile()}" "x-originating-ip" "10.1.2.3" "${hostile('x-')}" "${hostile()}")`);
    expect(await a.command(hostile('t'), `LOGIN ${userA} ${passA}`)).toMatch(/ OK /);
    expect(await a.command(hostile('t'), `CREATE "${boxA}"`)).toMatch(/ OK /);
    expect(await a.command(hostile('t'), `FOO${hostile()} ${hostile()}`)).toMatch(/ BAD /);
    expect(await a.command(hostile('t'), `UID ${hostile('X')} 1:*`)).toMatch(/ BAD /);
    expect(await a.command(hostile('t'), hostile('CMD'))).toMatch(/ BAD /);
    a.send(`${hostile()}\r\n`); // not even a command: no tag and name
    expect(await a.command(hostile('t'), register(okToken, account(), ['INBOX', boxA]))).toMatch(/ OK /);
    expect(await a.command(hostile('t'), register(rejectedToken, account(), [boxA]))).toMatch(/ OK /);
    expect(await a.command(hostile('t'), `XAPPLEPUSHSERVICE "aps-version" "${hostile()}" "${hostile()}" "${hostile()}"`)).toMatch(/ BAD /);

    const b = await RawImap.connect({ port: proxy.tlsPort, tls: true, ca });
    await b.greeting();
    expect(await b.command(hostile('t'), register(goneToken, account(), [boxB]))).toMatch(/ BAD /); // before login
    const pre = Buffer.from(`\0${userB}\0${passB}`).toString('base64');
    expect(await b.command(hostile('t'), `AUTHENTICATE PLAIN ${pre}`)).toMatch(/ OK /);
    expect(await b.command(hostile('t'), `CREATE "${boxB}"`)).toMatch(/ OK /);
    expect(await b.command(hostile('t'), register(goneToken, account(), [boxB]))).toMatch(/ OK /);

    // failed logins come from another address: Dovecot's per-address penalty must not slow the rest
    const f = await RawImap.connect({ port: proxy.plainPort, localAddress: '127.0.0.2' });
    await f.greeting();
    expect(await f.command(hostile('t'), `LOGIN ${hostile('nobody')} ${hostile()}`)).toMatch(/ NO /);
    const bogus = Buffer.from(`\0${hostile('nobody')}\0${hostile()}`).toString('base64');
    expect(await f.command(hostile('t'), `AUTHENTICATE PLAIN ${bogus}`)).toMatch(/ NO /);
    f.close();

    await until('both users watched', async () => Boolean(proxy.app.watch?.isWatching(userA) && proxy.app.watch?.isWatching(userB)));
    await new Promise((r) => setTimeout(r, 300)); // the watchers' first snapshots
    await dovecot.deliver(userA, `Subject: ${hostile()}\r\n\r\n${hostile()}\r\n`, boxA);
    await dovecot.deliver(userB, `Subject: ${hostile()}\r\n\r\n${hostile()}\r\n`, boxB);
    const registry = proxy.app.registry;
    await until('the three pushes answered', async () => (await value(registry, 'xaps_pushes_total', { result: 'delivered' })) === 1
      && (await value(registry, 'xaps_pushes_total', { result: 'rejected' })) === 1
      && (await value(registry, 'xaps_pushes_total', { result: 'unregistered' })) === 1);
    a.close();
    b.close();

    expect(await violations(registry)).toEqual([]);
    const text = await registry.metrics();
    for (const s of injected) expect(text).not.toContain(s);
    // and the hostile paths did run, so there was something to find
    expect(await value(registry, 'xaps_imap_commands_total', { command: 'other' })).toBe(4);
    expect(await value(registry, 'xaps_push_registrations_total', { result: 'bad' })).toBe(2);
    expect(await value(registry, 'xaps_apns_responses_total', { status: '400', reason: 'other' })).toBe(1);
    expect(await value(registry, 'xaps_registrations_removed_total', { reason: 'unregistered' })).toBe(1);
  });

  it('events from the mail server: every label from its declared set, none carrying input', async () => {
    const token = hostileToken();
    const c = await RawImap.connect({ port: events.plainPort });
    await c.greeting();
    expect(await c.command(hostile('t'), `LOGIN ${userA} ${passA}`)).toMatch(/ OK /);
    expect(await c.command(hostile('t'), register(token, account(), ['INBOX', boxA]))).toMatch(/ OK /);
    c.close();

    const post = (body: string, at = '/events') =>
      fetch(`http://127.0.0.1:${eventsPort}${at}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    const event = (user: string, mailbox: string, type = 'MessageNew') =>
      JSON.stringify({ event: type, user, mailbox, uid: 7, uidvalidity: 1234 });
    expect((await post(event(userA, boxA))).status).toBe(202);
    expect((await post(event(hostile('nobody'), hostile('m')))).status).toBe(202);
    expect((await post(event(userA, boxA, hostile('Evt')))).status).toBe(202);
    expect((await post(hostile('{'))).status).toBe(400);
    expect((await post(event(userA, boxA), `/${hostile()}`)).status).toBe(404);

    const registry = events.app.registry;
    await until('the push for the event delivered', async () => (await value(registry, 'xaps_pushes_total', { result: 'delivered' })) === 1);

    expect(await violations(registry)).toEqual([]);
    const text = await registry.metrics();
    for (const s of injected) expect(text).not.toContain(s);
    expect(await value(registry, 'xaps_watch_changes_total', { source: 'events' })).toBe(2);
    expect(await value(registry, 'xaps_push_changes_total', { result: 'no_device' })).toBe(1);
    expect(await value(registry, 'xaps_events_ignored_total', { reason: 'event_type' })).toBe(1);
    expect(await value(registry, 'xaps_events_requests_total', { outcome: 'not_found' })).toBe(1);
  });

  it('the check itself: a series labelled by user is caught', async () => {
    const { Counter } = await import('prom-client');
    const registry = createRegistry({ defaultMetrics: false });
    new Counter({ name: 'xaps_logins_by_user_total', help: 'wrong on purpose', labelNames: ['user'], registers: [registry] }).inc({ user: userA });
    new Counter({ name: 'xaps_commands_wrong_total', help: 'wrong on purpose', labelNames: ['command'], registers: [registry] }).inc({ command: `FOO${injected[injected.length - 1]}` });
    expect(await violations(registry)).toEqual([
      { metric: 'xaps_logins_by_user_total', label: 'user', value: userA },
      { metric: 'xaps_commands_wrong_total', label: 'command', value: `FOO${injected[injected.length - 1]}` },
    ]);
  });
});
