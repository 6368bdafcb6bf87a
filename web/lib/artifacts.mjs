// Node side of verification: find manifests, check every byte a runtime will see against them
// (artifact sha256, raw golden index and data sha256), and read the golden arrays.
// Fails closed: any problem is an ArtifactError with a one-line reason.
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { viewGolden, GoldenError, DTYPES } from './golden.mjs';
import { manifestSchema, validate } from './schema.mjs';

export const MANIFEST_SUFFIXES = ['.onnx.json', '.tflite.json'];
const MAX_MANIFEST_BYTES = 16 << 20;
const MAX_GOLDEN_BYTES = 1 << 30;

export class ArtifactError extends Error {}
export class UsageError extends Error {}

export function sha256(buffer) {
  return crypto.createHash('sha256').update(buffer).digest('hex');
}

/** A folder (every *.onnx.json, *.tflite.json in it) or one manifest -> manifest paths. */
export function findManifests(target) {
  let st;
  try {
    st = fs.statSync(target);
  } catch {
    throw new UsageError(`no such file or folder: ${target}`);
  }
  if (st.isFile()) {
    if (!target.endsWith('.json')) throw new UsageError(`${target} is neither a manifest (.json) nor a folder`);
    return [target];
  }
  const found = fs.readdirSync(target)
    .filter((n) => MANIFEST_SUFFIXES.some((s) => n.endsWith(s)) && !n.startsWith('.'))
    .sort()
    .map((n) => path.join(target, n));
  if (!found.length) throw new UsageError(`no manifests (*${MANIFEST_SUFFIXES.join(', *')}) in ${target}`);
  return found;
}

// A file named by a manifest: a plain name in the manifest's own folder, never a path.
function fileIn(folder, name, field) {
  if (typeof name !== 'string' || !name || name !== path.basename(name) || name === '.' || name === '..') {
    throw new ArtifactError(`manifest field ${field} must be a file name in the manifest's folder, got ${JSON.stringify(name)?.slice(0, 80)}`);
  }
  return path.join(folder, name);
}

function readLimited(file, limit, what) {
  let st;
  try {
    st = fs.statSync(file);
  } catch {
    throw new ArtifactError(`${what} ${path.basename(file)} is missing`);
  }
  if (!st.isFile()) throw new ArtifactError(`${what} ${path.basename(file)} is not a file`);
  if (st.size > limit) throw new ArtifactError(`${what} ${path.basename(file)} is ${st.size} bytes; refusing`);
  return fs.readFileSync(file);
}

function checkSha(buffer, expected, what) {
  if (typeof expected !== 'string' || !/^[0-9a-f]{64}$/.test(expected)) {
    throw new ArtifactError(`manifest has no valid sha256 for ${what}`);
  }
  const got = sha256(buffer);
  if (got !== expected) throw new ArtifactError(`${what} sha256 mismatch: ${got.slice(0, 12)}..., the manifest says ${expected.slice(0, 12)}...`);
}

function tensors(list, field) {
  if (!Array.isArray(list) || !list.length) throw new ArtifactError(`manifest field ${field} must be a non-empty list`);
  return list.map((t, i) => {
    if (!t || typeof t.name !== 'string' || !Array.isArray(t.shape) || typeof t.dtype !== 'string') {
      throw new ArtifactError(`manifest ${field}[${i}] needs name, shape and dtype`);
    }
    if (!(t.dtype in DTYPES)) throw new ArtifactError(`manifest ${field}[${i}] has unknown dtype ${t.dtype}`);
    const q = t.quantization;
    if (q != null && !(Number.isFinite(q.scale) && q.scale > 0 && Number.isInteger(q.zero_point))) {
      throw new ArtifactError(`manifest ${field}[${i}] has a bad quantization ${JSON.stringify(q)}`);
    }
    return { name: t.name, shape: t.shape, dtype: t.dtype, ...(q ? { quantization: q } : {}) };
  });
}

function tolerance(parity) {
  if (!parity || typeof parity !== 'object') throw new ArtifactError('manifest has no parity object');
  const out = {};
  for (const key of ['atol', 'max_rel_error']) {
    if (parity[key] == null) continue;
    if (!(Number.isFinite(parity[key]) && parity[key] > 0)) throw new ArtifactError(`parity.${key} must be a positive number`);
    out[key] = parity[key];
  }
  if (!Object.keys(out).length) throw new ArtifactError('parity has neither atol nor max_rel_error');
  return out;
}

