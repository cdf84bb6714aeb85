//! Runs a [`Plan`]: buffers, pipelines and bind groups are created once; a
//! step writes the host inputs, encodes the cached dispatches into one compute
//! pass and submits once.

use super::emit::{Slot, Window};
use super::plan::{normalize, Plan, RunSpec, StepStats, StorageDesc};
use super::{Graph, TensorId};
use crate::error::{Error, Result};
use crate::gpu::shader::Storage;
use crate::gpu::{read_buffer, Gpu, KernelKey};
use crate::ops::optim::GRAD_SCALER;
use std::sync::Arc;

struct ReadyKernel {
    pipeline: Arc<crate::gpu::CachedPipeline>,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
}

pub struct Session {
    pub gpu: Gpu,
    pub graph: Arc<Graph>,
    pub plan: Plan,
    buffers: Vec<wgpu::Buffer>,
    kernels: Vec<ReadyKernel>,
    lr: f32,
}

impl Session {
    pub fn new(gpu: &Gpu, graph: Arc<Graph>, spec: RunSpec) -> Result<Session> {
        let plan = Plan::build(&graph, &gpu.caps, &spec)?;
        #[cfg(not(target_arch = "wasm32"))]
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let buffers: Vec<wgpu::Buffer> = plan
            .buffers
            .iter()
            .map(|(label, bytes)| gpu.storage_buffer(label, *bytes))
            .collect();
        // Header tensors left unbound: one dummy for those a shader only
        // reads; those it writes each get their own slot of another (WebGPU
        // allows no buffer range bound writable twice in one dispatch, nor
        // bound both read-only and writable).
        let dummy_read = gpu.storage_buffer("unbound (read)", 16);
        let slot = gpu.caps.storage_offset_alignment.max(16);
        let slots = gpu.limits.max_storage_buffers_per_shader_stage.max(1) as u64;
        let dummy_write = gpu.storage_buffer("unbound (written)", slot * slots);

        // All kernels' params in one uniform buffer, each at an aligned offset.
        let align = gpu.limits.min_uniform_buffer_offset_alignment as usize;
        let mut uniform_bytes: Vec<u8> = Vec::new();
        let mut offsets = Vec::with_capacity(plan.kernels.len());
        for k in &plan.kernels {
            offsets.push(uniform_bytes.len());
            let mut words = k.params.clone();
            words.resize(words.len().next_multiple_of(4).max(4), 0);
            uniform_bytes.extend_from_slice(bytemuck::cast_slice(&words));
            uniform_bytes.resize(uniform_bytes.len().next_multiple_of(align), 0);
        }
        let uniforms = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: uniform_bytes.len().max(16) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        gpu.queue.write_buffer(&uniforms, 0, &uniform_bytes);

        let mut kernels = Vec::with_capacity(plan.kernels.len());
        for (ki, k) in plan.kernels.iter().enumerate() {
            let info = crate::gpu::shader::ShaderFile::get(k.shader)?;
            let entry = info.entry(k.entry)?;
            let kernel_err = |msg: String| Error::Shader {
                shader: format!("{}::{} (node {})", k.shader, k.entry, k.node),
                msg,
            };
            for b in &k.bindings {
                let name = b.name;
                if !entry.tensors.iter().any(|(n, _)| n == name) {
                    return Err(kernel_err(format!(
                        "binds '{name}', which the shader does not declare"
                    )));
                }
            }
            // Per header tensor: its storage and binding window, if bound.
            let bound: Vec<Option<(&StorageDesc, Option<Window>)>> = entry
                .tensors
                .iter()
                .map(|(n, _)| {
                    let b = k.bindings.iter().find(|b| b.name == n)?;
                    let sid = plan.slot_storage[&normalize(&graph, b.slot)];
                    Some((&plan.storages[sid], b.window))
                })
                .collect();
            let storages: Vec<Storage> = bound
                .iter()
                .map(|b| match b {
                    Some((st, _)) => {
                        Storage::for_dtype(st.dtype, gpu.caps.shader_f16, spec.force_packed_f16)
                    }
                    None => Storage::F32,
                })
                .collect();
            let key = KernelKey {
                shader: k.shader,
                entry: k.entry,
                storages,
                consts: k.consts.clone(),
            };
            let pipeline = gpu.pipelines.get(&key)?;
            let mut entries = Vec::new();
            if pipeline.has_params {
                let size = (k.params.len().next_multiple_of(4).max(4) * 4) as u64;
                entries.push(wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &uniforms,
                        offset: offsets[ki] as u64,
                        size: wgpu::BufferSize::new(size),
                    }),
                });
            }
            for (i, b) in bound.iter().enumerate() {
                // A storage binds its own extent (or window), not the whole
                // pooled buffer it shares.
                let resource = match b {
                    Some((st, window)) => {
                        let (offset, size) = st.extent(*window);
                        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &buffers[st.buffer],
                            offset,
                            size: wgpu::BufferSize::new(size),
                        })
                    }
                    None if !entry.tensors[i].1.writes() => dummy_read.as_entire_binding(),
                    None => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &dummy_write,
                        offset: slot * i as u64,
                        size: wgpu::BufferSize::new(16),
                    }),
                };
                entries.push(wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
                    resource,
                });
            }
            let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&k.node),
                layout: &pipeline.layout,
                entries: &entries,
            });
            kernels.push(ReadyKernel {
                pipeline,
                bind_group,
                workgroups: k.workgroups,
            });
        }
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!(
                "creating the session's resources failed: {e}"
            )));
        }
        let lr = spec.optimizer.as_ref().map(|o| o.lr).unwrap_or(0.0);
        let s = Session {
            gpu: gpu.clone(),
            graph,
            plan,
            buffers,
            kernels,
            lr,
        };
        if let Some(scaling) = spec.optimizer.and_then(|o| o.loss_scaling) {
            s.write_state(GRAD_SCALER, &[scaling.init_scale, 0.0, 0.0, 0.0])?;
        }
        Ok(s)
    }

    pub fn stats(&self) -> &StepStats {
        &self.plan.stats
    }

    /// The buffer and storage of `slot`.
    fn buffer_of(&self, slot: Slot) -> Result<(&wgpu::Buffer, &StorageDesc)> {
        let sid = self.plan.slot_storage.get(&normalize(&self.graph, slot)).ok_or_else(|| {
            let t = match slot {
                Slot::Value(t) | Slot::Grad(t) => self.graph.desc(t).name.clone(),
                other => format!("{other:?}"),
            };
            Error::Tensor {
                name: t,
                msg: format!("{slot:?} is not used by this session (not an input, output or kept gradient)"),
            }
        })?;
        let s = &self.plan.storages[*sid];
        Ok((&self.buffers[s.buffer], s))
    }

    /// Upload f32 values into a tensor, converting to its storage dtype.
    pub fn write(&self, t: TensorId, values: &[f32]) -> Result<()> {
        let d = self.graph.desc(t);
        if values.len() != d.numel() {
            return Err(Error::Tensor {
                name: d.name.clone(),
                msg: format!(
                    "expected {} values for shape {:?}, got {}",
                    d.numel(),
                    d.shape,
                    values.len()
                ),
            });
        }
        let (buf, s) = self.buffer_of(Slot::Value(t))?;
        self.gpu.write(buf, s.offset, &d.dtype.encode(values));
        Ok(())
    }

    /// Read a tensor's values (after a step) as f32.
    pub async fn read(&self, t: TensorId) -> Result<Vec<f32>> {
        self.read_slot(t, Slot::Value(t)).await
    }

    /// Read a tensor's gradient (kept by `RunSpec::grads`, or a parameter's).
    pub async fn read_grad(&self, t: TensorId) -> Result<Vec<f32>> {
        self.read_slot(t, Slot::Grad(t)).await
    }

    async fn read_slot(&self, t: TensorId, slot: Slot) -> Result<Vec<f32>> {
        let (buf, s) = self.buffer_of(slot)?;
        if !s.persistent {
            return Err(Error::Tensor {
                name: self.graph.desc(t).name.clone(),
                msg: "its memory is reused within a step; list it in RunSpec outputs/grads to read it".into(),
            });
        }
        self.read_storage(buf, s).await
    }

    /// A persistent storage's values as f32.
    async fn read_storage(&self, buf: &wgpu::Buffer, s: &StorageDesc) -> Result<Vec<f32>> {
        let bytes = (s.numel * s.dtype.size_bytes()) as u64;
        let raw = read_buffer(&self.gpu, buf, s.offset, bytes).await?;
        Ok(s.dtype.decode(&raw, s.numel))
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_blocking(&self, t: TensorId) -> Result<Vec<f32>> {
        pollster::block_on(self.read(t))
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_grad_blocking(&self, t: TensorId) -> Result<Vec<f32>> {
        pollster::block_on(self.read_grad(t))
    }

    pub fn set_lr(&mut self, lr: f32) {
        self.lr = lr;
    }

    /// The persistent storage labelled `label` (optimizer state: `adamw.m.NAME`,
    /// `adamw.v.NAME`, `adamw.step`, `adamw.clip`, `grad_scaler`; EMA
    /// shadows `ema.NAME`).
    fn state(&self, label: &str) -> Result<&StorageDesc> {
        self.plan
            .storages
            .iter()
            .find(|s| s.persistent && s.label == label)
            .ok_or_else(|| Error::Tensor {
                name: label.to_string(),
                msg: "no such state in this session".into(),
            })
    }

    /// Labels of the persistent state storages (optimizer moments
    /// `adamw.m.NAME` / `adamw.v.NAME`, EMA shadows `ema.NAME`, ...) that
    /// start with `prefix`, in plan order.
    pub fn state_labels(&self, prefix: &str) -> Vec<String> {
        self.plan
            .storages
            .iter()
            .filter(|s| s.persistent && s.label.starts_with(prefix))
            .map(|s| s.label.clone())
            .collect()
    }

    /// Read a persistent state storage (e.g. an AdamW moment) as f32.
    pub async fn read_state(&self, label: &str) -> Result<Vec<f32>> {
        let s = self.state(label)?;
        self.read_storage(&self.buffers[s.buffer], s).await
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_state_blocking(&self, label: &str) -> Result<Vec<f32>> {
        pollster::block_on(self.read_state(label))
    }

    /// Overwrite a persistent state storage (restoring a checkpoint).
    pub fn write_state(&self, label: &str, values: &[f32]) -> Result<()> {
        let s = self.state(label)?;
        if values.len() != s.numel {
            return Err(Error::Tensor {
                name: label.to_string(),
                msg: format!("expected {} values, got {}", s.numel, values.len()),
            });
        }
        self.gpu
            .write(&self.buffers[s.buffer], s.offset, &s.dtype.encode(values));
        Ok(())
    }

    /// Record a GPU copy of the values of `src` (readable in this session)
    /// into the input `dst` of `other`: an encoder's output feeding the
    /// UNet's session, without a readback. Shapes and dtypes must match.
    pub fn record_copy(
        &self,
        enc: &mut wgpu::CommandEncoder,
        src: TensorId,
        other: &Session,
        dst: TensorId,
    ) -> Result<()> {
        let (a, b) = (self.graph.desc(src), other.graph.desc(dst));
        if a.shape != b.shape || a.dtype != b.dtype {
            return Err(Error::Tensor {
                name: b.name.clone(),
                msg: format!(
                    "cannot copy '{}' {:?} {} into it ({:?} {})",
                    a.name, a.shape, a.dtype, b.shape, b.dtype
                ),
            });
        }
        let (from, s) = self.buffer_of(Slot::Value(src))?;
        let (to, d) = other.buffer_of(Slot::Value(dst))?;
        enc.copy_buffer_to_buffer(
            from,
            s.offset,
            to,
            d.offset,
            a.dtype.buffer_bytes(a.numel()),
        );
        Ok(())
    }

    /// Encode every dispatch of the schedule into one pass and submit once.
    pub fn step(&mut self) -> Result<()> {
        self.submit_step(true)
    }

    /// A step without the optimizer: with `RunSpec::accumulate_grads`, the
    /// parameter gradients add up until the next [`Session::step`].
    pub fn step_accumulate(&mut self) -> Result<()> {
        self.submit_step(false)
    }

    fn submit_step(&mut self, optimizer: bool) -> Result<()> {
        let mut enc = self.gpu.encoder("step");
        self.record_step(&mut enc, optimizer)?;
        self.gpu.queue.submit([enc.finish()]);
        Ok(())
    }

    /// Record a step into `enc` as one compute pass, with the optimizer or
    /// without it (accumulation). Several sessions' steps and the copies
    /// between them then go to the GPU in one submission.
    pub fn record_step(&mut self, enc: &mut wgpu::CommandEncoder, optimizer: bool) -> Result<()> {
        let count = if optimizer {
            self.write_optimizer_step()?;
            self.kernels.len()
        } else {
            self.plan.optimizer_start
        };
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("step"),
            timestamp_writes: None,
        });
        for k in &self.kernels[..count] {
            k.dispatch(&mut pass);
        }
        Ok(())
    }

    /// Write AdamW's per-step constants [lr, 0, 0, 0].
    fn write_optimizer_step(&mut self) -> Result<()> {
        if let Some(slot) = self.plan.adamw_step {
            let (buf, s) = self.buffer_of(slot)?;
            self.gpu.queue.write_buffer(
                buf,
                s.offset,
                bytemuck::cast_slice(&[self.lr, 0.0, 0.0, 0.0]),
            );
        }
        Ok(())
    }

    /// One step with every dispatch in its own compute pass between GPU
    /// timestamps: each dispatch's GPU time in milliseconds, in schedule
    /// order (`plan.kernels`). Slower than [`Session::step`] (a pass per
    /// dispatch); for finding where a step's time goes. Needs an adapter
    /// with timestamp queries.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn profile_step(&mut self) -> Result<Vec<f64>> {
        if !self.gpu.caps.timestamps {
            return Err(Error::Gpu(format!(
                "device on '{}' has no timestamp queries (open it with AdapterChoice::timestamps, \
                 on an adapter with wgpu TIMESTAMP_QUERY); cannot profile",
                self.gpu.info.name
            )));
        }
        self.write_optimizer_step()?;
        // Two timestamps per dispatch; wgpu allows 4096 queries per set.
        const PER_SET: usize = 2048;
        let ns_per_tick = self.gpu.queue.get_timestamp_period() as f64;
        let mut times = Vec::with_capacity(self.kernels.len());
        for chunk in self.kernels.chunks(PER_SET) {
            let queries = 2 * chunk.len() as u32;
            let set = self.gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile"),
                ty: wgpu::QueryType::Timestamp,
                count: queries,
            });
            let resolved = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile"),
                size: queries as u64 * 8,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let mut enc = self
                .gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("profile"),
                });
            for (i, k) in chunk.iter().enumerate() {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &set,
                        beginning_of_pass_write_index: Some(2 * i as u32),
                        end_of_pass_write_index: Some(2 * i as u32 + 1),
                    }),
                });
                k.dispatch(&mut pass);
            }
            enc.resolve_query_set(&set, 0..queries, &resolved, 0);
            self.gpu.queue.submit([enc.finish()]);
            let raw =
                crate::gpu::read_buffer_blocking(&self.gpu, &resolved, 0, queries as u64 * 8)?;
            let ticks: Vec<u64> = raw
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect();
            times.extend(
                ticks
                    .chunks_exact(2)
                    .map(|t| t[1].saturating_sub(t[0]) as f64 * ns_per_tick / 1e6),
            );
        }
        Ok(times)
    }
}

impl ReadyKernel {
    fn dispatch(&self, pass: &mut wgpu::ComputePass) {
        pass.set_pipeline(&self.pipeline.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        let [x, y, z] = self.workgroups;
        pass.dispatch_workgroups(x, y, z);
    }
}
