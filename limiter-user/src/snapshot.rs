//! Client state on disk, so that a reboot (which loses the pinned maps) does not hand every
//! client a fresh allowance.
//!
//! # Format (version 1, little endian)
//! ```text
//! 0   magic      b"LIMSNAP\0"
//! 8   format     u32 = 1
//! 12  layout     u32 = limiter_common::maps::LAYOUT_VERSION
//! 16  wall_ns    u64  CLOCK_REALTIME when taken
//! 24  mono_ns    u64  CLOCK_MONOTONIC when taken (the clock the window tags count)
//! 32  boot_id    [u8; 16]  /proc/sys/kernel/random/boot_id: is mono_ns comparable with now?
//! 48  count      u64
//! 56  reserved   u64 = 0
//! 64  entries    count × (key [u8; 16], state record 48 bytes: see `encode_state`)
//! end crc32      u32 (IEEE) of everything before it
//! ```
//! Written to a temporary file in the same directory, fsynced, renamed over the old snapshot and
//! the directory fsynced: a crash at any moment leaves either the old or the new snapshot whole.

use std::{
    fs, io,
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
    time::Duration,
};

use limiter_common::{
    ClientState, Policy,
    addr::{ClientKey, GROUP_KEY_MARK},
    maps::{LAYOUT_VERSION, generation_tag},
    window::rebase,
};

/// Periodic snapshots take at most 1/`PERIODIC_CPU_SHARE` of one CPU (5%): see [`periodic_gap`].
pub const PERIODIC_CPU_SHARE: u32 = 20;

/// The least time from the start of one periodic snapshot to the start of the next, for
/// `--snapshot-interval` `interval`, when the last one took `cpu` of its thread's CPU time:
/// the interval, or [`PERIODIC_CPU_SHARE`] times that CPU time if longer. A million clients
/// take about 0.6 s of CPU (BENCHMARKS.md, Snapshots: the pacing paragraph), so every 5 s
/// would hold 12% of a CPU from the packets and the rest of the agent, during a flood of new
/// sources above all; paced, they are snapshotted every 12 s or so. The snapshot at shutdown is
/// never paced.
pub fn periodic_gap(interval: Duration, cpu: Duration) -> Duration {
    interval.max(cpu.saturating_mul(PERIODIC_CPU_SHARE))
}

/// Map layouts whose snapshots this binary restores: their entry records are the same (layout 4
/// packed the map value into 40 bytes, but the record keeps one field per field; layout 5 added
/// the `LIMITED` map, whose entries a snapshot lists with the others; layout 6 added group keys,
/// which are keys like any other: a layout-5 snapshot's address keys restore as they are, and an
/// IPv6 client now counted per /64 starts its group afresh, its old address entry left to age
/// out of the LRU map; layout 7 added the cluster's maps, which snapshots do not list).
const READABLE_LAYOUTS: [u32; 5] = [3, 4, 5, 6, LAYOUT_VERSION];
/// The first layout with group keys (`limiter_common::addr::group_key`, in `ff00::/8`). Before
/// it, a key there was a multicast source the parser then let through; restored now it would
/// read as a group's key, so a source could have chosen the state of another client's group:
/// such entries are dropped from older snapshots.
const GROUPED_LAYOUT: u32 = 6;

use crate::{
    capped_read::{self, CappedReadError},
    datapath::syscall,
    state_file,
};

const MAGIC: &[u8; 8] = b"LIMSNAP\0";
const FORMAT: u32 = 1;
const HEADER: usize = 64;
/// Bytes of one entry's state record (see `encode_state`).
const RECORD: usize = 48;
const ENTRY: usize = 16 + RECORD;
const TRAILER: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error(transparent)]
    Read(CappedReadError),
    #[error("writing the snapshot {path}")]
    Write {
        path: PathBuf,
        #[source]
        error: state_file::StateFileError,
    },
    #[error("empty file")]
    Empty,
    #[error("not a limiter snapshot (bad magic)")]
    Magic,
    #[error("snapshot format {0} is not supported (this binary reads format {FORMAT})")]
    Format(u32),
    #[error("snapshot of map layout v{0}, this binary reads v3 to v{LAYOUT_VERSION}")]
    Layout(u32),
    #[error("truncated: {actual} bytes, the header promises {expected}")]
    Truncated { expected: u64, actual: u64 },
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
}

