//! Map pressure and moves between maps: exact-address clients in `STATIC_CLIENTS`, limited ones in
//! `LIMITED` through floods and a full map, the lookup hint, the sweep, concurrent CPUs and the
//! counters' wrap.

use super::*;

/// A packet running while an apply makes its held client exact-address may copy it back into
/// `LIMITED` (it found the client in `CLIENTS` before the move, and holds it after): the sweep
/// takes such copies out, once running programs have ended, of a key still static, and the
/// static entry keeps counting. Copies of a key an apply made dynamic again stay.
#[test]
fn the_sweep_takes_out_copies_left_by_a_move_into_the_static_map() -> Result<()> {
    let base = "default: { limit: 7, window: 1h }\npolicies:\n  - { match: 10.0.0.0/8, limit: 2, window: 1h }\n";
    let host = format!("{base}  - {{ match: 10.0.0.5, limit: 8, window: 1h }}\n");
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, base)?;
        let src = v4(10, 0, 0, 5);
        check_eq!(lim.send(src, 3)?, 2);
        let held = lim.tables.limited.get(&key_of(src), 0)?;
        let mut sweep = lim.tables.limited_sweep()?;
        lim.apply(&host)?;
        ensure!(lim.tables.limited.get(&key_of(src), 0).is_err(), "moved");
        // The racing packet's copy, and the sweep's own that came back.
        lim.tables.limited.insert(key_of(src), held, 0)?;
        lim.tables.clients.insert(key_of(src), held, 0)?;
        std::thread::sleep(std::time::Duration::from_millis(20));
        sweep.sweep(monotonic_ns())?;
        ensure!(
            lim.tables.limited.get(&key_of(src), 0).is_err(),
            "copy in LIMITED left"
        );
        ensure!(
            lim.tables.clients.get(&key_of(src), 0).is_err(),
            "copy in CLIENTS left"
        );
        let before = lim
            .tables
            .static_clients
            .get(&key_of(src), 0)?
            .total_passed();
        check_eq!(lim.send(src, 1)?, 1);
        check_eq!(
            lim.tables
                .static_clients
                .get(&key_of(src), 0)?
                .total_passed(),
            before + 1
        );
        // Made dynamic again before the sweep: what it holds in LIMITED is the client's.
        let other = v4(10, 0, 0, 6);
        lim.apply(&format!(
            "{base}  - {{ match: 10.0.0.6, limit: 8, window: 1h }}\n"
        ))?;
        lim.apply(base)?;
        check_eq!(lim.send(other, 3)?, 2);
        std::thread::sleep(std::time::Duration::from_millis(20));
        sweep.sweep(monotonic_ns())?;
        ensure!(
            lim.tables.limited.get(&key_of(other), 0).is_ok(),
            "a held client taken out"
        );
        Ok(())
    })
}

#[test]
fn a_new_exact_address_policy_moves_the_client_with_its_count() -> Result<()> {
    let base = "default: { limit: 7, window: 1h }\npolicies:\n  - { match: 10.0.0.0/8, limit: 5, window: 1h }\n";
    let host = format!("{base}  - {{ match: 10.0.0.5, limit: 8, window: 1h }}\n");
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, base)?;
        let no_static = |lim: &Limiter| -> Result<bool> {
            Ok(lim.tables.map_config()?.flags & CONFIG_NO_STATIC != 0)
        };
        // No exact-address policy: the programs skip the empty `STATIC_CLIENTS`.
        ensure!(
            no_static(&lim)?,
            "CONFIG_NO_STATIC without exact-address policies"
        );
        let src = v4(10, 0, 0, 5);
        check_eq!(lim.send(src, 6)?, 5);
        lim.apply(&host)?;
        ensure!(
            !no_static(&lim)?,
            "CONFIG_NO_STATIC with an exact-address policy"
        );
        // Now static, with the same window: 5 of 8 used.
        check_eq!(lim.send(src, 5)?, 3);
        let c = lim.client(src).context("no client")?;
        check_eq!(
            (
                c.total_passed(),
                c.dropped_count(),
                c.limit,
                c.flags() & FLAG_STATIC
            ),
            (8, 3, 8, FLAG_STATIC)
        );
        let entries_of = |lim: &Limiter| -> Result<usize> {
            Ok(lim
                .tables
                .clients()?
                .iter()
                .filter(|(k, _)| *k == key_of(src))
                .count())
        };
        check_eq!(entries_of(&lim)?, 1);
        // The programs honour the flag: set while the client is static, its packets miss its
        // entry and make a second one (which is why the agent clears the flag before the
        // first static entry goes in).
        let config = lim.tables.map_config()?;
        lim.tables.config.set(
            0,
            limiter_common::MapConfig {
                flags: config.flags | CONFIG_NO_STATIC,
                ..config
            },
            0,
        )?;
        check_eq!(lim.send(src, 1)?, 1);
        check_eq!(entries_of(&lim)?, 2);
        lim.tables.config.set(0, config, 0)?;
        lim.tables.clients.remove(&key_of(src))?;
        // The policy removed, it is dynamic again under 10.0.0.0/8, count and counters kept.
        lim.apply(base)?;
        ensure!(
            no_static(&lim)?,
            "CONFIG_NO_STATIC once the exact-address policy is gone"
        );
        check_eq!(lim.send(src, 2)?, 0);
        let c = lim.client(src).context("no client")?;
        check_eq!(
            (
                c.total_passed(),
                c.dropped_count(),
                c.limit,
                c.flags() & FLAG_STATIC
            ),
            (8, 5, 5, 0)
        );
        check_eq!(lim.tables.clients()?.len(), 1);
        Ok(())
    })
}

