/**
 * The one error type configuration loading throws. `message` is always a single line
 * that names the option and where its value came from, so the CLI can print it as is:
 *
 *   --upstream-tls: expected one of none|starttls|tls, got "ssl" (from XAPS_UPSTREAM_TLS)
 */
export class ConfigError extends Error {
  override readonly name = 'ConfigError';
  /** Kebab-case option name (or config-file key) the error is about, when there is one. */
  readonly option: string | undefined;
  /** Where the offending value came from: `--flag`, `XAPS_…`, `FILE:LINE`, `default`. */
  readonly origin: string | undefined;

  constructor(message: string, opts: { option?: string; origin?: string } = {}) {
    super(oneLine(message));
    this.option = opts.option;
    this.origin = opts.origin;
  }
}

/** Collapse any line breaks so a message can never span several lines. */
export function oneLine(s: string): string {
  return s.replace(/\s*[\r\n]+\s*/g, ' ').trim();
}
