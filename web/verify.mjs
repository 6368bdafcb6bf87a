#!/usr/bin/env node
// node verify.mjs PATH: the JS twin of `python -m export.verify`. For each *.onnx.json and
// *.tflite.json manifest: sha256 of the artifact and of the raw golden vectors, then the golden
// inputs through onnxruntime-node, onnxruntime-web (headless Chromium) for ONNX, and LiteRT.js
// (headless Chromium, wasm) for TFLite, compared with the golden outputs within the manifest's
// tolerance. One line per artifact and runtime; exit 0 all passed (or not supported), 1 any
// failed, 2 usage error.
import path from 'node:path';
import { parseArgs } from 'node:util';
import { findManifests, loadArtifact, UsageError } from './lib/artifacts.mjs';
import { parityMetrics } from './lib/golden.mjs';
import { BrowserRuntimes, findChromium, packageVersion, runOrtNode } from './lib/runtimes.mjs';

const RUNTIMES = { node: 'onnx', web: 'onnx', litert: 'tflite' };
const USAGE = `usage: node verify.mjs [--runtimes node,web,litert] [--chromium PATH] [-q] PATH

Verify xattn artifacts against their manifests and raw golden vectors in JS runtimes:
ONNX in onnxruntime-node (node) and onnxruntime-web in headless Chromium (web), TFLite in
LiteRT.js in headless Chromium (litert). PATH is an output folder or one manifest.
Chromium: --chromium, else $CHROMIUM, else /usr/lib/chromium/chromium, /usr/bin/chromium.

exit codes: 0 every check passed or is not supported by its runtime; 1 any failed; 2 usage error`;

const MARKS = { passed: '✓', failed: '✗', unsupported: '-' };

function num(x) {
  const [m, e] = x.toExponential(2).split('e');
  const exp = Number(e);
  return `${m.replace(/\.?0+$/, '')}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
}

// 1.4e-06, as Python's f"{x:.1e}" prints it (export.verify's lines).
function sci(x, digits = 1) {
  const [m, e] = x.toExponential(digits).split('e');
  const exp = Number(e);
  return `${m}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
}

function describe(metrics, tol) {
  let text = `max abs diff ${sci(metrics.max_abs)}`;
  const gates = [];
  if (tol.atol != null) gates.push(`atol ${num(tol.atol)}`);
  if (tol.max_rel_error != null) {
    text += `  rel L2 ${sci(metrics.rel_l2)}`;
    gates.push(`max_rel_error ${num(tol.max_rel_error)}`);
  }
  return `${text}  (${gates.join(', ')})`;
}

const oneLine = (text) => {
  const t = String(text).replace(/\s*\n\s*/g, ' ').trim();
  return t.length > 300 ? `${t.slice(0, 297)}...` : t;
};

/** Judge one runtime's answer: a line record {status, text, metrics?}. */
function judge(artifact, answer) {
  if (answer.unsupported) return { status: 'unsupported', text: answer.unsupported };
  const expected = Object.fromEntries(artifact.outputs.map((t) => [t.name, artifact.golden[t.name]]));
  const metrics = parityMetrics(expected, answer.outputs);
  const { atol, max_rel_error: maxRel } = artifact.tolerance;
  if (atol != null && !(metrics.max_abs <= atol)) {
    return { status: 'failed', metrics, text: `max abs diff ${metrics.max_abs.toPrecision(3)} exceeds atol ${num(atol)} on the golden vectors` };
  }
  if (maxRel != null && !(metrics.rel_l2 <= maxRel)) {
    return { status: 'failed', metrics, text: `relative L2 error ${metrics.rel_l2.toPrecision(3)} exceeds max_rel_error ${num(maxRel)} on the golden vectors` };
  }
  return { status: 'passed', metrics, text: describe(metrics, artifact.tolerance) };
}

