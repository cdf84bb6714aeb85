//! Write a safetensors file of random tensors, e.g. the inputs of
//! `difftrain forward` for a shape check of a real-size model:
//!
//! ```text
//! cargo run --release --example random_inputs -- unet_in.safetensors \
//!     sample=1,4,32,32 timestep=1:steps encoder_hidden_states=1,77,768
//! ```
//!
//! Each argument after the file is `name=d0,d1,..[:kind]`, kind one of
//! `normal` (N(0, 1), the default), `uniform` (U(-1, 1), images) or `steps`
//! (int64 timesteps in [0, 1000)). Seeded by the name, so reruns match.

use difftrain::io::{HostTensor, TensorFile};
use difftrain::models::weights::standard_normal;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next().map(PathBuf::from) else {
        anyhow::bail!(
            "usage: random_inputs OUT.safetensors name=d0,d1,..[:normal|uniform|steps] ..."
        );
    };
    let mut file = TensorFile::new(&out);
    for spec in args {
        let (name, rest) = spec
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("'{spec}': expected name=d0,d1,..[:kind]"))?;
        let (dims, kind) = rest.split_once(':').unwrap_or((rest, "normal"));
        let shape = dims
            .split(',')
            .map(|d| d.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("'{spec}': bad shape '{dims}': {e}"))?;
        let n: usize = shape.iter().product();
        let seed = name
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let t = match kind {
            "normal" => {
                HostTensor::f32(&shape, (0..n).map(|_| standard_normal(&mut rng)).collect())
            }
            "uniform" => HostTensor::f32(
                &shape,
                (0..n).map(|_| rng.random_range(-1.0..1.0)).collect(),
            ),
            "steps" => {
                let v: Vec<i64> = (0..n).map(|_| rng.random_range(0..1000)).collect();
                HostTensor::i64(&shape, &v)
            }
            other => anyhow::bail!("'{spec}': unknown kind '{other}' (normal, uniform, steps)"),
        };
        file.insert(name, t);
    }
    file.write(&out, None)?;
    println!("wrote {} tensors to {}", file.tensors.len(), out.display());
    Ok(())
}
