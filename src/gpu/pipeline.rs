//! Compute pipelines, created once per specialization and cached.

use super::shader::{Access, ShaderFile, Storage};
use super::Capabilities;
#[cfg(not(target_arch = "wasm32"))]
use crate::error::Error;
use crate::error::Result;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Everything that makes one pipeline distinct.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    pub shader: &'static str,
    pub entry: &'static str,
    /// One per header tensor, in header order.
    pub storages: Vec<Storage>,
    pub consts: Vec<(&'static str, String)>,
}

/// A pipeline with the layout its bind groups are made against.
pub struct CachedPipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    pub has_params: bool,
    /// Header tensor names and accesses, in binding order (binding i + 1).
    pub tensors: Vec<(String, Access)>,
}

pub struct PipelineCache {
    device: wgpu::Device,
    caps: Capabilities,
    cache: Mutex<HashMap<KernelKey, Arc<CachedPipeline>>>,
}

impl PipelineCache {
    pub fn new(device: wgpu::Device, caps: Capabilities) -> Self {
        PipelineCache {
            device,
            caps,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn caps(&self) -> &Capabilities {
        &self.caps
    }

    /// How many distinct pipelines were created so far.
    pub fn len(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, key: &KernelKey) -> Result<Arc<CachedPipeline>> {
        if let Some(p) = self.cache.lock().expect("pipeline cache poisoned").get(key) {
            return Ok(p.clone());
        }
        let pipeline = Arc::new(self.create(key)?);
        self.cache
            .lock()
            .expect("pipeline cache poisoned")
            .insert(key.clone(), pipeline.clone());
        Ok(pipeline)
    }

    fn create(&self, key: &KernelKey) -> Result<CachedPipeline> {
        let file = ShaderFile::get(key.shader)?;
        let info = file.entry(key.entry)?.clone();
        let wgsl = file.specialize(key.entry, &key.storages, &key.consts)?;
        let label = format!("{}::{}", key.shader, key.entry);
        // Capture validation errors: a broken shader is then an error with naga's
        // diagnostic instead of a panic in wgpu's default error handler.
        #[cfg(not(target_arch = "wasm32"))]
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(wgsl.into()),
        };
        // Bounds checks stay on; the loop-bounding counter wgpu injects into
        // every loop is dropped because it stops drivers (Mesa's llvmpipe
        // measurably) from unrolling our small fixed-count inner loops.
        let checks = wgpu::ShaderRuntimeChecks {
            force_loop_bounding: false,
            ..wgpu::ShaderRuntimeChecks::checked()
        };
        // SAFETY: force_loop_bounding may be off only for shaders without
        // infinite loops. These are our own sources from `shaders/`, where every
        // loop runs to a bound taken from its constants or its `Params`.
        let module = unsafe { self.device.create_shader_module_trusted(desc, checks) };
        let mut entries = Vec::new();
        if info.has_params {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        for (i, (_, access)) in info.tensors.iter().enumerate() {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: i as u32 + 1,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage {
                        read_only: !access.writes(),
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(&label),
                entries: &entries,
            });
        let pl = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(&label),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(key.entry),
                compilation_options: Default::default(),
                cache: None,
            });
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(shader_error(key, e.to_string()));
        }
        Ok(CachedPipeline {
            pipeline,
            layout,
            has_params: info.has_params,
            tensors: info.tensors,
        })
    }
}

impl std::fmt::Debug for PipelineCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PipelineCache({} pipelines)", self.len())
    }
}

/// Map a shader creation failure to our error type.
#[cfg(not(target_arch = "wasm32"))]
fn shader_error(key: &KernelKey, msg: impl Into<String>) -> Error {
    Error::Shader {
        shader: format!("{}::{}", key.shader, key.entry),
        msg: msg.into(),
    }
}