export async function main(argv) {
  let args;
  try {
    args = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        runtimes: { type: 'string', default: 'node,web,litert' },
        chromium: { type: 'string' },
        quiet: { type: 'boolean', short: 'q', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
    });
  } catch (e) {
    console.error(`node verify.mjs: error: ${e.message}`);
    return 2;
  }
  if (args.values.help) {
    console.log(USAGE);
    return 0;
  }
  const target = args.positionals[0];
  const wanted = args.values.runtimes.split(',').map((s) => s.trim()).filter(Boolean);
  const unknown = wanted.filter((r) => !(r in RUNTIMES));
  if (args.positionals.length !== 1 || unknown.length || !wanted.length) {
    console.error(unknown.length ? `node verify.mjs: error: unknown runtime ${unknown.join(', ')} (node, web, litert)` : USAGE);
    return 2;
  }
  let manifests;
  try {
    manifests = findManifests(target);
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`node verify.mjs: error: ${e.message}`);
      return 2;
    }
    throw e;
  }

  const lines = [];
  const emit = (name, runtime, verdict) => {
    lines.push(verdict.status);
    if (!args.values.quiet || verdict.status === 'failed') {
      const text = verdict.status === 'unsupported' ? `not supported by ${runtime}: ${verdict.text}` : verdict.text;
      console.log(`${MARKS[verdict.status]} ${name}  [${runtime}]  ${oneLine(text)}`);
    }
  };

  // Read and check every manifest first (Node's sha256 checks); browsers start only if needed.
  const checked = manifests.map((m) => {
    try {
      return { manifest: m, artifact: loadArtifact(m) };
    } catch (e) {
      return { manifest: m, error: e };
    }
  });
  const needBrowser = wanted.some((r) => r !== 'node') &&
    checked.some((c) => !c.error && wanted.some((r) => r !== 'node' && RUNTIMES[r] === c.artifact.format));
  let browser = null;
  const label = {
    node: `onnxruntime-node ${packageVersion('onnxruntime-node')}`,
    web: `onnxruntime-web ${packageVersion('onnxruntime-web')}`,
    litert: `LiteRT.js ${packageVersion('@litertjs/core')}`,
  };
  const versions = [`Node ${process.version}`, ...wanted.map((r) => label[r])];
  if (needBrowser) {
    const executable = findChromium(args.values.chromium);
    if (!executable) {
      console.error('node verify.mjs: error: no Chromium found: apt-get install -y chromium, or pass --chromium PATH / set CHROMIUM (or --runtimes node)');
      return 2;
    }
    try {
      browser = await BrowserRuntimes.start(path.resolve(target.endsWith('.json') ? path.dirname(target) : target), executable);
    } catch (e) {
      console.error(`node verify.mjs: error: cannot start ${executable}: ${oneLine(e.message)}`);
      return 2;
    }
    versions.push(browser.chromium);
  }
  if (!args.values.quiet) console.log(`runtimes: ${versions.join(', ')}`);

  try {
    for (const c of checked) {
      const runtimes = [];
      const format = c.error ? (c.manifest.endsWith('.onnx.json') ? 'onnx' : 'tflite') : c.artifact.format;
      if (format === 'onnx' && wanted.includes('node')) runtimes.push([label.node, (a) => runOrtNode(a)]);
      if (format === 'onnx' && wanted.includes('web')) runtimes.push([label.web, (a) => browser.runOrtWeb(a)]);
      if (format === 'tflite' && wanted.includes('litert')) runtimes.push([label.litert, (a) => browser.runLiteRt(a)]);
      const name = c.artifact?.name ?? path.basename(c.manifest).replace(/\.json$/, '');
      for (const [label, run] of runtimes) {
        if (c.error) {
          emit(name, label, { status: 'failed', text: c.error.message });
          continue;
        }
        let verdict;
        try {
          verdict = judge(c.artifact, await run(c.artifact));
        } catch (e) {
          verdict = { status: 'failed', text: e?.message ?? String(e) };
        }
        emit(name, label, verdict);
      }
    }
  } finally {
    await browser?.close();
  }
  const n = (s) => lines.filter((x) => x === s).length;
  let summary = `${n('passed')} passed, ${n('failed')} failed`;
  if (n('unsupported')) summary += `, ${n('unsupported')} not supported`;
  console.log(`${summary} (${manifests.length} manifest${manifests.length === 1 ? '' : 's'} in ${target})`);
  return n('failed') ? 1 : 0;
}

process.exitCode = await main(process.argv.slice(2));
