//! CPU load sources for the adaptive controller ([`super::Controller`]): the agent samples one
//! once per period and passes the value as [`super::LoadSample::cpu`].
//!
//! A sample is a utilisation in `[0, 1]`, or NaN when it is unknown (the controller then keeps
//! its previous smoothed load).

use std::{
    fmt,
    io::Read as _,
    path::{Path, PathBuf},
    time::Instant,
};

/// Where the CPU utilisation comes from. `sample` is called once per period.
pub trait LoadSource: Send {
    /// The utilisation since the previous sample, in `[0, 1]`, or NaN if unknown.
    fn sample(&mut self) -> f64;
    /// What is sampled, for logs (`system CPU (8 CPUs)`, `file /run/load`).
    fn describe(&self) -> String;
}

/// The whole machine's CPU utilisation, all CPUs together, from [`sysinfo`] (on Linux, the
/// `cpu` line of `/proc/stat`: busy time over total time, iowait and idle counting as idle).
///
/// Each [`sample`](LoadSource::sample) is the utilisation over the interval since the previous
/// refresh: the one in [`SystemLoad::new`] for the first sample, the previous sample's after
/// that. sysinfo does not re-read the counters less than [`MIN_INTERVAL`] (200 ms on Linux)
/// after the previous refresh; a sample taken that early returns the previous sample's value,
/// or NaN for a first sample. Periods of a second or so are well clear of that.
pub struct SystemLoad {
    system: sysinfo::System,
    /// When the counters were last re-read.
    refreshed: Instant,
    /// The last value returned.
    last: f64,
}

/// The shortest interval over which [`SystemLoad`] measures (sysinfo's
/// `MINIMUM_CPU_UPDATE_INTERVAL`).
pub const MIN_INTERVAL: std::time::Duration = sysinfo::MINIMUM_CPU_UPDATE_INTERVAL;

impl SystemLoad {
    /// Reads the CPU counters once, so that the first sample measures from now.
    pub fn new() -> std::io::Result<SystemLoad> {
        let mut system = sysinfo::System::new().map_err(|e| match e {
            sysinfo::Error::Io(e) => e,
            e => std::io::Error::other(e.to_string()),
        })?;
        system.refresh_cpu_usage();
        Ok(SystemLoad {
            system,
            refreshed: Instant::now(),
            last: f64::NAN,
        })
    }
}

impl fmt::Debug for SystemLoad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SystemLoad")
            .field("cpus", &self.system.cpus().len())
            .field("last", &self.last)
            .finish()
    }
}

impl LoadSource for SystemLoad {
    fn sample(&mut self) -> f64 {
        if self.refreshed.elapsed() < MIN_INTERVAL {
            return self.last;
        }
        self.system.refresh_cpu_usage();
        self.refreshed = Instant::now();
        let usage = f64::from(self.system.global_cpu_usage()) / 100.0;
        self.last = if usage.is_finite() {
            usage.clamp(0.0, 1.0)
        } else {
            f64::NAN
        };
        self.last
    }

    fn describe(&self) -> String {
        format!("system CPU ({} CPUs)", self.system.cpus().len())
    }
}

/// The utilisation read from a file at every sample, for tests, for a load computed elsewhere
/// (a cgroup's share, a remote measurement), or to force the controller's hand. The file holds
/// one number: a fraction (`0.93`) or a percentage (`93%`), whitespace around it allowed.
/// Values outside `[0, 1]` are clamped.
///
/// A missing, unreadable or unparsable file samples as NaN. Each problem is logged as a warning
/// once, when it appears (not at every period while it lasts); a valid read after one is logged
/// at info, and a later problem is logged again.
#[derive(Debug)]
pub struct FileLoad {
    path: PathBuf,
    /// The problem last warned about, until a clean read.
    problem: Option<Problem>,
}

/// Largest file read, bytes: the number and some whitespace.
const MAX_FILE_LEN: u64 = 256;

/// Kinds of problem, so that a problem that lasts is logged once even if its details change
/// (garbage that differs at each read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Problem {
    Io(std::io::ErrorKind),
    Invalid,
    OutOfRange,
}

