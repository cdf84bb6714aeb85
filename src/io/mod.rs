//! Files on the host: safetensors tensors and JSON configs, with errors that
//! name the file, tensor or field at fault.

pub mod config;
pub mod tensors;

pub use tensors::{write_atomic, HostTensor, StoredDType, TensorFile, WeightFile};
