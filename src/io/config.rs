//! JSON configs (diffusers' and transformers' `config.json`). Parsing goes
//! through serde with the failing field's path in every error; keys that
//! start with `_` (`_class_name`, `_diffusers_version`, ...) are metadata and
//! skipped.

use crate::error::{file_err, Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

/// Read a JSON object from `path`.
pub fn read_json(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = crate::platform::read_to_string(path)
        .map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(file_err(path, "expected a JSON object")),
        Err(e) => Err(file_err(path, format!("invalid JSON: {e}"))),
    }
}

/// Parse `path` into a config struct. Unknown fields are errors when the
/// struct denies them (diffusers configs); metadata keys never are.
pub fn parse_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let mut map = read_json(path)?;
    map.retain(|k, _| !k.starts_with('_'));
    serde_path_to_error::deserialize(serde_json::Value::Object(map)).map_err(|e| Error::Config {
        path: path.display().to_string(),
        field: e.path().to_string(),
        msg: e.inner().to_string(),
    })
}

/// Write a config: the `header` keys first (diffusers' `_class_name`,
/// transformers' `architectures`, ...), then every field of `config`.
pub fn write_config<T: Serialize>(
    path: &Path,
    header: &[(&str, serde_json::Value)],
    config: &T,
) -> Result<()> {
    let mut out = serde_json::Map::new();
    for (k, v) in header {
        out.insert(k.to_string(), v.clone());
    }
    match serde_json::to_value(config) {
        Ok(serde_json::Value::Object(fields)) => out.extend(fields),
        _ => return Err(file_err(path, "config did not serialize to a JSON object")),
    }
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(out))
        .map_err(|e| file_err(path, e.to_string()))?;
    super::write_atomic(path, text.as_bytes())
}

/// An error for a config value difftrain does not support.
pub fn unsupported(path: &Path, field: &str, msg: impl Into<String>) -> Error {
    Error::Config {
        path: path.display().to_string(),
        field: field.to_string(),
        msg: msg.into(),
    }
}

/// A field diffusers accepts as one value or one per block.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// One value per block; a list must have exactly `n`.
    pub fn per_block(&self, n: usize, path: &Path, field: &str) -> Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Ok(v.clone()),
            OneOrMany::Many(v) => Err(unsupported(
                path,
                field,
                format!("has {} entries, expected one per block ({n})", v.len()),
            )),
        }
    }
}
