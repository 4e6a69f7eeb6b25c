//! Frames: every encapsulation the parser takes gets exactly the limit; truncated, malformed
//! and non-IP frames pass and are counted.

use super::*;

#[test]
fn every_encapsulation_gets_exactly_the_limit() -> Result<()> {
    const N: usize = 12;
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, "default: { limit: 5, window: 1h }\n")?;
        let nops = [1u8; 39];
        // Each IPv6 case in a /64 of its own: IPv6 sources share one client per /64.
        let cases: Vec<(&str, IpAddr, Builder)> = vec![
            (
                "IPv4",
                v4(198, 51, 100, 1),
                builder_from(v4(198, 51, 100, 1)),
            ),
            ("IPv6", v6("2001:db8::1"), builder_from(v6("2001:db8::1"))),
            (
                "802.1Q IPv4",
                v4(198, 51, 100, 2),
                builder_from(v4(198, 51, 100, 2)).vlan(TPID_8021Q, 10),
            ),
            (
                "802.1Q IPv6",
                v6("2001:db8:2::2"),
                builder_from(v6("2001:db8:2::2")).vlan(TPID_8021Q, 10),
            ),
            (
                "802.1ad IPv4",
                v4(198, 51, 100, 3),
                builder_from(v4(198, 51, 100, 3)).vlan(TPID_8021AD, 10),
            ),
            (
                "QinQ IPv4",
                v4(198, 51, 100, 4),
                builder_from(v4(198, 51, 100, 4)).qinq(10, 20),
            ),
            (
                "QinQ IPv6",
                v6("2001:db8:4::4"),
                builder_from(v6("2001:db8:4::4")).qinq(10, 20),
            ),
            (
                "IPv4 router alert option",
                v4(198, 51, 100, 5),
                builder_from(v4(198, 51, 100, 5)).ipv4_options(&[0x94, 0x04, 0, 0]),
            ),
            (
                "IPv4 40 bytes of options, QinQ",
                v4(198, 51, 100, 6),
                builder_from(v4(198, 51, 100, 6))
                    .ipv4_options(&nops)
                    .qinq(1, 2),
            ),
        ];
        for (name, src, builder) in &cases {
            let verdicts = lim.verdicts(&builder.build().bytes, N)?;
            expect_limit(&verdicts, 5).with_context(|| name.to_string())?;
            check_eq!(lim.client_counts(*src)?, (5, N as u64 - 5), "{name}");
        }
        let k = cases.len() as u64;
        let g = lim.global()?;
        check_eq!(g.passed, 5 * k);
        check_eq!(g.dropped, (N as u64 - 5) * k);
        check_eq!(g.new_clients, k);
        check_eq!(g.resolves, k);
        check_eq!(
            (g.malformed, g.non_ip, g.map_full, g.contended),
            (0, 0, 0, 0)
        );
        check_eq!(lim.tables.clients()?.len() as u64, k);
        Ok(())
    })
}