/// Client state at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub wall_ns: u64,
    pub mono_ns: u64,
    pub boot_id: [u8; 16],
    pub entries: Vec<(ClientKey, ClientState)>,
}

/// Both clocks and the boot they belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clocks {
    pub wall_ns: u64,
    pub mono_ns: u64,
    pub boot_id: [u8; 16],
}

impl Clocks {
    pub fn now() -> Clocks {
        Clocks {
            wall_ns: crate::stats::clock_ns(libc::CLOCK_REALTIME),
            mono_ns: crate::stats::monotonic_ns(),
            boot_id: boot_id(),
        }
    }
}

/// This boot's id (random per boot), as 16 bytes; zeros if unreadable.
fn boot_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(text) = fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let hex: Vec<u8> = text.trim().bytes().filter(u8::is_ascii_hexdigit).collect();
        for (i, pair) in hex.chunks(2).take(16).enumerate() {
            id[i] = u8::from_str_radix(std::str::from_utf8(pair).unwrap_or("0"), 16).unwrap_or(0);
        }
    }
    id
}

impl Snapshot {
    /// Reads the address-client maps (dynamic, static and limited: see
    /// `Tables::client_fds`) in batches.
    pub fn capture(maps: &[BorrowedFd<'_>], clocks: Clocks) -> io::Result<Snapshot> {
        let mut entries: Vec<(ClientKey, ClientState)> = Vec::new();
        for map in maps {
            entries.extend(syscall::lookup_all::<ClientKey, ClientState>(*map)?);
        }
        Ok(Snapshot {
            wall_ns: clocks.wall_ns,
            mono_ns: clocks.mono_ns,
            boot_id: clocks.boot_id,
            entries,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.entries.len() * ENTRY + TRAILER);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT.to_le_bytes());
        out.extend_from_slice(&LAYOUT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.wall_ns.to_le_bytes());
        out.extend_from_slice(&self.mono_ns.to_le_bytes());
        out.extend_from_slice(&self.boot_id);
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        for (key, state) in &self.entries {
            out.extend_from_slice(key);
            encode_state(state, &mut out);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        if bytes.is_empty() {
            return Err(SnapshotError::Empty);
        }
        if bytes.len() < MAGIC.len() || &bytes[..8] != MAGIC {
            return Err(SnapshotError::Magic);
        }
        if bytes.len() < HEADER + TRAILER {
            return Err(SnapshotError::Truncated {
                expected: (HEADER + TRAILER) as u64,
                actual: bytes.len() as u64,
            });
        }
        let u32_at = |o: usize| u32::from_le_bytes(array(&bytes[o..o + 4]));
        let u64_at = |o: usize| u64::from_le_bytes(array(&bytes[o..o + 8]));
        let format = u32_at(8);
        if format != FORMAT {
            return Err(SnapshotError::Format(format));
        }
        let count = u64_at(48);
        let expected = (count as u128) * ENTRY as u128 + (HEADER + TRAILER) as u128;
        if expected != bytes.len() as u128 {
            return Err(SnapshotError::Truncated {
                expected: expected.min(u64::MAX as u128) as u64,
                actual: bytes.len() as u64,
            });
        }
        let body = &bytes[..bytes.len() - TRAILER];
        let stored = u32_at(bytes.len() - TRAILER);
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(SnapshotError::Checksum { stored, computed });
        }
        let layout = u32_at(12);
        if !READABLE_LAYOUTS.contains(&layout) {
            return Err(SnapshotError::Layout(layout));
        }
        let entries = body[HEADER..]
            .chunks_exact(ENTRY)
            .map(|e| {
                let key: ClientKey = array(&e[..16]);
                (key, decode_state(&e[16..]))
            })
            .filter(|(key, _)| layout >= GROUPED_LAYOUT || key[0] != GROUP_KEY_MARK)
            .collect();
        Ok(Snapshot {
            wall_ns: u64_at(16),
            mono_ns: u64_at(24),
            boot_id: array(&bytes[32..48]),
            entries,
        })
    }

    /// Writes atomically ([`state_file::write_atomic`]): temp file, fsync, rename, fsync of the
    /// directory.
    pub fn write(&self, path: &Path) -> Result<(), SnapshotError> {
        state_file::write_atomic(path, &self.encode()).map_err(|error| SnapshotError::Write {
            path: path.to_path_buf(),
            error,
        })
    }

    /// The largest snapshot of `max_entries` entries.
    pub fn max_bytes(max_entries: u64) -> u64 {
        ((HEADER + TRAILER) as u64).saturating_add(max_entries.saturating_mul(ENTRY as u64))
    }

    /// Reads the snapshot at `path`, which may hold at most `max_entries` entries (what the
    /// maps it is restored into can hold: a bigger file is refused before it is read, see
    /// [`Snapshot::max_bytes`]). `Ok(None)` when there is none; a snapshot that cannot be used
    /// (over that size included) is moved aside to `PATH.corrupt-UNIXTIME` with a log line and
    /// also gives `Ok(None)`, so the agent starts from the config.
    pub fn load(path: &Path, max_entries: u64) -> Result<Option<Snapshot>, SnapshotError> {
        let cap = Snapshot::max_bytes(max_entries);
        let decoded = match capped_read::read(path, cap, "the snapshot") {
            Ok(bytes) => Snapshot::decode(&bytes).map_err(|e| e.to_string()),
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e @ CappedReadError::TooLarge { .. }) => Err(format!(
                "{e}: the size of {max_entries} entries, what the client maps hold \
                 (--max-clients plus the exact-address clients)"
            )),
            Err(e) => return Err(SnapshotError::Read(e)),
        };
        match decoded {
            Ok(snapshot) => Ok(Some(snapshot)),
            Err(reason) => {
                let aside = PathBuf::from(format!(
                    "{}.corrupt-{}",
                    path.display(),
                    Clocks::now().wall_ns / 1_000_000_000
                ));
                fs::rename(path, &aside).map_err(|source| SnapshotError::Io {
                    path: aside.clone(),
                    error: source,
                })?;
                tracing::warn!(
                    snapshot = %path.display(),
                    moved_to = %aside.display(),
                    "snapshot unusable ({reason}); starting from the config"
                );
                Ok(None)
            }
        }
    }

