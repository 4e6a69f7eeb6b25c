//! Hostile API callers against a real `limiter agent` with its TCP API on: a caller with the
//! check-only credential (token or certificate) trying to change policies, a caller over its
//! call rate, a caller checking random addresses to fill the packet path's client map, and a
//! flood of large CheckBatch calls aimed at stalling the agent's other callers. Root only; one
//! at a time (`--test-threads=1`).
//!
//! The TCP API listens on 0.0.0.0 of the receiver namespace: a client there that dials
//! 127.0.0.1 and one that dials the receiver's veth address (198.18.0.1) are two peers with two
//! addresses, so two callers of the same role.

#![expect(
    clippy::expect_used,
    reason = "test helpers outside #[test] functions; a panic there is the test failing"
)]

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use limiter_tests::{
    agent::{Agent, agent_has_option, run_limiter},
    api::Api,
    fixture::TempDir,
    netns::{RECEIVER_V4, TestNet},
    require_root,
};
use limiter_user::{
    api,
    cli::client::{self, Target},
    proto,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::{Code, Status};

/// The TCP API port, on every address of the receiver namespace.
const API_PORT: u16 = 7543;
const ADMIN_TOKEN: &str = "hostile-api-admin-token-0123456789";
const CHECK_TOKEN: &str = "hostile-api-check-token-0123456789";
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

const CONFIG: &str = "\
default: { limit: 1000, window: 1h }
policies:
  - match: 198.18.0.16/28
    limit: 20
    window: 1h
";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Writes `text` to `name` in `dir`, mode 0600; returns the path.
fn secret(dir: &TempDir, name: &str, text: &str) -> Result<String> {
    let path = dir.write(name, text)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// The API over TCP to `host`, with a token file.
fn tcp(host: &str, token_file: &str) -> Result<Api> {
    Api::connect(
        &Target {
            api: Some(format!("http://{host}:{API_PORT}")),
            token_file: Some(token_file.into()),
            ..Target::default()
        },
        CALL_TIMEOUT,
    )
}

fn pass_default() -> proto::Policy {
    proto::Policy {
        r#match: "default".into(),
        limit: None,
        window: None,
        action: proto::Action::Pass as i32,
        scope: proto::Scope::Unspecified as i32,
    }
}

fn hourly(matches: &str, limit: u32) -> proto::Policy {
    proto::Policy {
        r#match: matches.into(),
        limit: Some(limit),
        window: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        action: proto::Action::Limit as i32,
        scope: proto::Scope::Unspecified as i32,
    }
}

/// Asserts a PERMISSION_DENIED naming the check role and `method`.
fn assert_denied<T: std::fmt::Debug>(result: Result<T, Status>, method: &str) {
    let status = result.expect_err("the check role must be refused");
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{method}: {status:?}"
    );
    assert!(
        status
            .message()
            .contains(&format!("the check role may not call limiter.v1.{method}")),
        "{method}: {}",
        status.message()
    );
}

/// An agent with the TCP API on 0.0.0.0:API_PORT, both tokens, and `extra` arguments.
struct Setup {
    net: TestNet,
    dir: TempDir,
    socket: String,
    admin: String,
    check: String,
}

impl Setup {
    fn new() -> Result<Setup> {
        let net = TestNet::new()?;
        let dir = TempDir::new("hostile")?;
        let socket = dir.join("api.sock").to_string_lossy().into_owned();
        let admin = secret(&dir, "admin.token", ADMIN_TOKEN)?;
        let check = secret(&dir, "check.token", CHECK_TOKEN)?;
        Ok(Setup {
            net,
            dir,
            socket,
            admin,
            check,
        })
    }

    fn start(&self, extra: &[&str]) -> Result<Agent> {
        let listen = format!("0.0.0.0:{API_PORT}");
        let mut args = vec![
            "--api-socket",
            &self.socket,
            "--api-listen",
            &listen,
            "--api-token-file",
            &self.admin,
            "--api-check-token-file",
            &self.check,
        ];
        args.extend_from_slice(extra);
        Agent::start_with(&self.net, CONFIG, &args)
    }
}

// ---------------------------------------------------------------------------------------------
// Roles
// ---------------------------------------------------------------------------------------------

/// A caller with the check token can check, but every policy change (the default to `pass`,
/// a new policy, a removal) and every read of policies or stats is PERMISSION_DENIED naming its
/// role and the method, and the state in force stays: generation, policies, overlay, file. The
/// admin token can do all of it.
#[test]
fn the_check_token_may_check_but_never_change_policies() -> Result<()> {
    require_root!();
    let s = Setup::new()?;
    let agent = s.start(&[])?;
    let overlay = agent
        .state_dir()
        .join(format!("{}.overlay.yaml", s.net.receiver_if));
    let mut unix = Api::unix(&s.socket, CALL_TIMEOUT)?;
    let generation = unix.global()?.policy_generation;
    let policies = unix.list()?;
    let (checker, admin) = s.net.in_receiver(|| -> Result<_> {
        let mut checker = tcp("127.0.0.1", &s.check)?;
        let r = checker.check("198.18.0.17", 1)?;
        assert!(r.allowed && r.limit == 20 && r.remaining == 19, "{r:?}");
        assert!(checker.check("tenant-a", 1)?.allowed);
        let batch = checker.batch(&["198.18.0.18".into(), "tenant-b".into()])?;
        assert_eq!(batch.results.len(), 2);
        assert_denied(checker.set(pass_default()), "Limits/Set");
        assert_denied(checker.set(hourly("10.0.0.0/8", 1)), "Limits/Set");
        assert_denied(checker.delete("198.18.0.16/28"), "Limits/Delete");
        assert_denied(checker.list(), "Limits/List");
        assert_denied(checker.global(), "Stats/Global");
        // Health is open to the check role.
        let mut health = checker.rt.block_on(async {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{API_PORT}"))?
                    .connect()
                    .await?;
            let token: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                format!("Bearer {CHECK_TOKEN}").parse()?;
            anyhow::Ok(
                tonic_health::pb::health_client::HealthClient::with_interceptor(
                    channel,
                    move |mut r: tonic::Request<()>| {
                        r.metadata_mut().insert("authorization", token.clone());
                        Ok(r)
                    },
                ),
            )
        })?;
        let serving = checker.call(health.check(tonic_health::pb::HealthCheckRequest {
            service: "limiter.v1.RateLimiter".into(),
        }))?;
        assert_eq!(
            serving.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        let admin = tcp("127.0.0.1", &s.admin)?;
        Ok((checker, admin))
    })??;
    let (mut checker, mut admin) = (checker, admin);
    // Nothing changed.
    assert_eq!(unix.global()?.policy_generation, generation);
    assert_eq!(unix.list()?, policies);
    assert!(!overlay.exists(), "a refused change wrote the overlay");
    assert_eq!(fs::read_to_string(&agent.config_path)?, CONFIG);
    // The CLI with the check token: exit 1, the status on stderr.
    let url = format!("http://127.0.0.1:{API_PORT}");
    let out = run_limiter(
        &s.net.receiver_ns,
        &[
            "limits",
            "--api",
            &url,
            "--token-file",
            &s.check,
            "set",
            "default",
            "--action",
            "pass",
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("the check role"),
        "{stderr}"
    );
    assert_eq!(unix.global()?.policy_generation, generation);
    // The admin token may.
    s.net.in_receiver(|| -> Result<()> {
        admin.set(pass_default())?;
        ensure!(admin.global()?.policy_generation == generation + 1);
        // The check caller now gets the new default.
        let r = checker.check("10.9.9.9", 1)?;
        ensure!(r.action == proto::Action::Pass as i32, "{r:?}");
        Ok(())
    })??;
    assert!(fs::read_to_string(&overlay)?.contains("pass"));
    drop((checker, admin, unix));
    drop(agent);
    Ok(())
}

/// Bad role options stop the agent at start, naming the problem.
#[test]
fn bad_role_options_are_refused_at_start() -> Result<()> {
    require_root!();
    let s = Setup::new()?;
    let listen = format!("0.0.0.0:{API_PORT}");
    let same_token = secret(&s.dir, "copy.token", ADMIN_TOKEN)?;
    let empty = secret(&s.dir, "empty.token", "\n")?;
    let config = s.dir.write("limiter.yaml", CONFIG)?;
    let state = s.dir.join("state").to_string_lossy().into_owned();
    let base = [
        "agent",
        "--iface",
        &s.net.receiver_if,
        "--config",
        &config,
        "--state-dir",
        &state,
        "--api-socket",
        &s.socket,
        "--api-listen",
        &listen,
    ];
    for (extra, needle) in [
        (
            vec![
                "--api-token-file",
                &s.admin,
                "--api-check-token-file",
                &s.admin,
            ],
            "are the same file",
        ),
        (
            vec![
                "--api-token-file",
                &s.admin,
                "--api-check-token-file",
                &same_token,
            ],
            "hold the same token",
        ),
        (vec!["--api-check-token-file", &empty], "is empty"),
        (
            vec!["--api-token-file", &s.admin, "--api-caller-burst", "10"],
            "below --api-max-batch",
        ),
        (
            vec!["--api-token-file", &s.admin, "--api-caller-rate", "0"],
            "not a positive number per second or `off`",
        ),
    ] {
        let args = [&base[..], &extra[..]].concat();
        let out = run_limiter(&s.net.receiver_ns, &args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} started: {stderr}");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
        assert!(
            !std::path::Path::new(&s.socket).exists(),
            "{extra:?}: a refused agent bound its socket"
        );
    }
    Ok(())
}

/// A CA and certificates signed by it, as PEM files.
struct Pki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Result<Pki> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "hostile api test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let dir = TempDir::new("hostile-pki")?;
        dir.write("ca.pem", &ca.pem())?;
        Ok(Pki { dir, ca })
    }

    /// `NAME.pem` and `NAME.key`: a certificate with common name `cn` and these SANs.
    fn issue(&self, name: &str, cn: &str, sans: &[&str]) -> Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.ca)?;
        let cert_path = PathBuf::from(self.dir.write(&format!("{name}.pem"), &cert.pem())?);
        let key_path = PathBuf::from(secret(
            &self.dir,
            &format!("{name}.key"),
            &key.serialize_pem(),
        )?);
        Ok((cert_path, key_path))
    }
}

