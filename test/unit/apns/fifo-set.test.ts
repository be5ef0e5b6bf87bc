import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { FifoSet } from '../../../src/apns/queue.js';

describe('FifoSet', () => {
  it('behaves like an insertion-ordered set taken from the front (model check)', () => {
    fc.assert(
      fc.property(
        fc.array(fc.oneof(fc.record({ op: fc.constant('add'), v: fc.integer({ min: 0, max: 20 }) }), fc.record({ op: fc.constant('delete'), v: fc.integer({ min: 0, max: 20 }) }), fc.record({ op: fc.constant('shift'), v: fc.constant(0) })), { maxLength: 3000 }),
        (ops) => {
          const q = new FifoSet<number>();
          const model: number[] = [];
          for (const { op, v } of ops) {
            if (op === 'add') {
              q.add(v);
              if (!model.includes(v)) model.push(v);
            } else if (op === 'delete') {
              expect(q.delete(v)).toBe(model.includes(v));
              if (model.includes(v)) model.splice(model.indexOf(v), 1);
            } else {
              const got = q.shift();
              // a member deleted and added again keeps its first place: both orders are fair
              if (model.length === 0) expect(got).toBeUndefined();
              else {
                expect(model).toContain(got);
                model.splice(model.indexOf(got!), 1);
              }
            }
            expect(q.size).toBe(model.length);
          }
        },
      ),
      { numRuns: 300 },
    );
  });

  it('serves in insertion order', () => {
    const q = new FifoSet<string>();
    for (const s of ['a', 'b', 'c', 'b']) q.add(s);
    q.delete('a');
    expect([q.shift(), q.shift(), q.shift()]).toEqual(['b', 'c', undefined]);
  });
});
