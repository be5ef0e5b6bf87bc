/** README's option table is generated from the option table itself; this keeps them in step. */
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { withOptionsTable } from '../../../scripts/readme-options.js';
import { optionNames } from '../../../src/config/options.js';
import { ROOT } from '../cli/helpers.js';

const readme = readFileSync(path.join(ROOT, 'README.md'), 'utf8');

describe('README', () => {
  it('holds the option table exactly as generated from src/config/options.ts', () => {
    expect(readme, 'run: npx tsx scripts/readme-options.ts').toBe(withOptionsTable(readme));
  });

  it('names every option', () => {
    for (const name of optionNames()) expect(readme).toContain(`--${name}`);
  });

  it('links only to files that exist', () => {
    const links = [...readme.matchAll(/\]\(([^)#\s]+)(?:#[^)]*)?\)/g)].map((m) => m[1]!).filter((l) => !/^[a-z]+:/.test(l));
    expect(links.length).toBeGreaterThan(0);
    for (const link of links) expect(existsSync(path.join(ROOT, link)), link).toBe(true);
  });
});
