import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { UsageError } from '../../../src/cli/args.js';
import { formatTable, runDevices, type StoreOptions } from '../../../src/cli/devices.js';
import { main } from '../../../src/cli/main.js';
import { ConfigError } from '../../../src/config/index.js';
import { StoreLockedError, type Registration, type RegistrationStore } from '../../../src/store/types.js';
import { memoryIO, ROOT, runCli } from './helpers.js';

const T1 = 'a1b2c3d4'.repeat(8);
const T2 = 'a1b2c3d5'.repeat(8);
const T3 = 'ffee0011'.repeat(8);
const DAY = 86_400_000;

function reg(user: string, deviceToken: string, lastSeen: number, mailboxes = ['INBOX']): Registration {
  return {
    user,
    deviceToken,
    accountId: `ACCT-${user}`,
    subtopic: 'com.apple.mobilemail',
    mailboxes: mailboxes.map((name) => ({ name, md5: '0'.repeat(32) })),
    version: 2,
    firstSeen: lastSeen - DAY,
    lastSeen,
  };
}

/** An in-memory store recording how it was opened and whether it was closed (`view`: as a read-only view). */
function fakeStore(regs: Registration[], view?: { holderPid: number }) {
  const state = { opened: undefined as StoreOptions | undefined, closed: false, purgedAt: [] as Array<number | undefined> };
  const rows = [...regs];
  const store = {
    kind: 'embedded',
    listAll: async () => [...rows],
    listByUser: async (user: string) => rows.filter((r) => r.user === user),
    remove: async (user: string, token: string) => {
      const i = rows.findIndex((r) => r.user === user && r.deviceToken === token);
      if (i < 0) return false;
      rows.splice(i, 1);
      return true;
    },
    purgeExpired: async (now?: number) => {
      state.purgedAt.push(now);
      return 3;
    },
    close: async () => {
      state.closed = true;
    },
    ...(view ? { readOnly: true, holderPid: view.holderPid } : {}),
  } as unknown as RegistrationStore;
  const openStore = async (opts: StoreOptions) => {
    state.opened = opts;
    return store;
  };
  return { state, rows, openStore };
}

const sample = () => [reg('alice@example.net', T1, Date.UTC(2025, 0, 2, 3, 4, 5), ['INBOX', 'Work']), reg('alice@example.net', T2, Date.UTC(2025, 0, 1)), reg('bob', T3, Date.UTC(2025, 0, 3))];

describe('devices list', () => {
  it('prints a table with shortened tokens and opens the store from the configuration', async () => {
    const fake = fakeStore(sample());
    const io = memoryIO({ env: { XAPS_REGISTRATION_TTL: '7d', XAPS_REDIS_URL: 'redis://:pw@r:6379/0' }, cwd: '/srv' });
    expect(await runDevices(['list', '--data-dir', 'state'], io, { openStore: fake.openStore })).toBe(0);
    expect(fake.state.opened).toMatchObject({ redisUrl: 'redis://:pw@r:6379/0', dataDir: '/srv/state', ttlMs: 7 * DAY });
    expect(fake.state.closed).toBe(true);
    const lines = io.out().trimEnd().split('\n');
    expect(lines[0]).toMatch(/^USER\s+TOKEN\s+ACCOUNT\s+MAILBOXES\s+VERSION\s+LAST SEEN$/);
    expect(lines[1]).toMatch(/^alice@example\.net\s+a1b2c3d4…\s+ACCT-alice@example\.net\s+INBOX,Work\s+2\s+2025-01-02T03:04:05\.000Z$/);
    expect(lines).toHaveLength(5);
    expect(lines[4]).toBe('3 registrations');
    expect(io.out()).not.toContain(T1);
  });

  it('--user filters and --json prints full registrations', async () => {
    const fake = fakeStore(sample());
    const io = memoryIO();
    expect(await runDevices(['list', '--user', 'bob', '--json'], io, { openStore: fake.openStore })).toBe(0);
    expect(JSON.parse(io.out())).toEqual([reg('bob', T3, Date.UTC(2025, 0, 3))]);
  });

  it('says so when there is nothing', async () => {
    const io = memoryIO();
    expect(await runDevices(['list', '--user', 'carol'], io, { openStore: fakeStore(sample()).openStore })).toBe(0);
    expect(io.out()).toBe('no registrations for "carol"\n');
    expect(formatTable([])).toBe('no registrations\n');
  });

  it('asks for a read-only view if the store is locked, and says on stderr when it got one', async () => {
    const fake = fakeStore(sample());
    const io = memoryIO();
    expect(await runDevices(['list', '--data-dir', '/srv/state'], io, { openStore: fake.openStore })).toBe(0);
    expect(fake.state.opened?.access).toBe('read-only-if-locked');
    expect(io.err()).toBe('');

    const view = fakeStore(sample(), { holderPid: 4242 });
    const json = memoryIO();
    expect(await runDevices(['list', '--json', '--data-dir', '/srv/state'], json, { openStore: view.openStore })).toBe(0);
    expect(JSON.parse(json.out())).toEqual(sample());
    expect(json.err()).toBe('xaps-proxy: note: the store in /srv/state is in use by pid 4242; showing a read-only view\n');
    expect(view.state.closed).toBe(true);
  });

  it('rejects serve-only options', async () => {
    const fake = fakeStore([]);
    await expect(runDevices(['list', '--upstream', 'imap:143'], memoryIO(), { openStore: fake.openStore })).rejects.toThrow(ConfigError);
    expect(fake.state.opened).toBeUndefined();
  });
});

