//! The API's Unix socket file: bound with its mode already set, never touched through a path
//! that could be a symlink, and removed when the agent stops, however it stops.
//!
//! - The directory is created (0755) if missing and must pass [`trusted_dir`]'s rules for a socket
//!   directory (owned by the agent's uid or root; writable by others only with the sticky bit).
//! - Something at the path that is not a socket is never removed; a socket someone listens on
//!   (another agent given this socket) stops the start; a socket nobody listens on (a crashed
//!   agent's) is replaced.
//! - The mode is set on the socket's descriptor before `bind(2)` (`fchmod`: Linux creates the
//!   file with the socket inode's mode less the umask, `unix_bind` in net/unix/af_unix.c), so
//!   the file is 0600 from the moment it exists, and no `chmod` by path, which follows symlinks,
//!   is ever made. The process-wide umask is not touched either (other threads create files).
//! - [`SocketFile`] removes the socket when dropped, if the path still holds the very socket the
//!   agent bound (same device and inode): on an orderly stop, on an error after the start, and on
//!   a failed start. Only a killed agent (SIGKILL, a crash) leaves it, and the next agent
//!   replaces it as stale.

use std::{
    io,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::{FileTypeExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::trusted_dir::{self, DirKind};

/// The socket's mode: the agent's user only (root, or the capabilities-only agent's user).
const SOCKET_MODE: u32 = 0o600;
/// Pending connections the kernel queues before the agent accepts them.
const BACKLOG: i32 = 1024;

/// Binds the API's Unix socket at `path` (see the module docs).
pub fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    trusted_dir::prepare(dir, DirKind::Socket)?;
    remove_stale(path)?;
    let socket =
        Socket::new(Domain::UNIX, Type::STREAM, None).context("creating the API's Unix socket")?;
    // SAFETY: fchmod on a descriptor this function owns; no memory is passed.
    if unsafe { libc::fchmod(socket.as_raw_fd(), SOCKET_MODE) } != 0 {
        return Err(io::Error::last_os_error())
            .context("setting the mode of the API's Unix socket");
    }
    let addr =
        SockAddr::unix(path).with_context(|| format!("API socket path {}", path.display()))?;
    socket.bind(&addr).with_context(|| {
        format!(
            "binding the API socket {} (created by someone else meanwhile?)",
            path.display()
        )
    })?;
    // From here the file is ours: remove it if anything below fails.
    let bound = SocketFile::claim(path);
    let mode = std::fs::symlink_metadata(path)
        .with_context(|| format!("checking the API socket {}", path.display()))?
        .mode()
        & 0o7777;
    if mode != SOCKET_MODE {
        anyhow::bail!(
            "the API socket {} was created with mode {mode:04o}, not {SOCKET_MODE:04o} (a umask \
             that removes the owner's bits?)",
            path.display()
        );
    }
    socket
        .listen(BACKLOG)
        .with_context(|| format!("listening on the API socket {}", path.display()))?;
    socket
        .set_nonblocking(true)
        .context("making the API socket non-blocking")?;
    let listener = std::os::unix::net::UnixListener::from(OwnedFd::from(socket));
    let listener = tokio::net::UnixListener::from_std(listener)
        .with_context(|| format!("serving the API socket {}", path.display()))?;
    // The listener is returned; the file is removed by the agent's own `SocketFile`.
    bound.release();
    Ok(listener)
}

/// Removes a socket nobody listens on at `path`; refuses anything else there.
fn remove_stale(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("checking the API socket path {}", path.display()));
        }
    };
    if !meta.file_type().is_socket() {
        anyhow::bail!(
            "API socket path {} exists and is not a socket ({}); refusing to replace it",
            path.display(),
            if meta.file_type().is_symlink() {
                "a symlink"
            } else {
                "another kind of file"
            }
        );
    }
    // Stale only if the kernel says nobody listens (ECONNREFUSED). The connect does not block:
    // a live agent whose accept queue is full (EAGAIN) is in use too, and any other error
    // (EACCES on another user's socket, say) is no proof of staleness.
    let probe = Socket::new(Domain::UNIX, Type::STREAM, None).and_then(|probe| {
        probe.set_nonblocking(true)?;
        probe.connect(&SockAddr::unix(path)?)
    });
    match probe {
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Ok(()) => anyhow::bail!(
            "API socket {} is in use by another process (another agent given this socket?)",
            path.display()
        ),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => anyhow::bail!(
            "API socket {} is in use by another process whose accept queue is full (another \
             agent on this interface?)",
            path.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "probing whether anyone listens on the API socket {}; refusing to replace it",
                    path.display()
                )
            });
        }
    }
    tracing::info!(socket = %path.display(), "replacing a stale API socket nobody listens on");
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("removing the stale API socket {}", path.display()))
        }
    }
}

/// The socket file the agent bound; removed when this is dropped if the path still holds that
/// same socket (see the module docs).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Device and inode of the socket bound at `path`, if one was there when claimed.
    id: Option<(u64, u64)>,
}

impl SocketFile {
    /// Takes charge of the socket now at `path` (just bound by this process).
    pub fn claim(path: &Path) -> SocketFile {
        let id = std::fs::symlink_metadata(path)
            .ok()
            .filter(|m| m.file_type().is_socket())
            .map(|m| (m.dev(), m.ino()));
        SocketFile {
            path: path.to_path_buf(),
            id,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the socket in place when dropped.
    fn release(mut self) {
        self.id = None;
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let Some(id) = self.id else {
            return;
        };
        let same = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == id);
        if same
            && let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("removing the API socket {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "limiter-unix-socket-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[tokio::test]
    async fn the_socket_is_0600_from_its_creation_and_removed_when_dropped() {
        let dir = scratch("mode");
        let path = dir.join("api.sock");
        // With the usual umask (022) a socket is created 0755; 0600 is the descriptor's mode.
        let listener = bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o7777, 0o600);
        let file = SocketFile::claim(&path);
        drop(listener);
        drop(file);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_symlink_at_the_path_is_neither_followed_nor_removed() {
        let dir = scratch("symlink");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = dir.join("api.sock");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let e = bind(&path).unwrap_err();
        assert!(format!("{e:#}").contains("a symlink"), "{e:#}");
        assert!(
            std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(
            std::fs::metadata(&victim).unwrap().permissions().mode() & 0o7777,
            0o644
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = scratch("stale");
        let path = dir.join("api.sock");
        // A live socket: another agent.
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let e = bind(&path).unwrap_err();
        assert!(format!("{e:#}").contains("in use"), "{e:#}");
        // Nobody listens any more (its agent was killed): replaced.
        drop(live);
        let _listener = bind(&path).unwrap();
        assert_eq!(
            std::fs::symlink_metadata(&path).unwrap().mode() & 0o7777,
            0o600
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_socket_file_removes_only_the_socket_it_claimed() {
        let dir = scratch("claim");
        let path = dir.join("api.sock");
        let first = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let claimed = SocketFile::claim(&path);
        // Someone replaced it meanwhile (a newer agent, after this one's socket went stale).
        std::fs::remove_file(&path).unwrap();
        let _second = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(claimed);
        assert!(path.exists(), "another socket was removed");
        drop(first);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_socket_directory_others_can_write_is_refused() {
        let dir = scratch("open-dir");
        let open = dir.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind(&open.join("api.sock")).unwrap_err();
        assert!(format!("{e:#}").contains("mode 0777"), "{e:#}");
        assert!(!open.join("api.sock").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
