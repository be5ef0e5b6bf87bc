/**
 * The contract between push delivery (queue, coalescing, retries: ./dispatcher)
 * and the wire (the HTTP/2 client: ./client). The client sends one request and
 * reports what APNs answered; deciding what an answer means is the dispatcher's.
 */

export type PushType = 'background' | 'alert';

export interface ApnsNotification {
  /** Device token, hex. */
  deviceToken: string;
  /** apns-topic: the certificate's topic. */
  topic: string;
  pushType: PushType;
  priority: 5 | 10;
  /** apns-expiration, UNIX seconds; 0 = deliver now or never. */
  expiration: number;
  /** apns-collapse-id (≤ 64 bytes), the account id for Mail. */
  collapseId?: string;
  /** JSON body, ≤ 4096 bytes. */
  payload: string;
}

/** What APNs answered (any HTTP status). */
export interface ApnsResponse {
  status: number;
  /** `reason` of the JSON error body, for non-200 answers. */
  reason?: string;
  /** 410: when the token became invalid, ms since epoch. */
  timestamp?: number;
  /** apns-id response header. */
  apnsId?: string;
  /** Retry-After header, in ms. */
  retryAfterMs?: number;
}

export type TransportErrorKind = 'timeout' | 'connect' | 'tls' | 'reset' | 'closed' | 'protocol';

/** No answer from APNs: the request may or may not have been delivered. */
export class ApnsTransportError extends Error {
  constructor(
    readonly kind: TransportErrorKind,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'ApnsTransportError';
  }
}

export type ApnsCredentials =
  | { kind: 'certificate'; certPem: string; keyPem: string }
  | { kind: 'token'; signingKeyPem: string; keyId: string; teamId: string };

export interface ApnsTransport {
  /**
   * Sends one notification. Resolves with APNs's answer; rejects with
   * ApnsTransportError when no answer came. Requests refused by a GOAWAY before
   * APNs processed them are retried inside the transport, never reported.
   */
  send(notification: ApnsNotification): Promise<ApnsResponse>;
  /** New credentials for new connections; existing ones drain and close. */
  setCredentials(credentials: ApnsCredentials): void;
  close(): Promise<void>;
}