/** Read and check one manifest; everything a runner needs, or ArtifactError. */
export function loadArtifact(manifestPath) {
  const folder = path.dirname(path.resolve(manifestPath));
  let manifest;
  try {
    manifest = JSON.parse(readLimited(manifestPath, MAX_MANIFEST_BYTES, 'manifest').toString('utf8'));
  } catch (e) {
    if (e instanceof ArtifactError) throw e;
    throw new ArtifactError(`manifest is not JSON: ${e.message}`);
  }
  if (!manifest || typeof manifest !== 'object' || Array.isArray(manifest)) throw new ArtifactError('manifest is not a JSON object');
  if (!['onnx', 'tflite'].includes(manifest.format)) throw new ArtifactError(`format ${JSON.stringify(manifest.format)} is not onnx or tflite`);
  const artifactPath = fileIn(folder, manifest.artifact, 'artifact');
  const inputs = tensors(manifest.inputs, 'inputs');
  const outputs = tensors(manifest.outputs, 'outputs');
  const tol = tolerance(manifest.parity);
  // Whatever else the schema export.verify applies asks (export/runtime/manifest.schema.json), before
  // any file is read; the checks above name the common mistakes in their own words.
  const problem = validate(manifest, manifestSchema());
  if (problem) throw new ArtifactError(`manifest does not match manifest.schema.json: ${problem}`);
  const raw = manifest.golden_raw;
  if (!raw || typeof raw !== 'object') {
    throw new ArtifactError('manifest has no golden_raw (built before raw golden vectors existed? rebuild it)');
  }
  const indexPath = fileIn(folder, raw.index, 'golden_raw.index');
  const dataPath = fileIn(folder, raw.data, 'golden_raw.data');

  // Integrity first: no runtime sees bytes whose sha256 is wrong.
  const model = readLimited(artifactPath, MAX_GOLDEN_BYTES, 'artifact');
  checkSha(model, manifest.sha256, `artifact ${manifest.artifact}`);
  const indexBytes = readLimited(indexPath, MAX_MANIFEST_BYTES, 'golden index');
  checkSha(indexBytes, raw.index_sha256, `golden index ${raw.index}`);
  const data = readLimited(dataPath, MAX_GOLDEN_BYTES, 'golden data');
  checkSha(data, raw.sha256, `golden data ${raw.data}`);
  let index, golden;
  try {
    index = JSON.parse(indexBytes.toString('utf8'));
    if (index.data !== raw.data || index.sha256 !== raw.sha256) throw new GoldenError('index and manifest disagree on the data file');
    golden = viewGolden(index, new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
  } catch (e) {
    throw new ArtifactError(`golden ${raw.index}: ${e.message}`);
  }
  let nRows = null;
  for (const t of [...inputs, ...outputs]) {
    const g = golden[t.name];
    if (!g) throw new ArtifactError(`golden ${raw.index} has no array ${t.name}`);
    // An int8-io tensor's golden values stay float: the runner (de)quantizes them.
    const want = t.quantization ? 'float32' : t.dtype;
    if (g.dtype !== want) throw new ArtifactError(`golden ${t.name} is ${g.dtype}, the manifest wants ${want}`);
    if (g.shape.length !== t.shape.length || t.shape.slice(1).some((d, i) => d !== null && d !== g.shape[i + 1])) {
      throw new ArtifactError(`golden ${t.name} has shape [${g.shape}], the manifest [${t.shape.map((d) => d ?? 'B')}]`);
    }
    if (nRows !== null && g.shape[0] !== nRows) throw new ArtifactError('golden arrays disagree on the number of samples');
    nRows = g.shape[0];
    if (g.dtype.startsWith('float') && !g.data.every(Number.isFinite)) throw new ArtifactError(`golden ${t.name} holds NaN or inf`);
  }
  return {
    manifestPath,
    name: manifest.artifact,
    format: manifest.format,
    manifest,
    artifactPath,
    model,
    inputs,
    outputs,
    tolerance: tol,
    golden,
    fixedBatch: Number.isInteger(inputs[0].shape[0]) ? inputs[0].shape[0] : null,
    // A file that keeps state between invokes (a converted LSTM: the manifest's `state`).
    stateful: manifest.state?.stateful === true,
    files: { artifact: manifest.artifact, index: raw.index, data: raw.data },
    sha: { artifact: manifest.sha256, data: raw.sha256 },
  };
}
