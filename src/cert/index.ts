/**
 * The Mail push certificate: loading (PEM / PKCS#12), watching and reloading, CSRs for the
 * developer portal, the historical PushCertRequest flow and auto-renewal.
 * See docs/certificates.md. (selfsigned.ts — TLS certificates for labs — is separate.)
 */
export { CertificateError, PushCertRefusedError, type CertificateErrorCode } from './errors.js';
export {
  loadMailPushCredentials,
  readCredentialFile,
  certificateForKey,
  validityProblems,
  DAY_MS,
  EXPIRY_WARNING_DAYS,
  type CredentialFiles,
  type LoadOptions,
  type LoadedCertificate,
  type FileContents,
} from './load.js';
export {
  CertificateSource,
  type CertificateSourceOptions,
  type CertificateSourceEvents,
  type ExpiryInfo,
  type ReloadResult,
} from './watch.js';
export { certificateInfo, decodeTopicsExtension, UID_OID, TOPICS_OID, type CertificateInfo } from './x509.js';
export { generateRsaKeyPem, createCsrPem, parseSubject, type SubjectField } from './csr.js';
export { writeFileAtomic, writeMailCredentials, KEY_FILE_MODE, CERT_FILE_MODE, type CredentialTarget } from './files.js';
export {
  DEFAULT_CERT_SERVICE_URL,
  PUSH_SERVICES,
  MAIL_INDEX,
  passwordHash,
  loadVendorMaterial,
  buildInnerPlist,
  buildSignedRequest,
  parsePushCertResponse,
  requestPushCertificates,
  serviceUrlFor,
  serviceFiles,
  type PushServiceName,
  type VendorMaterial,
  type PushCertIssue,
  type PushCertExchangeOptions,
  type PushCertResponse,
} from './pushcert.js';
export {
  CertificateRenewer,
  requestNewMailPushCertificate,
  renewMailPushCertificate,
  checkIssuedMailCertificate,
  renewalDue,
  systemClock,
  type PushCertAccount,
  type IssuedMailCertificate,
  type CertificateRenewerOptions,
  type RenewerClock,
  type RenewerStatus,
  type RenewOutcome,
} from './renew.js';
export { registerCertificateMetrics, type CertificateMetrics } from './metrics.js';
export {
  pushCertAccountFromSettings,
  missingPushCertSettings,
  readPasswordFile,
  type PushCertSettings,
} from './account.js';
