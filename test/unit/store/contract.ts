/**
 * Behaviour every RegistrationStore must have; run by the embedded and Redis test files:
 *   storeContract('embedded', async ({ ttlMs }) => ({ store, cleanup }))
 * Expiry is tested through explicit `now` values far from the real clock, never by sleeping.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { mailboxRef } from '../../../src/store/common.js';
import type { MailboxStatus, Registration, RegistrationInput, RegistrationStore } from '../../../src/store/types.js';

export interface ContractStore {
  store: RegistrationStore;
  cleanup: () => Promise<void>;
}
export type MakeStore = (opts: { ttlMs: number }) => Promise<ContractStore>;

/** The TTL the contract runs with: short next to 30 days, long next to any test run. */
export const CONTRACT_TTL_MS = 10 * 60_000;

export function tokenFor(n: number, salt = 0): string {
  return (salt.toString(16) + n.toString(16).padStart(16, '0')).padStart(64, 'a');
}

export function inputFor(user: string, n: number, extra: Partial<RegistrationInput> = {}): RegistrationInput {
  return {
    user,
    deviceToken: tokenFor(n),
    accountId: `0715A26B-1C2D-4E3F-8A9B-${n.toString(16).padStart(12, '0').toUpperCase()}`,
    subtopic: 'com.apple.mobilemail',
    mailboxes: [mailboxRef('INBOX')],
    version: 2,
    ...extra,
  };
}

function fields(r: Registration): Omit<Registration, 'firstSeen' | 'lastSeen'> {
  const { firstSeen: _f, lastSeen: _l, ...rest } = r;
  return rest;
}