    /// The entries as they should be restored at `now`: on the same boot the monotonic clock
    /// goes on, so window state is exact as it is; after a reboot each client's window state is
    /// moved to the new clock, aged by the wall-clock time since the snapshot
    /// ([`limiter_common::window::rebase`]). Policies are re-resolved on the next packet.
    pub fn restored(&self, now: Clocks) -> Vec<(ClientKey, ClientState)> {
        let same_boot = self.boot_id == now.boot_id && now.mono_ns >= self.mono_ns;
        let elapsed = now.wall_ns.saturating_sub(self.wall_ns);
        self.entries
            .iter()
            .map(|(key, state)| {
                let mut state = *state;
                let window = std::num::NonZeroU64::new(state.window_us as u64 * 1000);
                if let (false, Some(window)) = (same_boot, window) {
                    state.slots = rebase(&state.slots, window, self.mono_ns, elapsed, now.mono_ns);
                }
                state.set_generation_tag(0);
                (*key, state)
            })
            .collect()
    }
}

/// The 48-byte record: slots, passed (without the slots), dropped, limit, window_us (8, 8, 8, 8,
/// 4, 4 bytes), generation tag (4), policy id (2), action (1), flags (1).
fn encode_state(s: &ClientState, out: &mut Vec<u8>) {
    out.extend_from_slice(&s.slots[0].to_le_bytes());
    out.extend_from_slice(&s.slots[1].to_le_bytes());
    out.extend_from_slice(&s.passed_count().to_le_bytes());
    out.extend_from_slice(&s.dropped_count().to_le_bytes());
    out.extend_from_slice(&s.limit.to_le_bytes());
    out.extend_from_slice(&s.window_us.to_le_bytes());
    out.extend_from_slice(&(s.generation_tag() as u32).to_le_bytes());
    out.extend_from_slice(&s.policy().to_le_bytes());
    out.push(s.action());
    out.push(s.flags());
}

