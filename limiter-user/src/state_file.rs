//! The one way the agent replaces a file it owns under `--state-dir` (the client-state
//! snapshot, the policy overlay): atomically, so a crash at any moment leaves either the old or
//! the new file whole.
//!
//! The new contents go to a temporary file in the same directory (so the rename stays on one
//! filesystem), created with `O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600 and a random name (so
//! nothing planted at a guessable name, a symlink least of all, is ever opened or written
//! through), fsynced, renamed over the target, and the directory fsynced so the rename itself
//! survives a crash. A symlink at the target is replaced, not followed: the agent's own files are
//! never links. On failure the temporary file is removed and the target is untouched.
//!
//! Before every write the directory is checked with [`trusted_dir`] (created 0700 if missing):
//! one that another user can write, or that is not the agent's, is refused with an error naming
//! it and its mode, since such a user could swap the files for their own between writes.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use crate::trusted_dir::{self, DirKind, TrustedDirError};

/// Temporary names tried before giving up (each collision is with a file someone else made).
const ATTEMPTS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("{path} has no file name")]
    NoFileName { path: PathBuf },
    #[error(transparent)]
    Dir(#[from] TrustedDirError),
    #[error("{step} {path}")]
    Temp {
        step: &'static str,
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("renaming {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        error: io::Error,
    },
}

/// Replaces `path` with `contents` atomically (see the module docs), creating its directory if
/// missing. The new file has mode 0600.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), StateFileError> {
    let (dir, name) = split(path)?;
    trusted_dir::prepare(&dir, DirKind::State)?;
    remove_stale_temps(&dir, &name);
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let tmp = dir.join(format!(".{name}.{:016x}.tmp", random_u64()));
        match write_via(path, &dir, &tmp, contents) {
            Err(StateFileError::Temp { error, .. })
                if error.kind() == io::ErrorKind::AlreadyExists =>
            {
                last = Some(error);
            }
            other => return other,
        }
    }
    Err(StateFileError::Temp {
        step: "creating a temporary file next to",
        path: path.to_path_buf(),
        error: last.unwrap_or_else(|| io::ErrorKind::AlreadyExists.into()),
    })
}

/// Removes the temporary files a write of `name` interrupted by a crash left in `dir` (names
/// `.NAME.<16 hex digits>.tmp`), so crashes do not pile them up. Each file has one writer (one
/// agent per interface), so none of them belongs to a write in progress. Best effort: a file
/// that cannot be removed is logged and left.
fn remove_stale_temps(dir: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{name}.");
    for entry in entries.filter_map(Result::ok) {
        let file_name = entry.file_name();
        let Some(random) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_suffix(".tmp"))
        else {
            continue;
        };
        // Never a directory; a symlink is unlinked itself, not followed.
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if random.len() == 16
            && random.bytes().all(|b| b.is_ascii_hexdigit())
            && !is_dir
            && let Err(e) = fs::remove_file(entry.path())
        {
            tracing::warn!("removing the stale {}: {e}", entry.path().display());
        }
    }
}

/// The directory and file name of `path` (`.` for a bare name).
fn split(path: &Path) -> Result<(PathBuf, String), StateFileError> {
    let name = path
        .file_name()
        .ok_or_else(|| StateFileError::NoFileName {
            path: path.to_path_buf(),
        })?
        .to_string_lossy()
        .into_owned();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

/// Writes `contents` to the new file `tmp`, then renames it over `path`. Fails with
/// `AlreadyExists` (and touches nothing) if anything, a symlink included, is at `tmp`.
fn write_via(path: &Path, dir: &Path, tmp: &Path, contents: &[u8]) -> Result<(), StateFileError> {
    let step = |step: &'static str| {
        move |error| StateFileError::Temp {
            step,
            path: tmp.to_path_buf(),
            error,
        }
    };
    // O_EXCL alone already refuses a symlink at `tmp` (open(2): "If O_CREAT and O_EXCL are set
    // ... symbolic links are not followed"); O_NOFOLLOW says so explicitly.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp)
        .map_err(step("creating"))?;
    // From here the temporary file is ours: remove it on any failure.
    let written = (|| {
        file.write_all(contents).map_err(step("writing"))?;
        file.sync_all().map_err(step("fsyncing"))?;
        drop(file);
        fs::rename(tmp, path).map_err(|error| StateFileError::Rename {
            from: tmp.to_path_buf(),
            to: path.to_path_buf(),
            error,
        })
    })();
    if let Err(e) = written {
        // Best effort: the error that matters is the one returned.
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    // The new contents are in place once renamed; a failed directory fsync only weakens their
    // durability across a crash, so it is logged, not returned (returning it would make a caller
    // undo a change that did take effect).
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(
            "{} was written, but fsyncing its directory {} failed: {e}",
            path.display(),
            dir.display()
        );
    }
    Ok(())
}

