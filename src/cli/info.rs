//! `difftrain info`: adapters, the selected one's backend, driver, limits
//! and features.

use anyhow::Result;
use difftrain::gpu::{list_adapters, AdapterChoice};
use difftrain::Gpu;

pub fn info(choice: &AdapterChoice) -> Result<()> {
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
    println!("  driver: {}", gpu.driver());
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
