/** The user name in a LOGIN command (RFC 3501 §6.2.3: the first astring). */
import { ArgReader, ParseError, valueText, type CommandPart } from './tokens.js';

export function loginUsername(parts: CommandPart[]): string | null {
  try {
    const reader = new ArgReader(parts);
    reader.atom(); // tag
    reader.skipSpace();
    reader.atom(); // LOGIN
    if (!reader.skipSpace()) return null;
    const name = reader.value();
    return valueText(name);
  } catch (err) {
    if (err instanceof ParseError) return null;
    throw err;
  }
}
