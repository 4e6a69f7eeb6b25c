//! What every privileged test needs around its traffic: a root check, a temporary directory,
//! and a guard that its exact counts stayed inside one hour window.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::clock::{clear_of_hour_boundary, window_index};

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether the tests run under vm-test's emulation (`LIMITER_EMULATED`, which it sets): an
/// older kernel on a CPU many times slower.
pub fn emulated() -> bool {
    std::env::var_os("LIMITER_EMULATED").is_some()
}

/// Whether the tests run under CI (`CI=true`, as GitHub Actions, GitLab CI and most others set
/// it): there a privileged test that cannot run is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value.eq_ignore_ascii_case("true") || value == "1")
}

/// What a privileged test does when it is not run as root: `None` to run it (root), the skip
/// message outside CI, and a panic under CI so a runner without root cannot pass silently.
pub fn root_missing() -> Option<&'static str> {
    if is_root() {
        return None;
    }
    if in_ci() {
        panic!(
            "this privileged test needs root (network namespaces, XDP) and CI=true is set, so it \
             fails instead of skipping; run the privileged tests as root \
             (`sudo -E cargo xtask test`)"
        );
    }
    Some("skipped: needs root (network namespaces, XDP); under CI=true this is a failure")
}

/// Skips (passes) a test that cannot run without root, saying so; under `CI=true` the test fails
/// instead.
#[macro_export]
macro_rules! require_root {
    () => {
        if let Some(skip) = $crate::fixture::root_missing() {
            eprintln!("{skip}");
            return Ok(());
        }
    };
}

/// Skips (passes, saying so) a test whose bounds are wall-clock rates that an emulated CPU cannot
/// meet: `cargo xtask vm-test` runs the tests under TCG, many times slower, and sets
/// `LIMITER_EMULATED`. Such a test still runs on the host in `cargo xtask test`.
#[macro_export]
macro_rules! skip_under_emulation {
    ($why:expr) => {
        if $crate::fixture::emulated() {
            eprintln!("skipped under emulation (vm-test): {}", $why);
            return Ok(());
        }
    };
}

/// Asserts at the end of a test that no hour boundary of CLOCK_MONOTONIC passed since it was
/// created (it first waits past a boundary closer than the test's `span`). A `window: 1h` limit
/// is exact only within one hour window: across a boundary the previous hour's count is
/// weighted by a truncated fraction and a client may get one packet more.
pub struct ExactWindow(u128);

impl ExactWindow {
    pub fn start(span: Duration) -> ExactWindow {
        ExactWindow(clear_of_hour_boundary(span))
    }

    pub fn check(&self) {
        assert_eq!(
            window_index(Duration::from_secs(3600)),
            self.0,
            "an hour boundary of CLOCK_MONOTONIC passed during the test, so the exact counts \
             may be off by one; rerun it"
        );
    }
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "limiter-test-{}-{tag}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `text` to `name` in the directory; returns the file's path.
    pub fn write(&self, name: &str, text: &str) -> Result<String> {
        let path = self.0.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path.to_string_lossy().into_owned())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Polls `probe` every 20 ms until it returns `Some`, for at most `timeout`; the error names
/// `what`.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
