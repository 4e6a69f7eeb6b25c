//! Reading a rate limit service config's files: one file, or every `*.yaml` / `*.yml` file of a
//! directory, and their fingerprint.

use std::path::Path;

use super::RlsConfigError;
use crate::{capped_read, config::MAX_CONFIG_BYTES};

pub(super) fn fingerprint(files: &[(String, String)]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    files.hash(&mut h);
    h.finish()
}

/// The files of `path` with their text, in name order.
pub(super) fn read_files(path: &Path) -> Result<Vec<(String, String)>, RlsConfigError> {
    let read = |p: &Path| {
        capped_read::read_to_string(p, MAX_CONFIG_BYTES, "rate limit service config")
            .map(|text| (p.display().to_string(), text))
            .map_err(|source| RlsConfigError::ReadCapped {
                path: p.to_path_buf(),
                source,
            })
    };
    let meta = std::fs::metadata(path).map_err(|source| RlsConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Ok(vec![read(path)?]);
    }
    let entries = std::fs::read_dir(path).map_err(|source| RlsConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| RlsConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let p = entry.path();
        if name.starts_with('.')
            || !(name.ends_with(".yaml") || name.ends_with(".yml"))
            || !p.is_file()
        {
            continue;
        }
        paths.push(p);
    }
    if paths.is_empty() {
        return Err(RlsConfigError::Empty {
            path: path.to_path_buf(),
        });
    }
    paths.sort();
    paths.iter().map(|p| read(p)).collect()
}
