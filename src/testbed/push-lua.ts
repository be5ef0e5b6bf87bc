/**
 * The Dovecot push_notification Lua driver that ships in deploy/dovecot/xaps-push.lua: tests and
 * the demo install that very file (read here, never a copy), so what is tested is what ships.
 *
 * The file is found relative to the package root, which is two levels above this module both as
 * src/testbed/push-lua.ts (tsx, vitest) and as dist/testbed/push-lua.js (compiled); the search
 * walks up a few levels to the first directory holding deploy/dovecot/xaps-push.lua.
 *
 * Dovecot settings (2.3, plugins mail_lua notify push_notification push_notification_lua for
 * imap, lda and lmtp; see deploy/dovecot/95-xaps-push.conf):
 *   plugin {
 *     push_notification_driver = lua:file=/path/to/xaps-push.lua
 *     xaps_push_url = http://127.0.0.1:PORT/events      # required
 *     xaps_push_secret = SECRET                          # optional: "Authorization: Bearer SECRET"
 *   }
 * The script also reads push_lua_url / push_lua_token (the names src/testbed/dovecot.ts writes)
 * when the xaps_push_* settings are unset.
 *
 * Body: {"user","event","mailbox","uid","uidvalidity","messages","from","subject"}; event is
 * "MessageNew" (LDA/LMTP delivery) or "MessageAppend" (IMAP APPEND/COPY into a mailbox).
 */
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** Path of the shipped script, relative to the package root. */
export const PUSH_LUA_RELATIVE_PATH = path.join('deploy', 'dovecot', 'xaps-push.lua');

/** Plugin setting names the shipped script reads (primary, then the legacy fallback). */
export const PUSH_LUA_SETTINGS = {
  url: 'xaps_push_url',
  secret: 'xaps_push_secret',
  timeoutMsecs: 'xaps_push_timeout_msecs',
  legacyUrl: 'push_lua_url',
  legacySecret: 'push_lua_token',
} as const;

/** The package root: the first ancestor of this module holding deploy/dovecot/xaps-push.lua. */
export function packageRoot(): string {
  const here = path.dirname(fileURLToPath(import.meta.url));
  let dir = here;
  for (let i = 0; i < 6; i++) {
    if (existsSync(path.join(dir, PUSH_LUA_RELATIVE_PATH))) return dir;
    const parent = path.dirname(dir);
    if (parent === dir) break;
    dir = parent;
  }
  throw new Error(`${PUSH_LUA_RELATIVE_PATH} not found above ${here} (is the deploy/ folder missing from the package?)`);
}

/** Absolute path of deploy/dovecot/xaps-push.lua. */
export const PUSH_LUA_PATH: string = path.join(packageRoot(), PUSH_LUA_RELATIVE_PATH);

/** The shipped script's text. */
export const PUSH_LUA_SCRIPT: string = readFileSync(PUSH_LUA_PATH, 'utf8');
