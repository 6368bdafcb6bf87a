// The three JS runtimes: onnxruntime-node in this process; onnxruntime-web and LiteRT.js in a
// headless Chromium page driven by playwright-core, fed by a static server on 127.0.0.1.
// Each run returns {outputs} (float32 arrays by name) or {unsupported: reason}; anything else
// throws and is a failure.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { rows, concat, batchPlan, quantize, dequantize } from './golden.mjs';
import { startServer } from './server.mjs';

const require = createRequire(import.meta.url);
const WEB = path.dirname(path.dirname(fileURLToPath(import.meta.url)));

export function packageVersion(name) {
  const file = path.join(WEB, 'node_modules', ...name.split('/'), 'package.json');
  return JSON.parse(fs.readFileSync(file, 'utf8')).version;
}

// A load error that says the runtime lacks a kernel or a tensor type for what the (sha256
// verified) file asks for: reported as not supported. Every other error is a failure.
const UNSUPPORTED = [
  /Element type \w+ is not supported/, // LiteRT.js: its Tensor API has float32, int32, uint8
  /DType \w+ is not supported/,
  /Could not find an implementation for/, // onnxruntime: no kernel for an op/type in this build
  /is not (yet )?(supported|implemented)/i,
];

export function unsupportedReason(message, artifact) {
  if (!UNSUPPORTED.some((re) => re.test(message))) return null;
  let reason = message.split('\n')[0].trim();
  const type = /Element type (\w+)/.exec(message)?.[1]?.toLowerCase();
  if (type) {
    const names = [...artifact.inputs, ...artifact.outputs].filter((t) => t.dtype === type).map((t) => t.name);
    if (names.length) reason += ` (${names.join(', ')} ${names.length > 1 ? 'are' : 'is'} ${type})`;
  }
  return reason;
}

// -- onnxruntime-node ------------------------------------------------------------------------

let ortNode = null;

export async function runOrtNode(artifact) {
  ortNode ??= require('onnxruntime-node');
  let session;
  try {
    session = await ortNode.InferenceSession.create(artifact.model, { executionProviders: ['cpu'] });
  } catch (e) {
    const reason = unsupportedReason(String(e?.message ?? e), artifact);
    if (reason) return { unsupported: reason };
    throw new Error(`onnxruntime-node cannot load it: ${String(e?.message ?? e).split('\n')[0]}`);
  }
  try {
    const nRows = artifact.golden[artifact.inputs[0].name].shape[0];
    const chunks = [];
    for (const [start, n] of batchPlan(nRows, artifact.fixedBatch)) {
      const feeds = {};
      for (const t of artifact.inputs) {
        const a = rows(artifact.golden[t.name], start, n);
        const data = t.quantization ? quantize(a.data, t.quantization) : a.data;
        feeds[t.name] = new ortNode.Tensor(t.dtype, data, a.shape);
      }
      const result = await session.run(feeds);
      const chunk = {};
      for (const t of artifact.outputs) {
        const r = result[t.name];
        if (!r) throw new Error(`no output ${t.name}; the session returned [${Object.keys(result)}]`);
        const data = t.quantization ? dequantize(r.data, t.quantization) : r.data;
        chunk[t.name] = { dtype: 'float32', shape: Array.from(r.dims, Number), data };
      }
      chunks.push(chunk);
    }
    return { outputs: Object.fromEntries(artifact.outputs.map((t) => [t.name, concat(chunks.map((c) => c[t.name]))])) };
  } finally {
    await session.release();
  }
}

// -- headless Chromium -----------------------------------------------------------------------

const CHROMIUM_CANDIDATES = [
  '/usr/lib/chromium/chromium', // Debian's binary (/usr/bin/chromium is a shell wrapper)
  '/usr/bin/chromium',
  '/usr/bin/chromium-browser',
  '/usr/bin/google-chrome',
];

export function findChromium(explicit) {
  const found = [explicit, process.env.CHROMIUM, ...CHROMIUM_CANDIDATES].filter(Boolean).find((p) => fs.existsSync(p));
  return found ?? null;
}

const PAGE_TIMEOUT_MS = 180_000;

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms / 1000} s`)), ms); }),
  ]);
}

export class BrowserRuntimes {
  static async start(folder, executablePath) {
    const { chromium } = await import('playwright-core');
    const server = await startServer(folder);
    let browser;
    try {
      // --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
      browser = await chromium.launch({ executablePath, args: ['--no-sandbox'], headless: true });
      const page = await browser.newPage();
      const log = [];
      page.on('pageerror', (e) => log.push(`pageerror: ${e.message}`));
      await page.goto(`${server.url}/page/index.html`);
      await page.waitForFunction(() => document.title === 'ready' || document.title === 'failed', null, { timeout: 60_000 });
      if (await page.title() === 'failed') throw new Error(`the page did not load: ${await page.evaluate(() => window.xattnError)}`);
      return new BrowserRuntimes(server, browser, page, log);
    } catch (e) {
      await browser?.close();
      await server.close();
      throw e;
    }
  }

  constructor(server, browser, page, log) {
    this.server = server;
    this.browser = browser;
    this.page = page;
    this.log = log;
    this.chromium = `Chromium ${browser.version()}`;
  }

  async run(fn, artifact) {
    const job = {
      modelUrl: `/artifacts/${encodeURIComponent(artifact.files.artifact)}`,
      indexUrl: `/artifacts/${encodeURIComponent(artifact.files.index)}`,
      dataUrl: `/artifacts/${encodeURIComponent(artifact.files.data)}`,
      sha: artifact.sha,
      inputs: artifact.inputs,
      outputs: artifact.outputs,
      fixedBatch: artifact.fixedBatch,
      stateful: artifact.stateful,
    };
    const result = await withTimeout(
      this.page.evaluate(([name, j]) => window.xattn[name](j), [fn, job]),
      PAGE_TIMEOUT_MS, fn,
    );
    if (result.loadError) {
      const reason = unsupportedReason(result.loadError, artifact);
      if (reason) return { unsupported: reason };
      throw new Error(`cannot load it: ${result.loadError.split('\n')[0]}`);
    }
    const outputs = {};
    for (const [name, a] of Object.entries(result.outputs)) {
      outputs[name] = { dtype: a.dtype, shape: a.shape, data: Float32Array.from(a.data) };
    }
    return { outputs };
  }

  runOrtWeb(artifact) { return this.run('runOrtWeb', artifact); }

  runLiteRt(artifact) { return this.run('runLiteRt', artifact); }

  async close() {
    await this.browser.close();
    await this.server.close();
  }
}
