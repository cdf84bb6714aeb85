//! Checkpoints: the whole training state in `OUTPUT_DIR/checkpoint-STEP/`
//! (diffusers' naming), written atomically (a temporary folder, fsync,
//! rename) and read back exactly.
//!
//! ```text
//! checkpoint-STEP/
//!   unet/config.json, unet/diffusion_pytorch_model.safetensors   (diffusers layout)
//!   unet_ema/ ...            the EMA weights, when the EMA is on
//!   optimizer.safetensors    AdamW moments `adamw.m.NAME`, `adamw.v.NAME`, its
//!                            step count `adamw.step`, and in fp16 the loss
//!                            scaler `grad_scaler` (f32)
//!   trainer_state.json       step, micro-step (the RNG counter), data position,
//!                            seed, LR schedule, images skipped, time
//!   config.toml              the resolved config
//! ```
//! Because noise and timesteps come from a counter-based generator, the
//! micro-step counter is all the RNG state there is.

use super::run::write_unet;
pub use super::run::TrainerState;
use crate::error::{file_err, Error, Result};
use crate::graph::Session;
use crate::io::{HostTensor, TensorFile, WeightFile};
use crate::models::weights::load_params;
use crate::models::UNet;
use crate::ops::optim::{ema_label, ADAMW_STEP, EMA_ONE_MINUS_DECAY, GRAD_SCALER};
use crate::platform::block_on;
use std::path::{Path, PathBuf};

const STATE: &str = "trainer_state.json";
const OPTIMIZER: &str = "optimizer.safetensors";
const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";
const UNET_EMA_WEIGHTS: &str = "unet_ema/diffusion_pytorch_model.safetensors";

/// The folder name of the checkpoint after `step` optimizer steps.
pub fn name(step: u64) -> String {
    format!("checkpoint-{step}")
}

/// Complete checkpoints in `output_dir`, oldest first. Leftovers of an
/// interrupted write (hidden temporary folders) are not checkpoints.
pub fn list(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let step = e
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            e.path().join(STATE).is_file().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The newest complete checkpoint.
pub fn latest(output_dir: &Path) -> Option<PathBuf> {
    list(output_dir).pop().map(|(_, p)| p)
}

/// Write the checkpoint of `state.global_step` into `output_dir`, then keep
/// only the newest `keep` (all when None). One already there (from a run
/// that went past this step before being resumed from an earlier one) is
/// replaced once the new one is complete.
pub fn save(
    output_dir: &Path,
    session: &Session,
    unet: &UNet,
    state: &TrainerState,
    config_toml: &str,
    keep: Option<usize>,
) -> Result<PathBuf> {
    let dir = output_dir.join(name(state.global_step));
    let tmp = output_dir.join(format!(".{}.tmp", name(state.global_step)));
    let io = |p: &Path, e: std::io::Error| file_err(p, e.to_string());
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(tmp.join("unet")).map_err(|e| io(&tmp, e))?;

    block_on(write_unet(&tmp.join("unet"), session, unet, false))?;
    if has_ema(session) {
        std::fs::create_dir_all(tmp.join("unet_ema")).map_err(|e| io(&tmp, e))?;
        block_on(write_unet(&tmp.join("unet_ema"), session, unet, true))?;
    }
    pause_for_crash_test(state.global_step);
    let mut opt = TensorFile::new(&tmp.join(OPTIMIZER));
    for label in optimizer_labels(session) {
        let v = session.read_state_blocking(&label)?;
        opt.insert(&label, HostTensor::f32(&[v.len()], v));
    }
    opt.write(&tmp.join(OPTIMIZER), None)?;
    let json = serde_json::to_string_pretty(state).map_err(|e| file_err(&tmp, e.to_string()))?;
    std::fs::write(tmp.join("config.toml"), config_toml).map_err(|e| io(&tmp, e))?;
    // The state file last: a folder without it is not a checkpoint.
    std::fs::write(tmp.join(STATE), json).map_err(|e| io(&tmp, e))?;
    sync_tree(&tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
    sync_dir(output_dir)?;
    if let Some(keep) = keep {
        let all = list(output_dir);
        for (_, old) in &all[..all.len().saturating_sub(keep)] {
            std::fs::remove_dir_all(old).map_err(|e| io(old, e))?;
        }
    }
    Ok(dir)
}

/// Whether the session keeps an EMA of its parameters.
fn has_ema(session: &Session) -> bool {
    !session.state_labels(EMA_ONE_MINUS_DECAY).is_empty()
}

/// Restore a checkpoint into `session` (whose graph is `unet`'s training
/// step): weights, optimizer moments and step count. Returns its state. A
/// missing or truncated file, a tensor of another shape, or a UNet config
/// other than the one being trained is an error naming the file and tensor.
pub fn load(dir: &Path, session: &Session, unet: &UNet) -> Result<TrainerState> {
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| file_err(&state_path, format!("cannot read ({e}); not a checkpoint")))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| file_err(&state_path, format!("damaged: {e}")))?;

    check_same_config(&dir.join("unet").join("config.json"), unet)?;
    let weights = WeightFile::read(&dir.join(UNET_WEIGHTS))?;
    load_params(session, &weights)?;

    let opt_path = dir.join(OPTIMIZER);
    let opt = TensorFile::read(&opt_path)?;
    for label in optimizer_labels(session) {
        if label == ADAMW_STEP && opt.get(&label).is_err() {
            // A checkpoint from before the step count moved to the GPU:
            // every step was applied.
            let adamw = session.plan.adamw.clone().unwrap_or_default();
            let t = state.global_step as i32;
            let bc = |beta: f32| 1.0 - (beta as f64).powi(t) as f32;
            let values = [t as f32, bc(adamw.beta1), bc(adamw.beta2), 0.0];
            session.write_state(&label, &values)?;
            continue;
        }
        if label == GRAD_SCALER && opt.get(&label).is_err() {
            // A run switched to fp16 at this resume: the scaler starts fresh.
            continue;
        }
        let t = opt.get(&label)?;
        session
            .write_state(&label, &t.values)
            .map_err(|e| Error::Tensor {
                name: label.clone(),
                msg: format!("in {}: {e}", opt_path.display()),
            })?;
    }
    if has_ema(session) {
        let path = dir.join(UNET_EMA_WEIGHTS);
        let ema = WeightFile::read(&path)?;
        for &p in &session.plan.trained_params.clone() {
            let name = &session.graph.desc(p).name;
            let values = ema.decode(name).ok_or_else(|| Error::Tensor {
                name: name.clone(),
                msg: format!("missing from {} (the EMA weights)", path.display()),
            })?;
            session
                .write_state(&ema_label(name), &values)
                .map_err(|e| Error::Tensor {
                    name: name.clone(),
                    msg: format!("in {}: {e}", path.display()),
                })?;
        }
    }
    Ok(state)
}

