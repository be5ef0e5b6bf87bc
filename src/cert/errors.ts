/**
 * The one error type of src/cert: a single line naming the file (when there is one) and
 * the problem, fit to print as is (`xaps-proxy: <message>`). Never carries key material.
 */

export type CertificateErrorCode =
  | 'unreadable'
  | 'not-a-certificate'
  | 'no-key'
  | 'bad-key'
  | 'key-mismatch'
  | 'bad-passphrase'
  | 'no-topic'
  | 'expired'
  | 'not-yet-valid'
  | 'write-failed'
  | 'bad-input'
  /** Apple (or the mock) answered with a non-zero Response.Status.ErrorCode. */
  | 'refused'
  /** The certificate service could not be reached or answered something unusable. */
  | 'service';

export class CertificateError extends Error {
  override readonly name = 'CertificateError';
  readonly code: CertificateErrorCode;
  /** The file the error is about, when there is one. */
  readonly file: string | undefined;

  constructor(message: string, opts: { code: CertificateErrorCode; file?: string; cause?: unknown }) {
    super(message.replace(/\s*[\r\n]+\s*/g, ' ').trim(), opts.cause !== undefined ? { cause: opts.cause } : undefined);
    this.code = opts.code;
    this.file = opts.file;
  }
}

/** Apple's historical PushCertRequest service said no (Response.Status.ErrorCode ≠ 0). */
export class PushCertRefusedError extends CertificateError {
  readonly errorCode: number;
  readonly errorMessage: string;
  readonly errorDescription: string;

  constructor(status: { errorCode: number; errorMessage: string; errorDescription: string }) {
    const detail = [...new Set([status.errorMessage, status.errorDescription].map((s) => s.trim()).filter(Boolean))].join(': ');
    super(
      `the certificate service refused the request: ErrorCode ${status.errorCode}${detail ? ` (${detail})` : ''}. ` +
        `Apple has refused these requests since 2024-10-29; get a Mail push certificate through the Apple developer ` +
        `portal instead ("xaps-proxy cert csr", see docs/certificates.md)`,
      { code: 'refused' },
    );
    this.errorCode = status.errorCode;
    this.errorMessage = status.errorMessage;
    this.errorDescription = status.errorDescription;
  }
}

/** Node's fs error as a short phrase ("no such file", "permission denied"). */
export function describeFsError(err: unknown): string {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (code === 'ENOENT') return 'no such file';
  if (code === 'EACCES' || code === 'EPERM') return 'permission denied';
  if (code === 'EISDIR') return 'is a directory';
  if (code === 'ENOTDIR') return 'a parent is not a directory';
  return (err as Error | undefined)?.message ?? String(err);
}