#[test]
fn truncated_and_malformed_frames_pass_and_are_counted() -> Result<()> {
    let lim = Limiter::new(1024, "default: { limit: 1000000, window: 1h }\n")?;
    let src = v4(198, 51, 100, 7);
    let src6 = v6("2001:db8::7");
    let bases = [
        ("IPv4", builder_from(src).build()),
        (
            "IPv4 + options",
            builder_from(src)
                .ipv4_options(&[0x94, 0x04, 0, 0, 1, 1, 1, 0])
                .build(),
        ),
        ("IPv6", builder_from(src6).build()),
        ("802.1Q IPv4", builder_from(src).vlan(TPID_8021Q, 7).build()),
        (
            "QinQ IPv4 + options",
            builder_from(src)
                .qinq(7, 8)
                .ipv4_options(&[1, 1, 1, 1])
                .build(),
        ),
        ("QinQ IPv6", builder_from(src6).qinq(7, 8).build()),
    ];
    let mut malformed = 0u64;
    let mut run_malformed = |what: &str, frame: &[u8]| -> Result<()> {
        check_eq!(lim.run(frame)?, XDP_PASS, "{what}");
        malformed += 1;
        let g = lim.global()?;
        check_eq!(g.malformed, malformed, "{what}");
        check_eq!(
            (g.passed, g.dropped, g.non_ip, g.new_clients, g.resolves),
            (0, 0, 0, 0, 0),
            "{what}"
        );
        Ok(())
    };
    let mut udp_cuts = Vec::new();
    for (name, frame) in &bases {
        // Cuts inside the Ethernet header (shorter than 14 bytes) cannot be run: see `run`.
        for cut in frame
            .truncations()
            .into_iter()
            .filter(|c| c.len >= ETH_HLEN)
        {
            if cut.header.parsed() {
                let what = format!(
                    "{name} cut at {} ({:?}, boundary: {})",
                    cut.len, cut.header, cut.at_boundary
                );
                run_malformed(&what, frame.truncated(cut.len))?;
            } else {
                udp_cuts.push((name, frame.truncated(cut.len).to_vec(), cut));
            }
        }
    }
    for ihl in 0..5 {
        run_malformed(
            &format!("IHL {ihl}"),
            &builder_from(src).ihl(ihl).build().bytes,
        )?;
    }
    // IHL 15 claims 40 bytes of options that the frame (20-byte header, 8 UDP, no payload) lacks.
    run_malformed(
        "IHL 15 beyond the frame",
        &builder_from(src).payload(b"").ihl(15).build().bytes,
    )?;
    for version in [0, 6, 15] {
        run_malformed(
            &format!("IPv4 version {version}"),
            &builder_from(src).version(version).build().bytes,
        )?;
    }
    for version in [0, 4, 15] {
        run_malformed(
            &format!("IPv6 version {version}"),
            &builder_from(src6).version(version).build().bytes,
        )?;
    }
    for total in [0, 19] {
        run_malformed(
            &format!("total length {total}"),
            &builder_from(src).total_len(total).build().bytes,
        )?;
    }
    let with_options = builder_from(src).ipv4_options(&[1, 1, 1, 1]);
    run_malformed(
        "total length 20 < IHL 6 * 4",
        &with_options.clone().total_len(20).build().bytes,
    )?;
    run_malformed(
        "total length 23 < IHL 6 * 4",
        &with_options.total_len(23).build().bytes,
    )?;
    ensure!(
        lim.tables.clients()?.is_empty(),
        "malformed frames created clients: {:?}",
        lim.tables.clients()?
    );

    // Cuts inside UDP or the payload leave a whole IP header: limited like any packet.
    for (i, (name, bytes, cut)) in udp_cuts.iter().enumerate() {
        check_eq!(
            lim.run(bytes)?,
            XDP_PASS,
            "{name} cut at {} ({:?})",
            cut.len,
            cut.header
        );
        check_eq!(lim.global()?.passed, i as u64 + 1);
    }
    check_eq!(lim.global()?.malformed, malformed);
    check_eq!(
        lim.client_counts(src)?.0 + lim.client_counts(src6)?.0,
        udp_cuts.len() as u64
    );
    Ok(())
}

#[test]
fn non_ip_frames_pass_and_are_counted() -> Result<()> {
    let lim = Limiter::new(1024, "default: { limit: 0, window: 1h }\n")?;
    let arp = Builder::arp(
        Ipv4Addr::new(198, 51, 100, 8),
        Ipv4Addr::new(198, 51, 100, 9),
    );
    let src = v4(198, 51, 100, 8);
    let frames = [
        ("ARP", arp.build()),
        ("802.1Q ARP", arp.clone().vlan(TPID_8021Q, 3).build()),
        ("QinQ ARP", arp.qinq(3, 4).build()),
        (
            "three tags, IPv4",
            builder_from(src).qinq(3, 4).vlan(TPID_8021Q, 5).build(),
        ),
        (
            "three tags, IPv6",
            builder_from(v6("2001:db8::8"))
                .vlan(TPID_8021Q, 3)
                .qinq(4, 5)
                .build(),
        ),
    ];
    for (i, (name, frame)) in frames.iter().enumerate() {
        check_eq!(lim.run(&frame.bytes)?, XDP_PASS, "{name}");
        let g = lim.global()?;
        check_eq!(g.non_ip, i as u64 + 1, "{name}");
        check_eq!(
            (g.passed, g.dropped, g.malformed, g.new_clients),
            (0, 0, 0, 0),
            "{name}"
        );
    }
    ensure!(lim.tables.clients()?.is_empty());
    // The limit of 0 does apply to IP.
    check_eq!(lim.run(&udp_from(src))?, XDP_DROP);
    Ok(())
}
