//! Parameters between safetensors files and sessions: find a folder's weight
//! file, load it into a session's parameters (shape-checked, by name), read
//! parameters back for saving, and fill fresh ones the way diffusers and
//! transformers initialize them.

use super::clip::upgrade_unprefixed_names;
use super::init::Component;
use super::vae::upgrade_legacy_names;
use crate::error::{file_err, Error, Result};
use crate::graph::{Graph, Init, Session, TensorDesc, TensorId};
use crate::io::{HostTensor, TensorFile, WeightFile};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// The weight file of a model folder: `{stem}.safetensors`, else the
/// `{stem}.fp16.safetensors` variant.
pub fn weights_path(dir: &Path, stem: &str) -> Result<PathBuf> {
    let full = dir.join(format!("{stem}.safetensors"));
    let half = dir.join(format!("{stem}.fp16.safetensors"));
    if crate::platform::is_file(&full) {
        Ok(full)
    } else if crate::platform::is_file(&half) {
        Ok(half)
    } else {
        Err(file_err(
            dir,
            format!("no {stem}.safetensors (or {stem}.fp16.safetensors) in this folder"),
        ))
    }
}

/// The weights of a component folder under today's names:
/// `diffusion_pytorch_model` for the UNet and the VAE (the VAE's pre-0.14
/// attention names renamed), `model` for the text encoder (transformers 5's
/// names without `text_model.` given the prefix).
pub fn read_component_weights(dir: &Path, component: Component) -> Result<WeightFile> {
    let stem = match component {
        Component::TextEncoder => "model",
        Component::Unet | Component::Vae => "diffusion_pytorch_model",
    };
    let mut file = WeightFile::read(&weights_path(dir, stem)?)?;
    match component {
        Component::TextEncoder => upgrade_unprefixed_names(&mut file),
        Component::Vae => upgrade_legacy_names(&mut file),
        Component::Unet => {}
    }
    Ok(file)
}

/// Write every parameter of the session's graph from `file`, matching by
/// name and checking shapes; a parameter missing from the file is an error.
/// Tensors are decoded one at a time and uploads flushed every 256 MiB, so
/// the host holds little more than the file itself.
pub fn load_params(s: &Session, file: &WeightFile) -> Result<()> {
    let g = &s.graph;
    let mut missing = Vec::new();
    let mut upload = Upload::new(s);
    for p in g.params() {
        let d = g.desc(p);
        let Some(shape) = file.shape(&d.name) else {
            missing.push(d.name.clone());
            continue;
        };
        if shape != d.shape {
            return Err(Error::Tensor {
                name: d.name.clone(),
                msg: format!(
                    "in {}: expected shape {:?} (from the config), found {:?}",
                    file.path.display(),
                    d.shape,
                    shape
                ),
            });
        }
        upload.write(p, &file.decode(&d.name).expect("shape found above"))?;
    }
    if missing.is_empty() {
        return Ok(());
    }
    let n = missing.len();
    missing.truncate(5);
    Err(file_err(
        &file.path,
        format!(
            "{n} parameter(s) the config needs are missing, e.g. {}",
            missing.join(", ")
        ),
    ))
}

/// Uploads of parameters that submit and wait every 256 MiB, so staged
/// copies do not pile up until the first step: the host then holds little
/// more than the tensor being written.
struct Upload<'s> {
    s: &'s Session,
    pending: usize,
}

impl<'s> Upload<'s> {
    const FLUSH_BYTES: usize = 256 << 20;

    fn new(s: &'s Session) -> Self {
        Upload { s, pending: 0 }
    }

    fn write(&mut self, p: TensorId, values: &[f32]) -> Result<()> {
        self.s.write(p, values)?;
        self.pending += values.len() * 4;
        if self.pending >= Self::FLUSH_BYTES {
            self.s.gpu.flush()?;
            self.pending = 0;
        }
        Ok(())
    }
}

/// Warn about tensors of `file` that no parameter of `g` uses (diffusers
/// warns likewise): usually a file of another model or config.
pub fn warn_unused(g: &Graph, file: &WeightFile) {
    let used: std::collections::HashSet<&str> = g
        .params()
        .iter()
        .map(|&p| g.desc(p).name.as_str())
        .collect();
    let unused: Vec<&str> = file.names().filter(|k| !used.contains(k)).collect();
    if let Some(first) = unused.first() {
        log::warn!(
            "{}: {} tensor(s) not used by the model, e.g. {first}",
            file.path.display(),
            unused.len()
        );
    }
}

/// Every parameter of the session read back, named as in the graph.
pub async fn read_params(s: &Session, path: &Path) -> Result<TensorFile> {
    let g = &s.graph;
    let mut out = TensorFile::new(path);
    for p in g.params() {
        let d = g.desc(p);
        out.insert(&d.name, HostTensor::f32(&d.shape, s.read(p).await?));
    }
    Ok(out)
}

/// Fresh parameters for every parameter of `g`, following each one's
/// [`Init`]; parameter k draws from ChaCha8 stream k of `seed`, so a
/// parameter's values don't depend on how many came before it.
pub fn init_params(g: &Graph, seed: u64, path: &Path) -> TensorFile {
    let mut out = TensorFile::new(path);
    for (k, p) in g.params().into_iter().enumerate() {
        let d = g.desc(p);
        out.insert(&d.name, HostTensor::f32(&d.shape, init_values(d, seed, k)));
    }
    out
}

/// [`init_params`] written straight into the session's parameters, one
/// tensor at a time (SD 1.5's 3.4 GB of weights never sit in host memory
/// all at once).
pub fn write_init_params(s: &Session, seed: u64) -> Result<()> {
    let mut upload = Upload::new(s);
    for (k, p) in s.graph.params().into_iter().enumerate() {
        upload.write(p, &init_values(s.graph.desc(p), seed, k))?;
    }
    Ok(())
}

/// The fresh values of parameter number `k`, from ChaCha8 stream k of `seed`.
fn init_values(d: &TensorDesc, seed: u64, k: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(k as u64);
    let n = d.numel();
    match d.init {
        Init::Const(v) => vec![v; n],
        Init::Uniform(b) => (0..n).map(|_| rng.random_range(-b..=b)).collect(),
        Init::Normal(std) => (0..n).map(|_| std * standard_normal(&mut rng)).collect(),
    }
}

/// One N(0, 1) sample (Box-Muller).
pub fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}