#[test]
fn exact_address_clients_are_static_and_survive_a_flood() -> Result<()> {
    let yaml = "\
default: { limit: 100, window: 1h }
policies:
  - { match: 192.0.2.7, limit: 10, window: 1h }
";
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(256, yaml)?;
        let vip = v4(192, 0, 2, 7);
        let dynamic = v4(198, 51, 100, 1);
        check_eq!(lim.send(vip, 4)?, 4);
        check_eq!(lim.send(dynamic, 1)?, 1);
        let c = lim.client(vip).context("static client")?;
        ensure!(
            c.flags() & FLAG_STATIC != 0,
            "192.0.2.7 is not in STATIC_CLIENTS: {c:?}"
        );
        for src in spoofed(0, 5000) {
            check_eq!(lim.send(src, 1)?, 1, "{src}");
        }
        // Its window state is intact: 4 of 10 used.
        check_eq!(lim.send(vip, 10)?, 6);
        let c = lim.client(vip).context("static client after the flood")?;
        check_eq!(
            (c.total_passed(), c.dropped_count(), c.flags() & FLAG_STATIC),
            (10, 4, FLAG_STATIC)
        );
        ensure!(
            lim.client(dynamic).is_none(),
            "the dynamic client was not evicted"
        );
        let g = lim.global()?;
        check_eq!(g.new_clients, 5001);
        check_eq!(g.map_full, 0);
        let dynamic_entries = lim
            .tables
            .clients()?
            .iter()
            .filter(|(_, c)| c.flags() & FLAG_STATIC == 0)
            .count();
        ensure!(
            dynamic_entries <= 256,
            "{dynamic_entries} dynamic entries in a 256-entry map"
        );
        Ok(())
    })
}

#[test]
fn a_full_map_never_bypasses_limiting() -> Result<()> {
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(64, "default: { limit: 1, window: 1h }\n")?;
        for src in spoofed(0, 2000) {
            let frame = udp_from(src);
            check_eq!(lim.verdicts(&frame, 2)?, vec![XDP_PASS, XDP_DROP], "{src}");
        }
        let g = lim.global()?;
        check_eq!((g.passed, g.dropped), (2000, 2000));
        eprintln!("new_clients {} map_full {}", g.new_clients, g.map_full);
        check_eq!((g.new_clients, g.map_full), (2000, 0));
        Ok(())
    })
}