describe('devices remove', () => {
  it('removes by full token', async () => {
    const fake = fakeStore(sample());
    const io = memoryIO();
    expect(await runDevices(['remove', '--user', 'bob', '--token', T3], io, { openStore: fake.openStore })).toBe(0);
    expect(io.out()).toBe('removed the registration of "bob" with token ffee0011…\n');
    expect(fake.rows.map((r) => r.deviceToken)).toEqual([T1, T2]);
    expect(fake.state.closed).toBe(true);
  });

  it('accepts a unique prefix as shown by list (with or without the ellipsis, any case)', async () => {
    const fake = fakeStore(sample());
    expect(await runDevices(['remove', '--user=bob', '--token=FFEE0011…'], memoryIO(), { openStore: fake.openStore })).toBe(0);
    expect(fake.rows.some((r) => r.deviceToken === T3)).toBe(false);
  });

  it('refuses an ambiguous prefix', async () => {
    // T1 and T2 share 7 digits; 8 digits tell them apart.
    const fake = fakeStore(sample());
    await expect(runDevices(['remove', '--user', 'alice@example.net', '--token', 'a1b2c3d4'], memoryIO(), { openStore: fake.openStore })).resolves.toBe(0);
    expect(fake.rows.map((r) => r.deviceToken)).toEqual([T2, T3]);
    const again = fakeStore([reg('u', 'abcdef01' + '0'.repeat(56), 1), reg('u', 'abcdef01' + '1'.repeat(56), 1)]);
    await expect(runDevices(['remove', '--user', 'u', '--token', 'abcdef01'], memoryIO(), { openStore: again.openStore })).rejects.toThrow(/matches 2 registrations/);
    expect(again.rows).toHaveLength(2);
    expect(again.state.closed).toBe(true);
  });

  it('exits 1 with a message when nothing was removed', async () => {
    const fake = fakeStore(sample());
    const io = memoryIO();
    expect(await runDevices(['remove', '--user', 'carol', '--token', T1], io, { openStore: fake.openStore })).toBe(1);
    expect(io.err()).toBe('xaps-proxy: no registration of "carol" with token a1b2c3d4…; nothing removed\n');
    expect(fake.rows).toHaveLength(3);
  });

  it('requires --user and a hex --token', async () => {
    const open = fakeStore([]).openStore;
    await expect(runDevices(['remove', '--token', T1], memoryIO(), { openStore: open })).rejects.toThrow(new UsageError('devices remove: --user is required'));
    await expect(runDevices(['remove', '--user', 'bob'], memoryIO(), { openStore: open })).rejects.toThrow(/--token is required/);
    await expect(runDevices(['remove', '--user', 'bob', '--token', 'xyz'], memoryIO(), { openStore: open })).rejects.toThrow(/--token must be the device token in hex/);
    await expect(runDevices(['remove', '--user'], memoryIO(), { openStore: open })).rejects.toThrow(/--user: missing value/);
  });
});

