//! On-disk caches of the frozen encoders' outputs (`data.cache_latents`,
//! `data.cache_text_embeddings`): one small safetensors file per entry under
//! `OUTPUT_DIR/cache/KIND/`, so later epochs and resumed runs skip the
//! encoders.
//!
//! An entry's name is the BLAKE3 hash of what the encoder would see (the
//! preprocessed pixels, or the token ids) together with the encoder itself
//! (its config and weight files), the storage precision and the seed. The
//! pixels are the result of the image file *and* of every preprocessing
//! setting (resolution, crop offsets, flip), so a changed file or setting
//! gives a new entry and a stale one is never reused.

use crate::error::{file_err, Result};
use crate::io::{HostTensor, TensorFile};
use std::path::{Path, PathBuf};

/// One cache folder.
pub struct EncoderCache {
    dir: PathBuf,
    /// Hash state after the encoder's identity; each key continues it.
    salt: blake3::Hasher,
    pub hits: u64,
    pub misses: u64,
}

/// The identity of a model component: the bytes of its config and weight
/// files (hashed once per run).
pub fn component_identity(dir: &Path) -> Result<blake3::Hash> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| file_err(dir, format!("cannot list: {e}")))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "json" || x == "safetensors" || x == "bin")
        })
        .collect();
    files.sort();
    let mut h = blake3::Hasher::new();
    for f in &files {
        let file = std::fs::File::open(f).map_err(|e| file_err(f, e.to_string()))?;
        h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        h.update_reader(file)
            .map_err(|e| file_err(f, e.to_string()))?;
    }
    Ok(h.finalize())
}

impl EncoderCache {
    /// The cache `OUTPUT_DIR/cache/kind` for the encoder whose identity
    /// (see [`component_identity`]) and settings are given.
    pub fn open(
        output_dir: &Path,
        kind: &str,
        identity: &blake3::Hash,
        settings: &str,
    ) -> Result<Self> {
        let dir = output_dir.join("cache").join(kind);
        std::fs::create_dir_all(&dir).map_err(|e| file_err(&dir, e.to_string()))?;
        let mut salt = blake3::Hasher::new();
        salt.update(identity.as_bytes());
        salt.update(settings.as_bytes());
        Ok(EncoderCache {
            dir,
            salt,
            hits: 0,
            misses: 0,
        })
    }

    /// The key of an encoder input.
    pub fn key(&self, input: &[f32]) -> blake3::Hash {
        let mut h = self.salt.clone();
        h.update(bytemuck::cast_slice(input));
        h.finalize()
    }

    fn path(&self, key: &blake3::Hash) -> PathBuf {
        self.dir.join(format!("{}.safetensors", key.to_hex()))
    }

    /// The cached output for `key`, if present, complete and of `numel`
    /// values (anything else is a miss and is encoded again).
    pub fn get(&mut self, key: &blake3::Hash, numel: usize) -> Option<Vec<f32>> {
        let path = self.path(key);
        let found = TensorFile::read(&path)
            .ok()
            .and_then(|f| f.get("value").ok().map(|t| t.values.clone()))
            .filter(|v| v.len() == numel);
        match found {
            Some(_) => self.hits += 1,
            None => self.misses += 1,
        }
        found
    }

    /// Store `values` (shape `shape`) under `key`: written to a temporary
    /// file, then renamed, so a crash never leaves a partial entry.
    pub fn put(&self, key: &blake3::Hash, shape: &[usize], values: Vec<f32>) -> Result<()> {
        let path = self.path(key);
        let tmp = self.dir.join(format!(".{}.tmp", key.to_hex()));
        let mut f = TensorFile::new(&tmp);
        f.insert("value", HostTensor::f32(shape, values));
        f.write(&tmp, None)?;
        std::fs::rename(&tmp, &path).map_err(|e| file_err(&path, e.to_string()))
    }

    /// The outputs of `batch` encoder inputs laid end to end in `inputs`,
    /// each `shape` (one row of the output, without the batch dim): read
    /// from the cache, or made by `encode(input, key)` and stored.
    pub async fn outputs(
        &mut self,
        inputs: &[f32],
        batch: usize,
        shape: &[usize],
        mut encode: impl AsyncFnMut(&[f32], &blake3::Hash) -> Result<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for input in inputs.chunks(inputs.len() / batch) {
            let key = self.key(input);
            let v = match self.get(&key, shape.iter().product()) {
                Some(v) => v,
                None => {
                    let v = encode(input, &key).await?;
                    self.put(&key, shape, v.clone())?;
                    v
                }
            };
            out.extend(v);
        }
        Ok(out)
    }

    /// Entries on disk.
    pub fn len(&self) -> usize {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                    .count()
            })
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_keys_follow_input_encoder_and_settings() {
        let out = std::env::temp_dir().join(format!("difftrain-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let id = blake3::hash(b"encoder a");
        let mut c = EncoderCache::open(&out, "latents", &id, "fp32 seed 0").unwrap();
        let k = c.key(&[1.0, 2.0]);
        assert_eq!(c.get(&k, 3), None);
        c.put(&k, &[3], vec![4.0, 5.0, 6.0]).unwrap();
        assert_eq!(c.get(&k, 3), Some(vec![4.0, 5.0, 6.0]));
        assert_eq!(c.get(&k, 4), None, "another size is a miss");
        assert_eq!((c.hits, c.misses, c.len()), (1, 2, 1));
        // Another input, encoder or setting: another key.
        assert_ne!(c.key(&[1.0, 2.5]), k);
        let other = EncoderCache::open(&out, "latents", &blake3::hash(b"encoder b"), "fp32 seed 0");
        assert_ne!(other.unwrap().key(&[1.0, 2.0]), k);
        let other = EncoderCache::open(&out, "latents", &id, "fp16 seed 0").unwrap();
        assert_ne!(other.key(&[1.0, 2.0]), k);
        // A damaged entry is a miss, not an error.
        std::fs::write(c.path(&k), b"not safetensors").unwrap();
        assert_eq!(c.get(&k, 3), None);
        let _ = std::fs::remove_dir_all(&out);
    }
}
