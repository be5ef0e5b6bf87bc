/**
 * Answers XAPPLEPUSHSERVICE for the session: validates, stores the registration
 * durably, and only then replies the way iOS parses it (protocol notes §a):
 *   * XAPPLEPUSHSERVICE "mailbox" "<name>"          (version 2, one per mailbox)
 *   * XAPPLEPUSHSERVICE "aps-version" "2" "aps-topic" "<topic>"
 *   tag OK XAPPLEPUSHSERVICE completed.
 */
import type { Logger } from '../ops/log.js';
import { shortToken } from '../ops/log.js';
import { quote } from '../imap/tokens.js';
import type { LocalCommand, PushCommandHandler } from '../proxy/session.js';
import type { Registration, RegistrationStore } from '../store/types.js';
import { mailboxRef } from '../store/common.js';
import { parsePushCommand, PushCommandError, type PushRequest } from './command.js';

export interface PushRegistrationEvents {
  /** A registration was stored (new or refreshed). */
  registered?(registration: Registration, created: boolean): void;
}

export class PushRegistrationHandler implements PushCommandHandler {
  constructor(
    private readonly topic: () => string | null,
    private readonly store: RegistrationStore,
    private readonly log: Logger,
    private readonly events: PushRegistrationEvents = {},
  ) {}

  get advertised(): boolean {
    return this.topic() !== null;
  }

  async handle(cmd: LocalCommand): Promise<Buffer> {
    const { tag } = cmd;
    const topic = this.topic();
    if (!topic) return line(`${tag} NO XAPPLEPUSHSERVICE: push is not configured on this server`);
    if (!cmd.authenticated) return line(`${tag} BAD XAPPLEPUSHSERVICE: log in first`);
    if (!cmd.user) return line(`${tag} NO XAPPLEPUSHSERVICE: the login name of this session is unknown`);

    let req: PushRequest;
    try {
      req = parsePushCommand(cmd.parts, { utf8: cmd.utf8 });
    } catch (err) {
      if (err instanceof PushCommandError) return line(`${tag} BAD XAPPLEPUSHSERVICE: ${err.message}`);
      throw err;
    }

    try {
      const { created, registration } = await this.store.upsert({
        user: cmd.user,
        deviceToken: req.deviceToken,
        accountId: req.accountId,
        subtopic: req.subtopic,
        mailboxes: req.mailboxes.map((m) => mailboxRef(m.name)),
        version: req.version,
      });
      this.log.info(
        { sid: cmd.sessionId, user: cmd.user, token: shortToken(req.deviceToken), version: req.version, mailboxes: req.mailboxes.length, created },
        'push registration stored',
      );
      this.events.registered?.(registration, created);
    } catch (err) {
      this.log.error({ sid: cmd.sessionId, user: cmd.user, err: (err as Error).message }, 'push registration not stored');
      return line(`${tag} NO [UNAVAILABLE] XAPPLEPUSHSERVICE: registration could not be stored, try again later`);
    }
    return renderReply(tag, req, topic);
  }
}

function line(text: string): Buffer {
  return Buffer.from(`${text}\r\n`, 'utf8');
}

export function renderReply(tag: string, req: PushRequest, topic: string): Buffer {
  const lines: string[] = [];
  if (req.version === 2) {
    for (const m of req.mailboxes) lines.push(`* XAPPLEPUSHSERVICE "mailbox" ${quote(m.wire)}`);
  }
  lines.push(`* XAPPLEPUSHSERVICE "aps-version" "${req.version}" "aps-topic" ${quote(topic)}`);
  lines.push(`${tag} OK XAPPLEPUSHSERVICE completed.`);
  return Buffer.from(lines.map((l) => `${l}\r\n`).join(''), 'utf8');
}