describe('devices remove and purge-expired: a locked store', () => {
  const locked = async () => {
    throw new StoreLockedError('data directory /srv/state is in use by pid 4242 on host (since …); stop that process first', {
      lockFile: '/srv/state/store.lock',
      pid: 4242,
    });
  };

  it('open the store read-write, and exit 1 with one line naming the data dir and the pid when it is locked', async () => {
    const fake = fakeStore(sample());
    expect(await runDevices(['purge-expired'], memoryIO(), { openStore: fake.openStore })).toBe(0);
    expect(fake.state.opened?.access).toBe('read-write');
    expect(await runDevices(['remove', '--user', 'bob', '--token', T3], memoryIO(), { openStore: fake.openStore })).toBe(0);
    expect(fake.state.opened?.access).toBe('read-write');

    const remove = memoryIO();
    expect(await runDevices(['remove', '--user', 'bob', '--token', T3, '--data-dir', '/srv/state'], remove, { openStore: locked })).toBe(1);
    expect(remove.out()).toBe('');
    expect(remove.err()).toBe(
      'xaps-proxy: cannot remove registrations: the data directory /srv/state is in use by pid 4242 (a running xaps-proxy?); ' +
        'stop it first, or use Redis (--redis-url) for live administration\n',
    );
    const purge = memoryIO();
    expect(await runDevices(['purge-expired', '--data-dir', '/srv/state'], purge, { openStore: locked })).toBe(1);
    expect(purge.err()).toBe(
      'xaps-proxy: cannot purge expired registrations: the data directory /srv/state is in use by pid 4242 (a running xaps-proxy?); ' +
        'stop it first, or use Redis (--redis-url) for live administration\n',
    );
  });

  it('other store errors still propagate', async () => {
    const unreadable = async () => {
      throw new StoreLockedError('data directory /srv/state has an unreadable lock file /srv/state/store.lock', { lockFile: '/srv/state/store.lock' });
    };
    await expect(runDevices(['purge-expired'], memoryIO(), { openStore: unreadable })).rejects.toThrow(/unreadable lock file/);
    await expect(runDevices(['list'], memoryIO(), { openStore: unreadable })).rejects.toThrow(/unreadable lock file/);
  });
});

describe('devices purge-expired and dispatch', () => {
  it('prints how many were removed', async () => {
    const fake = fakeStore([]);
    const io = memoryIO();
    expect(await runDevices(['purge-expired'], io, { openStore: fake.openStore })).toBe(0);
    expect(io.out()).toBe('removed 3 expired registrations\n');
    expect(fake.state.closed).toBe(true);
  });

  it('unknown devices subcommands are usage errors (exit 2 through main)', async () => {
    await expect(runDevices(['frob'], memoryIO())).rejects.toThrow(UsageError);
    const io = memoryIO();
    expect(await main(['devices', 'frob'], io)).toBe(2);
    expect(io.err()).toBe('xaps-proxy: unknown devices command "frob" (expected list, remove or purge-expired)\n');
    const flag = memoryIO();
    expect(await main(['devices', 'purge-expired', '--user', 'x'], flag)).toBe(2);
    expect(flag.err()).toBe('xaps-proxy: --user: unknown option\n');
  });
});

describe('devices against the real embedded store', () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'xaps-devices-'));
  afterAll(() => rmSync(dataDir, { recursive: true, force: true }));

  it('lists, removes and purges through createStore', async () => {
    const { createStore } = await import('../../../src/store/index.js');
    const store = await createStore({ dataDir, ttlMs: 30 * DAY });
    await store.upsert({ user: 'alice', deviceToken: T1, accountId: 'A-1', subtopic: 'com.apple.mobilemail', mailboxes: [{ name: 'INBOX', md5: 'e'.repeat(32) }], version: 2 });
    await store.upsert({ user: 'bob', deviceToken: T3, accountId: 'B-1', subtopic: 'com.apple.mobilemail', mailboxes: [], version: 1, now: Date.now() - 40 * DAY });
    await store.close();

    const list = memoryIO();
    expect(await main(['devices', 'list', '--json', '--data-dir', dataDir, '--log-level', 'silent'], list)).toBe(0);
    expect((JSON.parse(list.out()) as Registration[]).map((r) => [r.user, r.deviceToken])).toEqual([['alice', T1]]);

    const purge = memoryIO();
    expect(await main(['devices', 'purge-expired', '--data-dir', dataDir, '--log-level', 'silent'], purge)).toBe(0);
    expect(purge.out()).toBe('removed 1 expired registration\n');

    const remove = memoryIO();
    expect(await main(['devices', 'remove', '--user', 'alice', '--token', T1.slice(0, 8), '--data-dir', dataDir, '--log-level', 'silent'], remove)).toBe(0);
    const missing = memoryIO();
    expect(await main(['devices', 'remove', '--user', 'alice', '--token', T1, '--data-dir', dataDir, '--log-level', 'silent'], missing)).toBe(1);
    const empty = memoryIO();
    expect(await main(['devices', 'list', '--data-dir', dataDir, '--log-level', 'silent'], empty)).toBe(0);
    expect(empty.out()).toBe('no registrations\n');
  });
});

