//! Snapshot cost at scale: capture, write (fsync + rename), read back and restore N clients
//! (default 1,000,000) with the agent's own code, on private maps. `cargo xtask bench` runs it.
//!
//! Usage: `snapshot-bench [--clients N] [--write FILE]`

use std::{
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use limiter_common::{ClientState, addr::v4_mapped, window::slot};
use limiter_user::{
    datapath::{self, LoadOptions, Tables, syscall},
    snapshot::{Clocks, Snapshot},
};

/// `snapshot-bench [--clients N] [--write FILE]`.
#[derive(clap::Parser)]
#[command(about = "Snapshot cost at scale: capture, write, read back and restore N clients")]
pub struct Args {
    /// Clients in the map.
    #[arg(long, default_value_t = 1_000_000)]
    pub clients: u32,
    /// Also write the report (markdown) to FILE.
    #[arg(long, value_name = "FILE")]
    pub write: Option<String>,
}

/// Runs the benchmark and prints (and with `--write` writes) the report.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let clients = args.clients;
    let write = args.write.as_ref();
    let max_clients = clients.next_power_of_two().max(1024);
    let mut ebpf = datapath::load(&LoadOptions {
        pin_dir: None,
        max_clients,
        ..LoadOptions::default()
    })
    .context("loading the object")?;
    let mut tables = Tables::take(&mut ebpf)?;
    let [dynamic, statics, limited] = tables.client_fds()?;
    let maps = [dynamic.as_fd(), statics.as_fd(), limited.as_fd()];

    let entries: Vec<_> = (0..clients)
        .map(|i| {
            let key = v4_mapped([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            let mut state = ClientState {
                slots: [slot(1000, i % 100), slot(999, 7)],
                passed: i as u64,
                limit: 100,
                window_us: 1_000_000,
                ..Default::default()
            };
            state.set_generation_tag(1);
            (key, state)
        })
        .collect();
    syscall::update_all(dynamic.as_fd(), &entries).context("filling the client map")?;

    let dir = std::env::temp_dir().join(format!("limiter-snapshot-bench-{}", std::process::id()));
    let path = dir.join("bench.snapshot");
    let timed = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<Duration> {
        let t = Instant::now();
        f()?;
        Ok(t.elapsed())
    };
    let mut snapshot = None;
    let capture = timed(&mut || {
        snapshot = Some(Snapshot::capture(&maps, Clocks::now())?);
        Ok(())
    })?;
    let snapshot = snapshot.context("no snapshot")?;
    if snapshot.entries.len() != clients as usize {
        bail!(
            "captured {} entries, expected {clients}",
            snapshot.entries.len()
        );
    }
    let write_time = timed(&mut || Ok(snapshot.write(&path)?))?;
    let bytes = std::fs::metadata(&path)?.len();
    let mut loaded = None;
    let read = timed(&mut || {
        loaded = Snapshot::load(&path, u64::MAX)?;
        Ok(())
    })?;
    let loaded = loaded.context("snapshot did not load back")?;
    let restore = timed(&mut || {
        let restored = loaded.restored(Clocks::now());
        syscall::update_all(dynamic.as_fd(), &restored)?;
        Ok(())
    })?;

    // The agent's own loop while a snapshot runs: a config reload (`Tables::apply`) timed 40
    // times (25 ms apart) idle, and 40 times while another thread captures and writes snapshots
    // back to back, as the agent's snapshot worker would.
    let config = limiter_user::config::Config::parse(
        "default: { limit: 100, window: 1s }\npolicies:\n  - { match: 10.0.0.0/8, limit: 50, window: 1s }\n",
    )?;
    let reloads = |tables: &mut Tables| -> anyhow::Result<Vec<Duration>> {
        (0..40)
            .map(|_| {
                let t = Instant::now();
                tables.apply(&config)?;
                std::thread::sleep(Duration::from_millis(25));
                Ok(t.elapsed() - Duration::from_millis(25))
            })
            .collect()
    };
    let idle = reloads(&mut tables)?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (busy, snapshots) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let worker = scope.spawn(|| -> anyhow::Result<u32> {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                Snapshot::capture(&maps, Clocks::now())?.write(&path)?;
                n += 1;
            }
            Ok(n)
        });
        std::thread::sleep(Duration::from_millis(100));
        let busy = reloads(&mut tables);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let snapshots = worker
            .join()
            .map_err(|_| anyhow::anyhow!("the snapshot worker panicked"))??;
        Ok((busy?, snapshots))
    })?;
    std::fs::remove_dir_all(&dir).ok();
    let quantiles = |mut v: Vec<Duration>| {
        v.sort();
        (v[v.len() / 2], v[v.len() - 1])
    };
    let ((idle_p50, idle_max), (busy_p50, busy_max)) = (quantiles(idle), quantiles(busy));

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let report = format!(
        "| step ({clients} clients) | time |\n| --- | ---: |\n\
         | capture (batched map reads) | {:.0} ms |\n\
         | encode + write + fsync + rename ({:.1} MiB) | {:.0} ms |\n\
         | **snapshot total** (capture + write; target < 1 s) | **{:.0} ms** |\n\
         | read + verify checksum + decode | {:.0} ms |\n\
         | restore into the map (batched writes) | {:.0} ms |\n\n\
         The agent during snapshots: a config reload (`Tables::apply`) takes p50 {:.2} ms / max \
         {:.2} ms with no snapshot running, and p50 {:.2} ms / max {:.2} ms while snapshots of \
         {clients} clients were captured and written back to back on another thread ({} completed \
         meanwhile; the agent takes them on a blocking worker thread, so its reload, signal and \
         stats work goes on).\n",
        ms(capture),
        bytes as f64 / (1 << 20) as f64,
        ms(write_time),
        ms(capture + write_time),
        ms(read),
        ms(restore),
        ms(idle_p50),
        ms(idle_max),
        ms(busy_p50),
        ms(busy_max),
        snapshots,
    );
    print!("{report}");
    if let Some(file) = write {
        std::fs::write(file, &report).with_context(|| format!("writing {file}"))?;
    }
    Ok(())
}