/// A client over its limit moves into the never-evicted `LIMITED` map on its first dropped
/// packet: a flood of new sources many times `--max-clients` evicts everyone else, but the limited
/// client keeps its window (before `LIMITED`, it came back with a fresh allowance).
#[test]
fn a_limited_client_is_held_through_a_flood_of_new_sources() -> Result<()> {
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(128, "default: { limit: 5, window: 1h }\n")?;
        let limited = v4(198, 51, 100, 1);
        let polite = v4(198, 51, 100, 2);
        check_eq!(lim.send(limited, 10)?, 5);
        check_eq!(lim.send(polite, 3)?, 3);
        ensure!(
            lim.tables.limited.get(&key_of(limited), 0).is_ok(),
            "the limited client is not in LIMITED"
        );
        ensure!(
            lim.tables.clients.get(&key_of(limited), 0).is_err(),
            "the limited client is still in CLIENTS too"
        );
        check_eq!(lim.global()?.limited_moves, 1);
        // 8x --max-clients new sources, each within its limit: none of them moves.
        for src in spoofed(0, 1024) {
            check_eq!(lim.send(src, 2)?, 2, "{src}");
        }
        check_eq!(
            lim.send(limited, 5)?,
            0,
            "the flood reset the limited client"
        );
        check_eq!(lim.client_counts(limited)?, (5, 10));
        // The polite client was evicted (it was within its limit): it starts afresh.
        ensure!(
            lim.client(polite).is_none(),
            "the polite client was not evicted"
        );
        let g = lim.global()?;
        check_eq!((g.limited_moves, g.limited_full), (1, 0));
        check_eq!(g.new_clients, 2 + 1024);
        Ok(())
    })
}

/// A full `LIMITED` refuses the move: the client stays in `CLIENTS` (limited as before, only
/// evictable again), and `limited_full` counts each refused attempt.
#[test]
fn a_full_limited_map_leaves_clients_evictable_and_says_so() -> Result<()> {
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::with_options(
            &LoadOptions {
                pin_dir: None,
                max_clients: 1024,
                max_limited: 2,
                ..LoadOptions::default()
            },
            "default: { limit: 1, window: 1h }\n",
        )?;
        let sources: Vec<IpAddr> = spoofed(0, 4).collect();
        for src in &sources {
            check_eq!(lim.send(*src, 3)?, 1, "{src}");
        }
        let held = sources
            .iter()
            .filter(|s| lim.tables.limited.get(&key_of(**s), 0).is_ok())
            .count();
        let kept = sources
            .iter()
            .filter(|s| lim.tables.clients.get(&key_of(**s), 0).is_ok())
            .count();
        check_eq!((held, kept), (2, 2));
        let g = lim.global()?;
        // The first two moved on their first drop; the other two tried on each of their 2 drops.
        check_eq!((g.limited_moves, g.limited_full), (2, 4));
        check_eq!((g.passed, g.dropped), (4, 8));
        Ok(())
    })
}

/// After `LIMITED` refused a move for being full, the CPU tries none for 10 ms (a refused
/// insert costs a bucket lock and a search of the free lists on every denied packet): the
/// refusal sets this CPU's pause to 10 ms of the coarse clock ahead; a client denied within a
/// pause stays in `CLIENTS` although the map has room again, and moves at its first denial after
/// it. Every denial that did not move counts in `limited_full`. The pause is per CPU, so the test
/// runs on one, and it sets the pause itself (far ahead, then over) rather than race the clock.
#[test]
fn after_a_refused_move_no_move_is_tried_for_a_pause() -> Result<()> {
    limiter_tests::bench::report::pin_to_cpu(0)?;
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::with_options(
            &LoadOptions {
                pin_dir: None,
                max_clients: 1024,
                max_limited: 1,
                ..LoadOptions::default()
            },
            "default: { limit: 1, window: 1h }\n",
        )?;
        let (held, refused) = (v4(198, 51, 100, 1), v4(198, 51, 100, 2));
        check_eq!(lim.send(held, 2)?, 1);
        let coarse = || limiter_user::stats::clock_ns(libc::CLOCK_MONOTONIC_COARSE);
        let before = coarse();
        check_eq!(lim.send(refused, 2)?, 1);
        let after = coarse();
        let g = lim.global()?;
        check_eq!((g.limited_moves, g.limited_full), (1, 1));
        // 10 ms from the program's coarse clock, which is up to two jiffies (20 ms at HZ 100)
        // behind.
        const PAUSE_NS: u64 = 10_000_000;
        let until = pause_until(&mut lim, None)?;
        ensure!(
            until + 20_000_000 >= before + PAUSE_NS && until <= after + PAUSE_NS,
            "the pause ends at {until}, not 10 ms after the refusal ({before}..{after})"
        );
        // Room again, but within the pause: the next denial does not move.
        lim.tables.limited.remove(&key_of(held))?;
        pause_until(&mut lim, Some(u64::MAX))?;
        check_eq!(lim.send(refused, 1)?, 0);
        ensure!(
            lim.tables.limited.get(&key_of(refused), 0).is_err(),
            "moved within the pause"
        );
        let g = lim.global()?;
        check_eq!((g.limited_moves, g.limited_full), (1, 2));
        // The pause over, the first denial moves.
        pause_until(&mut lim, Some(0))?;
        check_eq!(lim.send(refused, 1)?, 0);
        ensure!(
            lim.tables.limited.get(&key_of(refused), 0).is_ok(),
            "not moved after the pause"
        );
        let g = lim.global()?;
        check_eq!((g.limited_moves, g.limited_full), (2, 2));
        Ok(())
    })
}