/// `bytes` as an array of its length. Every caller slices exactly `N` bytes out of a record
/// whose length was checked first.
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(bytes);
    out
}

fn decode_state(b: &[u8]) -> ClientState {
    let u64_at = |o: usize| u64::from_le_bytes(array(&b[o..o + 8]));
    let u32_at = |o: usize| u32::from_le_bytes(array(&b[o..o + 4]));
    // The record keeps the fields of map layout 3 (one per field, 48 bytes), so snapshots of
    // either layout restore into the other. The action is implied by the limits (see
    // `ClientState`); a generation tag of 0 is what restoring sets anyway.
    let mut state = ClientState {
        slots: [u64_at(0), u64_at(8)],
        passed: 0,
        dropped: 0,
        limit: u32_at(32),
        window_us: u32_at(36),
    };
    state.set_passed_count(u64_at(16));
    state.set_dropped_count(u64_at(24));
    state.set_generation_tag(generation_tag(u32_at(40)));
    state.set_policy(u16::from_le_bytes([b[44], b[45]]));
    state.set_flags(b[47]);
    // A layout-3 record names the action; the limits carry it, as for a fresh entry.
    (state.limit, state.window_us) = Policy {
        limit: state.limit,
        window_us: state.window_us,
        id: state.policy(),
        action: b[46],
        group: 0,
    }
    .entry_limits();
    state
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use limiter_common::{
        addr::v4_mapped,
        maps::{ACTION_DROP, ACTION_PASS},
        window::slot,
    };

    use super::*;

    fn sample(n: usize) -> Snapshot {
        Snapshot {
            wall_ns: 1_700_000_000_000_000_000,
            mono_ns: 50_000_000_000,
            boot_id: [7; 16],
            entries: (0..n)
                .map(|i| {
                    let key = v4_mapped([10, 0, (i >> 8) as u8, i as u8]);
                    let mut state = ClientState {
                        slots: [slot(50, i as u32), slot(49, 3)],
                        passed: 0,
                        dropped: 0,
                        limit: 100,
                        window_us: 1_000_000,
                    };
                    state.set_passed_count(i as u64 * 10);
                    state.set_dropped_count(1);
                    state.set_generation_tag(4);
                    state.set_policy(2);
                    state.set_flags((i % 3) as u8);
                    (key, state)
                })
                .collect(),
        }
    }

    #[test]
    fn periodic_snapshots_keep_within_their_cpu_share() {
        let interval = Duration::from_secs(5);
        // Small maps: the interval as set.
        assert_eq!(periodic_gap(interval, Duration::from_millis(3)), interval);
        assert_eq!(periodic_gap(interval, Duration::from_millis(250)), interval);
        // A million clients, 0.6 s of CPU: one every 12 s, 5% of a CPU.
        assert_eq!(
            periodic_gap(interval, Duration::from_millis(600)),
            Duration::from_secs(12)
        );
        // A short interval stretches the same way; nothing overflows.
        assert_eq!(
            periodic_gap(Duration::from_millis(100), Duration::from_millis(10)),
            Duration::from_millis(200)
        );
        assert_eq!(periodic_gap(interval, Duration::MAX), Duration::MAX);
    }

    #[test]
    fn round_trips() {
        let s = sample(300);
        assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
        assert_eq!(Snapshot::decode(&sample(0).encode()).unwrap(), sample(0));
    }

    /// A layout-3 snapshot (the 48-byte map value, byte for byte) restores into layout 4: the
    /// counters, policy, flags and the action carried by the limits.
    #[test]
    fn reads_layout_3_snapshots() {
        let mut bytes = sample(0).encode();
        bytes[12..16].copy_from_slice(&3u32.to_le_bytes());
        bytes.truncate(HEADER);
        bytes[48..56].copy_from_slice(&2u64.to_le_bytes());
        let mut record = Vec::new();
        for (key, passed, dropped, action, flags) in [
            (1u8, 5u64, 7u64, 1u8, 2u8), // pass, reported
            (2, 1 << 50, 0, 2, 1),       // drop, static; passed beyond 48 bits
        ] {
            record.extend_from_slice(&v4_mapped([10, 0, 0, key]));
            record.extend_from_slice(&slot(50, 3).to_le_bytes());
            record.extend_from_slice(&0u64.to_le_bytes());
            record.extend_from_slice(&passed.to_le_bytes());
            record.extend_from_slice(&dropped.to_le_bytes());
            record.extend_from_slice(&100u32.to_le_bytes());
            record.extend_from_slice(&1_000_000u32.to_le_bytes());
            record.extend_from_slice(&9u32.to_le_bytes());
            record.extend_from_slice(&12u16.to_le_bytes());
            record.extend_from_slice(&[action, flags]);
        }
        bytes.extend_from_slice(&record);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let s = Snapshot::decode(&bytes).unwrap();
        let (pass, drop) = (s.entries[0].1, s.entries[1].1);
        assert_eq!(
            (pass.action(), pass.passed_count(), pass.dropped_count()),
            (ACTION_PASS, 5, 7)
        );
        assert_eq!(
            (pass.policy(), pass.flags(), pass.generation_tag()),
            (12, 2, 9)
        );
        assert_eq!(
            (drop.action(), drop.passed_count(), drop.flags()),
            (ACTION_DROP, 0, 1)
        );
        assert_eq!(drop.total_passed(), 3);
    }

    /// Snapshots of the layouts before this one whose records are the same restore as they are
    /// (layout 5 is the one before grouping: an upgrade must not lose every client); a newer
    /// layout is refused.
    #[test]
    fn reads_snapshots_of_earlier_layouts_with_the_same_records() {
        let mut grouped = sample(3);
        grouped.entries[1].0[0] = GROUP_KEY_MARK;
        let with_layout = |layout: u32, snapshot: &Snapshot| {
            let mut bytes = snapshot.encode();
            bytes[12..16].copy_from_slice(&layout.to_le_bytes());
            bytes.truncate(bytes.len() - TRAILER);
            let crc = crc32fast::hash(&bytes);
            bytes.extend_from_slice(&crc.to_le_bytes());
            bytes
        };
        for layout in [4, 5, 6, LAYOUT_VERSION] {
            let s = Snapshot::decode(&with_layout(layout, &sample(3))).unwrap();
            assert_eq!(s.entries, sample(3).entries, "layout {layout}");
        }
        // A key in ff00::/8 is a group's from layout 6 on; before, a multicast source's: dropped.
        for layout in [6, LAYOUT_VERSION] {
            let s = Snapshot::decode(&with_layout(layout, &grouped)).unwrap();
            assert_eq!(s.entries, grouped.entries, "layout {layout}");
        }
        let s = Snapshot::decode(&with_layout(5, &grouped)).unwrap();
        assert_eq!(s.entries, [grouped.entries[0], grouped.entries[2]]);
        let next = LAYOUT_VERSION + 1;
        assert!(matches!(
            Snapshot::decode(&with_layout(next, &sample(3))),
            Err(SnapshotError::Layout(l)) if l == next
        ));
    }

    #[test]
    fn every_corruption_is_detected() {
        let bytes = sample(20).encode();
        assert!(matches!(Snapshot::decode(&[]), Err(SnapshotError::Empty)));
        assert!(matches!(
            Snapshot::decode(b"mode: enforce\ndefault: {}\n"),
            Err(SnapshotError::Magic)
        ));
        for cut in [9, HEADER, HEADER + 5, bytes.len() - 1] {
            assert!(
                matches!(
                    Snapshot::decode(&bytes[..cut]),
                    Err(SnapshotError::Truncated { .. })
                ),
                "cut at {cut}"
            );
        }
        for i in (8..bytes.len()).step_by(7) {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x40;
            assert!(
                Snapshot::decode(&flipped).is_err(),
                "flip at byte {i} undetected"
            );
        }
        let mut other_format = bytes.clone();
        other_format[8] = 9;
        assert!(matches!(
            Snapshot::decode(&other_format),
            Err(SnapshotError::Format(9))
        ));
    }

    #[test]
    fn write_is_atomic_and_load_moves_bad_files_aside() {
        let dir = std::env::temp_dir().join(format!("limiter-snap-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("eth0.snapshot");
        assert_eq!(Snapshot::load(&path, 5).unwrap(), None);
        sample(5).write(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600,
            "a snapshot lists clients: owner only"
        );
        assert_eq!(Snapshot::load(&path, 5).unwrap(), Some(sample(5)));
        fs::write(&path, b"garbage").unwrap();
        assert_eq!(Snapshot::load(&path, 5).unwrap(), None);
        assert!(!path.exists());
        let aside: Vec<_> = fs::read_dir(&dir).unwrap().filter_map(Result::ok).collect();
        assert!(
            aside
                .iter()
                .any(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_snapshot_over_what_the_maps_hold_is_set_aside_unread() {
        let dir = std::env::temp_dir().join(format!("limiter-snap-cap-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("eth0.snapshot");
        sample(5).write(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            Snapshot::max_bytes(5),
            "the cap is exact"
        );
        assert_eq!(Snapshot::load(&path, 5).unwrap(), Some(sample(5)));
        // Four entries' worth of maps: one entry too many, refused before decoding.
        assert_eq!(Snapshot::load(&path, 4).unwrap(), None);
        assert!(!path.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn restore_keeps_state_on_the_same_boot_and_rebases_after_a_reboot() {
        let s = sample(3);
        let same = s.restored(Clocks {
            wall_ns: s.wall_ns + 2_000_000_000,
            mono_ns: s.mono_ns + 2_000_000_000,
            boot_id: s.boot_id,
        });
        assert_eq!(same[2].1.slots, s.entries[2].1.slots);
        assert_eq!(same[2].1.generation_tag(), 0);
        // Rebooted 0.2 s of wall time later (saved mid-window 50 at 50.0 s): still window 50 on
        // the old clock, so the counts land in the new clock's current and previous windows.
        let rebooted = s.restored(Clocks {
            wall_ns: s.wall_ns + 200_000_000,
            mono_ns: 3_500_000_000,
            boot_id: [1; 16],
        });
        let window = std::num::NonZeroU64::new(1_000_000_000).unwrap();
        assert_eq!(
            limiter_common::window::counts(&rebooted[2].1.slots, 3),
            (3, 2)
        );
        assert!(
            limiter_common::window::estimate_at(&rebooted[2].1.slots, 3_500_000_000, window) >= 2
        );
        // Rebooted an hour later: everything aged out.
        let later = s.restored(Clocks {
            wall_ns: s.wall_ns + 3_600_000_000_000,
            mono_ns: 3_500_000_000,
            boot_id: [1; 16],
        });
        assert_eq!(
            limiter_common::window::estimate_at(&later[2].1.slots, 3_500_000_000, window),
            0
        );
        assert_eq!(later[2].1.passed_count(), 20);
    }
}
