// Golden vectors (export/runtime/golden_raw.py's <name>.golden.json + .golden.bin) as typed arrays, and
// what every runtime runner shares: batching, int8 (de)quantization, parity metrics.
// Runs unchanged in Node and in the browser page: no Node imports here.

export const RAW_FORMAT = 'xattn-golden-raw';

// dtype -> [TypedArray constructor, bytes per element]; bool is stored as uint8 (0/1).
export const DTYPES = {
  bool: [Uint8Array, 1],
  int8: [Int8Array, 1],
  uint8: [Uint8Array, 1],
  int16: [Int16Array, 2],
  uint16: [Uint16Array, 2],
  int32: [Int32Array, 4],
  uint32: [Uint32Array, 4],
  int64: [BigInt64Array, 8],
  uint64: [BigUint64Array, 8],
  float32: [Float32Array, 4],
  float64: [Float64Array, 8],
};

export class GoldenError extends Error {}

const count = (shape) => shape.reduce((a, b) => a * b, 1);

/** The arrays of a raw golden index over its data bytes: {name: {dtype, shape, data}}.
 *  Checks every entry against the buffer (fails closed: GoldenError with a one-line reason). */
export function viewGolden(index, bytes) {
  if (!index || index.format !== RAW_FORMAT) throw new GoldenError(`not a ${RAW_FORMAT} index`);
  if (index.byte_order !== 'little') throw new GoldenError(`byte_order ${index.byte_order}, not little`);
  if (index.bytes !== bytes.byteLength) {
    throw new GoldenError(`data is ${bytes.byteLength} bytes, the index says ${index.bytes}`);
  }
  const out = {};
  for (const [name, e] of Object.entries(index.arrays ?? {})) {
    const spec = DTYPES[e.dtype];
    if (!spec) throw new GoldenError(`array ${name} has unsupported dtype ${e.dtype}`);
    const [Ctor, width] = spec;
    if (!Array.isArray(e.shape) || !e.shape.every((d) => Number.isInteger(d) && d >= 0)) {
      throw new GoldenError(`array ${name} has a bad shape ${JSON.stringify(e.shape)}`);
    }
    const n = count(e.shape);
    if (!Number.isInteger(e.offset) || e.offset < 0 || e.offset % width !== 0 ||
        e.bytes !== n * width || e.offset + e.bytes > bytes.byteLength) {
      throw new GoldenError(`array ${name}: offset ${e.offset} / ${e.bytes} bytes do not fit its shape and the data`);
    }
    // A copy, aligned and independent of the file buffer.
    const data = new Ctor(bytes.buffer.slice(bytes.byteOffset + e.offset, bytes.byteOffset + e.offset + e.bytes));
    out[name] = { dtype: e.dtype, shape: e.shape.slice(), data };
  }
  return out;
}

/** Rows [start, start + n) of an array along axis 0. */
export function rows(array, start, n) {
  const per = count(array.shape.slice(1));
  return {
    dtype: array.dtype,
    shape: [n, ...array.shape.slice(1)],
    data: array.data.slice(start * per, (start + n) * per),
  };
}

/** Concatenate along axis 0 (same trailing shape). */
export function concat(arrays) {
  const first = arrays[0];
  const total = arrays.reduce((a, x) => a + x.data.length, 0);
  const data = new first.data.constructor(total);
  let at = 0;
  for (const a of arrays) { data.set(a.data, at); at += a.data.length; }
  return { dtype: first.dtype, shape: [arrays.reduce((a, x) => a + x.shape[0], 0), ...first.shape.slice(1)], data };
}

// numpy's np.round: halves go to the even neighbour.
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** float32 -> int8 with a tensor's {scale, zero_point}, as export.runtime.runtimes.quantize does. */
export function quantize(data, { scale, zero_point: zp }) {
  const out = new Int8Array(data.length);
  for (let i = 0; i < data.length; i++) {
    out[i] = Math.min(127, Math.max(-128, roundHalfEven(Math.fround(data[i] / scale)) + zp));
  }
  return out;
}

export function dequantize(data, { scale, zero_point: zp }) {
  const out = new Float32Array(data.length);
  for (let i = 0; i < data.length; i++) out[i] = (data[i] - zp) * scale;
  return out;
}

/** Batches to run: the golden row count split into chunks of a fixed batch, or one run. */
export function batchPlan(nRows, fixedBatch) {
  if (fixedBatch == null) return [[0, nRows]];
  if (nRows % fixedBatch !== 0) {
    throw new GoldenError(`${nRows} golden rows are not a multiple of the fixed batch ${fixedBatch}`);
  }
  const plan = [];
  for (let s = 0; s < nRows; s += fixedBatch) plan.push([s, fixedBatch]);
  return plan;
}

/** max_abs and rel_l2 (||y - ŷ|| / ||y||) over every output, sorted by name, as export.runtime.check. */
export function parityMetrics(expected, got) {
  let maxAbs = 0, sumDiff2 = 0, sumRef2 = 0, nBad = 0, n = 0;
  for (const name of Object.keys(expected).sort()) {
    const y = expected[name], yh = got[name];
    if (!yh) throw new GoldenError(`output ${name} missing; the runtime returned [${Object.keys(got).sort().join(', ')}]`);
    if (JSON.stringify(y.shape) !== JSON.stringify(yh.shape)) {
      throw new GoldenError(`output ${name} has shape [${yh.shape}], the golden [${y.shape}]`);
    }
    for (let i = 0; i < y.data.length; i++) {
      const a = Number(y.data[i]), b = Number(yh.data[i]);
      if (!Number.isFinite(b)) { nBad++; continue; }
      const d = a - b;
      maxAbs = Math.max(maxAbs, Math.abs(d));
      sumDiff2 += d * d;
      sumRef2 += a * a;
    }
    n += y.data.length;
  }
  if (nBad) throw new GoldenError(`the runtime returned ${nBad} NaN/inf values (of ${n})`);
  const norm = Math.sqrt(sumRef2), diff = Math.sqrt(sumDiff2);
  return { max_abs: maxAbs, rel_l2: norm ? diff / norm : diff, n };
}
