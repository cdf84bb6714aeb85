//! Reading buffers back to the host: async (the browser's only way), with a
//! blocking wrapper for native code.

use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// Copy `bytes` bytes from byte `offset` (a multiple of 4) of `src` to the host.
pub async fn read_buffer(
    gpu: &Gpu,
    src: &wgpu::Buffer,
    offset: u64,
    bytes: u64,
) -> Result<Vec<u8>> {
    let size = bytes.next_multiple_of(4).max(4);
    let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = gpu
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("readback"),
        });
    enc.copy_buffer_to_buffer(src, offset, &staging, 0, size);
    gpu.queue.submit([enc.finish()]);
    let (tx, rx) = futures_channel::oneshot::channel();
    staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    #[cfg(not(target_arch = "wasm32"))]
    gpu.wait()?;
    rx.await
        .map_err(|_| Error::Gpu("readback was cancelled".into()))?
        .map_err(|e| Error::Gpu(format!("mapping the readback buffer failed: {e}")))?;
    let view = staging
        .slice(..)
        .get_mapped_range()
        .map_err(|e| Error::Gpu(format!("{e:?}")))?;
    let out = view[..bytes as usize].to_vec();
    drop(view);
    staging.unmap();
    Ok(out)
}

/// Blocking [`read_buffer`].
#[cfg(not(target_arch = "wasm32"))]
pub fn read_buffer_blocking(
    gpu: &Gpu,
    src: &wgpu::Buffer,
    offset: u64,
    bytes: u64,
) -> Result<Vec<u8>> {
    pollster::block_on(read_buffer(gpu, src, offset, bytes))
}
