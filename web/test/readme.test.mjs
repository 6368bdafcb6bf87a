// The docs' browser snippet (on README.md or a docs/ page) runs as written in headless Chromium
// (the CDN URL pointed at the onnxruntime-web that npm installed, the model at the artifacts folder).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { findChromium } from '../lib/runtimes.mjs';
import { startServer } from '../lib/server.mjs';

const WEB = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const ARTIFACTS = path.resolve(WEB, process.env.XATTN_ARTIFACTS ?? '../artifacts');
const MODEL = 'xattn_u64_h4_q10x64_kv10x64.onnx';
const chromium = findChromium();
const skip = !chromium ? 'no Chromium' : !fs.existsSync(path.join(ARTIFACTS, MODEL)) ? `no ${MODEL} in ${ARTIFACTS}` : false;

// README.md and every page of the docs site (docs/**/*.md).
function docPages() {
  const repo = path.join(WEB, '..');
  const docs = fs.readdirSync(path.join(repo, 'docs'), { recursive: true })
    .filter((name) => name.endsWith('.md')).map((name) => path.join(repo, 'docs', name));
  return [path.join(repo, 'README.md'), ...docs];
}

test('docs browser snippet', { skip }, async () => {
  // The block may sit on any page; shown on two, it is the same text on both.
  const blocks = [...new Set(docPages().flatMap((page) => [...fs.readFileSync(page, 'utf8').matchAll(/```js\n(.*?)```/gs)]
    .map((m) => m[1]).filter((b) => b.includes('onnxruntime-web'))))];
  assert.equal(blocks.length, 1);
  assert.equal(blocks[0].trim().split('\n').length, 5);
  const code = blocks[0]
    .replace(/https:\/\/cdn\.jsdelivr\.net\/npm\/onnxruntime-web@[^/]+\/dist\//, '/node_modules/onnxruntime-web/dist/')
    .replace(`'${MODEL}'`, `'/artifacts/${MODEL}'`);
  const { chromium: pw } = await import('playwright-core');
  const server = await startServer(ARTIFACTS);
  const browser = await pw.launch({ executablePath: chromium, args: ['--no-sandbox'] });
  try {
    const page = await browser.newPage();
    const logged = new Promise((resolve, reject) => {
      page.on('console', (m) => m.type() === 'log' && resolve(m.text()));
      page.on('pageerror', reject);
    });
    await page.goto(`${server.url}/page/index.html`);
    await page.addScriptTag({ type: 'module', content: code });
    assert.match(await logged, /^\[1, 10, 64\] Float32Array\(4\)/);
  } finally {
    await browser.close();
    await server.close();
  }
});
