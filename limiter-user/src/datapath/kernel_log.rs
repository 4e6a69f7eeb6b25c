//! The XDP program's own log (aya-log; the events are in `limiter-ebpf/src/events.rs`), forwarded
//! into the agent's `tracing` log: a full client map, a client contended past its retries, a
//! counter update that lost its races. Records carry no per-packet data and are sampled in the
//! kernel, so the log stays quiet under a flood.

use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};

/// aya-log's levels, as the eBPF side's `AYA_LOG_LEVEL` global holds them: 0 (off), then error
/// (1) to trace (5). `'static` because the loader keeps a reference to the value.
static LEVELS: [u8; 6] = [0, 1, 2, 3, 4, 5];

/// Sets the eBPF side's log level to the most verbose level this module's `tracing` target
/// shows, before the object is loaded: the level lives in a frozen read-only map, so with the
/// records filtered out the verifier prunes the logging branches from the programs.
pub fn set_level(loader: &mut EbpfLoader<'_>) {
    use tracing::{Level, enabled};
    let level = if enabled!(Level::TRACE) {
        5
    } else if enabled!(Level::DEBUG) {
        4
    } else if enabled!(Level::INFO) {
        3
    } else if enabled!(Level::WARN) {
        2
    } else if enabled!(Level::ERROR) {
        1
    } else {
        0
    };
    loader.override_global(aya_log::LEVEL, &LEVELS[level], true);
}

/// Forwards the records of a loaded object to `tracing` from a task on the current tokio
/// runtime, for as long as the runtime runs. Outside a runtime (benchmarks, some tests) it does
/// nothing: the records then stay in the kernel's ring buffer until it is full and later ones are
/// dropped there, which costs the program nothing it would not pay anyway.
///
/// Call it before the object's programs are loaded: the task owns the log map's descriptor,
/// which the programs' instructions refer to.
pub fn forward(ebpf: &mut Ebpf) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let logger = match EbpfLogger::init_with_logger(ebpf, Forward) {
        Ok(logger) => logger,
        Err(error) => {
            tracing::warn!("the XDP program's log will not be shown: {error}");
            return;
        }
    };
    // SAFETY: the logger owns the ring buffer map's descriptor, which stays open and is the one
    // `as_raw_fd` returns for as long as the logger (owned by the `AsyncFd`) lives.
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(error) => {
            tracing::warn!(
                "the XDP program's log will not be shown: polling its ring buffer: {error}"
            );
            return;
        }
    };
    runtime.spawn(async move {
        while let Ok(mut ready) = fd.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
}

/// A `log::Log` that hands aya-log's records to `tracing`.
struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(kernel = true, "{message}"),
            log::Level::Warn => tracing::warn!(kernel = true, "{message}"),
            log::Level::Info => tracing::info!(kernel = true, "{message}"),
            log::Level::Debug => tracing::debug!(kernel = true, "{message}"),
            log::Level::Trace => tracing::trace!(kernel = true, "{message}"),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_aya_logs() {
        for level in [
            aya_log::Level::Error,
            aya_log::Level::Warn,
            aya_log::Level::Info,
            aya_log::Level::Debug,
            aya_log::Level::Trace,
        ] {
            assert_eq!(LEVELS[level as usize], level as u8);
        }
    }
}
