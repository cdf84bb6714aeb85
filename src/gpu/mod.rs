//! The GPU runtime: adapter selection, device with the adapter's real limits,
//! the pipeline cache, upload and readback.

mod adapter;
mod pipeline;
mod readback;
pub mod shader;

pub use adapter::{list as list_adapters, AdapterChoice, AdapterReport};
pub use pipeline::{CachedPipeline, KernelKey, PipelineCache};
pub use readback::read_buffer;
#[cfg(not(target_arch = "wasm32"))]
pub use readback::read_buffer_blocking;

use crate::error::{Error, Result};
use std::sync::Arc;

/// What the kernels may use on this device.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// Native `f16` arithmetic and 16-bit storage (WebGPU `shader-f16`).
    pub shader_f16: bool,
    /// Subgroup builtins (wgpu `SUBGROUP`).
    pub subgroups: bool,
    /// GPU timestamps around compute passes (wgpu `TIMESTAMP_QUERY`), for
    /// per-dispatch profiles; only when asked for (`AdapterChoice::timestamps`).
    pub timestamps: bool,
    /// Smallest subgroup size the adapter reports (0 when unknown).
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    /// Whether the adapter is a CPU implementation (llvmpipe, SwiftShader, WARP).
    pub is_cpu: bool,
    /// The most bytes one storage binding may cover. A storage above it is
    /// bound in windows by the ops that can (see `Emit::windows`).
    pub max_binding_bytes: u64,
    /// The largest buffer the device creates.
    pub max_buffer_bytes: u64,
    /// Byte offsets of storage bindings are multiples of this.
    pub storage_offset_alignment: u64,
}

impl Capabilities {
    /// Subgroup builtins with every subgroup exactly `width` lanes: the
    /// kernels that take one workgroup of `width` invocations for one
    /// subgroup (llvmpipe's 8 SIMD lanes) need this.
    pub fn subgroups_exactly(&self, width: u32) -> bool {
        self.subgroups && self.subgroup_min_size == width && self.subgroup_max_size == width
    }
}

/// A device, its queue and everything cached on it. Cheap to clone.
#[derive(Clone)]
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pub caps: Capabilities,
    pub pipelines: Arc<PipelineCache>,
}

impl Gpu {
    /// The adapter, its backend and its driver with version, e.g. "llvmpipe
    /// (LLVM 15.0.6, 256 bits) (Vulkan, llvmpipe, Mesa 25.0.7)": benchmark
    /// figures depend on the driver's version as much as on the device.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {})",
            self.info.name,
            self.info.backend,
            self.driver()
        )
    }

    /// The driver's name and version ("llvmpipe, Mesa 25.0.7 (LLVM 15.0.6)"),
    /// as far as the platform says.
    pub fn driver(&self) -> String {
        match (
            self.info.driver.is_empty(),
            self.info.driver_info.is_empty(),
        ) {
            (false, false) => format!("{}, {}", self.info.driver, self.info.driver_info),
            (false, true) => self.info.driver.clone(),
            (true, false) => self.info.driver_info.clone(),
            (true, true) => "driver unknown".into(),
        }
    }

    /// Pick an adapter by `choice` and open a device with its real limits and
    /// the optional features (SHADER_F16, SUBGROUP, and TIMESTAMP_QUERY when
    /// `choice.timestamps`) it has.
    pub async fn new(choice: &AdapterChoice) -> Result<Gpu> {
        let (adapter, _instance) = adapter::select(choice).await?;
        let info = adapter.get_info();
        let mut wanted = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP;
        if choice.timestamps {
            wanted |= wgpu::Features::TIMESTAMP_QUERY;
        }
        let features = adapter.features() & wanted;
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("difftrain"),
                required_features: features,
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|source| Error::RequestDevice {
                adapter: info.name.clone(),
                source,
            })?;
        let caps = Capabilities {
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            subgroup_min_size: info.subgroup_min_size,
            subgroup_max_size: info.subgroup_max_size,
            is_cpu: info.device_type == wgpu::DeviceType::Cpu,
            max_binding_bytes: limits
                .max_storage_buffer_binding_size
                .min(limits.max_buffer_size),
            max_buffer_bytes: limits.max_buffer_size,
            storage_offset_alignment: limits.min_storage_buffer_offset_alignment as u64,
        };
        Ok(Gpu {
            pipelines: Arc::new(PipelineCache::new(device.clone(), caps.clone())),
            device,
            queue,
            info,
            limits,
            features,
            caps,
        })
    }

    /// Blocking [`Gpu::new`] for native programs.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking(choice: &AdapterChoice) -> Result<Gpu> {
        pollster::block_on(Gpu::new(choice))
    }

    /// A storage buffer that kernels read and write and the host can copy from.
    pub fn storage_buffer(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// A command encoder labelled `label`.
    pub fn encoder(&self, label: &str) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }

    /// Write bytes at byte `offset` (a multiple of 4) of `buffer`, padded to
    /// the 4-byte copy alignment.
    pub fn write(&self, buffer: &wgpu::Buffer, offset: u64, bytes: &[u8]) {
        if bytes.len().is_multiple_of(4) {
            self.queue.write_buffer(buffer, offset, bytes);
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().next_multiple_of(4), 0);
            self.queue.write_buffer(buffer, offset, &padded);
        }
    }

    /// Submit the uploads queued so far and wait for them, which frees
    /// their staging memory (loading GBs of weights would otherwise hold a
    /// staged copy of all of them until the first step).
    pub fn flush(&self) -> Result<()> {
        self.queue.submit(std::iter::empty());
        self.wait()
    }

    /// Wait for all submitted work (native only; on the web the browser drives it).
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Gpu(e.to_string()))
    }
}
