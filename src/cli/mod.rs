//! The subcommands of the `difftrain` binary, one file each.

pub mod bench;
pub mod forward;
pub mod info;
pub mod init;

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
