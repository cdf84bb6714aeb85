//! The `difftrain` command line.

mod cli;

use anyhow::Result;
use clap::{Parser, Subcommand};
use difftrain::gpu::AdapterChoice;
use difftrain::{DType, Gpu};

#[derive(Parser)]
#[command(
    name = "difftrain",
    version,
    about = "Train text-to-image latent diffusion models on any GPU (Vulkan, Metal, DX12, WebGPU).",
    long_about = "difftrain is a trainer for SD-style UNets in VAE latent space with every kernel \
a WGSL compute shader run through wgpu, so one code path runs on Vulkan, Metal, DX12 and browser \
WebGPU. Without a GPU it runs on Mesa's Vulkan CPU driver (lavapipe: apt-get install \
mesa-vulkan-drivers). Models load from and save to diffusers' folder layout (UNet, CLIP text \
encoder + tokenizer, VAE). `difftrain train` with no arguments trains a small built-in model on a \
built-in dataset in a few minutes on a CPU."
)]
struct Cli {
    /// Graphics backend(s) to use: vulkan, metal, dx12, gl, webgpu (comma separated).
    #[arg(long, global = true, env = "DIFFTRAIN_BACKEND")]
    backend: Option<String>,
    /// Use the adapter whose name contains this text (case-insensitive), e.g. "llvmpipe".
    #[arg(long, global = true, env = "DIFFTRAIN_ADAPTER")]
    adapter: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the UNet (the spec's step with DREAM, checkpoints, resume). With no config: the
    /// built-in small model on the built-in dataset, into ./difftrain-output.
    Train(cli::train::TrainArgs),
    /// Show the adapters found, and the selected one's backend, driver, limits and features.
    Info,
    /// Run benchmarks and print time, GFLOP/s or GB/s, dispatches and memory per step.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Run one model on inputs from a safetensors file and write its outputs (to compare with
    /// PyTorch).
    Forward {
        #[command(subcommand)]
        what: cli::forward::ForwardWhat,
    },
    /// Write a freshly initialized model folder (diffusers layout) from a config.json.
    Init(cli::init::InitArgs),
    /// Fit an AutoencoderKL (reconstruction MSE + a small KL term) on a dataset, e.g. the
    /// built-in demo's VAE.
    TrainVae(cli::train_vae::TrainVaeArgs),
    /// Plain training against DREAM, for epsilon and v_prediction, on the built-in default
    /// with the same seeds: held-out loss against step and time (dream_report.md, .png).
    DreamReport(cli::dream_report::DreamReportArgs),
    /// Generate images from prompts with a pipeline folder (DDIM or DDPM, classifier-free
    /// guidance), as a PNG grid or safetensors.
    Sample(cli::sample::SampleArgs),
    /// One exact training step on given tensors (latents, noise, timesteps, text states),
    /// to check against a PyTorch step.
    Step(cli::step::StepArgs),
}

#[derive(Subcommand)]
enum BenchWhat {
    /// A whole training step with AdamW (noise, add_noise, DREAM's extra pass when on,
    /// forward, MSE, backward, clipping, AdamW): median and first step time, images/s,
    /// GFLOP/s, dispatches, submissions, peak buffer memory and the process's peak resident memory.
    Train(cli::bench::TrainBenchArgs),
    /// Microbenchmarks of the core ops (matmul, conv2d, group norm, attention) in f32/f16/bf16.
    Ops {
        /// Only cases whose name contains this text (e.g. "conv").
        #[arg(long)]
        filter: Option<String>,
        /// Timed steps per case (after 2 warm-up steps); the median is reported.
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Also time every dispatch with GPU timestamps and print where each case's time goes.
        #[arg(long)]
        profile: bool,
    },
    /// A whole UNet step from a config.json (random weights, 77 text tokens), forward and
    /// forward + backward.
    Unet {
        /// UNet2DConditionModel config.json, e.g. examples/configs/sd15_unet.json.
        #[arg(long)]
        config: std::path::PathBuf,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Latent height and width (image size / 8).
        #[arg(long, default_value_t = 32)]
        latent: usize,
        /// Timed steps per case (after 2 warm-up steps).
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// Only the forward pass.
        #[arg(long)]
        forward_only: bool,
        /// Activation dtypes to run, comma separated (f32, f16, bf16); the weights and their
        /// gradients stay f32, as in training.
        #[arg(long, value_delimiter = ',', default_value = "f32", value_parser = parse_dtype)]
        dtype: Vec<DType>,
        /// Also time every dispatch with GPU timestamps and print where each case's time goes.
        #[arg(long)]
        profile: bool,
    },
}

fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    DType::parse(s).ok_or_else(|| format!("'{s}' is not one of f32, f16, bf16"))
}

fn main() -> Result<()> {
    cli::quiet_display_probe();
    let cli = Cli::parse();
    let choice = AdapterChoice {
        backend: cli.backend.clone(),
        name: cli.adapter.clone(),
        timestamps: false,
    };
    match cli.command {
        Command::Info => cli::info::info(&choice),
        Command::Bench {
            what:
                BenchWhat::Ops {
                    filter,
                    iters,
                    profile,
                },
        } => cli::bench::bench_ops(&choice, filter, iters, profile),
        Command::Bench {
            what: BenchWhat::Train(args),
        } => cli::bench::bench_train(&choice, args),
        Command::Bench {
            what:
                BenchWhat::Unet {
                    config,
                    batch,
                    latent,
                    iters,
                    forward_only,
                    dtype,
                    profile,
                },
        } => {
            let shape = cli::bench::UnetShape {
                batch,
                latent,
                forward_only,
                dtypes: dtype,
            };
            cli::bench::bench_unet(&choice, &config, shape, iters, profile)
        }
        Command::Forward { what } => cli::forward::run(&Gpu::new_blocking(&choice)?, what),
        Command::Init(args) => cli::init::run(args),
        Command::Train(args) => cli::train::run(&Gpu::new_blocking(&choice)?, args),
        Command::TrainVae(args) => cli::train_vae::run(&Gpu::new_blocking(&choice)?, args),
        Command::DreamReport(args) => cli::dream_report::run(&Gpu::new_blocking(&choice)?, args),
        Command::Sample(args) => cli::sample::run(&Gpu::new_blocking(&choice)?, args),
        Command::Step(args) => cli::step::run(&Gpu::new_blocking(&choice)?, args),
    }
}
