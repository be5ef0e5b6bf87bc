/**
 * `xaps-proxy test-push --user U [--token T]`: one push to each stored registration
 * of a user (or to one device), printing APNs's answer for each — for operators
 * checking a new certificate. Answers have their usual effect: a device APNs calls
 * unregistered is removed (unless the store is held read-only by a running proxy).
 */
import { configOrigins, loadConfig, type ConfigFor } from '../config/index.js';
import { createLogger, shortToken } from '../ops/log.js';
import { createRegistry } from '../ops/metrics.js';
import { createStore } from '../store/index.js';
import type { Registration } from '../store/types.js';
import { PushService } from '../push/service.js';
import { ApnsTransportError, type ApnsResponse } from '../apns/types.js';
import { classifyAnswer } from '../apns/dispatcher.js';
import { PROG, takeLocalFlags, UsageError, wantsHelp, helpText, type CliIO } from './args.js';

function describe(reg: Registration, answer: ApnsResponse | ApnsTransportError): string {
  const who = `${reg.user}  ${shortToken(reg.deviceToken)}  ${reg.accountId}`;
  if (answer instanceof ApnsTransportError) return `${who}  no answer (${answer.kind}): ${answer.message}`;
  const parts = [String(answer.status), answer.reason ?? (answer.status === 200 ? 'delivered' : ''), `-> ${classifyAnswer(answer)}`];
  if (answer.apnsId) parts.push(`apns-id=${answer.apnsId}`);
  if (answer.timestamp) parts.push(`timestamp=${new Date(answer.timestamp).toISOString()}`);
  return `${who}  ${parts.filter(Boolean).join(' ')}`;
}

export async function runTestPush(argv: readonly string[], io: CliIO): Promise<number> {
  if (wantsHelp(argv)) {
    io.stdout.write(helpText('test-push'));
    return 0;
  }
  const { values, rest } = takeLocalFlags(argv, { user: 'string', token: 'string', json: 'boolean' });
  if (values.user === undefined) throw new UsageError('test-push: --user is required');
  const config: ConfigFor<'test-push'> = loadConfig({ argv: rest, env: io.env, cwd: io.cwd, command: 'test-push' });
  const level = configOrigins(config).get('log-level')?.kind === 'default' ? 'warn' : config.logLevel;
  const log = createLogger({ level, pretty: false, destination: process.stderr });
  const store = await createStore({
    ...(config.redisUrl !== undefined ? { redisUrl: config.redisUrl } : {}),
    dataDir: config.dataDir,
    ttlMs: config.registrationTtl,
    logger: log,
    access: 'read-only-if-locked',
  });
  let push: PushService | null = null;
  try {
    push = await PushService.start(config, { store, registry: createRegistry({ defaultMetrics: false }), log });
    if (!push.dispatcher) {
      io.stderr.write(`${PROG}: test-push needs APNs credentials: --apns-cert/--apns-key, --apns-p12 or --apns-token-key\n`);
      return 2;
    }
    const wanted = values.token?.toLowerCase();
    const regs = (await store.listByUser(values.user)).filter((r) => !wanted || r.deviceToken.startsWith(wanted));
    if (regs.length === 0) {
      io.stderr.write(`${PROG}: no registration of "${values.user}"${wanted ? ` with token ${shortToken(wanted)}` : ''}\n`);
      return 1;
    }
    io.stdout.write(`topic ${push.topic()}\n`);
    const answers: Array<{ user: string; deviceToken: string; answer: ApnsResponse | { transportError: string } }> = [];
    let delivered = 0;
    for (const reg of regs) {
      const answer = await push.dispatcher.sendNow(reg);
      if (!(answer instanceof ApnsTransportError) && answer.status === 200) delivered++;
      answers.push({
        user: reg.user,
        deviceToken: reg.deviceToken,
        answer: answer instanceof ApnsTransportError ? { transportError: `${answer.kind}: ${answer.message}` } : answer,
      });
      io.stdout.write(values.json ? '' : `${describe(reg, answer)}\n`);
    }
    if (values.json) io.stdout.write(`${JSON.stringify(answers, null, 2)}\n`);
    return delivered === regs.length ? 0 : 1;
  } finally {
    await push?.close();
    await store.close();
  }
}
