//! The `difftrain` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use difftrain::gpu::{list_adapters, AdapterChoice};
use difftrain::Gpu;

#[derive(Parser)]
#[command(
    name = "difftrain",
    version,
    about = "Train text-to-image latent diffusion models on any GPU (Vulkan, Metal, DX12, WebGPU).",
    long_about = "difftrain is a trainer for SD-style UNets in VAE latent space with every kernel \
a WGSL compute shader run through wgpu, so one code path runs on Vulkan, Metal, DX12 and browser \
WebGPU. Without a GPU it runs on Mesa's Vulkan CPU driver (lavapipe: apt-get install \
mesa-vulkan-drivers). This version has the GPU runtime, the op set and its benchmarks; the \
model, training and sampling commands come next."
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
    /// Show the adapters found, and the selected one's backend, driver, limits and features.
    Info,
    /// Run benchmarks and print time, GFLOP/s or GB/s, dispatches and memory per step.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Microbenchmarks of the core ops (matmul, conv2d, group norm, attention) in f32/f16/bf16.
    Ops {
        /// Only cases whose name contains this text (e.g. "conv").
        #[arg(long)]
        filter: Option<String>,
        /// Timed steps per case (after 2 warm-up steps); the median is reported.
        #[arg(long, default_value_t = 5)]
        iters: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let choice = AdapterChoice {
        backend: cli.backend.clone(),
        name: cli.adapter.clone(),
    };
    match cli.command {
        Command::Info => info(&choice),
        Command::Bench {
            what: BenchWhat::Ops { filter, iters },
        } => bench_ops(&choice, filter, iters),
    }
}

fn info(choice: &AdapterChoice) -> Result<()> {
    let all = pollster::block_on(list_adapters(choice))?;
    println!("adapters found: {}", all.len());
    for a in &all {
        println!(
            "  - {} ({}, {}, driver: {})",
            a.name, a.backend, a.device_type, a.driver
        );
    }
    let gpu = Gpu::new_blocking(choice)?;
    let i = &gpu.info;
    let l = &gpu.limits;
    println!("selected: {}", i.name);
    println!(
        "  backend: {:?}  device type: {:?}",
        i.backend, i.device_type
    );
    println!("  driver: {} {}", i.driver, i.driver_info);
    println!(
        "  features: shader-f16 {}  subgroups {} (size {}..{})",
        gpu.caps.shader_f16,
        gpu.caps.subgroups,
        gpu.caps.subgroup_min_size,
        gpu.caps.subgroup_max_size
    );
    println!(
        "  max storage buffer binding: {} MiB",
        l.max_storage_buffer_binding_size >> 20
    );
    println!("  max buffer size: {} MiB", l.max_buffer_size >> 20);
    println!(
        "  storage binding offset alignment: {} bytes",
        l.min_storage_buffer_offset_alignment
    );
    println!(
        "  max storage buffers per stage: {}",
        l.max_storage_buffers_per_shader_stage
    );
    println!(
        "  max workgroup size: {}x{}x{}, {} invocations",
        l.max_compute_workgroup_size_x,
        l.max_compute_workgroup_size_y,
        l.max_compute_workgroup_size_z,
        l.max_compute_invocations_per_workgroup
    );
    println!(
        "  max workgroup memory: {} KiB",
        l.max_compute_workgroup_storage_size >> 10
    );
    println!(
        "  max workgroups per dimension: {}",
        l.max_compute_workgroups_per_dimension
    );
    Ok(())
}

fn bench_ops(choice: &AdapterChoice, filter: Option<String>, iters: usize) -> Result<()> {
    if iters == 0 {
        bail!("--iters must be at least 1");
    }
    let gpu = Gpu::new_blocking(choice)?;
    println!(
        "adapter: {} ({:?}, {})",
        gpu.info.name, gpu.info.backend, gpu.info.driver
    );
    let cases: Vec<_> = difftrain::bench::op_cases()
        .into_iter()
        .filter(|c| filter.as_ref().is_none_or(|f| c.name.contains(f.as_str())))
        .collect();
    if cases.is_empty() {
        bail!(
            "no benchmark matches --filter {:?}",
            filter.unwrap_or_default()
        );
    }
    let mut results = Vec::new();
    for case in &cases {
        let r = difftrain::bench::run_case(&gpu, case, iters)
            .with_context(|| format!("benchmark {} {} {}", case.name, case.shape, case.dtype))?;
        eprintln!("{} {} {}: {:.2} ms", r.name, r.shape, r.dtype, r.median_ms);
        results.push(r);
    }
    print!("{}", difftrain::bench::table(&results));
    Ok(())
}
