// node --test test/: the manifest schema (export/runtime/manifest.schema.json, the file export.verify reads)
// as lib/schema.mjs applies it. tests/test_manifest_schema.py checks both validators agree.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { manifestSchema, validate, checkSchema } from '../lib/schema.mjs';

const SHA = 'ab'.repeat(32);
const manifest = () => ({
  format: 'onnx', artifact: 'x.onnx', sha256: SHA, golden: 'x.golden.npz',
  inputs: [{ name: 'source1', shape: [null, 10, 64], dtype: 'float32' }],
  outputs: [{ name: 'output', shape: [1, 10, 64], dtype: 'float32' }],
  parity: { atol: 1e-4 },
});

test('a well-formed manifest matches', () => {
  assert.equal(validate(manifest(), manifestSchema()), null);
});

test('what it must hold is named where it fails', () => {
  const cases = [
    [(m) => { delete m.sha256; }, "$ lacks 'sha256'"],
    [(m) => { m.sha256 = 'x'; }, '$.sha256 must match'],
    [(m) => { m.outputs[0].shape = [0]; }, '$.outputs[0].shape[0] must be >= 1'],
    [(m) => { m.parity = { max_abs: 1 }; }, "$.parity lacks 'atol' or $.parity lacks 'max_rel_error'"],
    [(m) => { m.reference = 'x.keras'; }, "$ has 'reference' but lacks 'reference_sha256'"],
    [(m) => { m.bytes = 1.5; }, '$.bytes must be integer'],
  ];
  for (const [change, words] of cases) {
    const m = manifest();
    change(m);
    const problem = validate(m, manifestSchema());
    assert.ok(problem?.startsWith(words), `${words} <- ${problem}`);
  }
});

test('a keyword the validator does not apply is refused', () => {
  assert.throws(() => checkSchema({ items: { oneOf: [] } }), /\["oneOf"\] at #\/items are not implemented/);
});
