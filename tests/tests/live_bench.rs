//! The live-traffic benchmark (`live-bench`, tests/src/bench/live/) on one tiny round: the
//! generator's frames reach the receiver, and every receiver drops what its limit says. Needs
//! root; counts only, never times.

use std::time::Duration;

use anyhow::{Result, ensure};
use limiter_tests::bench::live::{Case, LiveBench, NFT_BIG_SIZE};

/// Distinct sources of the round: each may pass at most one packet in the minute (two, for a
/// window boundary crossed by limiter's sliding window), so at most `2 * SOURCES` pass.
const SOURCES: u32 = 1000;

#[test]
fn every_receiver_drops_the_traffic_over_its_limit() -> Result<()> {
    limiter_tests::require_root!();
    limiter_tests::skip_under_emulation!(
        "the generator's live frames under TCG are too few to exceed every source's limit"
    );
    // The generator runs on CPU 0 and the receiver on CPU 1.
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        eprintln!("skipped: the live benchmark needs CPUs 0 and 1, this process has {cpus}");
        return Ok(());
    }
    let mut bench = LiveBench::new(false)?;
    if let Some(why) = bench.live_frames_refused()? {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    // vm-test's initramfs has no `nft`.
    // `nft --version` alone would not say whether nf_tables works here.
    let nft = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nft {
        eprintln!("no `nft`: the nftables case is skipped");
    }
    let cases = [
        Case::XdpDrop,
        Case::XdpTouch,
        Case::Limiter,
        Case::Counter,
        Case::Nft(NFT_BIG_SIZE),
    ];
    for case in cases
        .into_iter()
        .filter(|c| nft || !matches!(c, Case::Nft(_)))
    {
        let run = bench.run(
            case,
            SOURCES,
            Duration::from_millis(200),
            Duration::from_millis(300),
        )?;
        eprintln!("{case:?}: {run:?}");
        ensure!(
            run.processed >= 20 * u64::from(SOURCES),
            "{case:?}: the receiver processed only {} frames",
            run.processed
        );
        ensure!(run.cpu_ns > 0, "{case:?}: no CPU time measured");
        if matches!(case, Case::XdpDrop | Case::XdpTouch) {
            ensure!(run.dropped == run.processed, "{case:?}: {run:?}");
        } else {
            ensure!(
                run.dropped <= run.processed
                    && run.dropped + 2 * u64::from(SOURCES) >= run.processed,
                "{case:?}: dropped {} of {} frames, where all but at most {} are over the limit",
                run.dropped,
                run.processed,
                2 * SOURCES
            );
        }
    }
    Ok(())
}
