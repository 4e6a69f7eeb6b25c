//! The redis-cell baseline: building its Redis module from crates.io source and driving it with
//! `redis-benchmark`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::placement::Cpus;
use super::process::{in_ns, output_of};
use super::{LIMIT, REDIS_CELL_VERSION, REDIS_PORT, WINDOW};

/// The workspace's target directory (`$CARGO_TARGET_DIR`, else `target/`).
pub(super) fn target_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

pub(super) fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // Whatever `cargo run` set for this binary is not for the builds below.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_MANIFEST_DIR",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        command.env_remove(var);
    }
    command
}

/// Builds redis-cell's Redis module from its crates.io source into `dir` (once; later runs
/// reuse it) and returns the module's path. The source comes through cargo itself: a
/// throwaway package depending on `redis-cell` is fetched and `cargo metadata` names where the
/// source was unpacked; a copy of it is built as its own workspace.
pub(super) fn build_redis_cell(dir: &Path) -> Result<PathBuf> {
    let module = dir.join(format!("libredis_cell-{REDIS_CELL_VERSION}.so"));
    if module.is_file() {
        return Ok(module);
    }
    let fetch = dir.join("fetch");
    fs::create_dir_all(fetch.join("src"))
        .with_context(|| format!("creating {}", fetch.display()))?;
    let manifest = fetch.join("Cargo.toml");
    fs::write(
        &manifest,
        format!(
            "[package]\nname = \"redis-cell-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
             publish = false\n\n[dependencies]\nredis-cell = \"={REDIS_CELL_VERSION}\"\n\n\
             # Not part of the limiter workspace.\n[workspace]\n"
        ),
    )
    .with_context(|| format!("writing {}", manifest.display()))?;
    fs::write(fetch.join("src/lib.rs"), "")
        .with_context(|| format!("writing {}", fetch.join("src/lib.rs").display()))?;
    let minutes = Duration::from_secs(300);
    output_of(
        cargo().args(["fetch", "--manifest-path"]).arg(&manifest),
        minutes,
    )
    .context("downloading redis-cell")?;
    let metadata = output_of(
        cargo()
            .args(["metadata", "--format-version", "1", "--manifest-path"])
            .arg(&manifest),
        minutes,
    )
    .context("locating redis-cell's source")?;
    let metadata: serde_json::Value =
        serde_json::from_str(&metadata).context("parsing `cargo metadata` output")?;
    let source = metadata["packages"]
        .as_array()
        .and_then(|packages| {
            packages
                .iter()
                .find(|p| p["name"] == "redis-cell" && p["version"] == REDIS_CELL_VERSION)
        })
        .and_then(|p| p["manifest_path"].as_str())
        .and_then(|path| Path::new(path).parent())
        .map(Path::to_path_buf)
        .context("`cargo metadata` lists no redis-cell package")?;

    let build = dir.join(format!("redis-cell-{REDIS_CELL_VERSION}"));
    let _ = fs::remove_dir_all(&build);
    copy_dir(&source, &build)?;
    // The copy lives under this workspace's target/: make it a workspace of its own.
    let build_manifest = build.join("Cargo.toml");
    let mut text = fs::read_to_string(&build_manifest)
        .with_context(|| format!("reading {}", build_manifest.display()))?;
    text.push_str("\n[workspace]\n");
    fs::write(&build_manifest, text)
        .with_context(|| format!("writing {}", build_manifest.display()))?;
    let log = dir.join("build.log");
    let output = crate::command::run_with_timeout(
        cargo()
            .args(["build", "--release", "--manifest-path"])
            .arg(&build_manifest)
            .arg("--target-dir")
            .arg(dir.join("target")),
        minutes,
    )
    .context("building redis-cell")?;
    fs::write(&log, &output.stderr).with_context(|| format!("writing {}", log.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("error"))
            .take(5)
            .collect();
        bail!(
            "`cargo build --release` of redis-cell {REDIS_CELL_VERSION} failed ({}): {} (full log: {})",
            output.status,
            errors.join("; "),
            log.display()
        );
    }
    let built = dir.join("target/release/libredis_cell.so");
    fs::copy(&built, &module)
        .with_context(|| format!("copying {} to {}", built.display(), module.display()))?;
    Ok(module)
}

pub(super) fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry.with_context(|| format!("reading {}", from.display()))?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target).with_context(|| {
                format!("copying {} to {}", entry.path().display(), target.display())
            })?;
        }
    }
    Ok(())
}

/// One redis-benchmark run: `(requests/s, p50 ms, p99 ms)`.
pub(super) fn redis_benchmark(
    ns: &str,
    pipeline: usize,
    connections: usize,
    requests: u64,
    keys: usize,
    cpus: &Cpus,
) -> Result<(f64, f64, f64)> {
    // CL.THROTTLE key max_burst count_per_period period quantity: LIMIT per WINDOW.
    let mut command = in_ns(ns, "redis-benchmark");
    cpus.apply_to_command(&mut command);
    command.args([
        "-h".to_owned(),
        "127.0.0.1".to_owned(),
        "-p".to_owned(),
        REDIS_PORT.to_string(),
        "-c".to_owned(),
        connections.to_string(),
        "-P".to_owned(),
        pipeline.to_string(),
        "-n".to_owned(),
        requests.to_string(),
        "-r".to_owned(),
        keys.to_string(),
        "--csv".to_owned(),
        "CL.THROTTLE".to_owned(),
        "key:__rand_int__".to_owned(),
        (LIMIT - 1).to_string(),
        LIMIT.to_string(),
        WINDOW.as_secs().to_string(),
        "1".to_owned(),
    ]);
    let csv = output_of(&mut command, Duration::from_secs(120))?;
    parse_redis_csv(&csv).with_context(|| format!("parsing redis-benchmark's output {csv:?}"))
}

/// The fields of one CSV line; a quoted field may hold commas (the test's name is the command,
/// and a Lua script has them). redis-benchmark quotes every field and doubles no quotes.
fn csv_fields(line: &str) -> Vec<&str> {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                fields.push(line[start..i].trim_matches('"'));
                start = i + 1;
            }
            _ => {}
        }
    }
    fields.push(line[start..].trim_matches('"'));
    fields
}

/// redis-benchmark `--csv`: a header line naming the columns, then one line per test.
pub(super) fn parse_redis_csv(csv: &str) -> Result<(f64, f64, f64)> {
    let mut lines = csv.lines().map(csv_fields);
    let header = lines.next().context("no header line")?;
    let row = lines.next().context("no result line")?;
    let column = |name: &str| -> Result<f64> {
        let at = header
            .iter()
            .position(|h| *h == name)
            .with_context(|| format!("no column {name:?}"))?;
        let value = row
            .get(at)
            .with_context(|| format!("no value for {name:?}"))?;
        value
            .parse()
            .with_context(|| format!("{name} {value:?} is not a number"))
    };
    Ok((
        column("rps")?,
        column("p50_latency_ms")?,
        column("p99_latency_ms")?,
    ))
}