describe('devices while another process (the proxy) holds the embedded store', () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'xaps-devices-locked-'));
  const children: ChildProcess[] = [];
  afterEach(() => {
    for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  });
  afterAll(() => rmSync(dataDir, { recursive: true, force: true }));

  /** Names, sizes and mtimes of the files in the data dir. */
  const files = () => readdirSync(dataDir).sort().map((name) => {
    const st = statSync(join(dataDir, name));
    return { name, size: st.size, mtimeMs: st.mtimeMs };
  });

  it('list shows its registrations read-only; remove and purge-expired exit 1; nothing in the data dir changes', async () => {
    const { createStore } = await import('../../../src/store/index.js');
    const store = await createStore({ dataDir, ttlMs: 30 * DAY });
    const now = Date.now();
    await store.upsert({ user: 'alice', deviceToken: T1, accountId: 'A-1', subtopic: 'com.apple.mobilemail', mailboxes: [{ name: 'INBOX', md5: 'e'.repeat(32) }], version: 2, now });
    await store.upsert({ user: 'alice', deviceToken: T2, accountId: 'A-2', subtopic: 'com.apple.mobilemail', mailboxes: [], version: 1, now });
    await store.upsert({ user: 'bob', deviceToken: T3, accountId: 'B-1', subtopic: 'com.apple.mobilemail', mailboxes: [], version: 1, now: now - 40 * DAY });
    await store.close();

    const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'test/unit/store/fixtures/hold-open.ts'), dataDir], {
      cwd: ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    children.push(child);
    const pid = await new Promise<number>((resolve, reject) => {
      createInterface({ input: child.stdout as NodeJS.ReadableStream }).on('line', (line) => {
        if (line.startsWith('READY ')) resolve(Number(line.slice(6)));
      });
      child.once('exit', (code) => reject(new Error(`hold-open exited early (${code})`)));
    });
    const before = files();
    expect(before.map((f) => f.name)).toContain('store.lock');

    const [json, table, remove, purge] = await Promise.all([
      runCli(['devices', 'list', '--json', '--data-dir', dataDir]),
      runCli(['devices', 'list', '--user', 'alice', '--data-dir', dataDir]),
      runCli(['devices', 'remove', '--user', 'alice', '--token', T1, '--data-dir', dataDir]),
      runCli(['devices', 'purge-expired', '--data-dir', dataDir]),
    ]);
    const note = `xaps-proxy: note: the store in ${dataDir} is in use by pid ${pid}; showing a read-only view\n`;
    expect(json.stderr).toBe(note);
    expect(json.code).toBe(0);
    expect((JSON.parse(json.stdout) as Registration[]).map((r) => [r.user, r.deviceToken, r.accountId, r.firstSeen])).toEqual([
      ['alice', T1, 'A-1', now],
      ['alice', T2, 'A-2', now],
    ]);
    expect(table.stderr).toBe(note);
    expect(table.code).toBe(0);
    expect(table.stdout).toMatch(/^alice\s+a1b2c3d4…\s+A-1\s+INBOX\s+2\s/m);
    expect(table.stdout).toMatch(/\n2 registrations\n$/);

    const busy = (what: string) =>
      `xaps-proxy: cannot ${what}: the data directory ${dataDir} is in use by pid ${pid} (a running xaps-proxy?); ` +
      'stop it first, or use Redis (--redis-url) for live administration\n';
    expect(remove).toEqual({ code: 1, stdout: '', stderr: busy('remove registrations') });
    expect(purge).toEqual({ code: 1, stdout: '', stderr: busy('purge expired registrations') });
    expect(files()).toEqual(before);

    // once the proxy is gone, the same commands work on the same data
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill('SIGKILL');
    await exited;
    const purged = memoryIO();
    expect(await main(['devices', 'purge-expired', '--data-dir', dataDir, '--log-level', 'silent'], purged)).toBe(0);
    expect(purged.out()).toBe('removed 1 expired registration\n');
    const removed = memoryIO();
    expect(await main(['devices', 'remove', '--user', 'alice', '--token', T1, '--data-dir', dataDir, '--log-level', 'silent'], removed)).toBe(0);
    const list = memoryIO();
    expect(await main(['devices', 'list', '--json', '--data-dir', dataDir, '--log-level', 'silent'], list)).toBe(0);
    expect(list.err()).toBe('');
    expect((JSON.parse(list.out()) as Registration[]).map((r) => r.deviceToken)).toEqual([T2]);
  });
});
