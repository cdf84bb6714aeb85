// The browser test: serve web/dist, open the page in headless Chromium
// (WebGPU on SwiftShader) and check what a person would see.
//
// 1. Training: the page trains a tiny configuration of the built-in run.
//    No error; every loss finite and the loss falls; sample grids drawn (not
//    blank); the losses equal a native run of the same configuration and
//    seed (NATIVE_DIR/train_log.jsonl) within 1e-4; the downloaded UNet
//    (config.json + diffusion_pytorch_model.safetensors) equals the native
//    run's final unet/ within 1e-4. Then v-prediction with DREAM, chosen in
//    the controls, restarts training.
// 2. Device loss: the GPU device destroyed mid-run ends in a message.
// 3. Out of memory: a batch too big for the adapter ends in a message.
// 4. No WebGPU: Chromium without WebGPU gets a message on how to enable it.
// Screenshots of each go to SCREENSHOT_DIR.
//
// usage: node browser.mjs DIST_DIR NATIVE_DIR SCREENSHOT_DIR [SET ...]
// where each SET is a `section.key=value` override given to both runs.

import { chromium } from "playwright-core";
import { createServer } from "node:http";
import { readFile, mkdir } from "node:fs/promises";
import { extname, join, normalize } from "node:path";

const [dist, nativeDir, shots, ...sets] = process.argv.slice(2);
if (!dist || !nativeDir || !shots) {
  console.error("usage: node browser.mjs DIST_DIR NATIVE_DIR SCREENSHOT_DIR [SET ...]");
  process.exit(2);
}
const CHROMIUM = process.env.CHROMIUM || "/usr/lib/chromium/chromium";
const TIMEOUT_MS = Number(process.env.BROWSER_TEST_TIMEOUT_MS || 20 * 60 * 1000);
const TOLERANCE = 1e-4;
const FLAGS = [
  "--headless=new", "--no-sandbox", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

let failed = false;
function check(ok, what) {
  console.log(`${ok ? "ok  " : "FAIL"} ${what}`);
  if (!ok) failed = true;
}

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

/// The tensors of a safetensors file as { name: { shape, values } } (F32 only).
function safetensors(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = Number(view.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
  const out = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    if (t.dtype !== "F32") throw new Error(`tensor ${name} is ${t.dtype}, not F32`);
    const [a, b] = t.data_offsets;
    const data = bytes.slice(8 + n + a, 8 + n + b);
    out[name] = { shape: t.shape, values: new Float32Array(data.buffer, data.byteOffset, (b - a) / 4) };
  }
  return out;
}

/// Open the page with `query` in `browser`, wait until `until(state)` holds
/// in the page (or its error is set), and return the page and its state.
async function open(browser, query, until, name) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
  const page = await context.newPage();
  page.on("console", (m) => {
    if (m.type() === "error") console.log(`[${name}: page ${m.type()}] ${m.text()}`);
  });
  page.on("pageerror", (e) => console.log(`[${name}: page error] ${e.message}`));
  await page.goto(`${base}?${new URLSearchParams(query)}`);
  await page.waitForFunction(
    `window.difftrain && (window.difftrain.error !== null || (${until})(window.difftrain))`,
    null, { timeout: TIMEOUT_MS, polling: 500 },
  );
  const state = await page.evaluate(() => window.difftrain);
  await page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
  return { page, state };
}

const setParams = sets.map((s) => ["set", s]);
const expected = (await readFile(join(nativeDir, "train_log.jsonl"), "utf8"))
  .split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l).loss);
const steps = expected.length;
if (steps < 4) throw new Error(`${nativeDir}/train_log.jsonl: ${steps} steps; the test needs at least 4`);
await mkdir(shots, { recursive: true });

