//! The seam between difftrain and the platform it runs on: files, the
//! clock, and waiting on the GPU. Everything else in the library (models,
//! trainer, sampler) is the same code natively and in the browser.
//!
//! - Natively files are the host's (`std::fs`; weights are memory-mapped),
//!   and a blocking wait is `pollster::block_on`.
//! - In the browser (wasm32) there is no file system: files live in an
//!   in-memory table for the page's lifetime (the built-in pipeline is
//!   written there as it is into a temporary folder natively, and a trained
//!   UNet is read from there for download). There is no blocking either:
//!   readbacks are awaited, so the browser drives the `async` APIs.
//!
//! Threads (the data loader's prefetching) stay native-only in `train::data`.

pub use web_time::Instant;

#[cfg(not(target_arch = "wasm32"))]
pub use native::*;
#[cfg(target_arch = "wasm32")]
pub use web::*;

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use crate::error::{file_err, Result};
    use std::path::{Path, PathBuf};

    /// A file's bytes: a read-only memory mapping, so decoding a tensor reads
    /// its pages from the page cache and weights never sit whole in the heap.
    pub type FileBytes = memmap2::Mmap;

    pub fn map_file(path: &Path) -> Result<FileBytes> {
        let err = |e: std::io::Error| file_err(path, format!("cannot read: {e}"));
        let file = std::fs::File::open(path).map_err(err)?;
        // Safety: the mapping is only read. A file changed by another
        // process while mapped may show its new contents (as a read racing
        // the write would); difftrain never writes a file it has mapped:
        // checkpoints and pipelines are written to a temporary and renamed.
        unsafe { memmap2::Mmap::map(&file) }.map_err(err)
    }

    /// Tell the OS a mapped range was used and can be dropped from memory
    /// (it is read from the file again if touched).
    pub fn release(bytes: &FileBytes, range: std::ops::Range<usize>) {
        #[cfg(unix)]
        // Safety: a read-only, shared mapping of a file: dropped pages are
        // read from the file again if touched, and no borrow of them lives on.
        unsafe {
            let _ = bytes.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                range.start,
                range.len(),
            );
        }
        #[cfg(not(unix))]
        let _ = (bytes, range);
    }

    pub fn read(path: &Path) -> std::io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::write(path, bytes)
    }

    pub fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }

    pub fn create_dir_all(path: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(path)
    }

    pub fn remove_dir_all(path: &Path) -> std::io::Result<()> {
        std::fs::remove_dir_all(path)
    }

    pub fn is_file(path: &Path) -> bool {
        path.is_file()
    }

    pub fn is_dir(path: &Path) -> bool {
        path.is_dir()
    }

    pub fn temp_dir() -> PathBuf {
        std::env::temp_dir()
    }

    /// A number that tells this process's temporary files from another's.
    pub fn process_id() -> u32 {
        std::process::id()
    }

    /// Wait for a future (a GPU readback) by blocking this thread.
    pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
        pollster::block_on(f)
    }
}

#[cfg(target_arch = "wasm32")]
mod web {
    use crate::error::{file_err, Result};
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::io::{Error, ErrorKind};
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    thread_local! {
        /// Every file by its full path (wasm is single-threaded).
        static FILES: RefCell<BTreeMap<PathBuf, Arc<[u8]>>> = RefCell::default();
    }

    /// A file's bytes, shared with the in-memory table (no copy).
    pub type FileBytes = Arc<[u8]>;

    pub fn map_file(path: &Path) -> Result<FileBytes> {
        FILES
            .with(|f| f.borrow().get(path).cloned())
            .ok_or_else(|| file_err(path, "cannot read: no such file"))
    }

    pub fn release(_: &FileBytes, _: std::ops::Range<usize>) {}

    pub fn read(path: &Path) -> std::io::Result<Vec<u8>> {
        FILES
            .with(|f| f.borrow().get(path).map(|b| b.to_vec()))
            .ok_or_else(|| Error::new(ErrorKind::NotFound, "no such file"))
    }

    pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        FILES.with(|f| f.borrow_mut().insert(path.to_path_buf(), bytes.into()));
        Ok(())
    }

    /// Move a file, or every file under a folder.
    pub fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
        FILES.with(|f| {
            let mut files = f.borrow_mut();
            let moved: Vec<PathBuf> = files
                .keys()
                .filter(|p| p.starts_with(from))
                .cloned()
                .collect();
            if moved.is_empty() {
                return Err(Error::new(ErrorKind::NotFound, "no such file or folder"));
            }
            for p in moved {
                let bytes = files.remove(&p).expect("listed above");
                let rest = p.strip_prefix(from).expect("filtered above");
                files.insert(to.join(rest), bytes);
            }
            Ok(())
        })
    }

    /// Folders exist when a file is in them.
    pub fn create_dir_all(_: &Path) -> std::io::Result<()> {
        Ok(())
    }

    pub fn remove_dir_all(path: &Path) -> std::io::Result<()> {
        FILES.with(|f| f.borrow_mut().retain(|p, _| !p.starts_with(path)));
        Ok(())
    }

    pub fn is_file(path: &Path) -> bool {
        FILES.with(|f| f.borrow().contains_key(path))
    }

    pub fn is_dir(path: &Path) -> bool {
        FILES.with(|f| f.borrow().keys().any(|p| p != path && p.starts_with(path)))
    }

    pub fn temp_dir() -> PathBuf {
        PathBuf::from("/tmp")
    }

    pub fn process_id() -> u32 {
        0
    }
}

/// `path` is a file or a folder.
pub fn exists(path: &std::path::Path) -> bool {
    is_file(path) || is_dir(path)
}

/// The UTF-8 text of a file.
pub fn read_to_string(path: &std::path::Path) -> std::io::Result<String> {
    String::from_utf8(read(path)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
