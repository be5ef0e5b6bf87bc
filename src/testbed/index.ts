/**
 * Test bed: real Dovecot, Redis and haproxy instances on loopback, each in its own temp dir,
 * for the test suite, `xaps-proxy demo` and the benchmarks. See README.md in this folder.
 * No test-framework imports here: this compiles into dist/ with the rest of src/.
 */
export { freePort, freePorts } from './ports.js';
export {
  startDovecot,
  dovecotAvailable,
  dovecotRunning,
  type DovecotOptions,
  type DovecotInstance,
} from './dovecot.js';
export { startRedis, redisAvailable, type RedisOptions, type RedisInstance, type RedisPersistence } from './redis.js';
export { startTcpRelay, haproxyAvailable, type TcpRelayOptions, type TcpRelayInstance } from './haproxy.js';
export { PUSH_LUA_SCRIPT } from './push-lua.js';
export { startMockApns, type MockApns, type MockAnswer, type RecordedRequest } from './mock-apns.js';
export { startMockCertService } from './mock-cert-service.js';
export { createTestCa, issueMailPushCert, issueServerCert, type TestCa, type IssuedCert } from './apns-certs.js';
export {
  canConnect,
  findBinary,
  isPidAlive,
  killAllTracked,
  probeBanner,
  runCommand,
  sleep,
  waitFor,
  waitForPort,
  WaitAborted,
} from './processes.js';
