// A static file server on 127.0.0.1 for the browser page: the page, the shared golden reader,
// the two runtimes' files from node_modules, and the artifact folder (flat files only).
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const WEB = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const TYPES = {
  '.html': 'text/html; charset=utf-8', '.mjs': 'text/javascript', '.js': 'text/javascript',
  '.wasm': 'application/wasm', '.json': 'application/json', '.map': 'application/json',
};

/** Serve; resolves to {url, close()}. `artifacts` is the folder served under /artifacts/. */
export function startServer(artifacts) {
  const roots = {
    page: path.join(WEB, 'page'),
    lib: path.join(WEB, 'lib'),
    node_modules: path.join(WEB, 'node_modules'),
    artifacts: path.resolve(artifacts),
  };
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://127.0.0.1');
    const [, top, ...rest] = decodeURIComponent(url.pathname).split('/');
    const root = roots[top];
    const file = root && path.resolve(root, ...rest);
    // Inside its root, and artifacts only at the top level (no SavedModel folders, no ..).
    const ok = file && file.startsWith(root + path.sep) && !rest.some((p) => p === '..' || p.startsWith('.')) &&
      (top !== 'artifacts' || rest.length === 1);
    fs.stat(ok ? file : '/nonexistent', (err, st) => {
      if (err || !st.isFile()) {
        res.writeHead(404).end('not found');
        return;
      }
      res.writeHead(200, {
        'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream',
        'content-length': st.size,
        'cache-control': 'no-store',
      });
      fs.createReadStream(file).pipe(res);
    });
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      resolve({ url: `http://127.0.0.1:${port}`, close: () => new Promise((r) => server.close(r)) });
    });
  });
}
