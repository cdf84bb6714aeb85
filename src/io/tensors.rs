//! Reading and writing safetensors files. Values travel as f32 on the host
//! (the runner converts to each tensor's storage dtype); files may hold f32,
//! f16, bf16, f64 or integer tensors.

use crate::error::{file_err, Error, Result};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    /// The dtype it had in its file (integers read exactly up to 2^24).
    pub file_dtype: StoredDType,
}

impl HostTensor {
    pub fn f32(shape: &[usize], values: Vec<f32>) -> HostTensor {
        HostTensor {
            shape: shape.to_vec(),
            values,
            file_dtype: StoredDType::F32,
        }
    }

    /// Integer values (token ids) stored as int64.
    pub fn i64(shape: &[usize], values: &[i64]) -> HostTensor {
        HostTensor {
            shape: shape.to_vec(),
            values: values.iter().map(|&v| v as f32).collect(),
            file_dtype: StoredDType::I64,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The element types difftrain reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredDType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
}

impl StoredDType {
    fn from_file(d: Dtype) -> Option<StoredDType> {
        Some(match d {
            Dtype::F32 => StoredDType::F32,
            Dtype::F16 => StoredDType::F16,
            Dtype::BF16 => StoredDType::BF16,
            Dtype::F64 => StoredDType::F64,
            Dtype::I64 => StoredDType::I64,
            Dtype::I32 => StoredDType::I32,
            _ => return None,
        })
    }

    fn to_file(self) -> Dtype {
        match self {
            StoredDType::F32 => Dtype::F32,
            StoredDType::F16 => Dtype::F16,
            StoredDType::BF16 => Dtype::BF16,
            StoredDType::F64 => Dtype::F64,
            StoredDType::I64 => Dtype::I64,
            StoredDType::I32 => Dtype::I32,
        }
    }

    fn decode(self, bytes: &[u8]) -> Vec<f32> {
        fn words<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
            bytes.chunks_exact(N).map(|c| c.try_into().unwrap())
        }
        match self {
            StoredDType::F32 => words(bytes).map(f32::from_le_bytes).collect(),
            StoredDType::F16 => words(bytes)
                .map(|w| f16::from_le_bytes(w).to_f32())
                .collect(),
            StoredDType::BF16 => words(bytes)
                .map(|w| bf16::from_le_bytes(w).to_f32())
                .collect(),
            StoredDType::F64 => words(bytes).map(|w| f64::from_le_bytes(w) as f32).collect(),
            StoredDType::I64 => words(bytes).map(|w| i64::from_le_bytes(w) as f32).collect(),
            StoredDType::I32 => words(bytes).map(|w| i32::from_le_bytes(w) as f32).collect(),
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * 8);
        for &v in values {
            match self {
                StoredDType::F32 => out.extend(v.to_le_bytes()),
                StoredDType::F16 => out.extend(f16::from_f32(v).to_le_bytes()),
                StoredDType::BF16 => out.extend(bf16::from_f32(v).to_le_bytes()),
                StoredDType::F64 => out.extend((v as f64).to_le_bytes()),
                StoredDType::I64 => out.extend((v as i64).to_le_bytes()),
                StoredDType::I32 => out.extend((v as i32).to_le_bytes()),
            }
        }
        out
    }
}

/// The tensors of one safetensors file, by name.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, HostTensor>,
}

impl TensorFile {
    pub fn new(path: &Path) -> TensorFile {
        TensorFile {
            path: path.to_path_buf(),
            tensors: BTreeMap::new(),
        }
    }

    /// Read every tensor of `path`, converting values to f32.
    pub fn read(path: &Path) -> Result<TensorFile> {
        let file = WeightFile::read(path)?;
        let tensors = file
            .entries
            .iter()
            .map(|(name, e)| {
                let t = HostTensor {
                    shape: e.shape.clone(),
                    values: e.decode(&file.bytes),
                    file_dtype: e.dtype,
                };
                (name.clone(), t)
            })
            .collect();
        Ok(TensorFile {
            path: path.to_path_buf(),
            tensors,
        })
    }

    pub fn insert(&mut self, name: &str, t: HostTensor) {
        self.tensors.insert(name.to_string(), t);
    }

