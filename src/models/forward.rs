//! Tensor-in/tensor-out runs of each model (`difftrain forward ...`): read
//! a model folder and a safetensors file of inputs, run one forward (and for
//! the UNet optionally the backward of sum(prediction * grad_output)), and
//! return the outputs under the names of the CLI contract.

use super::clip::ClipTextModel;
use super::unet::UNet;
use super::vae::{upgrade_legacy_names, Vae};
use super::weights::{load_params, warn_unused, weights_path};
use crate::dtype::DType;
use crate::error::Result;
use crate::graph::{Graph, RunSpec, Session, TensorId};
use crate::io::{HostTensor, TensorFile};
use crate::Gpu;
use std::path::Path;
use std::sync::Arc;

/// `difftrain forward unet`: inputs `sample` [B,C,H,W], `timestep` [B],
/// `encoder_hidden_states` [B,S,D] (and `grad_output` [B,C',H,W] with
/// `backward`). Outputs `sample`, and with `backward` `grad.sample`,
/// `grad.encoder_hidden_states` and `grad.<param>` for every parameter.
pub fn unet_forward(
    gpu: &Gpu,
    model_dir: &Path,
    inputs: &TensorFile,
    backward: bool,
) -> Result<TensorFile> {
    let unet = UNet::from_config_file(&model_dir.join("config.json"))?;
    let weights = TensorFile::read(&weights_path(model_dir, "diffusion_pytorch_model")?)?;
    let cfg = &unet.config;
    let cross = unet.layout.down[0].cross_attention_dim;
    let sample = inputs.get_shaped("sample", &[None, Some(cfg.in_channels), None, None])?;
    let b = sample.shape[0];
    let timestep = inputs.get_shaped("timestep", &[Some(b)])?;
    let context = inputs.get_shaped("encoder_hidden_states", &[Some(b), None, Some(cross)])?;
    let out_shape = [b, cfg.out_channels, sample.shape[2], sample.shape[3]];
    let grad_output = if backward {
        let want = out_shape.map(Some);
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
    let seed = grad_output.map(|go| (g.input("grad_output", &go.shape, DType::F32), go));
    let spec = RunSpec {
        outputs: vec![pred],
        seeds: seed.iter().map(|&(s, _)| (pred, s)).collect(),
        grads: if backward { vec![x, c] } else { vec![] },
        ..Default::default()
    };
    warn_unused(&g, &weights);
    let g = Arc::new(g);
    let mut s = Session::new(gpu, g.clone(), spec)?;
    load_params(&s, &weights)?;
    s.write(x, &sample.values)?;
    s.write(t, &timestep.values)?;
    s.write(c, &context.values)?;
    if let Some((sid, go)) = seed {
        s.write(sid, &go.values)?;
    }
    s.step()?;

    let mut out = TensorFile::new(Path::new("unet outputs"));
    out.insert("sample", read(&s, pred)?);
    if backward {
        out.insert("grad.sample", read_grad(&s, x)?);
        out.insert("grad.encoder_hidden_states", read_grad(&s, c)?);
        for p in g.params() {
            out.insert(&format!("grad.{}", g.desc(p).name), read_grad(&s, p)?);
        }
    }
    Ok(out)
}

/// The CLIP text encoder of `model_dir` on token ids `[N, S]` (S at most
/// max_position_embeddings): the hidden state after the final layer norm,
/// `clip_skip` layers early (0: `last_hidden_state`).
pub fn text_encoder_forward(
    gpu: &Gpu,
    model_dir: &Path,
    input_ids: &HostTensor,
    clip_skip: usize,
) -> Result<HostTensor> {
    let model = ClipTextModel::from_config_file(&model_dir.join("config.json"))?;
    let weights = TensorFile::read(&weights_path(model_dir, "model")?)?;
    let c = &model.config;
    let [n, seq] = input_ids.shape[..] else {
        return Err(crate::Error::Tensor {
            name: "input_ids".into(),
            msg: format!("expected shape [N, S], found {:?}", input_ids.shape),
        });
    };
    if seq == 0 || seq > c.max_position_embeddings {
        return Err(crate::Error::Tensor {
            name: "input_ids".into(),
            msg: format!(
                "{seq} tokens per prompt; the model takes 1 to {}",
                c.max_position_embeddings
            ),
        });
    }
    if let Some(bad) = input_ids
        .values
        .iter()
        .find(|&&v| v < 0.0 || v >= c.vocab_size as f32)
    {
        return Err(crate::Error::Tensor {
            name: "input_ids".into(),
            msg: format!(
                "id {bad} is outside the vocabulary of {} tokens",
                c.vocab_size
            ),
        });
    }
    let mut g = Graph::new();
    let ids = g.input("input_ids", &[n, seq], DType::F32);
    let pos = g.input("position_ids", &[seq], DType::F32);
    let h = model.forward(&mut g, ids, pos, clip_skip)?;
    if clip_skip == 0 {
        warn_unused(&g, &weights);
    }
    let positions = HostTensor::f32(&[seq], (0..seq).map(|i| i as f32).collect());
    let s = run_once(
        gpu,
        g,
        &weights,
        &[h],
        &[(ids, input_ids), (pos, &positions)],
    )?;
    read(&s, h)
}

/// `difftrain forward vae`: `image` `[B, 3, H, W]` in [-1, 1] gives `mean`
/// and `logvar` of the latent distribution; `latents` `[B, 4, h, w]` gives
/// `decoded` (no scaling applied). Either or both may be given.
pub fn vae_forward(gpu: &Gpu, model_dir: &Path, inputs: &TensorFile) -> Result<TensorFile> {
    let vae = Vae::from_config_file(&model_dir.join("config.json"))?;
    let mut weights = TensorFile::read(&weights_path(model_dir, "diffusion_pytorch_model")?)?;
    upgrade_legacy_names(&mut weights);
    let c = &vae.config;
    let image = inputs
        .tensors
        .contains_key("image")
        .then(|| inputs.get_shaped("image", &[None, Some(c.in_channels), None, None]))
        .transpose()?;
    let latents = inputs
        .tensors
        .contains_key("latents")
        .then(|| inputs.get_shaped("latents", &[None, Some(c.latent_channels), None, None]))
        .transpose()?;
    if image.is_none() && latents.is_none() {
        return Err(crate::Error::File {
            path: inputs.path.display().to_string(),
            msg: "has neither 'image' [B, 3, H, W] nor 'latents' [B, 4, h, w]".into(),
        });
    }
    let mut out = TensorFile::new(Path::new("vae outputs"));
    if let Some(image) = image {
        let mut g = Graph::new();
        let x = g.input("image", &image.shape, DType::F32);
        let (mean, logvar) = vae.encode(&mut g, x)?;
        let s = run_once(gpu, g, &weights, &[mean, logvar], &[(x, image)])?;
        out.insert("mean", read(&s, mean)?);
        out.insert("logvar", read(&s, logvar)?);
    }
    if let Some(latents) = latents {
        let mut g = Graph::new();
        let z = g.input("latents", &latents.shape, DType::F32);
        let y = vae.decode(&mut g, z)?;
        let s = run_once(gpu, g, &weights, &[y], &[(z, latents)])?;
        out.insert("decoded", read(&s, y)?);
    }
    Ok(out)
}

/// A no-grad session over `g`: load the parameters that `g` uses from
/// `weights`, write `inputs`, run one step.
fn run_once(
    gpu: &Gpu,
    g: Graph,
    weights: &TensorFile,
    outputs: &[TensorId],
    inputs: &[(TensorId, &HostTensor)],
) -> Result<Session> {
    let spec = RunSpec {
        outputs: outputs.to_vec(),
        ..Default::default()
    };
    let mut s = Session::new(gpu, Arc::new(g), spec)?;
    load_params(&s, weights)?;
    for (t, v) in inputs {
        s.write(*t, &v.values)?;
    }
    s.step()?;
    Ok(s)
}

fn read(s: &Session, t: TensorId) -> Result<HostTensor> {
    Ok(HostTensor::f32(s.graph.shape(t), s.read_blocking(t)?))
}

fn read_grad(s: &Session, t: TensorId) -> Result<HostTensor> {
    Ok(HostTensor::f32(s.graph.shape(t), s.read_grad_blocking(t)?))
}