/// A packet's first lookup follows its CPU's hint (`LOOKUP_HINT`): `LIMITED` first after a
/// packet whose client was there, else `CLIENTS` first. In either order a dynamic, a held and
/// an exact-address client are each found and counted in their own map (no second entry is
/// created for any), and the hint then says whether the last packet's client was in `LIMITED`.
#[test]
fn the_lookup_hint_orders_the_maps_and_every_client_is_found() -> Result<()> {
    let yaml = "default: { limit: 9, window: 1h }\npolicies:\n  - { match: 10.0.0.5, limit: 9, window: 1h }\n  - { match: 198.51.100.0/24, limit: 2, window: 1h }\n";
    // The hint read back is CPU 0's: this thread's runs are on CPU 0.
    pin_to_cpu(0)?;
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, yaml)?;
        let (dynamic, held, exact) = (v4(192, 0, 2, 1), v4(198, 51, 100, 2), v4(10, 0, 0, 5));
        check_eq!(lim.send(held, 3)?, 2, "held over its limit");
        ensure!(
            lim.tables.limited.get(&key_of(held), 0).is_ok(),
            "held in LIMITED"
        );
        // The packet that moved it found it in CLIENTS; the next finds it in LIMITED.
        check_eq!(lookup_hint(&mut lim, None)?, 0);
        check_eq!(lim.send(held, 1)?, 0);
        check_eq!(
            lookup_hint(&mut lim, None)?,
            1,
            "the last packet's client was held"
        );
        check_eq!(lim.send(exact, 1)?, 1);
        check_eq!(
            lookup_hint(&mut lim, None)?,
            0,
            "the last packet's client was not held"
        );
        let count = |map: &aya::maps::HashMap<_, ClientKey, ClientState>, src| {
            map.get(&key_of(src), 0)
                .map(|c| (c.total_passed(), c.dropped_count()))
                .ok()
        };
        for (round, first) in [0u64, 1, 1, 0].into_iter().enumerate() {
            let round = round as u64 + 1;
            // The dynamic client: new in the first round (all three maps miss), then in CLIENTS.
            lookup_hint(&mut lim, Some(first))?;
            check_eq!(lim.send(dynamic, 1)?, 1, "round {round}");
            check_eq!(lookup_hint(&mut lim, None)?, 0);
            lookup_hint(&mut lim, Some(first))?;
            check_eq!(lim.send(held, 1)?, 0, "round {round}");
            check_eq!(lookup_hint(&mut lim, None)?, 1);
            lookup_hint(&mut lim, Some(first))?;
            check_eq!(lim.send(exact, 1)?, 1, "round {round}");
            check_eq!(lookup_hint(&mut lim, None)?, 0);
            check_eq!(
                count(&lim.tables.clients, dynamic),
                Some((round, 0)),
                "round {round}"
            );
            check_eq!(
                count(&lim.tables.limited, held),
                Some((2, 2 + round)),
                "round {round}"
            );
            check_eq!(
                count(&lim.tables.static_clients, exact),
                Some((1 + round, 0))
            );
            for (map, srcs) in [
                (&lim.tables.clients, [held, exact]),
                (&lim.tables.limited, [dynamic, exact]),
                (&lim.tables.static_clients, [dynamic, held]),
            ] {
                for src in srcs {
                    ensure!(
                        count(map, src).is_none(),
                        "round {round}: a second entry of {src}"
                    );
                }
            }
        }
        // A new client with the hint at 1: every map misses (`LIMITED` twice), its entry is
        // created in `CLIENTS`, and the hint goes back to 0.
        let new = v4(192, 0, 2, 9);
        lookup_hint(&mut lim, Some(1))?;
        check_eq!(lim.send(new, 1)?, 1);
        check_eq!(lookup_hint(&mut lim, None)?, 0);
        check_eq!(count(&lim.tables.clients, new), Some((1, 0)));
        check_eq!(count(&lim.tables.limited, new), None);
        // The order is the hint's: with a second, current copy of the held client in `CLIENTS`
        // that would admit (the dynamic client's entry), `LIMITED` first drops the packet and
        // `CLIENTS` first passes it.
        let stray = lim.tables.clients.get(&key_of(dynamic), 0)?;
        lim.tables.clients.insert(key_of(held), stray, 0)?;
        lookup_hint(&mut lim, Some(1))?;
        check_eq!(lim.send(held, 1)?, 0, "LIMITED first");
        lookup_hint(&mut lim, Some(0))?;
        check_eq!(lim.send(held, 1)?, 1, "CLIENTS first");
        lim.tables.clients.remove(&key_of(held))?;
        Ok(())
    })
}

