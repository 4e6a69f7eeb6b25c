//! Reading the files the agent is given (the config file) or keeps (the policy overlay, the
//! snapshot) with a size cap, so that a wrong path (a log file, `/dev/zero`) or a file grown by
//! mistake or malice cannot make the agent read it all into memory; and without blocking on a
//! FIFO planted at the path (it is opened non-blocking, and anything but a regular file is
//! refused).
//!
//! The size is checked before reading (`fstat`) and again while reading (at most `cap + 1` bytes
//! are read), so a file that grows in between is caught too.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CappedReadError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("{what} {path} is not a regular file")]
    NotFile { what: &'static str, path: PathBuf },
    #[error("{what} {path} is {}, over the cap of {}", show_size(*size), show_bytes(*cap))]
    TooLarge {
        what: &'static str,
        path: PathBuf,
        /// The size read, or `None` when it is only known to be over the cap.
        size: Option<u64>,
        cap: u64,
    },
    #[error("{what} {path} is not UTF-8 text")]
    NotUtf8 { what: &'static str, path: PathBuf },
}

impl CappedReadError {
    /// Whether the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, CappedReadError::Io { error, .. } if error.kind() == io::ErrorKind::NotFound)
    }
}

/// `n` bytes in the unit an operator reads best, with the exact count.
pub fn show_bytes(n: u64) -> String {
    const MIB: u64 = 1 << 20;
    const KIB: u64 = 1 << 10;
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else if n >= MIB {
        format!("{:.1} MiB ({n} bytes)", n as f64 / MIB as f64)
    } else if n >= KIB && n.is_multiple_of(KIB) {
        format!("{} KiB", n / KIB)
    } else {
        format!("{n} bytes")
    }
}

fn show_size(size: Option<u64>) -> String {
    match size {
        Some(n) => show_bytes(n),
        None => "larger than that".to_owned(),
    }
}

/// Reads the regular file at `path`, at most `cap` bytes; `what` names the file in errors
/// ("config", "the policy overlay", ...).
pub fn read(path: &Path, cap: u64, what: &'static str) -> Result<Vec<u8>, CappedReadError> {
    let io_err = |error| CappedReadError::Io {
        what,
        path: path.to_path_buf(),
        error,
    };
    // O_NONBLOCK: opening a FIFO would otherwise wait for a writer. It changes nothing for the
    // regular file read below.
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(CappedReadError::NotFile {
            what,
            path: path.to_path_buf(),
        });
    }
    let too_large = |size| CappedReadError::TooLarge {
        what,
        path: path.to_path_buf(),
        size,
        cap,
    };
    if meta.len() > cap {
        return Err(too_large(Some(meta.len())));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > cap {
        return Err(too_large(None));
    }
    Ok(bytes)
}

/// [`read`] as UTF-8 text.
pub fn read_to_string(
    path: &Path,
    cap: u64,
    what: &'static str,
) -> Result<String, CappedReadError> {
    String::from_utf8(read(path, cap, what)?).map_err(|_| CappedReadError::NotUtf8 {
        what,
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "limiter-capped-read-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_a_file_up_to_the_cap() {
        let dir = scratch("ok");
        let path = dir.join("f");
        fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read(&path, 10, "config").unwrap(), b"0123456789");
        assert_eq!(read_to_string(&path, 100, "config").unwrap(), "0123456789");
        // No cap at all (tests reading the agent's snapshot) does not overflow.
        assert_eq!(read(&path, u64::MAX, "config").unwrap(), b"0123456789");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_over_the_cap_is_refused_naming_it_its_size_and_the_cap() {
        let dir = scratch("large");
        let path = dir.join("f");
        fs::write(&path, vec![b'x'; 3 << 20]).unwrap();
        let e = read(&path, 2 << 20, "config").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("config {} is 3 MiB, over the cap of 2 MiB", path.display())
        );
        fs::write(&path, vec![b'x'; 11]).unwrap();
        let e = read(&path, 10, "the policy overlay").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the policy overlay {} is 11 bytes, over the cap of 10 bytes",
                path.display()
            )
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_device_or_fifo_is_refused_without_reading_or_blocking() {
        let e = read(Path::new("/dev/zero"), 10, "config").unwrap_err();
        assert!(matches!(e, CappedReadError::NotFile { .. }), "{e}");
        let dir = scratch("fifo");
        let fifo = dir.join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let e = read(&fifo, 10, "config").unwrap_err();
        assert!(matches!(e, CappedReadError::NotFile { .. }), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_files_and_non_utf8_are_told_apart() {
        let dir = scratch("missing");
        let e = read(&dir.join("none"), 10, "config").unwrap_err();
        assert!(e.is_not_found(), "{e}");
        fs::write(dir.join("bin"), [0xff, 0xfe]).unwrap();
        let e = read_to_string(&dir.join("bin"), 10, "config").unwrap_err();
        assert!(matches!(e, CappedReadError::NotUtf8 { .. }), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sizes_are_shown_in_their_unit() {
        assert_eq!(show_bytes(16 << 20), "16 MiB");
        assert_eq!(show_bytes(512), "512 bytes");
        assert_eq!(show_bytes(4096), "4 KiB");
        assert_eq!(show_bytes((1 << 20) + 1), "1.0 MiB (1048577 bytes)");
    }
}