/// 64 random bits for a temporary name: from getrandom(2), else (it cannot fail for 8 bytes
/// once the pool is initialised, which it is after early boot) the clock and the pid, which are
/// unique enough since a collision only costs a retry.
fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == buf.len() as isize {
        return u64::from_ne_bytes(buf);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "limiter-state-file-{name}-{}-{:x}",
            std::process::id(),
            random_u64()
        ));
        fs::create_dir_all(&dir).unwrap();
        // Whatever the umask: the writer refuses a directory others can write.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_the_file_with_mode_0600_and_leaves_no_temporary_file() {
        let dir = scratch("replace");
        let path = dir.join("state");
        write_atomic(&path, b"one").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        // The inode changes: the old file is replaced by a rename, never rewritten in place, so
        // a reader holding the old file sees it whole.
        let mut old = File::open(&path).unwrap();
        let old_ino = fs::metadata(&path).unwrap().ino();
        write_atomic(&path, b"two, longer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two, longer");
        assert_ne!(fs::metadata(&path).unwrap().ino(), old_ino);
        let mut was = String::new();
        io::Read::read_to_string(&mut old, &mut was).unwrap();
        assert_eq!(was, "one");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(entries(&dir), ["state"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn creates_the_directory() {
        let dir = scratch("mkdir");
        let path = dir.join("a/b/state");
        write_atomic(&path, b"x").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"x");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary_file() {
        let dir = scratch("fail");
        // The target is a non-empty directory: the rename fails after the temporary file was
        // written, which must then be removed.
        let path = dir.join("state");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("keep"), b"old").unwrap();
        let e = write_atomic(&path, b"new").unwrap_err();
        assert!(matches!(e, StateFileError::Rename { .. }), "{e:?}");
        assert!(e.to_string().contains("state"), "{e}");
        assert_eq!(entries(&dir), ["state"]);
        assert_eq!(fs::read(path.join("keep")).unwrap(), b"old");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_symlink_planted_at_the_temporary_path() {
        let dir = scratch("symlink");
        let path = dir.join("state");
        fs::write(&path, b"old").unwrap();
        let victim = dir.join("victim");
        fs::write(&victim, b"precious").unwrap();
        let tmp = dir.join(".state.planted.tmp");
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let e = write_via(&path, &dir, &tmp, b"new").unwrap_err();
        let StateFileError::Temp { error, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        // Nothing written through the link, the link itself left alone, the target unchanged.
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(fs::symlink_metadata(&tmp).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        // A dangling link (which O_CREAT alone would create the file through) is refused too.
        fs::remove_file(&victim).unwrap();
        assert!(write_via(&path, &dir, &tmp, b"new").is_err());
        assert!(!victim.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_not_followed() {
        let dir = scratch("target-link");
        let victim = dir.join("victim");
        fs::write(&victim, b"precious").unwrap();
        let path = dir.join("state");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file());
        assert_eq!(fs::read(&path).unwrap(), b"new");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn temporary_files_left_by_a_crash_are_removed_by_the_next_write() {
        let dir = scratch("stale");
        let path = dir.join("state");
        let stale = dir.join(".state.0123456789abcdef.tmp");
        fs::write(&stale, b"half").unwrap();
        // Not ours: another file's temporary file, and names of another shape.
        let others = [
            ".other.0123456789abcdef.tmp",
            ".state.tmp",
            ".state.xyz.tmp",
        ];
        for other in others {
            fs::write(dir.join(other), b"x").unwrap();
        }
        write_atomic(&path, b"new").unwrap();
        assert!(!stale.exists());
        let mut want: Vec<&str> = others.to_vec();
        want.push("state");
        want.sort();
        assert_eq!(entries(&dir), want);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_refused_and_nothing_is_written() {
        let dir = scratch("open-dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let path = dir.join("state");
        let e = write_atomic(&path, b"new").unwrap_err();
        assert!(matches!(e, StateFileError::Dir(_)), "{e:?}");
        assert!(e.to_string().contains("mode 0777"), "{e}");
        assert!(entries(&dir).is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn temporary_names_differ() {
        let names: std::collections::HashSet<u64> = (0..64).map(|_| random_u64()).collect();
        assert_eq!(names.len(), 64);
    }
}
