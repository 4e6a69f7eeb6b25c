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
    datapath::{self, LoadOptions, Tables},
    snapshot::{Clocks, Snapshot},
    syscall,
};

fn main() -> anyhow::Result<()> {
    let mut clients: u32 = 1_000_000;
    let mut write = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--clients" => clients = args.next().context("--clients needs a number")?.parse()?,
            "--write" => write = Some(args.next().context("--write needs a file")?),
            other => bail!("unknown argument {other:?} (expected --clients N, --write FILE)"),
        }
    }
    let max_clients = clients.next_power_of_two().max(1024);
    let mut ebpf = datapath::load(&LoadOptions {
        pin_dir: None,
        max_clients,
    })
    .context("loading the object")?;
    let tables = Tables::take(&mut ebpf)?;
    let (dynamic, statics) = tables.client_fds()?;

    let entries: Vec<_> = (0..clients)
        .map(|i| {
            let key = v4_mapped([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            let state = ClientState {
                slots: [slot(1000, i % 100), slot(999, 7)],
                passed: i as u64,
                limit: 100,
                window_us: 1_000_000,
                generation: 1,
                ..Default::default()
            };
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
        snapshot = Some(Snapshot::capture(
            dynamic.as_fd(),
            statics.as_fd(),
            Clocks::now(),
        )?);
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
        loaded = Snapshot::load(&path)?;
        Ok(())
    })?;
    let loaded = loaded.context("snapshot did not load back")?;
    let restore = timed(&mut || {
        let restored = loaded.restored(Clocks::now());
        syscall::update_all(dynamic.as_fd(), &restored)?;
        Ok(())
    })?;
    std::fs::remove_dir_all(&dir).ok();

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let report = format!(
        "| step ({clients} clients) | time |\n| --- | ---: |\n\
         | capture (batched map reads) | {:.0} ms |\n\
         | encode + write + fsync + rename ({:.1} MiB) | {:.0} ms |\n\
         | **snapshot total** (capture + write; target < 1 s) | **{:.0} ms** |\n\
         | read + verify checksum + decode | {:.0} ms |\n\
         | restore into the map (batched writes) | {:.0} ms |\n",
        ms(capture),
        bytes as f64 / (1 << 20) as f64,
        ms(write_time),
        ms(capture + write_time),
        ms(read),
        ms(restore),
    );
    print!("{report}");
    if let Some(file) = write {
        std::fs::write(&file, &report).with_context(|| format!("writing {file}"))?;
    }
    Ok(())
}
