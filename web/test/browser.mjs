// The browser test: serve web/dist, open the page in headless Chromium
// (WebGPU on SwiftShader), let it train a tiny configuration of the
// built-in run, and check what a person would see:
//   - the page found a WebGPU adapter and reports no error;
//   - every loss is finite and the loss falls;
//   - a sample grid was drawn (non-blank pixels on its canvas);
//   - the first losses equal a native run of the same configuration and
//     seed (EXPECTED_LOSSES: the native train_log.jsonl) within 1e-4.
// Screenshots of the page go to SCREENSHOT_DIR.
//
// usage: node browser.mjs DIST_DIR NATIVE_TRAIN_LOG SCREENSHOT_DIR [SET ...]
// where each SET is a `section.key=value` override given to both runs.

import { chromium } from "playwright-core";
import { createServer } from "node:http";
import { readFile, mkdir } from "node:fs/promises";
import { extname, join, normalize } from "node:path";

const [dist, nativeLog, shots, ...sets] = process.argv.slice(2);
if (!dist || !nativeLog || !shots) {
  console.error("usage: node browser.mjs DIST_DIR NATIVE_TRAIN_LOG SCREENSHOT_DIR [SET ...]");
  process.exit(2);
}
const CHROMIUM = process.env.CHROMIUM || "/usr/lib/chromium/chromium";
const TIMEOUT_MS = Number(process.env.BROWSER_TEST_TIMEOUT_MS || 20 * 60 * 1000);
const TOLERANCE = 1e-4;

const expected = (await readFile(nativeLog, "utf8"))
  .split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l).loss);
const steps = expected.length;
if (steps < 4) throw new Error(`${nativeLog}: ${steps} steps; the test needs at least 4`);

// A static file server for the built site.
const types = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".wasm": "application/wasm" };
const server = createServer(async (req, res) => {
  const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname)).replace(/^\/+/, "");
  const file = path || "index.html";
  try {
    const body = await readFile(join(dist, file));
    res.writeHead(200, { "content-type": types[extname(file)] || "application/octet-stream" });
    res.end(body);
  } catch {
    res.writeHead(404);
    res.end();
  }
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const base = `http://127.0.0.1:${server.address().port}/`;

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: [
    "--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync",
  ],
});
let failed = false;
const check = (ok, what) => {
  console.log(`${ok ? "ok  " : "FAIL"} ${what}`);
  if (!ok) failed = true;
};

try {
  await mkdir(shots, { recursive: true });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("console", (m) => console.log(`[page ${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => console.log(`[page error] ${e.message}`));
  const query = new URLSearchParams([["autostart", "1"], ["sample_every", "2"], ...sets.map((s) => ["set", s])]);
  const t0 = Date.now();
  await page.goto(`${base}?${query}`);
  await page.waitForFunction(
    (n) => window.difftrain && (window.difftrain.error || (window.difftrain.step >= n && window.difftrain.done)),
    steps, { timeout: TIMEOUT_MS, polling: 500 },
  );
  const s = await page.evaluate(() => window.difftrain);
  console.log(`trained ${s.step} steps in the browser in ${((Date.now() - t0) / 1000).toFixed(1)} s on '${s.adapter}'`);
  await page.screenshot({ path: join(shots, "page.png"), fullPage: true });

  check(s.error === null, `no error on the page${s.error ? `: ${s.error}` : ""}`);
  check(s.adapter.length > 0, `a WebGPU adapter: '${s.adapter}'`);
  check(s.losses.length >= steps && s.losses.every(Number.isFinite), `${s.losses.length} finite losses`);
  const k = Math.max(2, Math.floor(steps / 4));
  const mean = (a) => a.reduce((x, y) => x + y, 0) / a.length;
  const [head, tail] = [mean(s.losses.slice(0, k)), mean(s.losses.slice(steps - k, steps))];
  check(tail < head, `the loss falls: mean of the first ${k} steps ${head.toFixed(4)}, of the last ${k} ${tail.toFixed(4)}`);
  const worst = expected.reduce((w, e, i) => Math.max(w, Math.abs(e - s.losses[i]) / Math.max(1, Math.abs(e))), 0);
  check(worst <= TOLERANCE, `the ${steps} losses equal the native run's within ${TOLERANCE} (worst ${worst.toExponential(2)})`);
  console.log(`  browser: ${s.losses.slice(0, steps).map((v) => v.toFixed(6)).join(" ")}`);
  console.log(`  native:  ${expected.map((v) => v.toFixed(6)).join(" ")}`);
  const drawn = await page.evaluate(() => [...document.querySelectorAll(".sample-row canvas")].map((c) => {
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let opaque = 0, varied = false;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i + 3] === 255) opaque++;
      if (Math.abs(d[i] - d[0]) + Math.abs(d[i + 1] - d[1]) + Math.abs(d[i + 2] - d[2]) > 8) varied = true;
    }
    return { w: c.width, h: c.height, full: opaque === c.width * c.height, varied };
  }));
  check(s.samples >= 2, `${s.samples} sample grids drawn while training`);
  check(drawn.length > 0 && drawn.every((r) => r.full && r.varied),
    `the last grid has ${drawn.length} rows of ${drawn.map((r) => `${r.w}x${r.h}`).join(", ")} pixels, none blank`);
  await page.locator("main").screenshot({ path: join(shots, "panels.png") });
} catch (e) {
  check(false, `the page ran: ${e.message}`);
} finally {
  await browser.close();
  server.close();
}
process.exit(failed ? 1 : 0);
