import { describe, expect, it } from 'vitest';
import { PassThrough } from 'node:stream';
import { createLogger, FieldLogger, setLogLevel } from '../../../src/ops/log.js';

function capture(level: 'info' | 'debug' = 'info') {
  const out = new PassThrough();
  const lines: Array<Record<string, unknown>> = [];
  let pending = '';
  out.on('data', (chunk: Buffer) => {
    pending += chunk.toString();
    for (let i = pending.indexOf('\n'); i >= 0; i = pending.indexOf('\n')) {
      lines.push(JSON.parse(pending.slice(0, i)));
      pending = pending.slice(i + 1);
    }
  });
  const root = createLogger({ level, pretty: false, destination: out });
  return { root, lines, settle: () => new Promise((r) => setImmediate(r)) };
}

describe('FieldLogger', () => {
  it('writes its fields on every line, the call’s fields after them, and more fields from with()', async () => {
    const { root, lines, settle } = capture();
    const log = new FieldLogger(root, { sid: 's1', client: '192.0.2.1:1234' });
    log.info('login');
    log.warn({ reason: 'x' }, 'upstream unavailable');
    log.with({ user: 'alice' }).error({ err: 'boom' }, 'failed');
    await settle();
    expect(lines.map(({ sid, client, user, reason, err, msg, level }) => ({ sid, client, user, reason, err, msg, level }))).toEqual([
      { sid: 's1', client: '192.0.2.1:1234', user: undefined, reason: undefined, err: undefined, msg: 'login', level: 30 },
      { sid: 's1', client: '192.0.2.1:1234', user: undefined, reason: 'x', err: undefined, msg: 'upstream unavailable', level: 40 },
      { sid: 's1', client: '192.0.2.1:1234', user: 'alice', reason: undefined, err: 'boom', msg: 'failed', level: 50 },
    ]);
  });

  it('follows the root’s level as it changes, and leaves secrets redacted', async () => {
    const { root, lines, settle } = capture('info');
    const log = new FieldLogger(root, { sid: 's2' });
    log.debug({ n: 1 }, 'hidden');
    setLogLevel(root, 'debug');
    log.debug({ n: 2, password: 'hunter2' }, 'shown');
    setLogLevel(root, 'error');
    log.info('hidden too');
    await settle();
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatchObject({ sid: 's2', n: 2, msg: 'shown', password: '[redacted]' });
  });
});