    /// The tensor `name`, which must exist.
    pub fn get(&self, name: &str) -> Result<&HostTensor> {
        self.tensors.get(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            msg: format!(
                "missing from {} (it has: {})",
                self.path.display(),
                self.names_preview()
            ),
        })
    }

    /// The tensor `name` if present, checked against an expected shape in
    /// which `None` matches any size.
    pub fn get_shaped(&self, name: &str, expected: &[Option<usize>]) -> Result<&HostTensor> {
        let t = self.get(name)?;
        let fits = t.shape.len() == expected.len()
            && t.shape
                .iter()
                .zip(expected)
                .all(|(&d, e)| e.is_none_or(|e| e == d));
        if !fits {
            let want: Vec<String> = expected
                .iter()
                .map(|e| e.map_or("?".to_string(), |v| v.to_string()))
                .collect();
            return Err(Error::Tensor {
                name: name.to_string(),
                msg: format!(
                    "in {}: expected shape [{}], found {:?}",
                    self.path.display(),
                    want.join(", "),
                    t.shape
                ),
            });
        }
        Ok(t)
    }

    fn names_preview(&self) -> String {
        let names: Vec<&str> = self.tensors.keys().map(String::as_str).take(8).collect();
        let more = self.tensors.len().saturating_sub(names.len());
        match (names.is_empty(), more) {
            (true, _) => "no tensors".into(),
            (false, 0) => names.join(", "),
            (false, n) => format!("{}, ... {n} more", names.join(", ")),
        }
    }

    /// Write every tensor in its `file_dtype`, or in `float` for the
    /// floating-point ones when given (the `.fp16.safetensors` variant).
    /// Tensors are encoded one at a time as they stream to a temporary file
    /// that is then renamed into place. The header carries
    /// `{"format": "pt"}` as torch's writers put it (transformers checks it).
    /// In the browser (no files to stream to) it is encoded whole and
    /// written to the in-memory file table.
    pub fn write(&self, path: &Path, float: Option<StoredDType>) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        return write_via_temp(path, |tmp| {
            safetensors::serialize_to_file(self.views(float), Some(pt_metadata()), tmp)
                .map_err(|e| file_err(tmp, format!("cannot write: {e}")))
        });
        #[cfg(target_arch = "wasm32")]
        write_atomic(path, &self.to_bytes(float)?)
    }

    /// The safetensors file [`TensorFile::write`] writes, as bytes.
    pub fn to_bytes(&self, float: Option<StoredDType>) -> Result<Vec<u8>> {
        safetensors::serialize(self.views(float), Some(pt_metadata()))
            .map_err(|e| file_err(&self.path, format!("cannot encode: {e}")))
    }

    /// Each tensor as written: in its `file_dtype`, or `float` for floats.
    fn views(&self, float: Option<StoredDType>) -> impl Iterator<Item = (&str, Encoded<'_>)> {
        self.tensors.iter().map(move |(name, t)| {
            let dtype = match (t.file_dtype, float) {
                (StoredDType::I64 | StoredDType::I32, _) | (_, None) => t.file_dtype,
                (_, Some(f)) => f,
            };
            (name.as_str(), Encoded { t, dtype })
        })
    }
}

/// The header metadata torch's writers put (transformers checks it).
fn pt_metadata() -> std::collections::HashMap<String, String> {
    [("format".to_string(), "pt".to_string())].into()
}

/// A host tensor as safetensors sees it, encoded when written.
struct Encoded<'a> {
    t: &'a HostTensor,
    dtype: StoredDType,
}

impl safetensors::View for Encoded<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype.to_file()
    }

    fn shape(&self) -> &[usize] {
        &self.t.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        self.dtype.encode(&self.t.values).into()
    }

    fn data_len(&self) -> usize {
        self.t.values.len() * self.dtype.to_file().bitsize() / 8
    }
}

/// A safetensors file held as its bytes, each tensor decoded to f32 only
/// when asked for: loading a model never holds a decoded copy of all its
/// weights next to the file's bytes.
pub struct WeightFile {
    pub path: PathBuf,
    bytes: crate::platform::FileBytes,
    entries: BTreeMap<String, Entry>,
}

/// Where one tensor lies in a [`WeightFile`].
struct Entry {
    dtype: StoredDType,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

impl Entry {
    /// This tensor's values as f32, from the bytes of its file.
    fn decode(&self, bytes: &[u8]) -> Vec<f32> {
        self.dtype.decode(&bytes[self.range.clone()])
    }
}

/// When the header of a safetensors file is whole but its data is cut
/// short, which tensor the cut falls in (the first one past the end). The
/// header is read by hand: the safetensors crate rejects the whole file.
fn truncated_tensor(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let have = bytes.len() - 8 - n;
    let mut ends: Vec<(u64, u64, &str)> = header
        .iter()
        .filter_map(|(name, v)| {
            let o = v.get("data_offsets")?.as_array()?;
            Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?, name.as_str()))
        })
        .collect();
    ends.sort();
    let (start, end, name) = ends.into_iter().find(|e| e.1 > have as u64)?;
    Some(format!(
        "truncated: tensor '{name}' needs data bytes {start}..{end}, the file holds {have}"
    ))
}

