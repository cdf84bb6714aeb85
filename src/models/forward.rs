//! Tensor-in/tensor-out runs of each model (`difftrain forward ...`): read
//! a model folder and a safetensors file of inputs, run one forward (and for
//! the UNet optionally the backward of sum(prediction * grad_output)), and
//! return the outputs under the names of the CLI contract, with the time and
//! buffer memory the run took.

use super::clip::ClipTextModel;
use super::unet::UNet;
use super::vae::{upgrade_legacy_names, Vae};
use super::weights::{load_params, warn_unused, weights_path};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::graph::{Graph, RunSpec, Session, TensorId};
use crate::io::{HostTensor, TensorFile};
use crate::Gpu;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Time and memory of a model run.
#[derive(Clone, Debug, Default)]
pub struct RunReport {
    /// Seconds to plan the graph, create buffers and pipelines, and upload
    /// the weights and inputs.
    pub setup_s: f64,
    /// Seconds of the step(s) and the readback (on llvmpipe this includes
    /// compiling each shader at its first dispatch).
    pub run_s: f64,
    /// Peak bytes of GPU buffers of one session.
    pub buffer_bytes: u64,
    pub dispatches: usize,
}

impl RunReport {
    fn add(&mut self, other: RunReport) {
        self.setup_s += other.setup_s;
        self.run_s += other.run_s;
        self.buffer_bytes = self.buffer_bytes.max(other.buffer_bytes);
        self.dispatches += other.dispatches;
    }
}

/// Outputs of a model run, named as the CLI writes them.
pub struct Outputs {
    pub tensors: TensorFile,
    pub report: RunReport,
}

/// A session over `g` with its parameters loaded from `weights` and its
/// inputs written; `run` steps it once and reads tensors back.
struct Run {
    s: Session,
    report: RunReport,
    started: Instant,
}

impl Run {
    fn new(
        gpu: &Gpu,
        g: Graph,
        spec: RunSpec,
        weights: &TensorFile,
        inputs: &[(TensorId, &[f32])],
    ) -> Result<Run> {
        let start = Instant::now();
        let s = Session::new(gpu, Arc::new(g), spec)?;
        load_params(&s, weights)?;
        for (t, v) in inputs {
            s.write(*t, v)?;
        }
        let stats = s.stats();
        let report = RunReport {
            setup_s: start.elapsed().as_secs_f64(),
            buffer_bytes: stats.pooled_bytes + stats.persistent_bytes,
            dispatches: stats.dispatches,
            ..Default::default()
        };
        Ok(Run {
            s,
            report,
            started: Instant::now(),
        })
    }

    fn step(mut self) -> Result<Run> {
        self.started = Instant::now();
        self.s.step()?;
        Ok(self)
    }

    fn read(&self, t: TensorId) -> Result<HostTensor> {
        Ok(HostTensor::f32(
            self.s.graph.shape(t),
            self.s.read_blocking(t)?,
        ))
    }

    fn read_grad(&self, t: TensorId) -> Result<HostTensor> {
        Ok(HostTensor::f32(
            self.s.graph.shape(t),
            self.s.read_grad_blocking(t)?,
        ))
    }

    fn finish(mut self) -> RunReport {
        self.report.run_s = self.started.elapsed().as_secs_f64();
        self.report
    }
}

/// `difftrain forward unet`: inputs `sample` [B,C,H,W], `timestep` [B],
/// `encoder_hidden_states` [B,S,D] (and `grad_output` [B,C',H,W] with
/// `backward`). Outputs `sample`, and with `backward` `grad.sample`,
/// `grad.encoder_hidden_states` and `grad.<param>` for every parameter.
pub fn unet_forward(
    gpu: &Gpu,
    model_dir: &Path,
    inputs: &TensorFile,
    backward: bool,
) -> Result<Outputs> {
    let unet = UNet::from_config_file(&model_dir.join("config.json"))?;
    let weights = TensorFile::read(&weights_path(model_dir, "diffusion_pytorch_model")?)?;
    let cfg = &unet.config;
    let cross = unet.layout.down[0].cross_attention_dim;
    let sample = inputs.get_shaped("sample", &[None, Some(cfg.in_channels), None, None])?;
    let b = sample.shape[0];
    let timestep = inputs.get_shaped("timestep", &[Some(b)])?;
    let context = inputs.get_shaped("encoder_hidden_states", &[Some(b), None, Some(cross)])?;
    let grad_output = if backward {
        let want = [b, cfg.out_channels, sample.shape[2], sample.shape[3]].map(Some);
        Some(inputs.get_shaped("grad_output", &want)?)
    } else {
        None
    };

    let mut g = Graph::new();
    let input = |g: &mut Graph, name: &str, t: &HostTensor| {
        if backward {
            g.input_with_grad(name, &t.shape, DType::F32)
        } else {
            g.input(name, &t.shape, DType::F32)
        }
    };
    let x = input(&mut g, "sample", sample);
    let t = g.input("timestep", &timestep.shape, DType::F32);
    let c = input(&mut g, "encoder_hidden_states", context);
    let pred = unet.forward(&mut g, x, t, c)?;
    warn_unused(&g, &weights);
    let mut host = vec![
        (x, &sample.values[..]),
        (t, &timestep.values[..]),
        (c, &context.values[..]),
    ];
    let mut spec = RunSpec {
        outputs: vec![pred],
        ..Default::default()
    };
    if let Some(go) = grad_output {
        let seed = g.input("grad_output", &go.shape, DType::F32);
        host.push((seed, &go.values[..]));
        spec.seeds = vec![(pred, seed)];
        spec.grads = vec![x, c];
    }
    let params = g.params();
    let run = Run::new(gpu, g, spec, &weights, &host)?.step()?;

    let mut out = TensorFile::new(Path::new("unet outputs"));
    out.insert("sample", run.read(pred)?);
    if backward {
        out.insert("grad.sample", run.read_grad(x)?);
        out.insert("grad.encoder_hidden_states", run.read_grad(c)?);
        for p in params {
            let name = format!("grad.{}", run.s.graph.desc(p).name);
            out.insert(&name, run.read_grad(p)?);
        }
    }
    Ok(Outputs {
        tensors: out,
        report: run.finish(),
    })
}

