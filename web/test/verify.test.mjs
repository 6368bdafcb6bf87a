// node --test test/: the verifier fails closed. Runs on a copy of an artifacts folder
// ($XATTN_ARTIFACTS, default ../artifacts, as `make artifacts` writes it); skipped without one.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { quantize, dequantize, parityMetrics, batchPlan } from '../lib/golden.mjs';

const WEB = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const SOURCE = path.resolve(WEB, process.env.XATTN_ARTIFACTS ?? '../artifacts');
const manifests = fs.existsSync(SOURCE)
  ? fs.readdirSync(SOURCE).filter((n) => n.endsWith('.onnx.json') || n.endsWith('.tflite.json')).sort()
  : [];
const skip = manifests.length ? false : `no manifests in ${SOURCE} (make artifacts)`;

function copyOf(name) {
  // The manifest and the files it names, alone in a fresh folder.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'xattn-web-test-'));
  const m = JSON.parse(fs.readFileSync(path.join(SOURCE, name), 'utf8'));
  for (const f of [name, m.artifact, m.golden_raw.index, m.golden_raw.data]) {
    fs.copyFileSync(path.join(SOURCE, f), path.join(dir, f));
  }
  return { dir, manifest: m };
}

function verify(dir, ...args) {
  const r = spawnSync(process.execPath, [path.join(WEB, 'verify.mjs'), ...args, dir], { encoding: 'utf8', timeout: 300_000 });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

function flipByte(file, at) {
  const bytes = fs.readFileSync(file);
  bytes[at] ^= 0x01;
  fs.writeFileSync(file, bytes);
}

const onnx = manifests.find((n) => n.endsWith('.onnx.json'));
const tflite = manifests.find((n) => n.endsWith('.tflite.json'));
// A folder with one format only (`python -m export.onnx` on a fresh clone) skips what needs the
// other, with the reason, instead of a TypeError from path.join(SOURCE, undefined).
const needs = (...names) => skip || names.map((n) => (n === 'onnx' ? onnx : tflite) ? false
  : `no .${n}.json manifest in ${SOURCE} (make artifacts builds both)`).find(Boolean) || false;

test('untouched artifacts pass in every runtime', { skip: needs('onnx', 'tflite') }, () => {
  const { dir } = copyOf(onnx);
  fs.copyFileSync(path.join(SOURCE, tflite), path.join(dir, tflite));
  const m = JSON.parse(fs.readFileSync(path.join(SOURCE, tflite), 'utf8'));
  fs.copyFileSync(path.join(SOURCE, m.artifact), path.join(dir, m.artifact));
  const r = verify(dir);
  assert.equal(r.code, 0, r.out + r.err);
  assert.match(r.out, /^3 passed, 0 failed \(2 manifests/m);
});

test('a changed byte in the ONNX file fails in every runtime, before it runs', { skip: needs('onnx') }, () => {
  const { dir, manifest } = copyOf(onnx);
  flipByte(path.join(dir, manifest.artifact), 100);
  const r = verify(dir);
  assert.equal(r.code, 1, r.out + r.err);
  assert.match(r.out, /✗ .*\[onnxruntime-node [^\]]+\]\s+artifact .* sha256 mismatch/);
  assert.match(r.out, /✗ .*\[onnxruntime-web [^\]]+\]\s+artifact .* sha256 mismatch/);
  assert.match(r.out, /^0 passed, 2 failed/m);
});

test('a changed byte in the raw golden data fails', { skip: needs('tflite') }, () => {
  const { dir, manifest } = copyOf(tflite);
  flipByte(path.join(dir, manifest.golden_raw.data), 0);
  const r = verify(dir);
  assert.equal(r.code, 1, r.out + r.err);
  assert.match(r.out, /golden data .* sha256 mismatch/);
});

test('outputs are really compared: an impossible atol fails on the numbers', { skip: needs('onnx') }, () => {
  const { dir, manifest } = copyOf(onnx);
  manifest.parity.atol = 1e-12; // the manifest is not hashed; its artifact and goldens are
  fs.writeFileSync(path.join(dir, onnx), JSON.stringify(manifest));
  const r = verify(dir, '--runtimes', 'node');
  assert.equal(r.code, 1, r.out + r.err);
  assert.match(r.out, /max abs diff .* exceeds atol 1e-12 on the golden vectors/);
});

test('a manifest pointing outside its folder fails', { skip: needs('onnx') }, () => {
  const { dir, manifest } = copyOf(onnx);
  manifest.artifact = '../x.onnx';
  fs.writeFileSync(path.join(dir, onnx), JSON.stringify(manifest));
  const r = verify(dir, '--runtimes', 'node');
  assert.equal(r.code, 1, r.out + r.err);
  assert.match(r.out, /must be a file name in the manifest's folder/);
});

test('usage errors exit 2', () => {
  assert.equal(verify(path.join(os.tmpdir(), 'no-such-folder-xattn')).code, 2);
  assert.equal(verify(WEB, '--runtimes', 'nope').code, 2);
});

test('int8 quantization rounds like numpy (half to even) and clips', () => {
  const q = { scale: 0.5, zero_point: -1 };
  assert.deepEqual(Array.from(quantize(Float32Array.from([0.25, 0.75, -0.25, 100, -100]), q)), [-1, 1, -1, 127, -128]);
  assert.deepEqual(Array.from(dequantize(Int8Array.from([-1, 1, 127]), q)), [0, 1, 64]);
});

test('metrics and batch plans', () => {
  const y = { o: { shape: [2], data: Float32Array.from([3, 4]) } };
  const m = parityMetrics(y, { o: { shape: [2], data: Float32Array.from([3, 3]) } });
  assert.equal(m.max_abs, 1);
  assert.equal(m.rel_l2, 0.2);
  assert.throws(() => parityMetrics(y, { o: { shape: [2], data: Float32Array.from([3, NaN]) } }), /NaN/);
  assert.deepEqual(batchPlan(4, null), [[0, 4]]);
  assert.deepEqual(batchPlan(4, 2), [[0, 2], [2, 2]]);
  assert.throws(() => batchPlan(3, 2), /multiple/);
});
