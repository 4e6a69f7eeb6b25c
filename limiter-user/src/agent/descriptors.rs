//! The agent's open-descriptor budget: the soft `RLIMIT_NOFILE` raised to the hard limit at
//! start (systemd starts services at a soft limit of 1024, its hard limit is 524288), and the
//! TCP connection caps fitted under it with room kept for the agent's own work, so that callers
//! who fill the caps never leave the Unix socket, config reloads or snapshots without a
//! descriptor.

use std::io;

use crate::admission::Caps;

/// Descriptors kept for everything but TCP connections: the maps and programs (about 20), the
/// duplicates a snapshot, a stats walk or the adaptive loop takes (4 each), the runtime's epoll
/// and signal descriptors, the listeners, Unix socket callers, and the files the agent reads and
/// writes. What the agent uses besides connections is well under a hundred; the rest is for
/// root's callers on the Unix socket, which are not capped.
pub const RESERVED: u64 = 256;

/// The descriptor limit before and after raising it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The soft limit the agent was started with.
    pub before: u64,
    /// The soft limit now.
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (no privilege needed). Descriptors above
/// 1023 are safe here: nothing in the agent uses `select(2)`.
pub fn raise() -> io::Result<Limit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; raising the soft limit up to the hard one is
        // allowed, except above `fs.nr_open` (EPERM), which a hard limit set before nr_open was
        // lowered can be: then the soft limit stays what it was, and is what the caps must fit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        } else {
            tracing::warn!(
                "open files: cannot raise the soft limit {before} to the hard limit {}: {}; \
                 keeping {before}",
                limit.rlim_max,
                io::Error::last_os_error()
            );
        }
    }
    Ok(Limit {
        before,
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// The caps of the API's and the metrics endpoint's TCP listeners (`None`: not listening),
/// lowered where they do not fit under `soft` with [`RESERVED`] kept back; the second value says
/// what was lowered, for a warning. When both must shrink, the metrics endpoint keeps at most
/// an eighth of the room.
pub fn fit(
    soft: u64,
    api: Option<Caps>,
    metrics: Option<Caps>,
) -> (Option<Caps>, Option<Caps>, Option<String>) {
    let room = usize::try_from(soft.saturating_sub(RESERVED)).unwrap_or(usize::MAX);
    let wanted = api.map_or(0, |c| c.total) + metrics.map_or(0, |c| c.total);
    if wanted <= room {
        return (api, metrics, None);
    }
    let shrink = |caps: Caps, total: usize| {
        let total = total.clamp(1, caps.total);
        Caps {
            total,
            per_source: caps.per_source.min(total),
        }
    };
    let metrics_fitted = metrics.map(|m| {
        let share = if api.is_some() { room / 8 } else { room };
        shrink(m, share)
    });
    let left = room.saturating_sub(metrics_fitted.map_or(0, |m| m.total));
    let api_fitted = api.map(|a| shrink(a, left));
    let mut lowered = Vec::new();
    for (flag, before, after) in [
        ("--api-max-connections", api, api_fitted),
        ("--metrics-max-connections", metrics, metrics_fitted),
    ] {
        if let (Some(b), Some(a)) = (before, after)
            && b.total != a.total
        {
            lowered.push(format!("{flag} from {} to {}", b.total, a.total));
        }
    }
    let note = format!(
        "the open-files limit {soft} leaves room for {room} connections besides the {RESERVED} \
         descriptors the agent keeps for itself: lowered {} (raise the hard limit, e.g. \
         LimitNOFILE= in the systemd unit, to keep them)",
        lowered.join(" and ")
    );
    (api_fitted, metrics_fitted, Some(note))
}

#[cfg(test)]
mod tests {
    use super::*;

    const API: Caps = Caps {
        total: 256,
        per_source: 32,
    };
    const METRICS: Caps = Caps {
        total: 64,
        per_source: 8,
    };

    #[test]
    fn the_defaults_fit_under_systemds_soft_limit() {
        assert_eq!(
            fit(1024, Some(API), Some(METRICS)),
            (Some(API), Some(METRICS), None)
        );
    }

    #[test]
    fn caps_that_do_not_fit_are_lowered_with_the_reserve_kept() {
        let big = Caps {
            total: 5000,
            per_source: 5000,
        };
        let (api, metrics, note) = fit(1024, Some(big), Some(METRICS));
        let (api, metrics) = (api.unwrap(), metrics.unwrap());
        assert_eq!(metrics.total, 64, "an eighth of 768 is 96: the 64 fit");
        assert_eq!(api.total, 1024 - RESERVED as usize - 64);
        assert_eq!(api.per_source, api.total);
        let note = note.unwrap();
        assert!(
            note.contains("--api-max-connections from 5000 to 704"),
            "{note}"
        );
        assert!(!note.contains("--metrics-max-connections"), "{note}");

        let (api, metrics, _) = fit(1024, None, Some(big));
        assert_eq!((api, metrics.unwrap().total), (None, 768));
    }

    #[test]
    fn a_tiny_limit_still_leaves_one_connection_each() {
        let (api, metrics, note) = fit(100, Some(API), Some(METRICS));
        assert_eq!(api.unwrap().total, 1);
        assert_eq!(metrics.unwrap().total, 1);
        assert!(note.is_some());
    }

    #[test]
    fn raising_reaches_the_hard_limit() {
        let limit = raise().unwrap();
        assert_eq!(limit.soft, limit.hard);
        assert!(limit.before <= limit.soft);
    }
}
