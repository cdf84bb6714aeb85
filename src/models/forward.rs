//! Tensor-in/tensor-out runs of each model (`difftrain forward ...`): read
//! a model folder and a safetensors file of inputs, run one forward (and for
//! the UNet optionally the backward of sum(prediction * grad_output)), and
//! return the outputs under the names of the CLI contract, with the time and
//! buffer memory the run took.

use super::clip::ClipTextModel;
use super::init::Component;
use super::unet::UNet;
use super::vae::Vae;
use super::weights::{load_params, read_component_weights, warn_unused};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::graph::{Graph, Plan, RunSpec, Session, TensorId};
use crate::io::{HostTensor, TensorFile, WeightFile};
use crate::Gpu;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Time and memory of a model run.
#[derive(Clone, Debug, Default)]
pub struct RunReport {
    /// Seconds to plan the graph, create buffers and pipelines, and upload
    /// the weights.
    pub setup_s: f64,
    /// Seconds of uploading inputs, the step(s) and the readback (on
    /// llvmpipe this includes compiling each shader at its first dispatch).
    pub run_s: f64,
    /// Peak bytes of GPU buffers of one session.
    pub buffer_bytes: u64,
    /// Dispatches of one step.
    pub dispatches: usize,
    /// Samples per step: less than the batch when the whole batch has an
    /// activation above the adapter's binding limit, and the batch is
    /// streamed through in micro-batches.
    pub micro_batch: usize,
}

impl RunReport {
    fn add(&mut self, other: RunReport) {
        self.setup_s += other.setup_s;
        self.run_s += other.run_s;
        self.buffer_bytes = self.buffer_bytes.max(other.buffer_bytes);
        self.dispatches += other.dispatches;
        self.micro_batch = other.micro_batch;
    }
}

/// Outputs of a model run, named as the CLI writes them.
pub struct Outputs {
    pub tensors: TensorFile,
    pub report: RunReport,
}

