/**
 * Property: for random sequences of mailbox changes and time steps (APNs answering 200),
 *   - no lost push: every change is followed, for each device that pushes that mailbox, by a push to that device
 *     that covers the mailbox (`m` lists its md5, or no `m` and it is INBOX) no later than the window end;
 *   - coalescing: a device never gets more than 2 pushes within any window-long interval;
 *   - no stray push: every push follows a matching change for that device by at most one window.
 */
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PushDispatcher } from '../../../src/apns/dispatcher.js';
import { mailboxKey } from '../../../src/apns/payload.js';
import { EmbeddedRegistrationStore } from '../../../src/store/embedded.js';
import type { Registration } from '../../../src/store/types.js';
import { FakeTransport, ManualScheduler, md5, regInput, removeTempDirs, T0, TOPIC } from './dispatcher-helpers.js';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

let store: EmbeddedRegistrationStore;
let regs: Registration[];

beforeAll(async () => {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'xaps-dispatch-prop-'));
  store = await EmbeddedRegistrationStore.open({ dataDir: dir, ttlMs: 30 * 24 * 3600 * 1000, clock: () => T0 });
  (globalThis as { __propDir?: string }).__propDir = dir;
  const inputs = [
    regInput('a', 0, { version: 2, mailboxes: ['INBOX', 'Work', 'Sent Messages'], now: T0 }),
    regInput('a', 1, { version: 1, mailboxes: ['INBOX'], now: T0 }),
    regInput('b', 2, { version: 2, mailboxes: ['INBOX', 'Work'], now: T0 }),
    regInput('c', 3, { version: 2, mailboxes: ['INBOX'], now: T0 }),
  ];
  regs = [];
  for (const i of inputs) regs.push((await store.upsert(i)).registration);
});

afterAll(async () => {
  await store?.close();
  const dir = (globalThis as { __propDir?: string }).__propDir;
  if (dir) await fsp.rm(dir, { recursive: true, force: true });
  await removeTempDirs();
});

type Cmd = { kind: 'change'; user: string; mailbox: string } | { kind: 'wait'; ms: number };

const cmdArb: fc.Arbitrary<Cmd> = fc.oneof(
  fc.record({
    kind: fc.constant('change' as const),
    user: fc.constantFrom('a', 'b', 'c', 'nobody'),
    mailbox: fc.constantFrom('INBOX', 'inbox', 'Work', 'Sent Messages', 'Other'),
  }),
  fc.record({ kind: fc.constant('wait' as const), ms: fc.oneof(fc.integer({ min: 0, max: 3000 }), fc.constantFrom(0, 1, 1999, 2000, 2001)) }),
);

describe('dispatcher property', () => {
  it('no lost push, at most 2 pushes per device per window, no stray push', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(cmdArb, { maxLength: 60 }), fc.constantFrom(500, 2000), async (cmds, windowMs) => {
        const sched = new ManualScheduler(T0);
        const transport = new FakeTransport(sched);
        const d = new PushDispatcher({ store, transport, topic: () => TOPIC, scheduler: sched, coalesceWindowMs: windowMs });
        const changes: Array<{ at: number; user: string; mailbox: string }> = [];
        for (const c of cmds) {
          if (c.kind === 'wait') {
            await sched.advance(c.ms);
          } else {
            changes.push({ at: sched.now(), user: c.user, mailbox: c.mailbox });
            await d.notify({ user: c.user, mailbox: c.mailbox });
          }
        }
        await sched.advance(windowMs + 1);
        await d.settled();

        for (const reg of regs) {
          const pushes = transport.to(reg.deviceToken);
          const mine = changes.filter((c) => c.user === reg.user && reg.mailboxes.some((m) => mailboxKey(m.name) === mailboxKey(c.mailbox)));
          // no lost push
          for (const c of mine) {
            const hash = md5(mailboxKey(c.mailbox));
            const covered = pushes.some((p) => {
              if (p.at < c.at || p.at > c.at + windowMs) return false;
              const m = p.payload.aps.m;
              return m === undefined ? mailboxKey(c.mailbox) === 'INBOX' : m.includes(hash);
            });
            expect(covered, `change ${JSON.stringify(c)} not pushed to ${reg.deviceToken.slice(-2)} within ${windowMs} ms`).toBe(true);
          }
          // at most 2 per window-long interval
          const at = pushes.map((p) => p.at).sort((x, y) => x - y);
          for (let i = 0; i < at.length; i++) {
            expect(at.filter((t) => t >= at[i]! && t < at[i]! + windowMs).length).toBeLessThanOrEqual(2);
          }
          // no stray push, and `m` only for version 2
          for (const p of pushes) {
            expect(mine.some((c) => c.at <= p.at && p.at <= c.at + windowMs)).toBe(true);
            if (reg.version === 1) expect(p.payload.aps.m).toBeUndefined();
            expect(p.payload.aps['account-id']).toBe(reg.accountId);
          }
        }
        expect(d.stats()).toMatchObject({ pending: 0, inFlight: 0 });
        await d.close();
      }),
      { numRuns: 150 },
    );
  });
});