impl WeightFile {
    pub fn read(path: &Path) -> Result<WeightFile> {
        let bytes = crate::platform::map_file(path)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| match truncated_tensor(&bytes) {
            Some(msg) => file_err(path, msg),
            None => file_err(
                path,
                format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            ),
        })?;
        let mut entries = BTreeMap::new();
        for (name, view) in st.iter() {
            let dtype = StoredDType::from_file(view.dtype()).ok_or_else(|| {
                file_err(
                    path,
                    format!(
                        "tensor '{name}' has dtype {:?}; expected F32, F16, BF16, F64, I64 or I32",
                        view.dtype()
                    ),
                )
            })?;
            // The view borrows from `bytes`: its offset there locates it.
            let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            let entry = Entry {
                dtype,
                shape: view.shape().to_vec(),
                range: start..start + view.data().len(),
            };
            entries.insert(name.to_string(), entry);
        }
        drop(st);
        Ok(WeightFile {
            path: path.to_path_buf(),
            bytes,
            entries,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| &e.shape[..])
    }

    /// The values of tensor `name` as f32. On Unix the tensor's pages of
    /// the mapping are released once decoded: loading a model then holds
    /// about one tensor of the file in memory at a time, not all of it.
    pub fn decode(&self, name: &str) -> Option<Vec<f32>> {
        let e = self.entries.get(name)?;
        let values = e.decode(&self.bytes);
        crate::platform::release(&self.bytes, e.range.clone());
        Some(values)
    }

    /// Give tensor `from` the name `to` and, when given, another shape of
    /// the same size (old checkpoints' names and 1x1-conv shapes).
    pub fn rename(&mut self, from: &str, to: &str, shape: Option<Vec<usize>>) {
        if let Some(mut e) = self.entries.remove(from) {
            if let Some(s) =
                shape.filter(|s| s.iter().product::<usize>() == e.shape.iter().product::<usize>())
            {
                e.shape = s;
            }
            self.entries.insert(to.to_string(), e);
        }
    }
}

/// Write a file through a temporary beside it and a rename, so a crash
/// never leaves a half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_via_temp(path, |tmp| {
        crate::platform::write(tmp, bytes).map_err(|e| file_err(tmp, format!("cannot write: {e}")))
    })
}

/// Let `write` fill a temporary file beside `path`, then rename it into place.
fn write_via_temp(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("partial");
    write(&tmp)?;
    crate::platform::rename(&tmp, path)
        .map_err(|e| file_err(path, format!("cannot rename into place: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_values_and_dtypes() {
        let dir = std::env::temp_dir().join(format!("difftrain-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let mut f = TensorFile::new(&path);
        f.insert(
            "w",
            HostTensor::f32(&[2, 3], vec![0.5, -1.0, 2.25, 3.0, 1e-3, 7.0]),
        );
        f.insert("ids", HostTensor::i64(&[3], &[49406, 0, 49407]));
        f.write(&path, None).unwrap();
        let back = TensorFile::read(&path).unwrap();
        assert_eq!(back.tensors, f.tensors);

        f.write(&path, Some(StoredDType::F16)).unwrap();
        let half = TensorFile::read(&path).unwrap();
        assert_eq!(half.get("w").unwrap().file_dtype, StoredDType::F16);
        assert_eq!(half.get("ids").unwrap().values, vec![49406.0, 0.0, 49407.0]);
        assert!((half.get("w").unwrap().values[4] - 1e-3).abs() < 1e-6);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_the_file_and_tensor() {
        let dir = std::env::temp_dir().join(format!("difftrain-io-err-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.safetensors");
        std::fs::write(&path, b"\x08\x00\x00\x00\x00\x00\x00\x00{}").unwrap();
        let e = TensorFile::read(&path).unwrap_err().to_string();
        assert!(e.contains("bad.safetensors"), "{e}");

        let mut f = TensorFile::new(&path);
        f.insert("sample", HostTensor::f32(&[1, 4], vec![0.0; 4]));
        let e = f
            .get_shaped("sample", &[Some(1), Some(4), None])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sample") && e.contains("[1, 4, ?]") && e.contains("[1, 4]"),
            "{e}"
        );
        let e = f.get("timestep").unwrap_err().to_string();
        assert!(e.contains("timestep") && e.contains("sample"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
