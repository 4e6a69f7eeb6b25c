//! The gRPC API in process: every RPC and every validation error, against the real kernel maps
//! and check program (private, unpinned copies; needs root), over the Unix socket and over TCP.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions; a panic there is the test failing"
)]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions, Xdp},
};
use limiter_tests::{
    fixture::{ExactWindow, TempDir},
    frames::Builder,
    require_root,
};
use limiter_user::{
    api::{self, ApiOptions, ApiState, TlsFiles},
    check::Checker,
    cli::client::{self, Clients, Target},
    config::{
        Config, Match,
        overlay::{Overlay, merge},
    },
    datapath::{self, LoadOptions, Tables},
    limits::{Loaded, PolicyStore},
    metrics::Counters,
    proto,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::Code;

const CONFIG: &str = "\
# The API test config. This comment must survive every edit.
mode: enforce
default: { limit: 3, window: 1h }   # default for everyone
policies:
  # a prefix
  - match: 10.0.0.0/8
    limit: 5
    window: 1h
  - match: 192.0.2.7
    action: pass
  - match: 198.51.100.0/24
    action: drop
  # an exact ID
  - match: tenant-gold
    limit: 10
    window: 1h
";

const TOKEN: &str = "correct-horse-battery-staple";

struct Fixture {
    /// The config's windows are an hour long and aligned to CLOCK_MONOTONIC; the counts these
    /// tests expect are those of one window, which hold while no hour boundary passes during a
    /// test (one passed once with the 1 min windows they had: 11 of 10 were admitted across it,
    /// from a rounding since fixed in `window`; across a boundary the sliding window itself
    /// admits more than a fresh window's count).
    exact: ExactWindow,
    dir: TempDir,
    config: PathBuf,
    /// The policy overlay (API changes), under the fixture's directory as a state dir.
    overlay: PathBuf,
    limits: Arc<PolicyStore>,
    counters: Arc<Counters>,
    ebpf: Ebpf,
    stop: tokio::sync::watch::Sender<bool>,
    served: api::Served,
    socket: PathBuf,
}

impl Fixture {
    async fn new(tcp: bool) -> Result<Fixture> {
        Fixture::build(tcp.then(|| Some(TOKEN.to_string())), None, 4096).await
    }

    async fn with_ids(tcp: bool, max_ids: u32) -> Result<Fixture> {
        Fixture::build(tcp.then(|| Some(TOKEN.to_string())), None, max_ids).await
    }

    /// `tcp`: serve TCP too, with this token (or none, then `tls` must be set).
    async fn build(
        tcp: Option<Option<String>>,
        tls: Option<(TempDir, TlsFiles)>,
        max_ids: u32,
    ) -> Result<Fixture> {
        let exact = ExactWindow::start(Duration::from_secs(60));
        let dir = TempDir::new("api")?;
        let config = PathBuf::from(dir.write("limiter.yaml", CONFIG)?);
        let mut ebpf = datapath::load(&LoadOptions {
            pin_dir: None,
            max_clients: 4096,
            max_ids,
            ..LoadOptions::default()
        })
        .context("loading the object (needs root)")?;
        let mut tables = Tables::take(&mut ebpf)?;
        let overlay = dir.join("test0.overlay.yaml");
        let loaded = Loaded::load(CONFIG, &overlay)?;
        let parsed = loaded.effective.config.clone();
        tables.apply(&parsed)?;
        let check_program = datapath::load_check_program(&mut ebpf)?;
        let program: &mut Xdp = ebpf
            .program_mut(datapath::PROGRAM)
            .context("no limiter program")?
            .try_into()?;
        program.load()?;
        let counters = Arc::new(Counters::default());
        let checker = Arc::new(Checker::new(check_program, &parsed));
        let limits = Arc::new(PolicyStore::new(
            tables,
            config.clone(),
            loaded,
            limiter_user::cluster::membership::ShareView::ALONE,
            Vec::new(),
            checker.clone(),
            counters.clone(),
        ));
        let socket = dir.join("api.sock");
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let opts = ApiOptions {
            socket: socket.clone(),
            listen: tcp.is_some().then(|| "127.0.0.1:0".parse().unwrap()),
            token: tcp.flatten(),
            tls: tls.map(|(_, files)| files),
            max_batch: 100,
            connections: api::ConnectionLimits::default(),
            access: api::AccessOptions::default(),
        };
        let listeners = api::bind(&opts).await?;
        let served = api::serve(
            ApiState {
                iface: "test0".into(),
                checker,
                limits: limits.clone(),
                counters: counters.clone(),
                max_batch: 100,
                walks: Default::default(),
                cluster: tokio::sync::watch::channel(None).1,
                cluster_error: tokio::sync::watch::channel(None).1,
            },
            opts,
            listeners,
            stop_rx,
        )
        .await?;
        Ok(Fixture {
            exact,
            dir,
            config,
            overlay,
            limits,
            counters,
            ebpf,
            stop,
            served,
            socket,
        })
    }

    async fn client(&self) -> Result<Clients> {
        client::connect(&Target {
            api: Some(self.socket.to_string_lossy().into_owned()),
            ..Target::default()
        })
        .await
    }

    /// Runs the attached-path program on one UDP packet from `src`; true if it passed.
    fn packet(&self, src: impl Into<IpAddr>) -> Result<bool> {
        let program: &Xdp = self
            .ebpf
            .program(datapath::PROGRAM)
            .context("no limiter program")?
            .try_into()?;
        let frame = match src.into() {
            IpAddr::V4(src) => Builder::ipv4(src, Ipv4Addr::new(192, 0, 2, 1)),
            IpAddr::V6(src) => Builder::ipv6(src, "2001:db8::fe".parse()?),
        }
        .build()
        .bytes;
        let r = program.test_run(TestRunOptions {
            data_in: Some(&frame),
            ..Default::default()
        })?;
        Ok(r.return_value == 2)
    }

    async fn shutdown(self) -> Result<()> {
        self.stop.send(true)?;
        for task in self.served.tasks {
            tokio::time::timeout(Duration::from_secs(10), task).await??;
        }
        ensure!(!self.socket.exists(), "the socket is removed at shutdown");
        self.exact.check();
        Ok(())
    }
}

fn check(id: &str, hits: Option<u32>) -> proto::CheckRequest {
    proto::CheckRequest {
        client_id: id.into(),
        hits,
    }
}

fn secs(d: &Option<prost_types::Duration>) -> f64 {
    d.as_ref()
        .map_or(-1.0, |d| d.seconds as f64 + d.nanos as f64 / 1e9)
}

async fn expect_code<T: std::fmt::Debug>(
    r: std::result::Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    needle: &str,
) -> Result<()> {
    match r {
        Ok(v) => anyhow::bail!("expected {code:?} ({needle}), got {v:?}"),
        Err(s) => {
            ensure!(
                s.code() == code,
                "expected {code:?}, got {:?}: {}",
                s.code(),
                s.message()
            );
            ensure!(
                s.message().contains(needle),
                "message {:?} should name {needle:?}",
                s.message()
            );
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_decides_addresses_and_ids_exactly() -> Result<()> {
    require_root!();
    let f = Fixture::new(false).await?;
    let mut c = f.client().await?.rate_limiter;

    // A prefix policy: 5 per minute; then denied with a retry time inside the next window.
    for i in 0..5 {
        let r = c.check(check("10.1.2.3", None)).await?.into_inner();
        ensure!(r.allowed, "hit {i} allowed");
        ensure!(
            r.remaining == 4 - i,
            "remaining after hit {i}: {}",
            r.remaining
        );
        ensure!(r.limit == 5 && r.policy == "10.0.0.0/8" && secs(&r.window) == 3600.0);
    }
    let r = c.check(check("10.1.2.3", None)).await?.into_inner();
    ensure!(!r.allowed && r.remaining == 0);
    let retry = secs(&r.retry_after);
    ensure!(retry > 0.0 && retry <= 7200.0, "retry_after {retry}");
    ensure!(
        secs(&r.reset_after) >= retry,
        "reset_after {}",
        secs(&r.reset_after)
    );
    // hits = 0 reads without spending; more hits than the limit can never be admitted.
    let r = c.check(check("10.1.2.4", Some(0))).await?.into_inner();
    ensure!(r.allowed && r.remaining == 5);
    let r = c.check(check("10.1.2.4", Some(6))).await?.into_inner();
    ensure!(!r.allowed && r.retry_after.is_none(), "{r:?}");
    let r = c.check(check("10.1.2.4", Some(5))).await?.into_inner();
    ensure!(r.allowed && r.remaining == 0);

    // IDs: the default (3) unless an exact-ID policy names them; each ID is its own client.
    for id in ["tenant-a", "tenant-b"] {
        let allowed = count_allowed(&mut c, id, 5).await?;
        ensure!(
            allowed == 3,
            "{id}: {allowed} allowed under the default of 3"
        );
    }
    let allowed = count_allowed(&mut c, "tenant-gold", 15).await?;
    ensure!(allowed == 10, "tenant-gold: {allowed} of its 10");
    let r = c.check(check("tenant-gold", Some(0))).await?.into_inner();
    ensure!(r.policy == "tenant-gold" && r.limit == 10 && !r.allowed);

    // Allow and block lists.
    let r = c
        .check(check("192.0.2.7", Some(1_000_000)))
        .await?
        .into_inner();
    ensure!(r.allowed && r.limit == u32::MAX && r.action == proto::Action::Pass as i32);
    let r = c.check(check("198.51.100.9", None)).await?.into_inner();
    ensure!(!r.allowed && r.retry_after.is_none() && r.action == proto::Action::Drop as i32);
    // IPv6 and the IPv4-mapped form of an IPv4 client (the same client).
    ensure!(count_allowed(&mut c, "2001:db8::1", 4).await? == 3);
    let r = c
        .check(check("::ffff:10.1.2.4", Some(0)))
        .await?
        .into_inner();
    ensure!(
        r.remaining == 0,
        "the mapped form is the same client: {r:?}"
    );

    ensure!(f.counters.checks_allowed.get() >= 20);
    ensure!(f.counters.checks_denied.get() >= 10);
    f.shutdown().await
}

async fn count_allowed(
    c: &mut proto::rate_limiter_client::RateLimiterClient<client::Authed>,
    id: &str,
    n: usize,
) -> Result<usize> {
    let mut allowed = 0;
    for _ in 0..n {
        allowed += c.check(check(id, None)).await?.into_inner().allowed as usize;
    }
    Ok(allowed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_and_checks_share_one_budget() -> Result<()> {
    require_root!();
    let f = Fixture::new(false).await?;
    let mut c = f.client().await?.rate_limiter;
    let src = Ipv4Addr::new(10, 9, 9, 9);
    // Two packets, then the API sees three left and spends them; the next packet is dropped.
    ensure!(f.packet(src)? && f.packet(src)?);
    let r = c.check(check("10.9.9.9", Some(0))).await?.into_inner();
    ensure!(r.remaining == 3, "after 2 packets: {r:?}");
    let r = c.check(check("10.9.9.9", Some(3))).await?.into_inner();
    ensure!(r.allowed && r.remaining == 0);
    ensure!(
        !f.packet(src)?,
        "the packet path sees the budget the API spent"
    );
    // The other way round: a fresh client spends its budget on the wire; Check is denied.
    let src = Ipv4Addr::new(10, 9, 9, 10);
    for _ in 0..5 {
        ensure!(f.packet(src)?);
    }
    ensure!(
        !c.check(check("10.9.9.10", None))
            .await?
            .into_inner()
            .allowed
    );
    f.shutdown().await
}

/// An IPv6 address is counted in its /64 (the default): a check on one address of a /64 spends
/// the budget that packets from another address of it spent, and the answer names the budget's
/// limit; a check on another /64 is another client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_check_shares_its_64s_budget_with_packets() -> Result<()> {
    require_root!();
    let f = Fixture::new(false).await?;
    let mut c = f.client().await?.rate_limiter;
    let src: Ipv6Addr = "2001:db8:7:7::1".parse()?;
    ensure!(f.packet(src)? && f.packet(src)?);
    let r = c
        .check(check("2001:db8:7:7::abcd", Some(0)))
        .await?
        .into_inner();
    ensure!(
        r.remaining == 1 && r.limit == 3,
        "after 2 packets of the /64: {r:?}"
    );
    ensure!(
        c.check(check("2001:db8:7:7:ffff::9", None))
            .await?
            .into_inner()
            .allowed
    );
    ensure!(
        !f.packet("2001:db8:7:7::2".parse::<Ipv6Addr>()?)?,
        "the packet path sees the budget the API spent"
    );
    ensure!(
        !c.check(check("2001:db8:7:7::3", None))
            .await?
            .into_inner()
            .allowed
    );
    ensure!(
        c.check(check("2001:db8:7:8::3", None))
            .await?
            .into_inner()
            .allowed
    );
    // Multicast is no client.
    expect_code(
        c.check(check("ff02::1", None)).await,
        Code::InvalidArgument,
        "multicast",
    )
    .await?;
    f.shutdown().await
}

/// A check denied by an address's window does not move its entry into `LIMITED` (a check-role
/// caller could otherwise fill that never-evicted map by spending clients out itself, without a
/// packet); the client's next dropped packet does. Batches of more checks than one program run
/// holds (`CHECK_BATCH`) are decided in order across runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_check_leaves_the_holding_to_packets() -> Result<()> {
    require_root!();
    let f = Fixture::new(false).await?;
    let mut c = f.client().await?;
    let moves = async |c: &mut Clients| -> Result<u64> {
        Ok(c.stats
            .global(proto::GlobalStatsRequest {})
            .await?
            .into_inner()
            .limited_moves)
    };
    let before = moves(&mut c).await?;
    // 10.0.0.0/8 allows 5 a minute: one batch of 2 * CHECK_BATCH + 1 checks of one address.
    let n = 2 * limiter_common::maps::CHECK_BATCH + 1;
    let batch = proto::CheckBatchRequest {
        checks: (0..n).map(|_| check("10.9.9.11", None)).collect(),
    };
    let results = c
        .rate_limiter
        .check_batch(batch)
        .await?
        .into_inner()
        .results;
    let allowed: Vec<bool> = results.iter().map(|r| r.allowed).collect();
    let mut expected = vec![true; 5];
    expected.resize(n, false);
    ensure!(allowed == expected, "{allowed:?}");
    ensure!(
        moves(&mut c).await? == before,
        "a denied check moved the client"
    );
    ensure!(
        !f.packet(Ipv4Addr::new(10, 9, 9, 11))?,
        "spent for packets too"
    );
    ensure!(
        moves(&mut c).await? == before + 1,
        "the dropped packet moved it"
    );
    f.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_batch_decides_in_order_and_validates_first() -> Result<()> {
    require_root!();
    let f = Fixture::new(false).await?;
    let mut c = f.client().await?.rate_limiter;
    let batch: Vec<_> = (0..5).map(|_| check("tenant-batch", None)).collect();
    let r = c
        .check_batch(proto::CheckBatchRequest { checks: batch })
        .await?
        .into_inner();
    let allowed: Vec<bool> = r.results.iter().map(|r| r.allowed).collect();
    ensure!(allowed == [true, true, true, false, false], "{allowed:?}");

    // One bad check rejects the whole batch, naming it, and spends nothing.
    let batch = vec![check("tenant-x", None), check("10.0.0.0/8", None)];
    expect_code(
        c.check_batch(proto::CheckBatchRequest { checks: batch })
            .await,
        Code::InvalidArgument,
        "checks[1].client_id",
    )
    .await?;
    let r = c.check(check("tenant-x", Some(0))).await?.into_inner();
    ensure!(r.remaining == 3, "nothing was spent: {r:?}");
    // Over the configured batch size.
    let batch: Vec<_> = (0..101).map(|_| check("tenant-y", None)).collect();
    expect_code(
        c.check_batch(proto::CheckBatchRequest { checks: batch })
            .await,
        Code::InvalidArgument,
        "at most 100",
    )
    .await?;
    f.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_rejected_naming_the_field() -> Result<()> {
    require_root!();
    let f = Fixture::new(false).await?;
    let clients = f.client().await?;
    let (mut rl, mut lim) = (clients.rate_limiter, clients.limits);
    for (id, needle) in [
        ("", "empty"),
        (&"x".repeat(257) as &str, "at most 256"),
        ("tab\there", "control"),
        ("10.0.0.0/8", "neither one IP address"),
        ("10.0.0.300", "neither one IP address"),
        ("default", "default"),
    ] {
        expect_code(
            rl.check(check(id, None)).await,
            Code::InvalidArgument,
            needle,
        )
        .await?;
        ensure!(
            rl.check(check(id, None))
                .await
                .unwrap_err()
                .message()
                .starts_with("client_id"),
            "the message names client_id"
        );
    }
    let before = std::fs::read_to_string(&f.config)?;
    let policy = |m: &str, limit: Option<u32>, window: Option<u64>, action: proto::Action| {
        proto::SetLimitRequest {
            policy: Some(proto::Policy {
                r#match: m.into(),
                limit,
                window: window.map(|ms| prost_types::Duration {
                    seconds: (ms / 1000) as i64,
                    nanos: (ms % 1000) as i32 * 1_000_000,
                }),
                action: action as i32,
                scope: proto::Scope::Unspecified as i32,
            }),
        }
    };
    use proto::Action::*;
    for (req, needle) in [
        (
            policy("10.0.0.0/33", Some(1), Some(1000), Limit),
            "policy.match",
        ),
        (
            policy("10.0.0.1/8", Some(1), Some(1000), Limit),
            "policy.match",
        ),
        (policy("", Some(1), Some(1000), Limit), "policy.match"),
        (
            policy("10.0.0.0/24", None, Some(1000), Limit),
            "policy.limit",
        ),
        (policy("10.0.0.0/24", Some(1), None, Limit), "policy.window"),
        (
            policy("10.0.0.0/24", Some(1), Some(5), Limit),
            "policy.window",
        ),
        (
            policy("10.0.0.0/24", Some(1), Some(7_200_000), Limit),
            "policy.window",
        ),
        (policy("10.0.0.0/24", Some(1), None, Pass), "policy.limit"),
        (
            policy("10.0.0.0/24", None, Some(1000), Drop),
            "policy.window",
        ),
        (proto::SetLimitRequest { policy: None }, "policy: required"),
    ] {
        expect_code(lim.set(req).await, Code::InvalidArgument, needle).await?;
    }
    let mut bad_action = policy("10.0.0.0/24", Some(1), Some(1000), Limit);
    bad_action.policy.as_mut().unwrap().action = 42;
    expect_code(
        lim.set(bad_action).await,
        Code::InvalidArgument,
        "policy.action",
    )
    .await?;
    // A scope comes from the config file: asking another than the policy's (every policy is
    // local outside a cluster) is refused, an unknown one too; the policy's own is accepted.
    for (scope, needle) in [
        (
            proto::Scope::Global as i32,
            "policy.scope: the policy for 10.0.0.0/24 is local",
        ),
        (7, "policy.scope: unknown scope 7"),
    ] {
        let mut req = policy("10.0.0.0/24", Some(1), Some(1000), Limit);
        req.policy.as_mut().unwrap().scope = scope;
        expect_code(lim.set(req).await, Code::InvalidArgument, needle).await?;
    }
    expect_code(
        lim.get(proto::GetLimitRequest {
            r#match: "10.11.0.0/16".into(),
        })
        .await,
        Code::NotFound,
        "10.11.0.0/16",
    )
    .await?;
    expect_code(
        lim.delete(proto::DeleteLimitRequest {
            r#match: "default".into(),
        })
        .await,
        Code::FailedPrecondition,
        "default",
    )
    .await?;
    expect_code(
        lim.delete(proto::DeleteLimitRequest {
            r#match: "tenant-none".into(),
        })
        .await,
        Code::NotFound,
        "tenant-none",
    )
    .await?;
    ensure!(
        std::fs::read_to_string(&f.config)? == before && !f.overlay.exists(),
        "nothing was written"
    );
    ensure!(
        f.limits.config() == Config::parse(CONFIG)?,
        "nothing changed"
    );
    f.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_changes_apply_at_once_persist_and_stream() -> Result<()> {
    require_root!();
    let f = Fixture::new(false).await?;
    let clients = f.client().await?;
    let (mut rl, mut lim) = (clients.rate_limiter, clients.limits);
    let mut watch = lim
        .watch(proto::WatchLimitsRequest { initial: true })
        .await?
        .into_inner();
    // The initial listing: the default and the four policies.
    for expected in [
        "default",
        "10.0.0.0/8",
        "192.0.2.7",
        "198.51.100.0/24",
        "tenant-gold",
    ] {
        let c = watch.message().await?.context("stream ended")?;
        ensure!(c.policy.as_ref().unwrap().r#match == expected, "{c:?}");
    }

    // Spend 2 of 10.0.0.0/8's 5, then lower the prefix's limit to 3 (same window: counts kept).
    for _ in 0..2 {
        ensure!(
            rl.check(check("10.5.5.5", None))
                .await?
                .into_inner()
                .allowed
        );
    }
    let set = proto::SetLimitRequest {
        policy: Some(proto::Policy {
            r#match: "10.0.0.0/8".into(),
            limit: Some(3),
            window: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            action: 0,
            // The policy's own scope may be said.
            scope: proto::Scope::Local as i32,
        }),
    };
    let change = lim.set(set).await?.into_inner();
    ensure!(change.kind == proto::limit_change::Kind::Set as i32 && change.source == "api");
    let r = rl.check(check("10.5.5.5", Some(0))).await?.into_inner();
    ensure!(
        r.limit == 3 && r.remaining == 1,
        "applied at once, counters kept: {r:?}"
    );
    let streamed = watch.message().await?.context("stream ended")?;
    ensure!(streamed.policy.unwrap().limit == Some(3) && streamed.source == "api");

    // A new ID policy and a new default. Hour-long windows: the exact counts below must not
    // depend on a window boundary falling between the checks, as 1 s and 2 s ones did when the
    // checks ran slowly (the TCG VM).
    let new_id = proto::SetLimitRequest {
        policy: Some(proto::Policy {
            r#match: "tenant-new".into(),
            limit: Some(1),
            window: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            action: 0,
            scope: proto::Scope::Unspecified as i32,
        }),
    };
    lim.set(new_id).await?;
    let new_default = proto::SetLimitRequest {
        policy: Some(proto::Policy {
            r#match: "default".into(),
            limit: Some(7),
            window: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            action: 0,
            scope: proto::Scope::Unspecified as i32,
        }),
    };
    lim.set(new_default).await?;
    ensure!(count_allowed(&mut rl, "tenant-new", 3).await? == 1);
    ensure!(count_allowed(&mut rl, "tenant-other", 9).await? == 7);
    lim.delete(proto::DeleteLimitRequest {
        r#match: "198.51.100.0/24".into(),
    })
    .await?;
    let r = rl.check(check("198.51.100.9", None)).await?.into_inner();
    ensure!(
        r.allowed && r.policy == "default",
        "the block is gone: {r:?}"
    );

    // The config file is never written; the changes are in the overlay, which merged over the
    // file is what is in force.
    ensure!(
        std::fs::read_to_string(&f.config)? == CONFIG,
        "the file is untouched"
    );
    let overlay = Overlay::load(&f.overlay)?;
    ensure!(overlay.removed == ["198.51.100.0/24".parse::<Match>().unwrap()]);
    let effective = merge(CONFIG, &overlay)?;
    ensure!(
        effective.config == f.limits.config(),
        "overlay and maps agree"
    );
    let order: Vec<String> = effective
        .config
        .policies
        .iter()
        .map(|(m, _)| m.to_string())
        .collect();
    ensure!(
        order == ["10.0.0.0/8", "192.0.2.7", "tenant-gold", "tenant-new"],
        "{order:?}"
    );
    let layers = lim
        .list(proto::ListLimitsRequest {})
        .await?
        .into_inner()
        .layers;
    ensure!(
        layers
            == [
                "overlay (overrides file)",
                "overlay (overrides file)",
                "file",
                "file",
                "overlay"
            ],
        "{layers:?}"
    );
    let yaml = lim
        .effective(proto::EffectiveConfigRequest {})
        .await?
        .into_inner()
        .yaml;
    ensure!(Config::parse(&yaml)? == f.limits.config(), "{yaml}");
    let list = lim
        .list(proto::ListLimitsRequest {})
        .await?
        .into_inner()
        .policies;
    ensure!(list.len() == 5 && list[0].r#match == "default" && list[0].limit == Some(7));
    // Outside a cluster every policy is local, and List and Get say so.
    ensure!(
        list.iter().all(|p| p.scope == proto::Scope::Local as i32),
        "{list:?}"
    );
    let got = lim
        .get(proto::GetLimitRequest {
            r#match: "tenant-new".into(),
        })
        .await?
        .into_inner();
    ensure!(got.limit == Some(1) && secs(&got.window) == 3600.0);
    ensure!(got.scope == proto::Scope::Local as i32, "{got:?}");

    for _ in 0..3 {
        // (set, set, delete) were streamed
        watch.message().await?.context("stream ended")?;
    }
    // An unchanged file is not re-applied...
    let reloads = f.counters.config_reloads.get();
    f.limits.reload_file(false);
    ensure!(f.counters.config_reloads.get() == reloads, "no re-apply");
    // ...a hand edit of the file is applied and streamed as a file change, under the overlay:
    // tenant-gold's new limit is in force, 10.0.0.0/8 stays the API's.
    std::fs::write(&f.config, CONFIG.replace("limit: 10\n", "limit: 11\n"))?;
    f.limits.reload_file(false);
    let c = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await??
        .context("stream ended")?;
    let p = c.policy.unwrap();
    ensure!(c.source == "file" && p.r#match == "tenant-gold" && p.limit == Some(11));
    let r = rl.check(check("10.5.5.5", Some(0))).await?.into_inner();
    ensure!(r.limit == 3, "the overlay's: {r:?}");
    // Removing the API's 10.0.0.0/8 puts the file's back (limit 5); removing again removes the
    // file's.
    let rm = || proto::DeleteLimitRequest {
        r#match: "10.0.0.0/8".into(),
    };
    let c = lim.delete(rm()).await?.into_inner();
    ensure!(
        c.kind == proto::limit_change::Kind::Set as i32 && c.policy.unwrap().limit == Some(5),
        "restored"
    );
    let r = rl.check(check("10.5.5.5", Some(0))).await?.into_inner();
    ensure!(r.limit == 5, "the file's again: {r:?}");
    let c = lim.delete(rm()).await?.into_inner();
    ensure!(c.kind == proto::limit_change::Kind::Deleted as i32);
    let r = rl.check(check("10.5.5.5", Some(0))).await?.into_inner();
    ensure!(r.policy == "default", "{r:?}");
    expect_code(lim.delete(rm()).await, Code::NotFound, "10.0.0.0/8").await?;
    ensure!(
        std::fs::read_to_string(&f.config)? == CONFIG.replace("limit: 10\n", "limit: 11\n"),
        "the file is untouched"
    );
    f.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_overlay_blocks_edits_and_changes_nothing() -> Result<()> {
    require_root!();
    let f = Fixture::new(false).await?;
    let mut lim = f.client().await?.limits;
    let set = || proto::SetLimitRequest {
        policy: Some(proto::Policy {
            r#match: "tenant-z".into(),
            limit: Some(1),
            window: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            action: 0,
            scope: proto::Scope::Unspecified as i32,
        }),
    };
    // A broken config file on disk does not block API changes (they are made over the file in
    // force, and the file is never written)...
    std::fs::write(&f.config, "default: { limit: -1 }\n")?;
    lim.set(set()).await?;
    ensure!(Overlay::load(&f.overlay)?.policies.len() == 1);
    lim.delete(proto::DeleteLimitRequest {
        r#match: "tenant-z".into(),
    })
    .await?;
    std::fs::write(&f.config, CONFIG)?;
    // ...an overlay from a newer limiter, taken up on SIGHUP, does: the policies in force stay
    // and the overlay is not overwritten.
    let newer = "version: 2\nwhatever: comes next\n";
    std::fs::write(&f.overlay, newer)?;
    f.limits.reload_file(true);
    expect_code(
        lim.set(set()).await,
        Code::FailedPrecondition,
        "written by a newer limiter",
    )
    .await?;
    ensure!(
        f.limits.config() == Config::parse(CONFIG)?,
        "the config in force stays"
    );
    ensure!(std::fs::read_to_string(&f.overlay)? == newer);
    // Removed and reloaded: changes are accepted again.
    std::fs::remove_file(&f.overlay)?;
    f.limits.reload_file(true);
    lim.set(set()).await?;
    ensure!(f.overlay.exists());
    f.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_health_and_reflection() -> Result<()> {
    require_root!();
    let f = Fixture::new(false).await?;
    let clients = f.client().await?;
    let (mut rl, mut stats) = (clients.rate_limiter, clients.stats);
    count_allowed(&mut rl, "tenant-gold", 12).await?;
    count_allowed(&mut rl, "tenant-anon", 2).await?;
    count_allowed(&mut rl, "10.7.7.7", 6).await?;
    ensure!(f.packet(Ipv4Addr::new(10, 8, 8, 8))?);

    let g = stats
        .global(proto::GlobalStatsRequest {})
        .await?
        .into_inner();
    ensure!(
        g.checks_allowed == 10 + 2 + 5 && g.checks_denied == 2 + 1,
        "{g:?}"
    );
    // 10.7.7.7, 10.8.8.8, and the allow-listed 192.0.2.7, whose static entry exists from the start.
    ensure!(g.clients_resident == 3 && g.ids_resident == 2, "{g:?}");
    ensure!(g.packets_passed == 1 && !g.dry_run && g.policy_generation >= 1);

    let c = stats
        .client(proto::ClientStatsRequest {
            client_id: "10.7.7.7".into(),
        })
        .await?
        .into_inner();
    ensure!(
        c.passed == 5 && c.dropped == 1 && c.resident && c.policy == "10.0.0.0/8",
        "{c:?}"
    );
    let c = stats
        .client(proto::ClientStatsRequest {
            client_id: "10.200.0.1".into(),
        })
        .await?
        .into_inner();
    ensure!(!c.resident && c.passed == 0);
    expect_code(
        stats
            .client(proto::ClientStatsRequest {
                client_id: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "client_id",
    )
    .await?;

    let top = stats
        .top(proto::TopRequest { n: 3 })
        .await?
        .into_inner()
        .clients;
    let ids: Vec<&str> = top.iter().map(|c| c.client_id.as_str()).collect();
    ensure!(ids.len() == 3 && ids[0] == "tenant-gold", "{ids:?}");
    let all = stats
        .top(proto::TopRequest { n: 0 })
        .await?
        .into_inner()
        .clients;
    ensure!(all.len() == 5, "{all:?}");
    ensure!(
        all.iter().any(|c| c.client_id.starts_with("id:")),
        "IDs without a policy are shown by hash"
    );

    // Standard health and reflection on the same socket.
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn({
            let socket = f.socket.clone();
            move |_: tonic::transport::Uri| {
                let socket = socket.clone();
                async move {
                    tokio::net::UnixStream::connect(socket)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }
        }))
        .await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in [
        "limiter.v1.RateLimiter",
        "limiter.v1.Limits",
        "limiter.v1.Stats",
    ] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        ensure!(r.status == 1, "{service}: {r:?}");
    }
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response = responses
        .message()
        .await?
        .context("no reflection response")?;
    let listed = format!("{response:?}");
    for service in [
        "limiter.v1.RateLimiter",
        "limiter.v1.Limits",
        "grpc.health.v1.Health",
    ] {
        ensure!(
            listed.contains(service),
            "reflection lists {service}: {listed}"
        );
    }
    f.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_requires_the_bearer_token() -> Result<()> {
    require_root!();
    let f = Fixture::new(true).await?;
    let addr = f.served.tcp.context("TCP listener")?;
    let url = format!("http://{addr}");
    let before = std::fs::read_to_string(&f.config)?;
    let token_file = f.dir.write("token", TOKEN)?;
    let wrong_file = f.dir.write("wrong", "not-the-token-at-all")?;
    for token in [None, Some(wrong_file)] {
        let mut c = client::connect(&Target {
            api: Some(url.clone()),
            token_file: token.map(PathBuf::from),
            ..Target::default()
        })
        .await?;
        expect_code(
            c.rate_limiter.check(check("10.1.1.1", None)).await,
            Code::Unauthenticated,
            "",
        )
        .await?;
        let set = proto::SetLimitRequest {
            policy: Some(proto::Policy {
                r#match: "10.0.0.0/8".into(),
                limit: Some(1000),
                window: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                action: 0,
                scope: proto::Scope::Unspecified as i32,
            }),
        };
        expect_code(c.limits.set(set).await, Code::Unauthenticated, "").await?;
        expect_code(
            c.stats.global(proto::GlobalStatsRequest {}).await,
            Code::Unauthenticated,
            "",
        )
        .await?;
    }
    ensure!(
        std::fs::read_to_string(&f.config)? == before && !f.overlay.exists(),
        "unauthenticated calls change nothing"
    );
    // Answered by the token check, not by a method, and still counted by code.
    ensure!(
        f.counters.api_errors(Code::Unauthenticated) == 6,
        "{} UNAUTHENTICATED counted",
        f.counters.api_errors(Code::Unauthenticated)
    );
    let mut c = client::connect(&Target {
        api: Some(url),
        token_file: Some(PathBuf::from(token_file)),
        ..Target::default()
    })
    .await?;
    let r = c
        .rate_limiter
        .check(check("10.1.1.1", Some(0)))
        .await?
        .into_inner();
    ensure!(r.remaining == 5, "the check was never spent: {r:?}");
    f.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_flood_stays_bounded_and_never_evicts_policy_ids() -> Result<()> {
    require_root!();
    let f = Fixture::with_ids(false, 64).await?;
    let mut c = f.client().await?.rate_limiter;
    // tenant-gold (an exact-ID policy) spends 4 of its 10; then 2000 one-off IDs flood a
    // 64-entry ID map.
    for _ in 0..4 {
        let r = c.check(check("tenant-gold", None)).await?.into_inner();
        ensure!(r.allowed, "{r:?}");
    }
    let flood: Vec<_> = (0..2000)
        .map(|i| check(&format!("spoof-{i}"), None))
        .collect();
    for batch in flood.chunks(100) {
        let r = c
            .check_batch(proto::CheckBatchRequest {
                checks: batch.to_vec(),
            })
            .await?
            .into_inner();
        // Every new ID gets its own default budget (or, if the map cannot take it, the shared
        // overflow budget): never unlimited.
        ensure!(r.results.iter().all(|r| r.limit == 3));
    }
    let r = c.check(check("tenant-gold", Some(0))).await?.into_inner();
    // The 4 hits are still counted: 6 left, or (when the test straddled the 1-minute grid, as
    // it can on a slow machine) up to 9, the hits then weighing in from the previous window by
    // its unelapsed fraction, which needs the rest of the test to take 45 s to fall below 1/4.
    // An evicted entry would start afresh with all 10 left.
    ensure!(
        (6..10).contains(&r.remaining),
        "the policy ID's state did not survive the flood: {r:?}"
    );
    let g = f
        .client()
        .await?
        .stats
        .global(proto::GlobalStatsRequest {})
        .await?
        .into_inner();
    ensure!(
        g.ids_resident <= 64 + 1,
        "bounded: {} IDs resident",
        g.ids_resident
    );
    f.shutdown().await
}

/// A CA and certificates signed by it, as PEM files in a temporary directory.
struct Pki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(tag: &str) -> Result<Pki> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("limiter test CA {tag}"));
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let dir = TempDir::new(&format!("pki-{tag}"))?;
        dir.write("ca.pem", &ca.pem())?;
        Ok(Pki { dir, ca })
    }

    /// Writes `NAME.pem` and `NAME.key` for a certificate with these subject alt names.
    fn issue(&self, name: &str, sans: &[&str]) -> Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        let cert = params.signed_by(&key, &self.ca)?;
        let cert_path = PathBuf::from(self.dir.write(&format!("{name}.pem"), &cert.pem())?);
        let key_path = PathBuf::from(
            self.dir
                .write(&format!("{name}.key"), &key.serialize_pem())?,
        );
        Ok((cert_path, key_path))
    }

    fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_clients_of_the_configured_ca() -> Result<()> {
    require_root!();
    let pki = Pki::new("good")?;
    let other = Pki::new("other")?;
    let (server_cert, server_key) = pki.issue("server", &["127.0.0.1", "localhost"])?;
    let (client_cert, client_key) = pki.issue("client", &["client"])?;
    let (rogue_cert, rogue_key) = other.issue("rogue", &["rogue"])?;
    let files = TlsFiles {
        cert: server_cert,
        key: server_key,
        client_ca: Some(pki.ca_path()),
    };
    let ca = pki.ca_path();
    let f = Fixture::build(Some(None), Some((TempDir::new("tls")?, files)), 4096).await?;
    let url = format!(
        "https://127.0.0.1:{}",
        f.served.tcp.context("TCP listener")?.port()
    );
    let target = |cert: Option<(&PathBuf, &PathBuf)>| Target {
        api: Some(url.clone()),
        tls_ca: Some(ca.clone()),
        tls_cert: cert.map(|c| c.0.clone()),
        tls_key: cert.map(|c| c.1.clone()),
        ..Target::default()
    };
    // A client certificate from the configured CA: served.
    let mut c = client::connect(&target(Some((&client_cert, &client_key)))).await?;
    let r = c
        .rate_limiter
        .check(check("10.3.3.3", Some(0)))
        .await?
        .into_inner();
    ensure!(r.remaining == 5);
    // No client certificate, or one from another CA: the handshake fails, nothing is served.
    for cert in [None, Some((&rogue_cert, &rogue_key))] {
        let outcome = match client::connect(&target(cert)).await {
            Err(e) => format!("connect: {e:#}"),
            Ok(mut c) => match c.rate_limiter.check(check("10.3.3.3", None)).await {
                Ok(r) => anyhow::bail!("served without a valid client certificate: {r:?}"),
                Err(s) => format!("{:?}: {}", s.code(), s.message()),
            },
        };
        eprintln!("rejected as expected: {outcome}");
    }
    let mut c = client::connect(&target(Some((&client_cert, &client_key)))).await?;
    let r = c
        .rate_limiter
        .check(check("10.3.3.3", Some(0)))
        .await?
        .into_inner();
    ensure!(r.remaining == 5, "the rejected calls spent nothing: {r:?}");
    f.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_frames_are_only_for_the_check_program() -> Result<()> {
    require_root!();
    let f = Fixture::new(false).await?;
    let run = |name: &str, frame: &[u8]| -> Result<u32> {
        let program: &Xdp = f.ebpf.program(name).context("program")?.try_into()?;
        Ok(program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..Default::default()
            })?
            .return_value)
    };
    const XDP_ABORTED: u32 = 0;
    const XDP_PASS: u32 = 2;
    // The check program refuses anything but a whole check frame, and changes nothing then.
    let packet = Builder::ipv4(Ipv4Addr::new(10, 4, 4, 4), Ipv4Addr::new(192, 0, 2, 1))
        .build()
        .bytes;
    ensure!(run("limiter_check", &packet)? == XDP_ABORTED);
    let mut frame = vec![0u8; limiter_common::maps::CHECK_FRAME_LEN];
    frame[12..14].copy_from_slice(&limiter_common::maps::CHECK_ETHERTYPE.to_be_bytes());
    frame[16..32].copy_from_slice(&limiter_common::addr::v4_mapped([10, 4, 4, 4]));
    frame[32..36].copy_from_slice(&1u32.to_ne_bytes());
    for cut in [14, 40, limiter_common::maps::CHECK_FRAME_LEN - 1] {
        ensure!(
            run("limiter_check", &frame[..cut])? == XDP_ABORTED,
            "cut at {cut}"
        );
    }
    let mut c = f.client().await?.rate_limiter;
    ensure!(
        c.check(check("10.4.4.4", Some(0)))
            .await?
            .into_inner()
            .remaining
            == 5
    );
    // A whole frame is a check (it spends one hit) ...
    ensure!(run("limiter_check", &frame)? == XDP_PASS);
    ensure!(
        c.check(check("10.4.4.4", Some(0)))
            .await?
            .into_inner()
            .remaining
            == 4
    );
    // ... but on the wire the attached program passes it untouched as a non-IP frame.
    ensure!(run(datapath::PROGRAM, &frame)? == XDP_PASS);
    ensure!(
        c.check(check("10.4.4.4", Some(0)))
            .await?
            .into_inner()
            .remaining
            == 4
    );
    let g = f.limits.with_tables(|t| t.global())?;
    ensure!(g.non_ip == 1, "{g:?}");
    f.shutdown().await
}

/// The rate limit service's config comes into force inside the change of the policies that the
/// cluster watches (`GlobalNames`), never before it: under `--rls-scope global` its limits'
/// policy ids may be renumbered by a reload, and the cluster must never name the new ids under
/// the names before (nor the ids before under the new names). The same limits again install
/// it at once, nothing changing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_s_config_comes_into_force_inside_the_change_of_the_policies() -> Result<()> {
    require_root!();
    let f = Fixture::new(false).await?;
    let names = f.limits.global_names();
    let limit = limiter_user::cluster::GlobalPolicy {
        id: 31_744,
        matches: "rate limit service: 10 per 1000000 µs".into(),
        limit: 10,
        window_us: 1_000_000,
        grouping: String::new(),
    };
    let mut changing = None;
    f.limits.set_service_global(vec![limit.clone()], || {
        changing = Some(names.read(|_, _| ()).is_none());
    })?;
    ensure!(
        changing == Some(true),
        "installed outside the change: {changing:?}"
    );
    ensure!(names.read(|_, _| ()).is_some(), "the change never ended");
    let mut changing = None;
    f.limits.set_service_global(vec![limit], || {
        changing = Some(names.read(|_, _| ()).is_none());
    })?;
    ensure!(changing == Some(false), "the same limits: {changing:?}");
    Ok(())
}