/// Labels of the optimizer's state: AdamW's moments and step count, the
/// loss scaler.
fn optimizer_labels(session: &Session) -> Vec<String> {
    let mut labels = session.state_labels("adamw.m.");
    labels.extend(session.state_labels("adamw.v."));
    labels.extend(session.state_labels(ADAMW_STEP));
    labels.extend(session.state_labels(GRAD_SCALER));
    labels
}

/// The checkpoint's UNet config must be the one being trained.
fn check_same_config(path: &Path, unet: &UNet) -> Result<()> {
    let saved = crate::io::config::read_json(path)?;
    let current = match serde_json::to_value(&unet.config) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => return Err(file_err(path, "cannot compare configs")),
    };
    for (k, v) in &current {
        if saved.get(k) != Some(v) {
            return Err(Error::Config {
                path: path.display().to_string(),
                field: k.clone(),
                msg: format!(
                    "the checkpoint's UNet has {}, the model being trained {v}",
                    saved
                        .get(k)
                        .map_or("no value".to_string(), |s| s.to_string())
                ),
            });
        }
    }
    Ok(())
}

/// Fault injection for the crash test (tests/trainer.rs): with
/// `DIFFTRAIN_TEST_PAUSE_CHECKPOINT=STEP`, writing checkpoint STEP stops
/// half-way (weights written, state not) and waits to be killed.
fn pause_for_crash_test(step: u64) {
    let wanted = std::env::var("DIFFTRAIN_TEST_PAUSE_CHECKPOINT").ok();
    if wanted.and_then(|v| v.parse::<u64>().ok()) == Some(step) {
        eprintln!("paused while writing {}", name(step));
        std::thread::sleep(std::time::Duration::from_secs(600));
    }
}

/// fsync every file under `dir` and the folders themselves.
fn sync_tree(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| file_err(dir, e.to_string()))?;
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| file_err(&p, format!("fsync: {e}")))?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Directories can be fsynced on Unix; elsewhere opening one fails, and
    // the rename is as durable as the platform makes it.
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
    Ok(())
}
