//! difftrain in the browser: the library's [`Run`] (the same trainer
//! `difftrain train` runs natively) behind a small wasm-bindgen API that the
//! page (`web/app.js`) drives. Nothing is reimplemented here: the page only
//! chooses options, awaits steps, draws what comes back and offers the
//! trained UNet for download.

use difftrain::train::config::Config;
use difftrain::train::run::{write_unet, Run};
use difftrain::{platform, sample};
use difftrain::{AdapterChoice, Gpu};
use serde::Serialize;
use std::path::Path;
use std::sync::{Arc, Mutex};
use wasm_bindgen::prelude::*;

/// A training run on the browser's WebGPU adapter.
#[wasm_bindgen]
pub struct Trainer {
    run: Run,
    /// Set by the device's lost / uncaptured-error callbacks.
    fault: Arc<Mutex<Option<String>>>,
}

/// What the page shows about the adapter.
#[derive(Serialize)]
struct AdapterInfo {
    name: String,
    backend: String,
    device_type: String,
    max_buffer_mib: u64,
    max_storage_binding_mib: u64,
    max_workgroup_invocations: u32,
    shader_f16: bool,
    subgroups: bool,
}

/// `unet/config.json` and `unet/diffusion_pytorch_model.safetensors`.
#[wasm_bindgen(getter_with_clone)]
pub struct UnetFiles {
    pub config: String,
    pub weights: Vec<u8>,
}

/// A grid of samples as RGBA pixels, a row per prompt.
#[wasm_bindgen(getter_with_clone)]
pub struct SampleGrid {
    pub width: u32,
    pub height: u32,
    pub rgba: Vec<u8>,
}

fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

#[wasm_bindgen]
impl Trainer {
    /// Open the browser's WebGPU adapter and set up the built-in run with
    /// `overrides`: `section.key=value` lines in the CLI's `--set` syntax
    /// (e.g. `train.dream_training=true`).
    pub async fn create(overrides: Vec<String>) -> Result<Trainer, JsError> {
        let gpu = Gpu::new(&AdapterChoice::default()).await.map_err(js_err)?;
        let fault = Arc::new(Mutex::new(None));
        let lost = Arc::clone(&fault);
        gpu.device.set_device_lost_callback(move |reason, msg| {
            *lost.lock().unwrap() = Some(format!("the GPU device was lost ({reason:?}): {msg}"));
        });
        let uncaptured = Arc::clone(&fault);
        gpu.device
            .on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                let msg = match &e {
                    wgpu::Error::OutOfMemory { .. } => {
                        format!("the GPU ran out of memory: {e}")
                    }
                    _ => format!("GPU error: {e}"),
                };
                uncaptured.lock().unwrap().get_or_insert(msg);
            }));
        let config = Config::for_training(None, &overrides).map_err(js_err)?;
        let setup = async {
            let mut run = Run::open(&gpu, &config).await?;
            run.start().await?;
            Ok(run)
        };
        let run = setup.await.map_err(|e| fault_or(&fault, e))?;
        let t = Trainer { run, fault };
        t.check()?;
        Ok(t)
    }

    /// The adapter's name, backend and limits, as JSON.
    pub fn adapter(&self) -> String {
        let g = &self.run.gpu;
        let info = AdapterInfo {
            name: g.info.name.clone(),
            backend: format!("{:?}", g.info.backend),
            device_type: format!("{:?}", g.info.device_type),
            max_buffer_mib: g.limits.max_buffer_size >> 20,
            max_storage_binding_mib: g.limits.max_storage_buffer_binding_size >> 20,
            max_workgroup_invocations: g.limits.max_compute_invocations_per_workgroup,
            shader_f16: g.caps.shader_f16,
            subgroups: g.caps.subgroups,
        };
        serde_json::to_string(&info).expect("plain fields")
    }

    /// "the built-in model on ..., batch 8 x 1 accumulation, epsilon prediction".
    pub fn describe(&self) -> String {
        self.run.describe()
    }

    /// The resolved config, as TOML.
    pub fn config_toml(&self) -> String {
        self.run.config.to_toml()
    }

    /// The `[sample]` section's prompts (the page's initial ones).
    pub fn validation_prompts(&self) -> Vec<String> {
        self.run.config.sample.validation_prompts.clone()
    }

    /// Images per prompt in a sample grid (its columns).
    pub fn images_per_prompt(&self) -> usize {
        self.run.config.sample.num_validation_images
    }

    /// Optimizer steps done.
    pub fn step_count(&self) -> u64 {
        self.run.state.global_step
    }

    /// Optimizer steps the config asks for.
    pub fn total_steps(&self) -> u64 {
        self.run.state.max_train_steps
    }

    /// One optimizer step; its log line (`train_log.jsonl`'s fields) as JSON.
    pub async fn step(&mut self) -> Result<String, JsError> {
        let entry = self.run.step().await.map_err(|e| self.fault_or(e))?;
        self.check()?;
        serde_json::to_string(&entry).map_err(js_err)
    }

    /// Destroy the GPU device, as a driver reset or an unplugged GPU would
    /// lose it: the page's device-loss path, for its test.
    pub fn lose_device(&self) {
        self.run.gpu.device.destroy();
    }

    /// `prompts` sampled with the current weights (the EMA's when it is on)
    /// as the validation grids are: `[sample]`'s steps, guidance and images
    /// per prompt, a row per prompt.
    pub async fn samples(&self, prompts: Vec<String>) -> Result<SampleGrid, JsError> {
        let out = self
            .run
            .validation_samples(&prompts)
            .await
            .map_err(|e| self.fault_or(e))?;
        self.check()?;
        let cols = self.run.config.sample.num_validation_images;
        let grid = sample::grid(&out.images, cols).map_err(js_err)?;
        let rgba = grid
            .pixels()
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect();
        Ok(SampleGrid {
            width: grid.width(),
            height: grid.height(),
            rgba,
        })
    }

    /// The trained UNet's folder as `difftrain train`'s final pipeline has
    /// it (diffusers' layout; the EMA weights when the EMA is on), written
    /// by the native writer into the in-memory files and read back.
    pub async fn export_unet(&self) -> Result<UnetFiles, JsError> {
        let dir = Path::new("/export/unet");
        let ema = self.run.config.train.use_ema;
        write_unet(dir, &self.run.session, &self.run.unet, ema)
            .await
            .map_err(|e| self.fault_or(e))?;
        let read = |name: &str| platform::read(&dir.join(name)).map_err(js_err);
        let config = String::from_utf8(read("config.json")?).map_err(js_err)?;
        let weights = read("diffusion_pytorch_model.safetensors")?;
        platform::remove_dir_all(dir).map_err(js_err)?;
        Ok(UnetFiles { config, weights })
    }

    fn fault_or(&self, e: difftrain::Error) -> JsError {
        fault_or(&self.fault, e)
    }

    /// An error once the device was lost or reported an error.
    fn check(&self) -> Result<(), JsError> {
        match self.fault.lock().unwrap().as_ref() {
            Some(msg) => Err(js_err(msg)),
            None => Ok(()),
        }
    }
}

/// The device's fault (lost, out of memory) when there is one: the cause of
/// `e`, which is then only its symptom (a failed readback).
fn fault_or(fault: &Mutex<Option<String>>, e: difftrain::Error) -> JsError {
    match fault.lock().unwrap().as_ref() {
        Some(msg) => js_err(msg),
        None => js_err(e),
    }
}
