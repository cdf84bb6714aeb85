//! Tensor-in/tensor-out runs of each model (`difftrain forward ...`): read
//! a model folder and a safetensors file of inputs, run one forward (and for
//! the UNet optionally the backward of sum(prediction * grad_output)), and
//! return the outputs under the names of the CLI contract.

use super::unet::UNet;
use super::weights::{load_params, weights_path};
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

fn read(s: &Session, t: TensorId) -> Result<HostTensor> {
    Ok(HostTensor::f32(s.graph.shape(t), s.read_blocking(t)?))
}

fn read_grad(s: &Session, t: TensorId) -> Result<HostTensor> {
    Ok(HostTensor::f32(s.graph.shape(t), s.read_grad_blocking(t)?))
}
