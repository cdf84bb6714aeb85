// The page: a thin shell around difftrain's trainer compiled to wasm
// (web/src/lib.rs). It chooses options, awaits training steps, draws the
// loss and sample grids, and offers the trained UNet for download.
//
// Its state is published for automated checks as
//   window.difftrain = { adapter, step, losses, error, samples, sampling, done }
// (`samples`: how many sample grids were drawn; `done`: the last step and
// its samples are finished).
//
// URL parameters (for tests and links): `set=section.key=value` (repeatable)
// adds config overrides in the CLI's --set syntax; `autostart=1` starts
// training at once; `sample_every=N` sets the sample refresh;
// `lose_device_after=N` destroys the GPU device after step N (the test of
// the device-loss message).

import init, { Trainer } from "./pkg/difftrain_web.js";

const state = { adapter: "", step: 0, losses: [], error: null, samples: 0, sampling: false, done: false };
window.difftrain = state;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const urlSets = params.getAll("set");
if (params.has("sample_every")) $("sample-every").value = params.get("sample_every");

let trainer = null;
let running = false;
let loopActive = false;
let sampleRequested = false;
let generation = 0; // bumps on restart, so a stale loop stops

function fail(message) {
  state.error = message;
  running = false;
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  for (const id of ["start", "sample-now", "download"]) $(id).disabled = true;
  $("start").textContent = "Start";
}

function errorText(e) {
  return e instanceof Error ? e.message : String(e);
}

// ---- the loss curve (log scale; raw losses faint, their running mean bold)

function drawLoss() {
  const canvas = $("loss-plot");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  const pad = { l: 56, r: 14, t: 12, b: 34 };
  ctx.clearRect(0, 0, w, h);
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#5f6b7a";
  const losses = state.losses.filter((v) => Number.isFinite(v) && v > 0);
  if (losses.length === 0) {
    ctx.fillText("The loss of each step appears here once training runs.", pad.l, h / 2);
    return;
  }
  let lo = Math.min(...losses), hi = Math.max(...losses);
  if (hi / lo < 1.5) { lo /= 1.25; hi *= 1.25; }
  const [lgLo, lgHi] = [Math.floor(Math.log10(lo) * 4) / 4, Math.ceil(Math.log10(hi) * 4) / 4];
  const n = Math.max(state.losses.length, 2);
  const x = (i) => pad.l + (i / (n - 1)) * (w - pad.l - pad.r);
  const y = (v) => pad.t + (1 - (Math.log10(v) - lgLo) / (lgHi - lgLo)) * (h - pad.t - pad.b);

  // Grid and axis labels.
  ctx.strokeStyle = "#e6e9ee";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let e = Math.ceil(lgLo * 4) / 4; e <= lgHi + 1e-9; e += 0.25) {
    const v = 10 ** e;
    ctx.beginPath(); ctx.moveTo(pad.l, y(v)); ctx.lineTo(w - pad.r, y(v)); ctx.stroke();
    ctx.fillText(v < 0.1 ? v.toFixed(3) : v.toFixed(2), pad.l - 6, y(v));
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const ticks = 5;
  for (let k = 0; k <= ticks; k++) {
    const i = Math.round((k / ticks) * (n - 1));
    ctx.fillText(String(i + 1), x(i), h - pad.b + 6);
  }
  ctx.fillText("step", (pad.l + w - pad.r) / 2, h - 14);

  // Raw losses, then their exponential moving average.
  ctx.strokeStyle = "rgba(47, 111, 222, 0.25)";
  ctx.beginPath();
  state.losses.forEach((v, i) => (i === 0 ? ctx.moveTo(x(i), y(v)) : ctx.lineTo(x(i), y(v))));
  ctx.stroke();
  ctx.strokeStyle = "#2f6fde";
  ctx.lineWidth = 2;
  ctx.beginPath();
  let mean = state.losses[0];
  state.losses.forEach((v, i) => {
    mean = i === 0 ? v : 0.9 * mean + 0.1 * v;
    i === 0 ? ctx.moveTo(x(i), y(mean)) : ctx.lineTo(x(i), y(mean));
  });
  ctx.stroke();
}

// ---- samples

async function drawSamples() {
  const prompts = $("prompts").value.split("\n").map((p) => p.trim()).filter((p) => p);
  if (prompts.length === 0) return;
  state.sampling = true;
  $("sample-note").textContent = "sampling\u2026";
  try {
    const grid = await trainer.samples(prompts);
    // One canvas per prompt's row, each image shown at about 80 pixels.
    const h = grid.height / prompts.length;
    const scale = Math.max(1, Math.ceil(80 / h));
    const rows = prompts.map((prompt, r) => {
      const canvas = Object.assign(document.createElement("canvas"), { width: grid.width, height: h });
      const row = grid.rgba.subarray(r * h * grid.width * 4, (r + 1) * h * grid.width * 4);
      canvas.getContext("2d").putImageData(new ImageData(new Uint8ClampedArray(row), grid.width, h), 0, 0);
      canvas.style.width = `${grid.width * scale}px`;
      canvas.style.height = `${h * scale}px`;
      const div = Object.assign(document.createElement("div"), { className: "sample-row" });
      div.append(canvas, Object.assign(document.createElement("span"), { textContent: prompt }));
      return div;
    });
    $("sample-rows").replaceChildren(...rows);
    $("sample-note").textContent = `after step ${state.step}, ${trainer.images_per_prompt()} per prompt`;
    state.samples += 1;
  } finally {
    state.sampling = false;
  }
}

// ---- the training loop