const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: [...FLAGS, "--enable-unsafe-webgpu"] });
try {
  // 1. Training, the samples, and the download.
  console.log("== training");
  const t0 = Date.now();
  const { page, state: s } = await open(browser, [["autostart", "1"], ["sample_every", "4"], ...setParams],
    `(s) => s.step >= ${steps} && s.done`, "training");
  console.log(`trained ${s.step} steps in ${((Date.now() - t0) / 1000).toFixed(1)} s on '${s.adapter}'`);
  check(s.error === null, `no error on the page${s.error ? `: ${s.error}` : ""}`);
  check(s.adapter.length > 0, `a WebGPU adapter: '${s.adapter}'`);
  check(s.losses.length === steps && s.losses.every(Number.isFinite), `${s.losses.length} finite losses`);
  const k = Math.max(2, Math.floor(steps / 4));
  const mean = (a) => a.reduce((x, y) => x + y, 0) / a.length;
  const [head, tail] = [mean(s.losses.slice(0, k)), mean(s.losses.slice(steps - k))];
  check(tail < head, `the loss falls: mean of the first ${k} steps ${head.toFixed(4)}, of the last ${k} ${tail.toFixed(4)}`);
  const worst = expected.reduce((w, e, i) => Math.max(w, Math.abs(e - s.losses[i]) / Math.max(1, Math.abs(e))), 0);
  check(worst <= TOLERANCE, `the ${steps} losses equal the native run's within ${TOLERANCE} (worst ${worst.toExponential(2)})`);
  console.log(`  browser: ${s.losses.map((v) => v.toFixed(6)).join(" ")}`);
  console.log(`  native:  ${expected.map((v) => v.toFixed(6)).join(" ")}`);
  const rows = await page.evaluate(() => [...document.querySelectorAll(".sample-row canvas")].map((c) => {
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let opaque = 0, varied = false;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i + 3] === 255) opaque++;
      if (Math.abs(d[i] - d[0]) + Math.abs(d[i + 1] - d[1]) + Math.abs(d[i + 2] - d[2]) > 8) varied = true;
    }
    return { w: c.width, h: c.height, full: opaque === c.width * c.height, varied };
  }));
  check(s.samples >= 2, `${s.samples} sample grids drawn while training`);
  check(rows.length > 0 && rows.every((r) => r.full && r.varied),
    `the last grid has ${rows.length} rows of ${rows.map((r) => `${r.w}x${r.h}`).join(", ")} pixels, none blank`);
  await page.locator("main").screenshot({ path: join(shots, "panels.png") });

  const downloads = [];
  page.on("download", (d) => downloads.push(d));
  await page.click("#download");
  for (let i = 0; i < 100 && downloads.length < 2; i++) await page.waitForTimeout(100);
  const files = {};
  for (const d of downloads) files[d.suggestedFilename()] = await readFile(await d.path());
  check(Object.keys(files).sort().join(",") === "config.json,diffusion_pytorch_model.safetensors",
    `the download is config.json + diffusion_pytorch_model.safetensors (got ${Object.keys(files).join(", ")})`);
  if (files["config.json"] && files["diffusion_pytorch_model.safetensors"]) {
    const config = JSON.parse(files["config.json"].toString());
    const nativeConfig = JSON.parse(await readFile(join(nativeDir, "unet", "config.json"), "utf8"));
    check(config._class_name === "UNet2DConditionModel" && JSON.stringify(config) === JSON.stringify(nativeConfig),
      "its config.json is the native run's unet/config.json");
    const got = safetensors(new Uint8Array(files["diffusion_pytorch_model.safetensors"]));
    const want = safetensors(new Uint8Array(await readFile(join(nativeDir, "unet", "diffusion_pytorch_model.safetensors"))));
    const names = Object.keys(want);
    let diff = 0, same = names.length === Object.keys(got).length;
    for (const n of names) {
      const [a, b] = [got[n], want[n]];
      if (!a || a.values.length !== b.values.length) { same = false; continue; }
      for (let i = 0; i < a.values.length; i++) diff = Math.max(diff, Math.abs(a.values[i] - b.values[i]));
    }
    check(same && diff <= TOLERANCE,
      `its ${Object.keys(got).length} tensors equal the native run's final UNet within ${TOLERANCE} (worst ${diff.toExponential(2)})`);
  }

  // The options: v-prediction with DREAM, set in the controls, start a new run.
  await page.selectOption("#prediction", "v_prediction");
  await page.check("#dream");
  await page.fill("#dream-p", "0.5");
  await page.click("#restart");
  await page.waitForFunction(() => window.difftrain.error !== null || window.difftrain.step >= 2,
    null, { timeout: TIMEOUT_MS, polling: 500 });
  const v = await page.evaluate(() => ({ ...window.difftrain, what: document.getElementById("what").textContent }));
  check(v.error === null && v.losses.length >= 2 && v.losses.every(Number.isFinite) && /v_prediction/.test(v.what) && /DREAM p = 0.5/.test(v.what),
    `restarted from the controls: ${v.what}; losses ${v.losses.map((x) => x.toFixed(4)).join(", ")}${v.error ? `; ${v.error}` : ""}`);
  await page.context().close();

  // 2. Device loss mid-run.
  console.log("== device loss");
  const lost = await open(browser, [["autostart", "1"], ["sample_every", "1000"], ["lose_device_after", "2"], ...setParams],
    "() => false", "device-loss");
  check(/lost/i.test(lost.state.error ?? ""), `a lost device is reported: ${lost.state.error}`);
  check(await lost.page.isVisible("#error"), "the message is on the page");
  await lost.page.context().close();

  // 3. A run too big for the adapter's memory.
  console.log("== out of memory");
  const big = await open(browser, [["autostart", "1"], ...setParams, ["set", "train.train_batch_size=512"], ["set", "data.resolution=256"]],
    "() => false", "out-of-memory");
  check(/memory|buffer size|max/i.test(big.state.error ?? ""), `too big a run is reported: ${big.state.error}`);
  await big.page.context().close();
} catch (e) {
  check(false, `the page ran: ${e.message}`);
} finally {
  await browser.close();
}

// 4. A browser without WebGPU.
console.log("== no WebGPU");
const plain = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: [...FLAGS, "--disable-webgpu"] });
try {
  const none = await open(plain, [["autostart", "1"]], "() => false", "no-webgpu");
  check(/WebGPU/.test(none.state.error ?? "") && /enable|Chrome/.test(none.state.error ?? ""),
    `no WebGPU is explained: ${(none.state.error ?? "").split("\n")[0]}`);
} catch (e) {
  check(false, `the page without WebGPU ran: ${e.message}`);
} finally {
  await plain.close();
  server.close();
}
process.exit(failed ? 1 : 0);
