//! Typed errors of the library. The CLI wraps them in `anyhow`.

use crate::dtype::DType;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no GPU adapter found{detail}. On Linux without a GPU install Mesa's Vulkan \
         driver on the CPU (lavapipe): `apt-get install mesa-vulkan-drivers`"
    )]
    NoAdapter { detail: String },

    #[error("requesting a device from adapter '{adapter}' failed: {source}")]
    RequestDevice {
        adapter: String,
        source: wgpu::RequestDeviceError,
    },

    #[error("{op}: {msg}")]
    Shape { op: String, msg: String },

    #[error("{op}: dtype {dtype} is not supported here ({msg})")]
    DType {
        op: String,
        dtype: DType,
        msg: String,
    },

    /// A kernel binds more of a tensor than one binding may cover: the op does
    /// not split that tensor into windows (or cannot split it finer).
    #[error(
        "{op}: tensor '{tensor}' {shape:?} needs {bytes} bytes in one binding, above this \
         adapter's max storage binding of {limit} bytes"
    )]
    BindingTooLarge {
        op: String,
        tensor: String,
        shape: Vec<usize>,
        bytes: u64,
        limit: u64,
    },

    #[error(
        "{op}: tensor '{tensor}' {shape:?} needs a buffer of {bytes} bytes, above this \
         adapter's max buffer size of {limit} bytes"
    )]
    BufferTooLarge {
        op: String,
        tensor: String,
        shape: Vec<usize>,
        bytes: u64,
        limit: u64,
    },

    #[error("shader {shader}: {msg}")]
    Shader { shader: String, msg: String },

    #[error("GPU error: {0}")]
    Gpu(String),

    #[error("tensor '{name}': {msg}")]
    Tensor { name: String, msg: String },

    #[error("{path}: {msg}")]
    File { path: String, msg: String },

    #[error("{path}: field '{field}': {msg}")]
    Config {
        path: String,
        field: String,
        msg: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for an error about a file, naming its path.
pub fn file_err(path: &std::path::Path, msg: impl Into<String>) -> Error {
    Error::File {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// Shorthand for a shape error naming the op.
pub fn shape_err(op: impl Into<String>, msg: impl Into<String>) -> Error {
    Error::Shape {
        op: op.into(),
        msg: msg.into(),
    }
}
