//! The subcommands of the `difftrain` binary, one file each.

pub mod bench;
pub mod dream_report;
pub mod forward;
pub mod info;
pub mod init;
pub mod sample;
pub mod step;
pub mod train;
pub mod train_vae;

/// Peak resident memory of this process in bytes (Linux; None elsewhere).
/// On a CPU adapter (lavapipe) GPU buffers live here too.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes as GiB or MiB for messages.
pub fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// On headless Linux, Mesa's Vulkan loader probes for a Wayland display and
/// libwayland prints "error: XDG_RUNTIME_DIR is invalid or not set" when the
/// variable is missing, which reads like a failure. Before any thread starts,
/// point a missing or unusable XDG_RUNTIME_DIR at a private empty folder (the
/// probe then finds no display, silently). A valid one is left alone.
#[cfg(unix)]
pub fn quiet_display_probe() {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let usable = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .is_some_and(|d| d.is_absolute() && d.is_dir());
    if usable {
        return;
    }
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("difftrain-runtime-{uid}"));
    let made = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    if made.is_ok() || dir.is_dir() {
        // Called first thing in main, before any other thread exists.
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}

#[cfg(not(unix))]
pub fn quiet_display_probe() {}