impl FileLoad {
    pub fn new(path: impl Into<PathBuf>) -> FileLoad {
        FileLoad {
            path: path.into(),
            problem: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<f64, (Problem, String)> {
        let mut text = String::new();
        std::fs::File::open(&self.path)
            .and_then(|f| f.take(MAX_FILE_LEN + 1).read_to_string(&mut text))
            .map_err(|e| (Problem::Io(e.kind()), e.to_string()))?;
        if text.len() as u64 > MAX_FILE_LEN {
            let message = format!("longer than {MAX_FILE_LEN} bytes, expected one number");
            return Err((Problem::Invalid, message));
        }
        parse_load(&text).map_err(|message| (Problem::Invalid, message))
    }

    /// Warns about `problem` unless it is the one last warned about.
    fn report(&mut self, problem: Problem, message: &str) {
        if self.problem != Some(problem) {
            tracing::warn!(
                "CPU load file {}: {message}; {}",
                self.path.display(),
                match problem {
                    Problem::OutOfRange => "clamped",
                    _ => "the load counts as unknown until the file reads again",
                }
            );
            self.problem = Some(problem);
        }
    }
}

impl LoadSource for FileLoad {
    fn sample(&mut self) -> f64 {
        match self.read() {
            Ok(value) if (0.0..=1.0).contains(&value) => {
                if self.problem.take().is_some() {
                    tracing::info!("CPU load file {} reads again", self.path.display());
                }
                value
            }
            Ok(value) => {
                let message = format!("{value} is outside [0, 1] (0% to 100%)");
                self.report(Problem::OutOfRange, &message);
                value.clamp(0.0, 1.0)
            }
            Err((problem, message)) => {
                self.report(problem, &message);
                f64::NAN
            }
        }
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

/// A load as written: `0.93` or `93%`, surrounding whitespace allowed; finite, not yet clamped.
pub fn parse_load(text: &str) -> Result<f64, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty, expected a fraction like 0.93 or a percentage like 93%".into());
    }
    let (number, scale) = match s.strip_suffix('%') {
        Some(n) => (n.trim_end(), 0.01),
        None => (s, 1.0),
    };
    match number.parse::<f64>() {
        Ok(n) if n.is_finite() => Ok(n * scale),
        _ => Err(format!(
            "{s:?} is not a fraction like 0.93 or a percentage like 93%"
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicBool, Ordering},
        time::Duration,
    };

    use super::*;

    /// A file path unique to this test run and `name`, removed on drop.
    struct TempPath(PathBuf);

    impl TempPath {
        fn new(name: &str) -> TempPath {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            TempPath(std::env::temp_dir().join(format!(
                "limiter-load-{}-{nanos}-{name}",
                std::process::id()
            )))
        }

        fn write(&self, text: &str) {
            std::fs::write(&self.0, text).unwrap();
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn file_reads_fractions_and_percentages() {
        let path = TempPath::new("fractions");
        let mut load = FileLoad::new(&path.0);
        for (text, want) in [
            ("0.93", 0.93),
            ("  0.5\n", 0.5),
            ("93%", 0.93),
            (" 42.5 % \n", 0.425),
            ("0", 0.0),
            ("1", 1.0),
            ("100%", 1.0),
        ] {
            path.write(text);
            let got = load.sample();
            assert!((got - want).abs() < 1e-12, "{text:?}: {got} != {want}");
        }
        assert!(load.describe().contains(&*path.0.to_string_lossy()));
    }

    #[test]
    fn file_problems_sample_as_nan() {
        let path = TempPath::new("problems");
        let mut load = FileLoad::new(&path.0);
        assert!(load.sample().is_nan(), "missing file");
        assert_eq!(
            load.problem,
            Some(Problem::Io(std::io::ErrorKind::NotFound))
        );
        for garbage in [
            "", "  \n", "high", "0.5.1", "93 %%", "nan", "inf", "1e999", "0.5 0.6",
        ] {
            path.write(garbage);
            assert!(load.sample().is_nan(), "{garbage:?}");
            assert_eq!(load.problem, Some(Problem::Invalid), "{garbage:?}");
        }
        path.write(&"0".repeat(300));
        assert!(load.sample().is_nan(), "too long");
        // A good read clears the problem, so the next one is reported again.
        path.write("0.25");
        assert_eq!(load.sample(), 0.25);
        assert_eq!(load.problem, None);
        std::fs::remove_file(&path.0).unwrap();
        assert!(load.sample().is_nan(), "removed");
        // Unreadable: a directory.
        std::fs::create_dir(&path.0).unwrap();
        assert!(load.sample().is_nan(), "directory");
        std::fs::remove_dir(&path.0).unwrap();
    }

    #[test]
    fn file_values_are_clamped() {
        let path = TempPath::new("clamp");
        let mut load = FileLoad::new(&path.0);
        for (text, want) in [("1.5", 1.0), ("150%", 1.0), ("-0.2", 0.0), ("-5%", 0.0)] {
            path.write(text);
            assert_eq!(load.sample(), want, "{text:?}");
            assert_eq!(load.problem, Some(Problem::OutOfRange));
        }
    }

    #[test]
    fn parse_load_reports_the_text() {
        assert_eq!(parse_load("93%"), Ok(0.93));
        let e = parse_load("busy").unwrap_err();
        assert!(e.contains("\"busy\"") && e.contains("93%"), "{e}");
        assert!(parse_load("").unwrap_err().contains("empty"));
    }

    #[test]
    fn system_load_measures_the_interval() {
        let mut load = SystemLoad::new().unwrap();
        assert!(
            load.describe().starts_with("system CPU ("),
            "{}",
            load.describe()
        );
        // Too early after `new`: unknown rather than the average since boot. (Checked only if
        // the sample really was early: a loaded test machine may deschedule us for 200 ms.)
        let primed = load.refreshed;
        let first = load.sample();
        if primed.elapsed() < MIN_INTERVAL {
            assert!(first.is_nan(), "{first}");
        }
        let stop = AtomicBool::new(false);
        let busy = std::thread::scope(|s| {
            let spinner = s.spawn(|| {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
                x
            });
            std::thread::sleep(Duration::from_millis(250));
            let value = load.sample();
            stop.store(true, Ordering::Relaxed);
            spinner.join().unwrap();
            value
        });
        assert!(busy.is_finite() && busy > 0.0 && busy <= 1.0, "{busy}");
        // Within the minimum interval the value repeats.
        let refreshed = load.refreshed;
        let again = load.sample();
        if refreshed.elapsed() < MIN_INTERVAL {
            assert_eq!(again, busy);
        }
        std::thread::sleep(MIN_INTERVAL + Duration::from_millis(20));
        let next = load.sample();
        assert!((0.0..=1.0).contains(&next), "{next}");
        // The source can move to the controller's thread.
        let boxed: Box<dyn LoadSource> = Box::new(load);
        drop(boxed);
    }
}
