/**
 * Human-facing output derived from OPTIONS: the effective configuration as YAML (secrets
 * masked) for `config check`, and the options section of `--help`.
 */
import { stringify } from 'yaml';
import { configCommand, configOrigins, type Origin } from './load.js';
import { camelCase, envVarName, getOption, optionNames, type Command, type OptionSpec } from './options.js';

function yamlScalar(value: string | number | boolean): string {
  return stringify(value, { lineWidth: 0 }).trimEnd();
}

function originComment(origin: Origin | undefined): string {
  if (!origin) return '';
  return origin.kind === 'default' ? 'default' : `from ${origin.label}`;
}

/** How an option's value is printed (masked when the option is secret). */
export function printableValue(spec: OptionSpec, value: unknown): string | number | boolean {
  if (spec.secret) return spec.type.mask ? spec.type.mask(value) : '***';
  return spec.type.format(value);
}

/**
 * The effective configuration as YAML that can be used as a config file: option names as
 * keys, values in input syntax, secrets masked (`redis://:***@host`), the origin of each
 * value as a comment, and unset optional options as commented-out lines.
 */
export function describeConfig(config: object): string {
  const values = config as Record<string, unknown>;
  const origins = configOrigins(config);
  const command = configCommand(config);
  const header: string[] = [`# xaps-proxy effective configuration${command ? ` (${command})` : ''}`];
  const rows: Array<[string, string]> = [];
  for (const name of optionNames()) {
    const key = camelCase(name);
    if (!Object.hasOwn(values, key)) continue;
    const spec = getOption(name)!;
    const value = values[key];
    if (spec.inFile === false) {
      if (value !== undefined) header.push(`# ${name}: ${String(value)}`);
      continue;
    }
    if (value === undefined) {
      rows.push([`# ${name}:`, `(not set${spec.unsetMeans ? `: ${spec.unsetMeans}` : ''})`]);
    } else {
      rows.push([`${name}: ${yamlScalar(printableValue(spec, value))}`, originComment(origins.get(name))]);
    }
  }
  const width = Math.min(48, Math.max(0, ...rows.map(([text]) => text.length)));
  const body = rows.map(([text, comment]) => {
    if (!comment) return text;
    // Unset options are already comments: `# apns-topic:   (not set: …)`.
    return `${text.padEnd(width)}  ${text.startsWith('#') ? '' : '# '}${comment}`;
  });
  return `${[...header, ...body].join('\n')}\n`;
}

function wrap(text: string, indent: number, width = 80): string[] {
  const lines: string[] = [];
  let line = '';
  for (const word of text.split(/\s+/).filter(Boolean)) {
    if (line && indent + line.length + 1 + word.length > width) {
      lines.push(' '.repeat(indent) + line);
      line = word;
    } else {
      line = line ? `${line} ${word}` : word;
    }
  }
  if (line) lines.push(' '.repeat(indent) + line);
  return lines;
}

/**
 * The options part of `--help`: every option of `command` (all options when omitted) with
 * its placeholder, environment variable, default and description, grouped.
 */
export function optionsHelp(command?: Command): string {
  const out: string[] = [
    'Options. Each can be given as a flag, as the environment variable shown, or as a key of',
    'the --config YAML file spelled like the flag without "--" (e.g. "listen-tls: 0.0.0.0:993").',
    'Precedence: flag > environment > config file > default. Durations: 500ms, 30s, 35m, 2h, 30d,',
    'or a number of seconds. Booleans: true/false/1/0/yes/no.',
  ];
  let group = '';
  for (const name of optionNames(command)) {
    const spec = getOption(name)!;
    if (spec.group !== group) {
      group = spec.group;
      out.push('', `${group}:`);
    }
    const usage =
      spec.type.arity === 'switch' ? `--${name}[=true|false]` : `--${name} ${spec.type.placeholder}`;
    const facts = [`env ${envVarName(name)}`];
    if (spec.required) facts.push('required');
    if (spec.default !== undefined) facts.push(`default ${spec.default}`);
    else if (spec.unsetMeans) facts.push(`unset: ${spec.unsetMeans}`);
    if (spec.secret) facts.push('secret (masked when printed)');
    if (spec.inFile === false) facts.push('not in the config file');
    out.push(`  ${usage}`, ...wrap(facts.join(', '), 6), ...wrap(spec.description, 6));
  }
  return `${out.join('\n')}\n`;
}

function markdownCell(text: string): string {
  return text.replace(/\|/g, '\\|').replace(/\s+/g, ' ').trim();
}

/**
 * Every option as one Markdown table (README's "Options" section is generated from this,
 * and a test keeps the two in step).
 */
export function optionsMarkdown(): string {
  const rows = [
    '| option | environment | default | commands | meaning |',
    '|---|---|---|---|---|',
  ];
  let group = '';
  for (const name of optionNames()) {
    const spec = getOption(name)!;
    if (spec.group !== group) {
      group = spec.group;
      rows.push(`| **${markdownCell(group)}** | | | | |`);
    }
    const usage = spec.type.arity === 'switch' ? `--${name}` : `--${name} ${spec.type.placeholder}`;
    const fallback = spec.required
      ? 'required'
      : spec.default !== undefined
        ? `\`${markdownCell(spec.default)}\``
        : spec.unsetMeans
          ? `unset: ${markdownCell(spec.unsetMeans)}`
          : '';
    const notes = [spec.secret ? ' (secret: masked when printed)' : '', spec.inFile === false ? ' (not in the config file)' : ''].join('');
    rows.push(
      `| \`${markdownCell(usage)}\` | \`${envVarName(name)}\` | ${fallback} | ${spec.commands.join(', ')} | ${markdownCell(spec.description)}${notes} |`,
    );
  }
  return `${rows.join('\n')}\n`;
}