// Yield to the browser between steps. A message-channel task is not
// throttled like timers are in a background tab, so training goes on there.
const channel = new MessageChannel();
const yieldToBrowser = () => new Promise((resolve) => {
  channel.port1.onmessage = () => resolve();
  channel.port2.postMessage(null);
});

async function loop(gen) {
  loopActive = true;
  let last = performance.now();
  try {
    while (running && gen === generation && state.step < trainer.total_steps()) {
      const entry = JSON.parse(await trainer.step());
      if (gen !== generation) return;
      state.step = entry.step;
      state.losses.push(entry.loss);
      const now = performance.now();
      $("step").textContent = `${entry.step} / ${trainer.total_steps()}`;
      $("loss").textContent = entry.loss.toFixed(4);
      $("rate").textContent = (1000 / (now - last)).toFixed(2);
      $("ips").textContent = entry.images_per_s.toFixed(1);
      last = now;
      drawLoss();
      if (Number(params.get("lose_device_after")) === entry.step) trainer.lose_device();
      const every = Math.max(1, Number($("sample-every").value) || 50);
      if (sampleRequested || entry.step % every === 0 || entry.step === 1) {
        sampleRequested = false;
        await drawSamples();
      }
      await yieldToBrowser();
    }
    if (state.step >= trainer.total_steps()) {
      running = false;
      $("start").textContent = "Done";
      $("start").disabled = true;
      await drawSamples();
      state.done = true;
    }
  } catch (e) {
    fail(`Training stopped: ${errorText(e)}\nRestart starts a new run (reload the page if the GPU is gone).`);
  } finally {
    loopActive = false;
  }
}

// The adapter's name as the browser describes it (WebGPU's adapter info;
// wgpu's name for it is often empty in browsers).
async function browserAdapterName() {
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  const info = adapter?.info ?? {};
  const name = info.description || [info.vendor, info.architecture, info.device].filter((p) => p).join(" ");
  const fallback = info.isFallbackAdapter || adapter?.isFallbackAdapter ? " (fallback adapter)" : "";
  return (name || "unnamed adapter") + fallback;
}

function overrides() {
  const sets = [`model.prediction_type=${$("prediction").value}`];
  if ($("dream").checked) {
    sets.push("train.dream_training=true", `train.dream_detail_preservation=${$("dream-p").value}`);
  }
  return sets.concat(urlSets);
}

async function createTrainer() {
  generation += 1;
  running = false;
  if (trainer) { trainer.free(); trainer = null; }
  $("start").disabled = true;
  $("start").textContent = "Setting up\u2026";
  Object.assign(state, { step: 0, losses: [], samples: 0, done: false });
  drawLoss();
  trainer = await Trainer.create(overrides());
  const a = JSON.parse(trainer.adapter());
  state.adapter = a.name || (await browserAdapterName());
  $("adapter").textContent =
    `Adapter: ${state.adapter} (${a.backend}, ${a.device_type}) \u00b7 max buffer ${a.max_buffer_mib} MiB, ` +
    `storage binding ${a.max_storage_binding_mib} MiB, ${a.max_workgroup_invocations} invocations/workgroup, ` +
    `f16 ${a.shader_f16 ? "yes" : "no"}, subgroups ${a.subgroups ? "yes" : "no"}`;
  $("what").textContent = trainer.describe();
  if (!$("prompts").value.trim()) $("prompts").value = trainer.validation_prompts().join("\n");
  $("step").textContent = `0 / ${trainer.total_steps()}`;
  for (const id of ["start", "restart", "sample-now", "download"]) $(id).disabled = false;
  $("start").textContent = "Start";
}

function toggle() {
  running = !running;
  $("start").textContent = running ? "Pause" : "Resume";
  if (running && !loopActive) loop(generation);
}

async function download() {
  const wasRunning = running;
  running = false;
  while (loopActive) await yieldToBrowser();
  try {
    const files = await trainer.export_unet();
    save(new Blob([files.config], { type: "application/json" }), "config.json");
    save(new Blob([files.weights], { type: "application/octet-stream" }), "diffusion_pytorch_model.safetensors");
  } catch (e) {
    fail(`Download failed: ${errorText(e)}`);
    return;
  }
  if (wasRunning) toggle();
}

function save(blob, name) {
  const a = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob), download: name });
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

async function main() {
  drawLoss();
  const adapter = navigator.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
  if (!adapter) {
    fail(
      `${navigator.gpu ? "This browser offers WebGPU but no adapter (GPU) for it" : "This browser does not offer WebGPU"}, ` +
      "which difftrain trains on.\n" +
      "Use a current Chrome or Edge (WebGPU is on by default on Windows, macOS and ChromeOS), " +
      "Safari 26+, or Firefox 141+ on Windows. On Linux, Chrome needs " +
      "chrome://flags/#enable-unsafe-webgpu enabled (and Vulkan drivers). Then reload this page."
    );
    $("adapter").textContent = "No WebGPU adapter.";
    $("restart").disabled = true;
    return;
  }
  $("start").addEventListener("click", toggle);
  $("restart").addEventListener("click", () =>
    createTrainer().then(() => { if (!state.error) toggle(); }, (e) => fail(errorText(e))));
  $("sample-now").addEventListener("click", () => {
    if (running) sampleRequested = true;
    else drawSamples().catch((e) => fail(`Sampling failed: ${errorText(e)}`));
  });
  $("download").addEventListener("click", download);
  try {
    await init();
    await createTrainer();
  } catch (e) {
    fail(`Could not set up training: ${errorText(e)}`);
    $("adapter").textContent = "No usable WebGPU adapter.";
    return;
  }
  if (params.get("autostart") === "1") toggle();
}

main();