/// The largest divisor of `batch` whose traced graph fits the adapter's
/// binding and buffer limits (planning is cheap: nothing is allocated), and
/// that trace. `graph_of` picks the graph and run spec out of a trace.
fn micro_batch<T>(
    gpu: &Gpu,
    batch: usize,
    trace: impl Fn(usize) -> Result<T>,
    graph_of: impl Fn(&T) -> (&Graph, &RunSpec),
) -> Result<(usize, T)> {
    let mut last = None;
    for mb in (1..=batch).rev().filter(|d| batch.is_multiple_of(*d)) {
        let traced = trace(mb)?;
        let (g, spec) = graph_of(&traced);
        match Plan::build(g, &gpu.caps, spec) {
            Ok(_) => return Ok((mb, traced)),
            Err(e @ (Error::BindingTooLarge { .. } | Error::BufferTooLarge { .. })) => {
                last = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| crate::error::shape_err("forward", "empty batch")))
}

/// Rows `chunk * mb .. (chunk + 1) * mb` of a tensor whose first axis is the batch.
fn rows(t: &HostTensor, chunk: usize, mb: usize) -> &[f32] {
    let per = t.numel() / t.shape[0].max(1);
    &t.values[chunk * mb * per..(chunk + 1) * mb * per]
}

/// Per-micro-batch results joined along the batch axis.
#[derive(Default)]
struct Joined {
    shape: Vec<usize>,
    values: Vec<f32>,
}

impl Joined {
    fn push(&mut self, part: HostTensor, batch: usize) {
        if self.values.is_empty() {
            self.shape = part.shape.clone();
            self.shape[0] = batch;
        }
        self.values.extend(part.values);
    }

    fn tensor(self) -> HostTensor {
        HostTensor::f32(&self.shape, self.values)
    }
}

/// A session with its parameters loaded, stepped once per micro-batch.
struct Run {
    s: Session,
    report: RunReport,
}

impl Run {
    fn new(gpu: &Gpu, g: Graph, spec: RunSpec, weights: &WeightFile, mb: usize) -> Result<Run> {
        let start = Instant::now();
        let s = Session::new(gpu, Arc::new(g), spec)?;
        load_params(&s, weights)?;
        let stats = s.stats();
        let report = RunReport {
            setup_s: start.elapsed().as_secs_f64(),
            buffer_bytes: stats.pooled_bytes + stats.persistent_bytes,
            dispatches: stats.dispatches,
            micro_batch: mb,
            ..Default::default()
        };
        Ok(Run { s, report })
    }

    /// Write `inputs`, step, and read `outputs` back (value or gradient).
    fn step(&mut self, inputs: &[(TensorId, &[f32])], outputs: &[Read]) -> Result<Vec<HostTensor>> {
        let start = Instant::now();
        for (t, v) in inputs {
            self.s.write(*t, v)?;
        }
        self.s.step()?;
        let shape = |t: TensorId| self.s.graph.shape(t).to_vec();
        let out = outputs
            .iter()
            .map(|r| match *r {
                Read::Value(t) => Ok(HostTensor::f32(&shape(t), self.s.read_blocking(t)?)),
                Read::Grad(t) => Ok(HostTensor::f32(&shape(t), self.s.read_grad_blocking(t)?)),
            })
            .collect::<Result<Vec<_>>>()?;
        self.report.run_s += start.elapsed().as_secs_f64();
        Ok(out)
    }
}

/// What to read back after a step.
#[derive(Clone, Copy)]
enum Read {
    Value(TensorId),
    Grad(TensorId),
}

/// The traced UNet of one micro-batch.
struct UNetTrace {
    g: Graph,
    spec: RunSpec,
    x: TensorId,
    t: TensorId,
    c: TensorId,
    seed: Option<TensorId>,
    pred: TensorId,
}

/// `difftrain forward unet`: inputs `sample` [B,C,H,W], `timestep` [B],
/// `encoder_hidden_states` [B,S,D] (and `grad_output` [B,C',H,W] with
/// `backward`). Outputs `sample`, and with `backward` `grad.sample`,
/// `grad.encoder_hidden_states` and `grad.<param>` for every parameter
/// (summed over micro-batches when the batch is streamed).
pub fn unet_forward(
    gpu: &Gpu,
    model_dir: &Path,
    inputs: &TensorFile,
    backward: bool,
) -> Result<Outputs> {
    let unet = UNet::from_config_file(&model_dir.join("config.json"))?;
    let weights = read_component_weights(model_dir, Component::Unet)?;
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

    let trace = |mb: usize| -> Result<UNetTrace> {
        let mut g = Graph::new();
        let with_batch = |t: &HostTensor| {
            let mut s = t.shape.clone();
            s[0] = mb;
            s
        };
        let input = |g: &mut Graph, name: &str, t: &HostTensor| {
            if backward {
                g.input_with_grad(name, &with_batch(t), DType::F32)
            } else {
                g.input(name, &with_batch(t), DType::F32)
            }
        };
        let x = input(&mut g, "sample", sample);
        let t = g.input("timestep", &[mb], DType::F32);
        let c = input(&mut g, "encoder_hidden_states", context);
        let pred = unet.forward(&mut g, x, t, c)?;
        let mut spec = RunSpec {
            outputs: vec![pred],
            ..Default::default()
        };
        let seed = grad_output.map(|go| g.input("grad_output", &with_batch(go), DType::F32));
        if let Some(seed) = seed {
            spec.seeds = vec![(pred, seed)];
            spec.grads = vec![x, c];
        }
        Ok(UNetTrace {
            g,
            spec,
            x,
            t,
            c,
            seed,
            pred,
        })
    };
    let (mb, tr) = micro_batch(gpu, b, trace, |tr| (&tr.g, &tr.spec))?;
    warn_unused(&tr.g, &weights);
    let params = tr.g.params();
    let mut reads = vec![Read::Value(tr.pred)];
    if backward {
        reads.extend([Read::Grad(tr.x), Read::Grad(tr.c)]);
        reads.extend(params.iter().map(|&p| Read::Grad(p)));
    }
    let mut run = Run::new(gpu, tr.g, tr.spec, &weights, mb)?;
    let (mut pred, mut dx, mut dc) = (Joined::default(), Joined::default(), Joined::default());
    let mut dparams: Vec<HostTensor> = Vec::new();
    for chunk in 0..b / mb {
        let mut host = vec![
            (tr.x, rows(sample, chunk, mb)),
            (tr.t, rows(timestep, chunk, mb)),
            (tr.c, rows(context, chunk, mb)),
        ];
        if let (Some(seed), Some(go)) = (tr.seed, grad_output) {
            host.push((seed, rows(go, chunk, mb)));
        }
        let mut got = run.step(&host, &reads)?.into_iter();
        pred.push(got.next().expect("read"), b);
        if backward {
            dx.push(got.next().expect("read"), b);
            dc.push(got.next().expect("read"), b);
            if dparams.is_empty() {
                dparams = got.collect();
            } else {
                // d/dθ of a sum over the batch: micro-batch gradients add.
                for (acc, part) in dparams.iter_mut().zip(got) {
                    acc.values
                        .iter_mut()
                        .zip(part.values)
                        .for_each(|(a, v)| *a += v);
                }
            }
        }
    }

    let mut out = TensorFile::new(Path::new("unet outputs"));
    out.insert("sample", pred.tensor());
    if backward {
        out.insert("grad.sample", dx.tensor());
        out.insert("grad.encoder_hidden_states", dc.tensor());
        for (p, grad) in params.into_iter().zip(dparams) {
            out.insert(&format!("grad.{}", run.s.graph.desc(p).name), grad);
        }
    }
    Ok(Outputs {
        tensors: out,
        report: run.report,
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
    let weights = read_component_weights(model_dir, Component::TextEncoder)?;
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
    let trace = |mb: usize| -> Result<(Graph, RunSpec, [TensorId; 3])> {
        let mut g = Graph::new();
        let ids = g.input("input_ids", &[mb, seq], DType::F32);
        let pos = g.input("position_ids", &[seq], DType::F32);
        let h = model.forward(&mut g, ids, pos, clip_skip)?;
        let spec = RunSpec {
            outputs: vec![h],
            ..Default::default()
        };
        Ok((g, spec, [ids, pos, h]))
    };
    let (mb, (g, spec, [ids, pos, h])) = micro_batch(gpu, n, trace, |(g, s, _)| (g, s))?;
    if clip_skip == 0 {
        warn_unused(&g, &weights);
    }
    let positions: Vec<f32> = (0..seq).map(|i| i as f32).collect();
    let mut run = Run::new(gpu, g, spec, &weights, mb)?;
    let mut hidden = Joined::default();
    for chunk in 0..n / mb {
        let host = [(ids, rows(input_ids, chunk, mb)), (pos, &positions[..])];
        let got = run.step(&host, &[Read::Value(h)])?;
        hidden.push(got.into_iter().next().expect("one output"), n);
    }
    Ok((hidden.tensor(), run.report))
}

/// `difftrain forward vae`: `image` `[B, 3, H, W]` in [-1, 1] gives `mean`
/// and `logvar` of the latent distribution; `latents` `[B, 4, h, w]` gives
/// `decoded` (no scaling applied). Either or both may be given.
pub fn vae_forward(gpu: &Gpu, model_dir: &Path, inputs: &TensorFile) -> Result<Outputs> {
    let vae = Vae::from_config_file(&model_dir.join("config.json"))?;
    let weights = read_component_weights(model_dir, Component::Vae)?;
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
    if let Some(image) = image {
        let trace = |mb: usize| -> Result<(Graph, RunSpec, [TensorId; 3])> {
            let mut g = Graph::new();
            let mut shape = image.shape.clone();
            shape[0] = mb;
            let x = g.input("image", &shape, DType::F32);
            let (mean, logvar) = vae.encode(&mut g, x)?;
            Ok((g, RunSpec::no_grad(vec![mean, logvar]), [x, mean, logvar]))
        };
        let (parts, r) = stream(gpu, &weights, image, trace)?;
        let mut parts = parts.into_iter();
        out.insert("mean", parts.next().expect("two outputs"));
        out.insert("logvar", parts.next().expect("two outputs"));
        report.add(r);
    }
    if let Some(latents) = latents {
        let trace = |mb: usize| -> Result<(Graph, RunSpec, [TensorId; 2])> {
            let mut g = Graph::new();
            let mut shape = latents.shape.clone();
            shape[0] = mb;
            let z = g.input("latents", &shape, DType::F32);
            let y = vae.decode(&mut g, z)?;
            Ok((g, RunSpec::no_grad(vec![y]), [z, y]))
        };
        let (parts, r) = stream(gpu, &weights, latents, trace)?;
        out.insert("decoded", parts.into_iter().next().expect("one output"));
        report.add(r);
    }
    Ok(Outputs {
        tensors: out,
        report,
    })
}

/// Run a no-grad graph with one batched input (`ids[0]`) and outputs
/// `ids[1..]` over `input` in the largest micro-batches that fit.
fn stream<const N: usize>(
    gpu: &Gpu,
    weights: &WeightFile,
    input: &HostTensor,
    trace: impl Fn(usize) -> Result<(Graph, RunSpec, [TensorId; N])>,
) -> Result<(Vec<HostTensor>, RunReport)> {
    let b = input.shape[0];
    let (mb, (g, spec, ids)) = micro_batch(gpu, b, trace, |(g, s, _)| (g, s))?;
    let reads: Vec<Read> = ids[1..].iter().map(|&t| Read::Value(t)).collect();
    let mut run = Run::new(gpu, g, spec, weights, mb)?;
    let mut joined: Vec<Joined> = (1..N).map(|_| Joined::default()).collect();
    for chunk in 0..b / mb {
        let got = run.step(&[(ids[0], rows(input, chunk, mb))], &reads)?;
        for (j, part) in joined.iter_mut().zip(got) {
            j.push(part, b);
        }
    }
    Ok((joined.into_iter().map(Joined::tensor).collect(), run.report))
}
