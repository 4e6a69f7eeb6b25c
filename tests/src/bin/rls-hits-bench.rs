//! What counting a descriptor's hits for the rate limit service's metrics costs a
//! `ShouldRateLimit` call (`limiter_user::rls::hits`): nanoseconds per descriptor counted, on 1
//! and 2 threads counting into the same series, beside a baseline measured in the same run (one
//! relaxed atomic add to one shared counter, what the agent's `limiter_checks_total` costs the
//! `limiter.v1` Check). Cases: a rule's series; a `detailed_metric` rule's series under one of
//! 1,000 known keys; a detailed key that does not fit under the cap (counted as unrecorded).
//!
//! `rls-hits-bench [--iterations N] [--rounds R]`; reports the median round.

use std::{
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use anyhow::{Context as _, Result};
use limiter_user::rls::{
    RlsConfig,
    hits::{Outcome, RlsHits, Series},
    matching::rule_for,
};

const CONFIG: &str = "domain: bench
descriptors:
  - key: path
    rate_limit: { unit: second, requests_per_unit: 1000000 }
  - key: user
    detailed_metric: true
    rate_limit: { unit: second, requests_per_unit: 1000000 }
";

const KEYS: usize = 1_000;

fn arg(name: &str, default: u64) -> Result<u64> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name}: not a number")),
    }
}

/// Nanoseconds per call of `f` (given the call's index), on `threads` threads at once.
fn per_call(threads: usize, iterations: u64, f: &(impl Fn(u64) + Sync)) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in 0..iterations {
                    f(black_box(i + t as u64));
                }
            });
        }
    });
    start.elapsed().as_nanos() as f64 / iterations as f64
}

fn main() -> Result<()> {
    let iterations = arg("--iterations", 2_000_000)?;
    let rounds = arg("--rounds", 5)? as usize;
    let hits = RlsHits::new(KEYS);
    let mut config = RlsConfig::parse(CONFIG).context("the benchmark's config")?;
    hits.install(&mut config);
    let series = |entries: &[(&str, &str)]| -> Result<&Series> {
        let rule = rule_for(&config, "bench", entries).context("a rule")?;
        Ok(&rule.series.as_ref().context("installed")?.0)
    };
    let path = series(&[("path", "/")])?;
    let user = series(&[("user", "u")])?;
    let names: Vec<String> = (0..KEYS).map(|i| format!("user-{i}")).collect();
    for name in &names {
        user.record(&[("user", name)], &outcome());
    }
    let outside: Vec<String> = (0..KEYS).map(|i| format!("other-{i}")).collect();
    let baseline = AtomicU64::new(0);

    type Case<'a> = (&'a str, Box<dyn Fn(u64) + Sync + 'a>);
    let cases: Vec<Case<'_>> = vec![
        (
            "baseline: one relaxed atomic add",
            Box::new(|_| {
                baseline.fetch_add(1, Ordering::Relaxed);
            }),
        ),
        (
            "rule series",
            Box::new(|_| path.record(&[("path", "/")], &outcome())),
        ),
        (
            "detailed series, known key",
            Box::new(|i| {
                let name = &names[(i as usize * 7919) % KEYS];
                user.record(&[("user", name)], &outcome());
            }),
        ),
        (
            "detailed key over the cap",
            Box::new(|i| {
                let name = &outside[(i as usize * 7919) % KEYS];
                user.record(&[("user", name)], &outcome());
            }),
        ),
    ];
    println!("| case | ns per descriptor, 1 thread | ns per descriptor, each of 2 threads |");
    println!("|---|---:|---:|");
    for (name, f) in &cases {
        let mut cells = Vec::new();
        for threads in [1, 2] {
            let mut samples: Vec<f64> = (0..rounds)
                .map(|_| per_call(threads, iterations, f))
                .collect();
            samples.sort_by(f64::total_cmp);
            cells.push(format!("{:.1}", samples[samples.len() / 2]));
        }
        println!("| {name} | {} | {} |", cells[0], cells[1]);
    }
    black_box(hits.snapshot());
    Ok(())
}

fn outcome() -> Outcome {
    Outcome {
        hits: 1,
        limit: Some(1_000_000),
        used_before: 10,
        over: false,
        shadow: false,
    }
}
