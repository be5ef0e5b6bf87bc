/**
 * Reading the login name out of SASL exchanges, so that registrations can be
 * bound to the authenticated user. Only the name is extracted; passwords and
 * tokens are never returned, stored or logged.
 */

function decodeBase64(text: string): Buffer | null {
  const t = text.trim();
  if (t === '=' || t === '') return Buffer.alloc(0); // RFC 4959: "=" is an empty initial response
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(t)) return null;
  return Buffer.from(t, 'base64');
}

/** PLAIN (RFC 4616): [authzid] NUL authcid NUL passwd → authzid if given, else authcid. */
function plainUser(msg: Buffer): string | null {
  const first = msg.indexOf(0);
  if (first < 0) return null;
  const second = msg.indexOf(0, first + 1);
  if (second < 0) return null;
  const authzid = msg.toString('utf8', 0, first);
  const authcid = msg.toString('utf8', first + 1, second);
  return authzid || authcid || null;
}

/** SCRAM (RFC 5802 §5.1): gs2-header "n,a=authzid," then "n=user,r=…". */
function scramUser(msg: Buffer): string | null {
  const text = msg.toString('utf8');
  const parts = text.split(',');
  const authzid = parts[1]?.startsWith('a=') ? parts[1].slice(2) : '';
  const userPart = parts.find((p, i) => i >= 2 && p.startsWith('n='));
  const name = authzid || (userPart ? userPart.slice(2) : '');
  return name ? name.replace(/=2C/g, ',').replace(/=3D/g, '=') : null;
}

/** OAUTHBEARER (RFC 7628 §3.1): gs2-header "n,a=user,". */
function oauthBearerUser(msg: Buffer): string | null {
  const m = /^[ny]p?[^,]*,a=([^,]*),/.exec(msg.toString('utf8'));
  return m && m[1] ? m[1].replace(/=2C/g, ',').replace(/=3D/g, '=') : null;
}

/** XOAUTH2: "user=NAME^Aauth=Bearer …^A^A". */
function xoauth2User(msg: Buffer): string | null {
  const m = /^user=([^\x01]*)\x01/.exec(msg.toString('utf8'));
  return m && m[1] ? m[1] : null;
}

/**
 * The login name carried by a mechanism's first client message, or null when
 * the mechanism hides it (or the message is not readable).
 * `response` is the base64 text the client sent (initial response or first reply).
 */
export function saslUsername(mechanism: string, response: string): string | null {
  const msg = decodeBase64(response);
  if (!msg) return null;
  switch (mechanism.toUpperCase()) {
    case 'PLAIN':
      return plainUser(msg);
    case 'LOGIN':
      return msg.length > 0 ? msg.toString('utf8') : null;
    case 'OAUTHBEARER':
      return oauthBearerUser(msg);
    case 'XOAUTH2':
      return xoauth2User(msg);
    default:
      return mechanism.toUpperCase().startsWith('SCRAM-') ? scramUser(msg) : null;
  }
}
