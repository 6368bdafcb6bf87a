// In the page: run one artifact, served from the local static server, on the golden inputs
// in onnxruntime-web (wasm) or LiteRT.js (wasm/XNNPACK); return raw outputs to Node, which
// compares them. Model and golden bytes are fetched by URL, as a web app would.
import { viewGolden, rows, concat, batchPlan, quantize, dequantize } from '/lib/golden.mjs';

const ORT_DIST = '/node_modules/onnxruntime-web/dist/';
const LITERT = '/node_modules/@litertjs/core/';

let ort = null;
let litert = null;

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`GET ${url}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

async function sha256(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

// The bytes as the page received them must be the ones Node checked against the manifest.
async function fetchChecked(url, expected) {
  const bytes = await fetchBytes(url);
  const got = await sha256(bytes);
  if (got !== expected) throw new Error(`${url} as served has sha256 ${got.slice(0, 12)}..., not ${expected.slice(0, 12)}...`);
  return bytes;
}

async function goldenInputs(job) {
  const index = await (await fetch(job.indexUrl)).json();
  return viewGolden(index, await fetchChecked(job.dataUrl, job.sha.data));
}

// Float32Array/Uint8Array -> plain arrays for the trip back to Node (exact for float32).
const plain = (a) => ({ dtype: a.dtype, shape: a.shape, data: Array.from(a.data, Number) });

export async function loadOrtWeb() {
  if (!ort) {
    ort = await import(`${ORT_DIST}ort.wasm.min.mjs`);
    ort.env.wasm.wasmPaths = ORT_DIST;
    ort.env.wasm.numThreads = 1; // no cross-origin isolation here: no SharedArrayBuffer
    ort.env.logLevel = 'error';
  }
  return { version: ort.env.versions?.web ?? '?' };
}

export async function runOrtWeb(job) {
  await loadOrtWeb();
  const model = await fetchChecked(job.modelUrl, job.sha.artifact);
  const golden = await goldenInputs(job);
  let session;
  try {
    session = await ort.InferenceSession.create(model, { executionProviders: ['wasm'] });
  } catch (e) {
    return { loadError: String(e?.message ?? e) };
  }
  const nRows = golden[job.inputs[0].name].shape[0];
  const chunks = [];
  for (const [start, n] of batchPlan(nRows, job.fixedBatch)) {
    const feeds = {};
    for (const t of job.inputs) {
      const a = rows(golden[t.name], start, n);
      feeds[t.name] = new ort.Tensor(t.dtype, a.data, a.shape);
    }
    const result = await session.run(feeds);
    chunks.push(Object.fromEntries(job.outputs.map((t) => {
      const r = result[t.name];
      if (!r) throw new Error(`no output ${t.name}; got [${Object.keys(result)}]`);
      return [t.name, { dtype: 'float32', shape: Array.from(r.dims, Number), data: r.data }];
    })));
  }
  await session.release();
  return { outputs: Object.fromEntries(job.outputs.map((t) => [t.name, plain(concat(chunks.map((c) => c[t.name])))])) };
}

export async function loadLiteRt() {
  if (!litert) {
    litert = await import(`${LITERT}dist/index.js`);
    await litert.loadLiteRt(`${LITERT}wasm/`);
  }
  return {};
}

export async function runLiteRt(job) {
  await loadLiteRt();
  const golden = await goldenInputs(job);
  const modelBytes = await fetchChecked(job.modelUrl, job.sha.artifact);
  let model;
  try {
    model = await litert.loadAndCompile(modelBytes, { accelerator: 'wasm' });
  } catch (e) {
    model?.delete?.();
    return { loadError: String(e?.message ?? e) };
  }
  const nRows = golden[job.inputs[0].name].shape[0];
  const chunks = [];
  try {
    for (const [start, n] of batchPlan(nRows, job.fixedBatch)) {
      const feeds = {};
      for (const t of job.inputs) {
        const a = rows(golden[t.name], start, n);
        const data = t.quantization ? quantize(a.data, t.quantization) : a.data;
        feeds[t.name] = new litert.Tensor(data, a.shape);
      }
      if (job.stateful && chunks.length) {
        // LiteRT.js has no reset_all_variables(): a converted LSTM's state is reset by a freshly
        // compiled model for each call after the first (the manifest's `state`).
        model.delete();
        model = await litert.loadAndCompile(modelBytes, { accelerator: 'wasm' });
      }
      let result;
      try {
        result = await model.run(feeds);
      } finally {
        for (const tensor of Object.values(feeds)) tensor.delete();
      }
      const chunk = {};
      for (const t of job.outputs) {
        const tensor = result[t.name];
        if (!tensor) throw new Error(`no output ${t.name}; got [${Object.keys(result)}]`);
        let data = tensor.toTypedArray();
        if (t.quantization) data = dequantize(data, t.quantization);
        chunk[t.name] = { dtype: 'float32', shape: Array.from(tensor.type.layout.dimensions, Number), data };
      }
      for (const tensor of Object.values(result)) tensor.delete();
      chunks.push(chunk);
    }
  } finally {
    model.delete();
  }
  return { outputs: Object.fromEntries(job.outputs.map((t) => [t.name, plain(concat(chunks.map((c) => c[t.name])))])) };
}
