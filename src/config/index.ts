/**
 * Configuration of xaps-proxy: one table of options (./options.ts) from which flags,
 * XAPS_* environment variables, the YAML config file, help and `config check` are derived.
 */
export { ConfigError } from './errors.js';
export {
  loadConfig,
  configWarnings,
  configOrigins,
  configCommand,
  type LoadConfigInput,
  type Origin,
} from './load.js';
export { describeConfig, optionsHelp } from './describe.js';
export {
  OPTIONS,
  RULES,
  COMMANDS,
  configSchema,
  envVarName,
  camelCase,
  optionNames,
  getOption,
  type Command,
  type Config,
  type DevicesConfig,
  type ConfigFor,
  type OptionName,
  type OptionSpec,
  type OptionValue,
  type CamelCase,
  type HostPort,
  type UpstreamTls,
  type ClientIpMode,
  type LogLevel,
  type Rule,
  type Report,
} from './options.js';
export { parseDuration, formatDuration, parseHostPort, formatHostPort, type ValueType } from './values.js';