export function storeContract(name: string, makeStore: MakeStore): void {
  describe(`${name}: RegistrationStore contract`, () => {
    const TTL = CONTRACT_TTL_MS;
    let store: RegistrationStore;
    let cleanup: () => Promise<void>;

    beforeEach(async () => {
      ({ store, cleanup } = await makeStore({ ttlMs: TTL }));
    });
    afterEach(async () => {
      await cleanup();
    });

    it('creates a registration and reads it back', async () => {
      const now = Date.now();
      const input = inputFor('alice', 1, { now, mailboxes: [mailboxRef('INBOX'), mailboxRef('Sent Messages')] });
      const res = await store.upsert(input);
      expect(res.created).toBe(true);
      expect(res.registration).toEqual({ ...inputFor('alice', 1, { mailboxes: input.mailboxes }), firstSeen: now, lastSeen: now });
      expect(await store.get('alice', tokenFor(1))).toEqual(res.registration);
      expect(await store.get('alice', tokenFor(2))).toBeNull();
      expect(await store.get('bob', tokenFor(1))).toBeNull();
      await expect(store.ping()).resolves.toBeUndefined();
    });

    it('uses the clock when no time is given', async () => {
      const before = Date.now();
      const { registration } = await store.upsert(inputFor('alice', 1));
      const after = Date.now();
      expect(registration.lastSeen).toBeGreaterThanOrEqual(before);
      expect(registration.lastSeen).toBeLessThanOrEqual(after);
      expect(registration.firstSeen).toBe(registration.lastSeen);
    });

    it('updates in place: firstSeen kept, lastSeen and fields move', async () => {
      const t0 = Date.now() - 60_000;
      await store.upsert(inputFor('alice', 1, { now: t0 }));
      const res = await store.upsert(inputFor('alice', 1, {
        now: t0 + 5000,
        version: 1,
        mailboxes: [mailboxRef('INBOX'), mailboxRef('Archive')],
      }));
      expect(res.created).toBe(false);
      expect(res.registration.firstSeen).toBe(t0);
      expect(res.registration.lastSeen).toBe(t0 + 5000);
      const got = await store.get('alice', tokenFor(1));
      expect(got).toEqual(res.registration);
      expect(got?.version).toBe(1);
      expect(got?.mailboxes.map((m) => m.name)).toEqual(['INBOX', 'Archive']);
      expect(await store.counts()).toEqual({ users: 1, registrations: 1 });
    });

    it('replaces the row when the account id rotates for the same (user, token)', async () => {
      const t0 = Date.now() - 60_000;
      await store.upsert(inputFor('alice', 1, { now: t0, accountId: 'OLD-ACCOUNT-ID' }));
      const res = await store.upsert(inputFor('alice', 1, { now: t0 + 1, accountId: 'NEW-ACCOUNT-ID' }));
      expect(res.created).toBe(false);
      const rows = await store.listByUser('alice');
      expect(rows).toHaveLength(1);
      expect(rows[0]?.accountId).toBe('NEW-ACCOUNT-ID');
      expect(rows[0]?.firstSeen).toBe(t0);
    });

    it('keeps one row per user when two users share a device token', async () => {
      const now = Date.now();
      expect((await store.upsert(inputFor('alice', 7, { now }))).created).toBe(true);
      expect((await store.upsert(inputFor('bob', 7, { now, accountId: 'BOB-ID' }))).created).toBe(true);
      expect(await store.listAll()).toHaveLength(2);
      expect((await store.get('alice', tokenFor(7)))?.user).toBe('alice');
      expect((await store.get('bob', tokenFor(7)))?.accountId).toBe('BOB-ID');
      expect(await store.remove('alice', tokenFor(7))).toBe(true);
      expect(await store.get('alice', tokenFor(7))).toBeNull();
      expect((await store.get('bob', tokenFor(7)))?.user).toBe('bob');
      expect(await store.counts()).toEqual({ users: 1, registrations: 1 });
    });

    it('treats device tokens case-insensitively and stores them lowercase', async () => {
      const upper = tokenFor(0xabc).toUpperCase();
      const res = await store.upsert(inputFor('alice', 0xabc, { deviceToken: upper }));
      expect(res.registration.deviceToken).toBe(tokenFor(0xabc));
      expect((await store.get('alice', upper))?.deviceToken).toBe(tokenFor(0xabc));
      expect(await store.remove('alice', upper)).toBe(true);
    });

    it('rejects malformed input', async () => {
      await expect(store.upsert(inputFor('alice', 1, { deviceToken: 'abc' }))).rejects.toBeInstanceOf(TypeError);
      await expect(store.upsert(inputFor('alice', 1, { deviceToken: 'g'.repeat(64) }))).rejects.toBeInstanceOf(TypeError);
      await expect(store.upsert(inputFor('', 1))).rejects.toBeInstanceOf(TypeError);
      await expect(store.upsert(inputFor('alice', 1, { version: 3 as 2 }))).rejects.toBeInstanceOf(TypeError);
      await expect(store.upsert(inputFor('alice', 1, { mailboxes: [{ name: 'INBOX', md5: 'nope' }] }))).rejects.toBeInstanceOf(TypeError);
      expect(await store.listAll()).toEqual([]);
    });

    it('hides expired registrations and recreates them as new', async () => {
      const old = Date.now() - TTL - 60_000;
      await store.upsert(inputFor('alice', 1, { now: old }));
      await store.upsert(inputFor('alice', 2, { now: Date.now() }));
      await store.upsert(inputFor('carol', 3, { now: old }));
      expect(await store.get('alice', tokenFor(1))).toBeNull();
      expect((await store.listByUser('alice')).map((r) => r.deviceToken)).toEqual([tokenFor(2)]);
      expect(await store.listByUser('carol')).toEqual([]);
      expect(await store.listUsers()).toEqual(['alice']);
      expect((await store.listAll()).map((r) => [r.user, r.deviceToken])).toEqual([['alice', tokenFor(2)]]);
      expect(await store.counts()).toEqual({ users: 1, registrations: 1 });

      const now = Date.now();
      const again = await store.upsert(inputFor('alice', 1, { now }));
      expect(again.created).toBe(true);
      expect(again.registration.firstSeen).toBe(now);
      expect(await store.counts()).toEqual({ users: 1, registrations: 2 });
    });

    it('expires exactly ttl after lastSeen', async () => {
      const now = Date.now();
      await store.upsert(inputFor('alice', 1, { now: now - TTL - 1 }));
      await store.upsert(inputFor('alice', 2, { now: now - TTL + 120_000 }));
      expect(await store.get('alice', tokenFor(1))).toBeNull();
      expect(await store.get('alice', tokenFor(2))).not.toBeNull();
      expect(await store.purgeExpired(now - 1)).toBe(1);
      // at lastSeen + ttl exactly the registration is expired
      expect(await store.purgeExpired(now - TTL + 120_000 + TTL)).toBe(1);
      expect(await store.listAll()).toEqual([]);
    });

    it('lists by user, users and everything in a stable order', async () => {
      const now = Date.now();
      for (const [user, n] of [['bob', 5], ['alice', 3], ['alice', 1], ['bob', 2], ['dave', 9], ['alice', 2]] as const) {
        await store.upsert(inputFor(user, n, { now }));
      }
      expect((await store.listByUser('alice')).map((r) => r.deviceToken)).toEqual([tokenFor(1), tokenFor(2), tokenFor(3)]);
      expect((await store.listByUser('alice')).every((r) => r.user === 'alice')).toBe(true);
      expect(await store.listByUser('nobody')).toEqual([]);
      expect(await store.listUsers()).toEqual(['alice', 'bob', 'dave']);
      expect((await store.listAll()).map((r) => `${r.user}/${r.deviceToken.slice(-1)}`)).toEqual([
        'alice/1', 'alice/2', 'alice/3', 'bob/2', 'bob/5', 'dave/9',
      ]);
      expect(await store.counts()).toEqual({ users: 3, registrations: 6 });
    });

    it('removes registrations', async () => {
      const now = Date.now();
      await store.upsert(inputFor('alice', 1, { now }));
      await store.upsert(inputFor('alice', 2, { now }));
      expect(await store.remove('alice', tokenFor(1))).toBe(true);
      expect(await store.remove('alice', tokenFor(1))).toBe(false);
      expect(await store.remove('alice', tokenFor(99))).toBe(false);
      expect(await store.remove('nobody', tokenFor(1))).toBe(false);
      expect(await store.get('alice', tokenFor(1))).toBeNull();
      expect(await store.listUsers()).toEqual(['alice']);
      expect(await store.remove('alice', tokenFor(2))).toBe(true);
      expect(await store.listUsers()).toEqual([]);
      expect(await store.counts()).toEqual({ users: 0, registrations: 0 });
      // the user can come back
      expect((await store.upsert(inputFor('alice', 1, { now }))).created).toBe(true);
      expect(await store.listUsers()).toEqual(['alice']);
    });

    it('removes with unlessSeenAfter only when not re-registered since (APNs 410)', async () => {
      const t = Date.now() - 30_000;
      await store.upsert(inputFor('alice', 1, { now: t }));
      expect(await store.remove('alice', tokenFor(1), { unlessSeenAfter: t - 1 })).toBe(false);
      expect(await store.get('alice', tokenFor(1))).not.toBeNull();
      expect(await store.remove('alice', tokenFor(1), { unlessSeenAfter: t })).toBe(true);
      expect(await store.get('alice', tokenFor(1))).toBeNull();

      await store.upsert(inputFor('alice', 2, { now: t }));
      expect(await store.remove('alice', tokenFor(2), { unlessSeenAfter: t + 10_000 })).toBe(true);
      expect(await store.remove('alice', tokenFor(3), { unlessSeenAfter: t + 10_000 })).toBe(false);
    });

    it('does not count removing an expired registration, and drops it', async () => {
      await store.upsert(inputFor('alice', 1, { now: Date.now() - TTL - 60_000 }));
      expect(await store.remove('alice', tokenFor(1))).toBe(false);
      expect(await store.purgeExpired()).toBe(0);
    });

    it('purges expired registrations', async () => {
      const now = Date.now();
      const old = now - TTL - 60_000;
      // (a store may purge a user's expired registrations when that user upserts at a later time, so the
      // expired ones are written last)
      await store.upsert(inputFor('alice', 2, { now }));
      await store.upsert(inputFor('alice', 1, { now: old }));
      await store.upsert(inputFor('bob', 3, { now: old }));
      await store.upsert(inputFor('bob', 4, { now: old }));
      expect(await store.purgeExpired()).toBe(3);
      expect(await store.purgeExpired()).toBe(0);
      expect(await store.counts()).toEqual({ users: 1, registrations: 1 });
      expect(await store.listUsers()).toEqual(['alice']);
      // a purge "in the future" removes what will have expired by then
      expect(await store.purgeExpired(now + TTL)).toBe(1);
      expect(await store.listUsers()).toEqual([]);
      expect(await store.counts()).toEqual({ users: 0, registrations: 0 });
      expect((await store.upsert(inputFor('bob', 3, { now }))).created).toBe(true);
      expect(await store.listUsers()).toEqual(['bob']);
    });

    it('counts live users and registrations', async () => {
      expect(await store.counts()).toEqual({ users: 0, registrations: 0 });
      const now = Date.now();
      for (let i = 0; i < 5; i++) await store.upsert(inputFor(`u${i % 2}`, i, { now }));
      await store.upsert(inputFor('ghost', 9, { now: now - TTL - 1000 }));
      expect(await store.counts()).toEqual({ users: 2, registrations: 5 });
    });

    it('keeps usernames with braces, colons, stars, percent signs and unicode apart and intact', async () => {
      const users = [
        'a{b}c', '{', '}', '}{', '{}', 'x:y:*', '*', '%7B', '%', 'xaps:{u:evil}:regs', 'user with spaces',
        'ünïcødé@例え.jp', '😀📬', 'tab\there', 'line\nbreak', 'alice', 'ALICE',
      ];
      const now = Date.now();
      for (const [i, user] of users.entries()) {
        const res = await store.upsert(inputFor(user, i, { now }));
        expect(res.created).toBe(true);
      }
      for (const [i, user] of users.entries()) {
        const got = await store.get(user, tokenFor(i));
        expect(got?.user).toBe(user);
        expect((await store.listByUser(user)).map((r) => r.deviceToken)).toEqual([tokenFor(i)]);
      }
      expect(await store.listUsers()).toEqual([...users].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)));
      expect(await store.counts()).toEqual({ users: users.length, registrations: users.length });
      expect(await store.remove('{', tokenFor(1))).toBe(true);
      expect(await store.get('}', tokenFor(2))).not.toBeNull();
      expect(await store.purgeExpired(now + TTL)).toBe(users.length - 1);
      expect(await store.listUsers()).toEqual([]);
    });

    it('keeps unicode mailbox names and their order intact', async () => {
      const names = ['INBOX', 'Entwürfe', '日本語のフォルダ', '📥 Eingang', 'Sent "quoted"', 'a\\b', 'Ärger/Sub Folder', '&AMQ-'];
      const mailboxes = names.map(mailboxRef);
      await store.upsert(inputFor('alice', 1, { mailboxes }));
      const got = await store.get('alice', tokenFor(1));
      expect(got?.mailboxes).toEqual(mailboxes);
      expect(got?.mailboxes[2]?.md5).toBe(mailboxRef('日本語のフォルダ').md5);
      expect((await store.listAll())[0]?.mailboxes).toEqual(mailboxes);
    });

    it('returns copies that callers cannot use to change the store', async () => {
      const { registration } = await store.upsert(inputFor('alice', 1));
      registration.mailboxes.push(mailboxRef('Hacked'));
      registration.accountId = 'changed';
      const got = await store.get('alice', tokenFor(1));
      expect(got?.mailboxes).toHaveLength(1);
      (got as Registration).mailboxes.length = 0;
      expect((await store.listByUser('alice'))[0]?.mailboxes).toHaveLength(1);
      expect((await store.get('alice', tokenFor(1)))?.accountId).not.toBe('changed');
    });

    it('handles concurrent upserts', async () => {
      const now = Date.now();
      const results = await Promise.all(Array.from({ length: 60 }, (_, i) => store.upsert(inputFor(`c${i % 4}`, i, { now }))));
      expect(results.every((r) => r.created)).toBe(true);
      expect(await store.counts()).toEqual({ users: 4, registrations: 60 });
      const same = await Promise.all(Array.from({ length: 10 }, (_, i) => store.upsert(inputFor('same', 1, { now: now + i }))));
      expect(same.filter((r) => r.created)).toHaveLength(1);
      const got = await store.get('same', tokenFor(1));
      expect(got?.firstSeen).toBe(Math.min(...same.map((r) => r.registration.firstSeen)));
      expect(fields(got as Registration)).toEqual(fields(same[0]?.registration as Registration));
    });
  });

  describe(`${name}: MailboxStateStore contract`, () => {
    const TTL = CONTRACT_TTL_MS;
    let store: RegistrationStore;
    let cleanup: () => Promise<void>;

    beforeEach(async () => {
      ({ store, cleanup } = await makeStore({ ttlMs: TTL }));
    });
    afterEach(async () => {
      await cleanup();
    });

    it('stores the last status per mailbox and reads it back', async () => {
      expect(await store.getMailboxStates('alice')).toEqual({});
      await store.upsert(inputFor('alice', 1));
      expect(await store.getMailboxStates('alice')).toEqual({});
      await store.setMailboxState('alice', 'INBOX', status(1, 10, 9));
      await store.setMailboxState('alice', 'Archive', status(2, 5, 4));
      expect(await store.getMailboxStates('alice')).toEqual({ INBOX: status(1, 10, 9), Archive: status(2, 5, 4) });
      await store.setMailboxState('alice', 'INBOX', status(1, 11, 10));
      await store.setMailboxState('alice', 'INBOX', status(1, 11, 10)); // unchanged: fine
      expect(await store.getMailboxStates('alice')).toEqual({ INBOX: status(1, 11, 10), Archive: status(2, 5, 4) });
      expect(await store.getMailboxStates('bob')).toEqual({});
      // states do not disturb the registrations
      expect(await store.counts()).toEqual({ users: 1, registrations: 1 });
      expect(await store.listUsers()).toEqual(['alice']);
    });

    it('keeps unicode and odd mailbox names and users with braces apart and intact', async () => {
      const users = ['a{b}c', '{', '%7B', 'ünï😀', 'xaps:{u:evil}:mbx'];
      const names = ['INBOX', 'Entwürfe', '日本語', '📥 Eingang', 'Sent "quoted"', 'a\\b', 'Ärger/Sub', '&AMQ-', '__proto__', 'constructor'];
      for (const [i, user] of users.entries()) await store.upsert(inputFor(user, i));
      for (const [i, user] of users.entries()) {
        for (const [j, name] of names.entries()) await store.setMailboxState(user, name, status(i + 1, j + 1, j));
      }
      for (const [i, user] of users.entries()) {
        const got = await store.getMailboxStates(user);
        expect(Object.keys(got).sort()).toEqual([...names].sort());
        for (const [j, name] of names.entries()) expect(Object.getOwnPropertyDescriptor(got, name)?.value).toEqual(status(i + 1, j + 1, j));
      }
      // a mailbox named like an Object.prototype member reads as absent until stored
      const alice = await store.upsert(inputFor('alice', 99));
      expect(alice.created).toBe(true);
      const none = await store.getMailboxStates('alice');
      expect(none.toString).toBeUndefined();
      expect(none.constructor).toBeUndefined();
      expect(Object.keys(none)).toEqual([]);
    });

    it('ignores states of users without registrations (no orphans)', async () => {
      await store.setMailboxState('nobody', 'INBOX', status(1, 2, 1));
      expect(await store.getMailboxStates('nobody')).toEqual({});
      await store.upsert(inputFor('nobody', 1));
      expect(await store.getMailboxStates('nobody')).toEqual({});
    });

    it('drops the states with the last registration removed, not before', async () => {
      const now = Date.now();
      await store.upsert(inputFor('alice', 1, { now }));
      await store.upsert(inputFor('alice', 2, { now }));
      await store.upsert(inputFor('bob', 3, { now }));
      await store.setMailboxState('alice', 'INBOX', status(7, 100, 99));
      await store.setMailboxState('bob', 'INBOX', status(8, 3, 2));
      expect(await store.remove('alice', tokenFor(1))).toBe(true);
      expect(await store.getMailboxStates('alice')).toEqual({ INBOX: status(7, 100, 99) });
      expect(await store.remove('alice', tokenFor(2))).toBe(true);
      expect(await store.getMailboxStates('alice')).toEqual({});
      expect(await store.getMailboxStates('bob')).toEqual({ INBOX: status(8, 3, 2) });
      // a user who comes back starts without states
      await store.upsert(inputFor('alice', 1, { now }));
      expect(await store.getMailboxStates('alice')).toEqual({});
      // a remove (unlessSeenAfter) that removes nothing keeps them
      await store.setMailboxState('alice', 'INBOX', status(7, 101, 100));
      expect(await store.remove('alice', tokenFor(1), { unlessSeenAfter: now - 1 })).toBe(false);
      expect(await store.getMailboxStates('alice')).toEqual({ INBOX: status(7, 101, 100) });
    });

    it('drops the states of users whose registrations were all purged', async () => {
      const now = Date.now();
      const old = now - TTL - 60_000;
      await store.upsert(inputFor('alice', 1, { now }));
      await store.upsert(inputFor('carol', 2, { now: old + 1000 }));
      await store.upsert(inputFor('carol', 3, { now: old + 2000 }));
      await store.setMailboxState('alice', 'INBOX', status(1, 2, 1));
      await store.setMailboxState('carol', 'INBOX', status(3, 4, 3));
      await store.setMailboxState('carol', 'Work', status(5, 6, 5));
      expect(await store.purgeExpired()).toBe(2);
      expect(await store.getMailboxStates('carol')).toEqual({});
      expect(await store.getMailboxStates('alice')).toEqual({ INBOX: status(1, 2, 1) });
      expect(await store.purgeExpired(now + TTL)).toBe(1);
      expect(await store.getMailboxStates('alice')).toEqual({});
    });

    it('rejects malformed mailbox states', async () => {
      await store.upsert(inputFor('alice', 1));
      const bad: unknown[] = [
        null, {}, { uidValidity: 1, uidNext: 2 }, { uidValidity: -1, uidNext: 2, messages: 0 },
        { uidValidity: 1.5, uidNext: 2, messages: 0 }, { uidValidity: '1', uidNext: 2, messages: 0 },
      ];
      for (const b of bad) {
        await expect(store.setMailboxState('alice', 'INBOX', b as MailboxStatus)).rejects.toBeInstanceOf(TypeError);
      }
      await expect(store.setMailboxState('', 'INBOX', status(1, 1, 0))).rejects.toBeInstanceOf(TypeError);
      await expect(store.setMailboxState('alice', '', status(1, 1, 0))).rejects.toBeInstanceOf(TypeError);
      expect(await store.getMailboxStates('alice')).toEqual({});
    });

    it('stores only the status fields and returns copies', async () => {
      await store.upsert(inputFor('alice', 1));
      await store.setMailboxState('alice', 'INBOX', { ...status(1, 2, 1), extra: 'x' } as MailboxStatus);
      const got = await store.getMailboxStates('alice');
      expect(got).toEqual({ INBOX: status(1, 2, 1) });
      (got.INBOX as MailboxStatus).uidNext = 999;
      expect(await store.getMailboxStates('alice')).toEqual({ INBOX: status(1, 2, 1) });
    });

    it('handles concurrent writes of many mailboxes and users', async () => {
      for (let u = 0; u < 4; u++) await store.upsert(inputFor(`c${u}`, u));
      await Promise.all(Array.from({ length: 80 }, (_, i) => store.setMailboxState(`c${i % 4}`, `box${i}`, status(1, i + 1, i))));
      for (let u = 0; u < 4; u++) {
        const got = await store.getMailboxStates(`c${u}`);
        expect(Object.keys(got)).toHaveLength(20);
        expect(got[`box${u + 4}`]).toEqual(status(1, u + 5, u + 4));
      }
    });
  });
}

export function status(uidValidity: number, uidNext: number, messages: number): MailboxStatus {
  return { uidValidity, uidNext, messages };
}