/// The CLIP text encoder of `model_dir` on token ids `[N, S]` (S at most
/// max_position_embeddings): the hidden state after the final layer norm,
/// `clip_skip` layers early (0: `last_hidden_state`).
pub fn text_encoder_forward(
    gpu: &Gpu,
    model_dir: &Path,
    input_ids: &HostTensor,
    clip_skip: usize,
) -> Result<(HostTensor, RunReport)> {
    let model = ClipTextModel::from_config_file(&model_dir.join("config.json"))?;
    let weights = TensorFile::read(&weights_path(model_dir, "model")?)?;
    let c = &model.config;
    let ids_err = |msg: String| Error::Tensor {
        name: "input_ids".into(),
        msg,
    };
    let [n, seq] = input_ids.shape[..] else {
        return Err(ids_err(format!(
            "expected shape [N, S], found {:?}",
            input_ids.shape
        )));
    };
    if seq == 0 || seq > c.max_position_embeddings {
        return Err(ids_err(format!(
            "{seq} tokens per prompt; the model takes 1 to {}",
            c.max_position_embeddings
        )));
    }
    if let Some(bad) = input_ids
        .values
        .iter()
        .find(|&&v| v < 0.0 || v >= c.vocab_size as f32)
    {
        return Err(ids_err(format!(
            "id {bad} is outside the vocabulary of {} tokens",
            c.vocab_size
        )));
    }
    let mut g = Graph::new();
    let ids = g.input("input_ids", &[n, seq], DType::F32);
    let pos = g.input("position_ids", &[seq], DType::F32);
    let h = model.forward(&mut g, ids, pos, clip_skip)?;
    if clip_skip == 0 {
        warn_unused(&g, &weights);
    }
    let positions: Vec<f32> = (0..seq).map(|i| i as f32).collect();
    let spec = RunSpec {
        outputs: vec![h],
        ..Default::default()
    };
    let host = [(ids, &input_ids.values[..]), (pos, &positions[..])];
    let run = Run::new(gpu, g, spec, &weights, &host)?.step()?;
    let hidden = run.read(h)?;
    Ok((hidden, run.finish()))
}

/// `difftrain forward vae`: `image` `[B, 3, H, W]` in [-1, 1] gives `mean`
/// and `logvar` of the latent distribution; `latents` `[B, 4, h, w]` gives
/// `decoded` (no scaling applied). Either or both may be given.
pub fn vae_forward(gpu: &Gpu, model_dir: &Path, inputs: &TensorFile) -> Result<Outputs> {
    let vae = Vae::from_config_file(&model_dir.join("config.json"))?;
    let mut weights = TensorFile::read(&weights_path(model_dir, "diffusion_pytorch_model")?)?;
    upgrade_legacy_names(&mut weights);
    let c = &vae.config;
    let optional = |name: &str, channels: usize| {
        inputs
            .tensors
            .contains_key(name)
            .then(|| inputs.get_shaped(name, &[None, Some(channels), None, None]))
            .transpose()
    };
    let image = optional("image", c.in_channels)?;
    let latents = optional("latents", c.latent_channels)?;
    if image.is_none() && latents.is_none() {
        return Err(Error::File {
            path: inputs.path.display().to_string(),
            msg: format!(
                "has neither 'image' [B, {}, H, W] nor 'latents' [B, {}, h, w]",
                c.in_channels, c.latent_channels
            ),
        });
    }
    let mut out = TensorFile::new(Path::new("vae outputs"));
    let mut report = RunReport::default();
    let no_grad = |outputs: Vec<TensorId>| RunSpec {
        outputs,
        ..Default::default()
    };
    if let Some(image) = image {
        let mut g = Graph::new();
        let x = g.input("image", &image.shape, DType::F32);
        let (mean, logvar) = vae.encode(&mut g, x)?;
        let spec = no_grad(vec![mean, logvar]);
        let run = Run::new(gpu, g, spec, &weights, &[(x, &image.values)])?.step()?;
        out.insert("mean", run.read(mean)?);
        out.insert("logvar", run.read(logvar)?);
        report.add(run.finish());
    }
    if let Some(latents) = latents {
        let mut g = Graph::new();
        let z = g.input("latents", &latents.shape, DType::F32);
        let y = vae.decode(&mut g, z)?;
        let run = Run::new(gpu, g, no_grad(vec![y]), &weights, &[(z, &latents.values)])?.step()?;
        out.insert("decoded", run.read(y)?);
        report.add(run.finish());
    }
    Ok(Outputs {
        tensors: out,
        report,
    })
}