/// With mutual TLS, the certificate's common name gives the role: `ops` is admin, `web` may
/// only check, and a certificate of the same CA whose name has no role is refused.
#[test]
fn certificate_subjects_give_roles() -> Result<()> {
    require_root!();
    let s = Setup::new()?;
    let pki = Pki::new()?;
    let (server_cert, server_key) = pki.issue("server", "agent", &["127.0.0.1"])?;
    let ops = pki.issue("ops", "ops", &["ops"])?;
    let web = pki.issue("web", "web", &["web"])?;
    let stranger = pki.issue("stranger", "stranger", &["stranger"])?;
    let listen = format!("0.0.0.0:{API_PORT}");
    let (cert, key, ca) = (
        server_cert.to_string_lossy().into_owned(),
        server_key.to_string_lossy().into_owned(),
        pki.dir.join("ca.pem").to_string_lossy().into_owned(),
    );
    let agent = Agent::start_with(
        &s.net,
        CONFIG,
        &[
            "--api-socket",
            &s.socket,
            "--api-listen",
            &listen,
            "--api-tls-cert",
            &cert,
            "--api-tls-key",
            &key,
            "--api-tls-client-ca",
            &ca,
            "--api-admin-subject",
            "ops",
            "--api-check-subject",
            "web",
        ],
    )?;
    let mut unix = Api::unix(&s.socket, CALL_TIMEOUT)?;
    let generation = unix.global()?.policy_generation;
    let target = |(cert, key): &(PathBuf, PathBuf)| Target {
        api: Some(format!("https://127.0.0.1:{API_PORT}")),
        tls_ca: Some(pki.dir.join("ca.pem")),
        tls_cert: Some(cert.clone()),
        tls_key: Some(key.clone()),
        ..Target::default()
    };
    s.net.in_receiver(|| -> Result<()> {
        let mut web = Api::connect(&target(&web), CALL_TIMEOUT)?;
        ensure!(web.check("198.18.0.17", 1)?.allowed);
        assert_denied(web.set(pass_default()), "Limits/Set");
        let mut stranger = Api::connect(&target(&stranger), CALL_TIMEOUT)?;
        let e = stranger.check("198.18.0.17", 1).expect_err("no role");
        ensure!(e.code() == Code::PermissionDenied, "{e:?}");
        ensure!(
            e.message().contains("CN=stranger") && e.message().contains("has no role"),
            "{}",
            e.message()
        );
        let mut ops = Api::connect(&target(&ops), CALL_TIMEOUT)?;
        ops.set(hourly("10.0.0.0/8", 5))?;
        ensure!(ops.global()?.policy_generation == generation + 1);
        Ok(())
    })??;
    // The refused calls spent nothing: only the web caller's hit was counted.
    let r = unix.check("198.18.0.17", 0)?;
    assert_eq!(r.remaining, 19, "{r:?}");
    drop(unix);
    drop(agent);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Per-caller limits
// ---------------------------------------------------------------------------------------------

/// A caller over its call rate gets RESOURCE_EXHAUSTED naming the limit, a CheckBatch counting
/// its checks; another address with the same role, the other role from the same address, and
/// the Unix socket are not affected.
#[test]
fn a_caller_over_its_rate_is_refused_and_other_callers_are_not() -> Result<()> {
    require_root!();
    let s = Setup::new()?;
    // 1 call per second, at most 10 at once.
    let agent = s.start(&[
        "--api-max-batch",
        "10",
        "--api-caller-rate",
        "1",
        "--api-caller-burst",
        "10",
    ])?;
    let receiver = RECEIVER_V4.to_string();
    s.net.in_receiver(|| -> Result<()> {
        let mut a = tcp("127.0.0.1", &s.check)?;
        let mut answered = 0;
        let refused = loop {
            match a.check("tenant-a", 1) {
                Ok(_) => answered += 1,
                Err(e) => break e,
            }
            ensure!(answered <= 11, "no limit after {answered} calls");
        };
        // 10 at once, plus at most one refilled while they ran.
        ensure!((10..=11).contains(&answered), "{answered} calls answered");
        ensure!(refused.code() == Code::ResourceExhausted, "{refused:?}");
        ensure!(
            refused.message().starts_with(
                "check caller 127.0.0.1 is over its API rate limit of 1 calls per second, burst 10"
            ) && refused.message().contains("--api-caller-rate"),
            "{}",
            refused.message()
        );
        // The other role from the same address is another caller.
        let mut admin = tcp("127.0.0.1", &s.admin)?;
        for _ in 0..5 {
            admin.check("tenant-a", 1)?;
        }
        // So is the same role from another address; a batch counts its checks.
        let mut b = tcp(&receiver, &s.check)?;
        b.check("tenant-b", 1)?;
        let nine: Vec<String> = (0..9).map(|i| format!("tenant-b{i}")).collect();
        b.batch(&nine)?;
        let e = b.check("tenant-b", 1).expect_err("b spent its 10");
        ensure!(e.code() == Code::ResourceExhausted, "{e:?}");
        ensure!(
            e.message()
                .starts_with(&format!("check caller {receiver} ")),
            "{}",
            e.message()
        );
        Ok(())
    })??;
    // The Unix socket is exempt.
    let mut unix = Api::unix(&s.socket, CALL_TIMEOUT)?;
    for _ in 0..50 {
        unix.check("tenant-a", 1)?;
    }
    drop(unix);
    drop(agent);
    Ok(())
}

/// Checks of addresses without an entry create entries in the packet path's client map: a TCP
/// caller may create at most `--api-new-clients-per-second` of them per second. Past the cap a
/// call is RESOURCE_EXHAUSTED and creates nothing; checks of addresses with an entry are not
/// capped. `clients_created` and the resident count move by exactly the checks answered.
#[test]
fn checks_of_random_addresses_create_at_most_the_cap() -> Result<()> {
    require_root!();
    limiter_tests::skip_under_emulation!("the cap refills 20 entries a second of wall clock");
    let s = Setup::new()?;
    let agent = s.start(&["--api-new-clients-per-second", "20"])?;
    let mut unix = Api::unix(&s.socket, CALL_TIMEOUT)?;
    // The sender namespace's MLD reports come from `::` while its addresses come up: the one
    // entry not made by the checks below, if it appears during them.
    let stray_before = unix.client_stats("::")?.resident;
    let before = unix.global()?;
    let start = Instant::now();
    let (answered, refused, first_refusal) = s.net.in_receiver(|| -> Result<_> {
        let mut checker = tcp("127.0.0.1", &s.check)?;
        let mut answered = Vec::new();
        let mut refused = 0;
        let mut first_refusal = None;
        for i in 0..200u32 {
            let addr = format!("10.{}.{}.{}", 40 + i / 65536, (i / 256) % 256, i % 256);
            match checker.check(&addr, 1) {
                Ok(r) => {
                    ensure!(r.allowed, "{r:?}");
                    answered.push(addr);
                }
                Err(e) if e.code() == Code::ResourceExhausted => {
                    refused += 1;
                    first_refusal.get_or_insert(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Addresses that have an entry are checked freely while the cap is spent.
        for addr in answered.iter().take(10) {
            ensure!(checker.check(addr, 1)?.remaining == 998);
        }
        // A batch with new addresses is refused whole: nothing spent, nothing created.
        let fresh: Vec<String> = (0..5).map(|i| format!("10.99.0.{i}")).collect();
        let mut mixed = vec![answered[0].clone()];
        mixed.extend(fresh);
        let e = checker.batch(&mixed).expect_err("over the cap");
        ensure!(e.code() == Code::ResourceExhausted, "{e:?}");
        ensure!(
            e.message().contains("would create 5 client entries"),
            "{}",
            e.message()
        );
        ensure!(checker.check(&answered[0], 0)?.remaining == 998);
        Ok((answered, refused, first_refusal))
    })??;
    let elapsed = start.elapsed();
    let after = unix.global()?;
    let stray = u64::from(unix.client_stats("::")?.resident && !stray_before);
    let created = after.clients_created - before.clients_created;
    let resident = after.clients_resident - before.clients_resident;
    eprintln!(
        "200 random addresses in {elapsed:?}: {} answered, {refused} refused, {created} created, \
         {resident} more resident",
        answered.len()
    );
    let message = first_refusal
        .context("no check was refused")?
        .message()
        .to_owned();
    assert!(
        message.contains("over its cap of 20 new address clients per second")
            && message.contains("--api-new-clients-per-second"),
        "{message}"
    );
    // The burst of 20, plus 20 per second of the time the checks took.
    let allowed = 20 + (20.0 * elapsed.as_secs_f64()).ceil() as usize;
    assert!(
        answered.len() >= 20 && answered.len() <= allowed,
        "{} answered, at most {allowed}",
        answered.len()
    );
    assert_eq!(
        created,
        answered.len() as u64 + stray,
        "one entry per answered check (and `::`'s, if it appeared meanwhile)"
    );
    assert_eq!(resident, answered.len() as u64 + stray);
    // The Unix socket is not capped.
    for i in 0..50 {
        unix.check(&format!("10.98.0.{i}"), 1)?;
    }
    // And `::`'s entry, if the veth's IPv6 start-up packets made it only meanwhile (seen once:
    // 51 created).
    let stray_later = u64::from(unix.client_stats("::")?.resident && !stray_before) - stray;
    assert_eq!(
        unix.global()?.clients_created - after.clients_created,
        50 + stray_later
    );
    drop(unix);
    drop(agent);
    Ok(())
}

/// A call whose addresses could all be new and still fit under the new-client cap is checked at
/// once, and the tokens its checks did not use go back: calls of addresses that have entries
/// leave the cap as it was, while a call that creates entries is charged exactly what it
/// created, so a call of more new addresses than are left is refused whole.
#[test]
fn the_new_client_cap_charges_what_checks_create_and_gives_the_rest_back() -> Result<()> {
    require_root!();
    limiter_tests::skip_under_emulation!("the cap refills 20 entries a second of wall clock");
    let s = Setup::new()?;
    let agent = s.start(&["--api-new-clients-per-second", "20"])?;
    let mut unix = Api::unix(&s.socket, CALL_TIMEOUT)?;
    let addrs = |base: u32, n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}", 60 + base, i / 256, i % 256))
            .collect()
    };
    let first = addrs(0, 15);
    let last = addrs(2, 5);
    // The sender namespace's MLD reports from `::`: an entry the checks did not make, if it
    // appears during them (as in `checks_of_random_addresses_create_at_most_the_cap`).
    let stray_before = unix.client_stats("::")?.resident;
    let before = unix.global()?;
    let over = s.net.in_receiver(|| -> Result<usize> {
        let mut checker = tcp("127.0.0.1", &s.check)?;
        let start = Instant::now();
        // 15 new addresses in one call: 15 of the 20 are spent, 5 left.
        ensure!(checker.batch(&first)?.results.iter().all(|r| r.allowed));
        // Calls of those 15 (each could create 15 entries, more than are left) and of 5 of them
        // (each holds the 5 left, and gives them back) spend nothing.
        for _ in 0..10 {
            ensure!(checker.batch(&first)?.results.len() == 15);
            ensure!(checker.batch(&first[..5])?.results.len() == 5);
        }
        // More new addresses than the 5 left and what refilled since (20 a second): refused
        // whole. Had the first call been given its 15 back, 20 would be there.
        let over = (5 + (20.0 * start.elapsed().as_secs_f64()).ceil() as usize + 2).min(20);
        let e = checker.batch(&addrs(1, over)).expect_err("over the cap");
        ensure!(e.code() == Code::ResourceExhausted, "{e:?}");
        ensure!(
            e.message()
                .contains(&format!("would create {over} client entries")),
            "{}",
            e.message()
        );
        // 5 new ones (with 2 of the first) fit in what is left: had the calls of the 5 kept
        // what they held, nothing but the refill would be.
        let mut mixed = last.clone();
        mixed.extend(first[..2].iter().cloned());
        ensure!(checker.batch(&mixed)?.results.iter().all(|r| r.allowed));
        Ok(over)
    })??;
    let created = unix.global()?.clients_created - before.clients_created;
    let stray = u64::from(unix.client_stats("::")?.resident && !stray_before);
    eprintln!("refused a call of {over} new addresses");
    assert_eq!(created, (first.len() + last.len()) as u64 + stray);
    for (i, a) in first.iter().enumerate() {
        let calls = 1 + 10 + if i < 5 { 10 } else { 0 } + u64::from(i < 2);
        assert_eq!(unix.client_stats(a)?.passed, calls, "{a}");
    }
    drop(unix);
    drop(agent);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Checks off the runtime
// ---------------------------------------------------------------------------------------------

/// How long a Unix-socket call may take while TCP callers flood the agent with CheckBatch calls
/// (measured on a shared 2-CPU machine: median 32 ms, worst 350 ms; before checks moved off the
/// runtime's workers, see the report in the commit).
const UNIX_CALL_BOUND: Duration = Duration::from_secs(1);
/// Checks per flooding CheckBatch (each about 40 ms of BPF_PROG_TEST_RUN).
const FLOOD_BATCH: usize = 40_000;
/// Flooding calls in flight.
const FLOOD_CONCURRENCY: usize = 16;

/// A flood of large CheckBatch calls over TCP does not stall the Unix socket: a check there and
/// `limiter stats --api` answer within a bound while the flood runs, and the flood itself is
/// being answered. These batches run in the TCP check lane.
#[test]
fn a_checkbatch_flood_does_not_stall_the_unix_socket() -> Result<()> {
    flood_of_batches(FLOOD_BATCH)
}

/// The same with batches small enough to be decided on the runtime's workers
/// (`api::INLINE_CHECKS`), which the Unix socket's calls share: they wait behind them, within the
/// same bound.
#[test]
fn a_flood_of_batches_decided_on_the_workers_does_not_stall_the_unix_socket() -> Result<()> {
    flood_of_batches(api::INLINE_CHECKS)
}

/// A flood of `batch`-check CheckBatch calls from 16 callers in flight over TCP, and the Unix
/// socket's answers meanwhile.
fn flood_of_batches(batch: usize) -> Result<()> {
    require_root!();
    limiter_tests::skip_under_emulation!("its bounds are wall-clock answer times");
    let s = Setup::new()?;
    let listen = format!("0.0.0.0:{API_PORT}");
    let max_batch = batch.to_string();
    let mut args = vec![
        "--api-socket",
        &s.socket,
        "--api-listen",
        &listen,
        "--api-token-file",
        &s.admin,
        "--api-max-batch",
        &max_batch,
    ];
    // Without per-caller limits: this measures the check threads alone.
    if agent_has_option("--api-caller-rate") {
        args.extend([
            "--api-caller-rate",
            "off",
            "--api-new-clients-per-second",
            "off",
        ]);
    }
    let agent = Agent::start_with(&s.net, CONFIG, &args)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, exhausted, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let flood = {
        let (stop, ok, exhausted, failed) = (
            Arc::clone(&stop),
            Arc::clone(&ok),
            Arc::clone(&exhausted),
            Arc::clone(&failed),
        );
        let url = format!("http://127.0.0.1:{API_PORT}");
        let token = s.admin.clone();
        limiter_tests::netns::spawn_in_netns(&s.net.receiver_ns, move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let clients = client::connect(&Target {
                    api: Some(url),
                    token_file: Some(token.into()),
                    ..Target::default()
                })
                .await?;
                let checks: Vec<proto::CheckRequest> = (0..batch)
                    .map(|i| proto::CheckRequest {
                        client_id: format!("flood-{i}"),
                        hits: Some(1),
                    })
                    .collect();
                let deadline = Instant::now() + Duration::from_secs(15);
                let mut tasks = Vec::new();
                for _ in 0..FLOOD_CONCURRENCY {
                    let mut c = clients.rate_limiter.clone();
                    let checks = checks.clone();
                    let (stop, ok, exhausted, failed) = (
                        Arc::clone(&stop),
                        Arc::clone(&ok),
                        Arc::clone(&exhausted),
                        Arc::clone(&failed),
                    );
                    tasks.push(tokio::spawn(async move {
                        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                            let request = proto::CheckBatchRequest {
                                checks: checks.clone(),
                            };
                            match c.check_batch(request).await {
                                Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                                Err(e) if e.code() == Code::ResourceExhausted => {
                                    exhausted.fetch_add(1, Ordering::Relaxed)
                                }
                                Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                            };
                        }
                    }));
                }
                for t in tasks {
                    t.await?;
                }
                anyhow::Ok(())
            })
        })
    };
    let result = (|| -> Result<(Vec<Duration>, Duration)> {
        let mut unix = Api::unix(&s.socket, CALL_TIMEOUT)?;
        // Let the flood build up.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ok.load(Ordering::Relaxed) < 2 {
            if Instant::now() > deadline {
                bail!("the flood got no answer within 10 s");
            }
            thread::sleep(Duration::from_millis(10));
        }
        let mut latencies = Vec::new();
        for i in 0..20 {
            let start = Instant::now();
            unix.check(&format!("tenant-local-{i}"), 1)?;
            latencies.push(start.elapsed());
            thread::sleep(Duration::from_millis(50));
        }
        let start = Instant::now();
        let out = run_limiter(
            &s.net.receiver_ns,
            &["stats", "--api", &s.socket, "--json", "--top", "5"],
        )?;
        let stats = start.elapsed();
        ensure!(out.status.success(), "{out:?}");
        Ok((latencies, stats))
    })();
    stop.store(true, Ordering::Relaxed);
    let flood = flood
        .join()
        .map_err(|_| anyhow!("the flood thread panicked"))?
        .and_then(|r| r);
    let (mut latencies, stats) = result?;
    flood?;
    latencies.sort();
    let (ok, exhausted, failed) = (
        ok.load(Ordering::Relaxed),
        exhausted.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "flood: {ok} batches of {batch} answered, {exhausted} RESOURCE_EXHAUSTED, \
         {failed} other errors; Unix-socket check: median {:?}, max {:?}; `limiter stats --api`: \
         {stats:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    assert_eq!(failed, 0, "flood calls failed otherwise");
    assert!(
        latencies[latencies.len() - 1] < UNIX_CALL_BOUND,
        "a Unix-socket check took {:?} during the flood",
        latencies[latencies.len() - 1]
    );
    assert!(
        stats < UNIX_CALL_BOUND + Duration::from_secs(2),
        "`limiter stats --api` took {stats:?} during the flood"
    );
    drop(agent);
    Ok(())
}