/// CPU 0's lookup hint (the map `LOOKUP_HINT`), set to `set` on every CPU first if given.
fn lookup_hint(lim: &mut Limiter, set: Option<u64>) -> Result<u64> {
    cpu0_value(lim, "LOOKUP_HINT", set)
}

/// CPU 0's end of the pause on moves into `LIMITED` (the map `LIMITED_FULL_UNTIL`), set to
/// `set` on every CPU first if given.
fn pause_until(lim: &mut Limiter, set: Option<u64>) -> Result<u64> {
    cpu0_value(lim, "LIMITED_FULL_UNTIL", set)
}

/// CPU 0's value of the one-entry per-CPU map `name`, set to `set` on every CPU first if given.
fn cpu0_value(lim: &mut Limiter, name: &str, set: Option<u64>) -> Result<u64> {
    let mut map: PerCpuArray<_, u64> = PerCpuArray::try_from(
        lim.ebpf
            .map_mut(name)
            .with_context(|| format!("no map {name}"))?,
    )?;
    if let Some(value) = set {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        map.set(0, PerCpuValues::try_from(vec![value; cpus])?, 0)?;
    }
    Ok(map.get(&0, 0)?[0])
}

/// The agent's sweep deletes a `LIMITED` entry once its window state has aged out; the client's
/// next packet starts it afresh in `CLIENTS`. Entries still in their window stay.
#[test]
fn the_sweep_releases_limited_clients_whose_windows_are_over() -> Result<()> {
    let yaml = "\
default: { limit: 2, window: 10ms }
policies:
  - { match: 10.0.0.0/8, limit: 2, window: 1h }
";
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, yaml)?;
        let short = v4(198, 51, 100, 1);
        let long = v4(10, 0, 0, 1);
        check_eq!(lim.send(long, 3)?, 2);
        check_eq!(lim.send(short, 3)?, 2);
        let mut sweep = lim.tables.limited_sweep()?;
        check_eq!(sweep.sweep(monotonic_ns())?, 0, "nothing is over yet");
        // Two 10 ms windows and the sweep's allowance for the program's clock later.
        std::thread::sleep(std::time::Duration::from_millis(60));
        check_eq!(sweep.sweep(monotonic_ns())?, 1);
        ensure!(lim.tables.limited.get(&key_of(short), 0).is_err());
        // Released back into CLIENTS with its lifetime counters: 2 passed, 1 dropped.
        let released = lim.tables.clients.get(&key_of(short), 0)?;
        check_eq!(released.dropped_count(), 1);
        check_eq!(released.total_passed(), 2);
        ensure!(lim.tables.limited.get(&key_of(long), 0).is_ok());
        check_eq!(lim.send(long, 1)?, 0);
        check_eq!(lim.send(short, 1)?, 1);
        ensure!(lim.tables.clients.get(&key_of(short), 0).is_ok());
        Ok(())
    })
}

fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_setaffinity(0) applies to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity({cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

#[test]
fn concurrent_cpus_lose_no_counts() -> Result<()> {
    const LIMIT: u64 = 150_000;
    const REPEAT: u32 = 200_000;
    ensure!(
        std::thread::available_parallelism()?.get() >= 2,
        "needs two CPUs"
    );
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(
            1024,
            &format!("default: {{ limit: {LIMIT}, window: 1h }}\n"),
        )?;
        let src = v4(192, 0, 2, 77);
        let frame = udp_from(src);
        let barrier = Barrier::new(2);
        let runs: Vec<Result<(u32, u64, u64)>> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..2)
                .map(|cpu| {
                    let (lim, frame, barrier) = (&lim, &frame, &barrier);
                    s.spawn(move || -> Result<(u32, u64, u64)> {
                        pin_to_cpu(cpu)?;
                        barrier.wait();
                        let start = monotonic_ns();
                        let r = lim.program().test_run(TestRunOptions {
                            data_in: Some(frame),
                            repeat: REPEAT,
                            ..Default::default()
                        })?;
                        Ok((r.return_value, start, monotonic_ns()))
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("thread panicked"))
                .collect()
        });
        let runs: Vec<(u32, u64, u64)> = runs.into_iter().collect::<Result<_>>()?;
        let c = lim.client(src).context("no client")?;
        let per_cpu = lim.tables.stats.get(&0, 0)?;
        let per_cpu: Vec<(u64, u64, u64)> = per_cpu
            .iter()
            .map(|s| (s.passed, s.dropped, s.contended))
            .collect();
        eprintln!(
            "runs (retval, start, end): {runs:?}; per CPU (passed, dropped, contended): {per_cpu:?}"
        );
        let g = lim.global()?;
        eprintln!(
            "CLIENTS {:?} LIMITED {:?} global {g:?}",
            lim.tables.clients.get(&key_of(src), 0),
            lim.tables.limited.get(&key_of(src), 0)
        );
        check_eq!(
            c.total_passed() + c.dropped_count(),
            2 * REPEAT as u64,
            "client {c:?}"
        );
        check_eq!(
            c.total_passed(),
            LIMIT,
            "client {c:?}, contended {}",
            g.contended
        );
        check_eq!((g.passed, g.dropped), (LIMIT, 2 * REPEAT as u64 - LIMIT));
        check_eq!(g.new_clients, 1);
        // Had the runs not overlapped, the first would have taken all 150000 and the second none.
        ensure!(
            per_cpu.iter().filter(|c| c.0 > 0).count() >= 2,
            "the two runs did not overlap, so nothing concurrent was tested: {per_cpu:?}"
        );
        Ok(())
    })
}

/// The lifetime counters share their words with the policy metadata (map layout 4): a counter
/// passing 2^48 wraps to 0 without carrying into the generation tag, the policy id or the flags.
#[test]
fn counters_wrap_at_48_bits_and_leave_the_metadata_alone() -> Result<()> {
    let yaml = "default: { limit: 3, window: 1h }\npolicies:\n  - { match: 10.0.0.0/8, limit: 2, window: 1h }\n  - { match: 203.0.113.0/24, action: pass }\n";
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(64, yaml)?;
        let (limited, allowed) = (v4(10, 1, 1, 1), v4(203, 0, 113, 1));
        check_eq!(lim.send(limited, 1)?, 1);
        check_eq!(lim.send(allowed, 1)?, 1);
        let generation = lim.tables.map_config()?.generation;
        let near = (1u64 << 48) - 2;
        let mut state = lim.client(limited).context("no entry")?;
        state.set_dropped_count(near);
        state.set_flags(FLAG_REPORTED);
        lim.tables.clients.insert(key_of(limited), state, 0)?;
        let mut state = lim.client(allowed).context("no entry")?;
        state.set_passed_count(near);
        lim.tables.clients.insert(key_of(allowed), state, 0)?;

        // 1 more passes, 4 are dropped: 2^48 - 2 + 4 wraps to 2.
        check_eq!(lim.send(limited, 5)?, 1);
        check_eq!(lim.send(allowed, 5)?, 5);
        let c = lim.client(limited).context("no entry")?;
        check_eq!(
            (c.dropped_count(), c.total_passed(), c.policy(), c.flags()),
            (2, 2, 1, FLAG_REPORTED)
        );
        ensure!(c.is_current(generation), "{c:?}");
        let c = lim.client(allowed).context("no entry")?;
        check_eq!(
            (
                c.total_passed(),
                c.dropped_count(),
                c.policy(),
                c.flags(),
                c.action()
            ),
            (3, 0, 2, 0, ACTION_PASS)
        );
        ensure!(c.is_current(generation), "{c:?}");
        Ok(())
    })
}
