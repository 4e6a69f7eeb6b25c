//! The node over real sockets: heartbeats, tokens, views and enrolment between agents in one
//! process.

use std::sync::atomic::AtomicU32;

use tonic::{Request, transport::Endpoint};

use super::*;
use crate::{
    cluster::{
        GlobalPolicy,
        config::Partition,
        membership::{ForgetRefusal, Phase},
    },
    proto::cluster::{ClientReport, Heartbeat, peer_client::PeerClient},
};

const TOKEN: &str = "a-cluster-token-of-some-length";

fn section(id: &str, listen: SocketAddr, peers: Vec<SocketAddr>) -> ClusterConfig {
    ClusterConfig {
        node_id: NodeId::new(id).expect("id"),
        listen,
        peers: peers.into_iter().map(PeerAddr::Socket).collect(),
        token_file: Some("/unused".into()),
        tls: None,
        sync_interval: Duration::from_millis(20),
        peer_timeout: Duration::from_millis(200),
        partition: Partition::Local,
    }
}

fn token() -> Credentials {
    Credentials {
        token: Some(TOKEN.into()),
        tls: None,
    }
}

fn policies() -> ClusterPolicies {
    ClusterPolicies {
        config: None,
        global: vec![GlobalPolicy {
            id: 1,
            matches: "10.0.0.0/8".into(),
            limit: 40,
            window_us: 1_000_000,
            grouping: "per address".into(),
        }],
        nested: Vec::new(),
    }
}

/// Node `id` on `listen`, dialling `peers`, with the test token and policies, adopted (no join
/// gate).
fn node(id: &str, listen: SocketAddr, peers: Vec<SocketAddr>) -> Node {
    Node::new(
        &section(id, listen, peers),
        &token(),
        1,
        true,
        policies(),
        1024,
    )
    .expect(id)
}

async fn listener() -> (tokio::net::TcpListener, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

/// Records the share views a node hands over.
fn recorder() -> (ShareSink, Arc<AtomicU32>) {
    let last = Arc::new(AtomicU32::new(u32::MAX));
    let seen = last.clone();
    (
        Arc::new(move |v: ShareView| {
            seen.store(v.share(40), Ordering::SeqCst);
            true
        }),
        last,
    )
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_agree_split_and_fall_back_when_one_stops() {
    let (l1, a1) = listener().await;
    let (l2, a2) = listener().await;
    let n1 = node("n1", a1, vec![a2]);
    let n2 = node("n2", a2, vec![a1]);
    let (stop1, rx1) = watch::channel(false);
    let (stop2, rx2) = watch::channel(false);
    let (sink1, share1) = recorder();
    let (sink2, _) = recorder();
    let _t1 = n1.run(l1, sink1, rx1);
    let _t2 = n2.run(l2, sink2, rx2);
    // (Before n2 hears n1 answer, it counts n1 twice, by id and by endpoint: safe, and
    // gone at n2's next heartbeat.)
    wait_for("both live, two members agreed", || {
        let s = n1.status();
        s.phase == "connected"
            && s.agreed_members == 2
            && s.views_agree
            && s.peers.iter().all(|p| p.live && p.node_id == "n2")
    })
    .await;
    let s = n1.status();
    assert_eq!((s.members, s.agreed_members), (2, 2));
    assert!(s.views_agree, "{s:?}");
    assert_eq!(s.policies[0].share, 20);
    // The status (and the metrics, which read it) show the sync's work.
    let peer = &s.peers[0];
    let rtt = peer.rtt.expect("an answered heartbeat has a round trip");
    assert!(rtt.seconds == 0 && rtt.nanos > 0, "{rtt:?}");
    let traffic = s.traffic.expect("traffic");
    assert!(traffic.rounds >= 1 && traffic.bytes_sent > 0 && traffic.bytes_received > 0);
    assert_eq!(traffic.heartbeats_failed, 0);
    // n2 stops: n1 is cut off, and `partition: local` gives it the whole limit.
    stop2.send_replace(true);
    wait_for("n1 cut off", || n1.status().phase == "cut-off").await;
    assert!(n1.status().traffic.expect("traffic").heartbeats_failed > 0);
    assert_eq!(
        share1.load(Ordering::SeqCst),
        40,
        "the maps got the whole limit"
    );
    assert_eq!(n1.status().members, 2, "a silent member still counts");
    stop1.send_replace(true);
}

#[tokio::test]
async fn peers_without_the_token_or_as_this_node_are_refused() {
    let (l1, a1) = listener().await;
    let n1 = node("n1", a1, vec![]);
    let (stop, rx) = watch::channel(false);
    let (sink, _) = recorder();
    let _t = n1.run(l1, sink, rx);
    let channel = Endpoint::from_shared(format!("http://{a1}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let heartbeat = |id: &str| Heartbeat {
        nonce: 0,
        node_id: id.into(),
        incarnation: 1,
        seq: 1,
        echo: 0,
        members: 2,
        view_hash: 0,
        ..Heartbeat::default()
    };
    let mut bare = PeerClient::new(channel.clone());
    let e = bare.heartbeat(heartbeat("n2")).await.expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let with = |token: &'static str| {
        move |mut r: Request<()>| {
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("value"),
            );
            Ok(r)
        }
    };
    let mut wrong = PeerClient::with_interceptor(channel.clone(), with("not-the-cluster-token"));
    let e = wrong
        .heartbeat(heartbeat("n2"))
        .await
        .expect_err("wrong token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let mut good = PeerClient::with_interceptor(channel, with(TOKEN));
    let e = good.heartbeat(heartbeat("n1")).await.expect_err("own id");
    assert!(e.message().contains("this node's own id"), "{e:?}");
    let e = good.heartbeat(heartbeat("n 2")).await.expect_err("bad id");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = good
        .heartbeat(Heartbeat {
            node_id: "x".repeat(MAX_MESSAGE_BYTES),
            ..heartbeat("n2")
        })
        .await
        .expect_err("oversized");
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    // A heartbeat refused for its enrolment part (a client key of 4 bytes) is refused whole:
    // n3 is not counted, nor its member count taken.
    let e = good
        .heartbeat(Heartbeat {
            members: 9,
            reports: vec![ClientReport {
                client: vec![1, 2, 3, 4],
                ..Default::default()
            }],
            ..heartbeat("n3")
        })
        .await
        .expect_err("a short client key");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // A member count no view holds is refused.
    let e = good
        .heartbeat(Heartbeat {
            members: u32::MAX,
            ..heartbeat("n3")
        })
        .await
        .expect_err("members: u32::MAX");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("more than any node's view"), "{e:?}");
    // More clients than a heartbeat may carry: refused by the codec before they are decoded.
    let e = good
        .heartbeat(Heartbeat {
            reports: vec![ClientReport::default(); wire::MAX_CLIENTS_PER_MESSAGE + 1],
            ..heartbeat("n3")
        })
        .await
        .expect_err("too many clients");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message()
            .ends_with("clients in one heartbeat: refused before decoding"),
        "{e:?}"
    );
    let s = n1.status();
    assert_eq!(
        (s.members, s.agreed_members),
        (1, 1),
        "neither refused heartbeat counted: {s:?}"
    );
    let answer = good
        .heartbeat(heartbeat("n2"))
        .await
        .expect("valid")
        .into_inner();
    assert_eq!((answer.node_id.as_str(), answer.echo), ("n1", 1));
    assert_eq!(n1.status().members, 2, "n2 heard: n1 counts it");
    // But its maps still hold the shares of one member (no heartbeat round has written the
    // view since): it reports one, so that a member joining does not take it for enforcing
    // the smaller share yet.
    assert_eq!(answer.members, 1, "{answer:?}");
    stop.send_replace(true);
}

/// A CA, and PEM credentials for `cn` (DNS name `limiter-cluster`) signed by it.
struct Pki(rcgen::CertifiedIssuer<'static, rcgen::KeyPair>);

impl Pki {
    fn new() -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cluster test CA");
        let key = rcgen::KeyPair::generate().expect("key");
        Pki(rcgen::CertifiedIssuer::self_signed(params, key).expect("CA"))
    }

    fn credentials(&self, cn: &str) -> Credentials {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["limiter-cluster".to_owned()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.0).expect("cert");
        Credentials {
            token: None,
            tls: Some(TlsMaterial {
                cert: cert.pem().into_bytes(),
                key: key.serialize_pem().into_bytes(),
                ca: self.0.pem().into_bytes(),
                server_name: "limiter-cluster".into(),
            }),
        }
    }
}

/// n1 (dialling n2 and a third node), n2 (dialling n1) and the third (dialling n1, as
/// `third_id` with `third`'s credentials) over mutual TLS with `pki`'s, running until `stop`
/// flips; returned once n1 and n2 are live to each other.
struct TlsTrio {
    n1: Node,
    third: Node,
    a1: SocketAddr,
    a3: SocketAddr,
    stop: watch::Sender<bool>,
    _tasks: Vec<JoinHandle<()>>,
}

async fn tls_trio(pki: &Pki, third_id: &str, third: &Credentials) -> TlsTrio {
    let (l1, a1) = listener().await;
    let (l2, a2) = listener().await;
    let (l3, a3) = listener().await;
    let node = |id, a, peers, credentials: &Credentials| {
        let section = ClusterConfig {
            token_file: None,
            ..section(id, a, peers)
        };
        Node::new(&section, credentials, 1, true, policies(), 1024).expect("node")
    };
    let n1 = node("n1", a1, vec![a2, a3], &pki.credentials("n1"));
    let n2 = node("n2", a2, vec![a1], &pki.credentials("n2"));
    let n3 = node(third_id, a3, vec![a1], third);
    let (stop, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for (node, l) in [(&n1, l1), (&n2, l2), (&n3, l3)] {
        let (sink, _) = recorder();
        tasks.extend(node.run(l, sink, rx.clone()));
    }
    wait_for("n1 and n2 live over TLS", || {
        let s = n1.status();
        s.phase == "connected" && s.peers.iter().any(|p| p.live && p.node_id == "n2")
    })
    .await;
    TlsTrio {
        n1,
        third: n3,
        a1,
        a3,
        stop,
        _tasks: tasks,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_peers_speak_only_as_their_certificate() {
    let pki = Pki::new();
    // n1 dials n3 too: n3's certificate is the CA's, but its heartbeats (and answers) say n4,
    // which the certificate does not name.
    let TlsTrio {
        n1,
        third: n3,
        a1,
        stop,
        ..
    } = tls_trio(&pki, "n4", &pki.credentials("n3")).await;
    // n3's heartbeats are refused, and so are its answers to n1's: it is never heard from
    // as n4 (the members n1 counts are n2 and n3's address, whose node it never learns).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = n1.status();
    assert!(
        s.peers
            .iter()
            .all(|p| p.node_id != "n4" && (p.live == (p.node_id == "n2"))),
        "the impostor is not heard from: {s:?}"
    );
    assert!(
        s.traffic.as_ref().is_some_and(|t| t.heartbeats_failed > 0),
        "n1's heartbeats to n3 failed: {s:?}"
    );
    // n3 hears n1's heartbeats (n1 is who its certificate says), but no answer of n1 to its
    // own: n1's endpoint stays unknown to it.
    assert!(
        n3.status()
            .peers
            .iter()
            .filter(|p| p.address == a1.to_string())
            .all(|p| !p.live && p.node_id.is_empty()),
        "{:?}",
        n3.status()
    );
    // Without a client certificate, nothing gets through the handshake.
    let plain = Endpoint::from_shared(format!("https://{a1}"))
        .expect("uri")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pki.0.pem()))
                .domain_name("limiter-cluster"),
        )
        .expect("tls")
        .connect()
        .await;
    if let Ok(channel) = plain {
        let e = PeerClient::new(channel)
            .heartbeat(Heartbeat {
                node_id: "n9".into(),
                members: 1,
                ..Heartbeat::default()
            })
            .await
            .expect_err("no client certificate");
        assert_ne!(e.code(), tonic::Code::Ok);
    }
    assert!(n1.status().peers.iter().all(|p| p.node_id != "n9"));
    stop.send_replace(true);
}

/// A peer whose certificate another CA signed (a member of another cluster, or an attacker with
/// a certificate of its own) fails the handshake both ways: it is never heard from, its name is
/// never learned, and the heartbeats to it count as failed, while the members of this CA go on.
/// It trusts this cluster's CA, so that each way fails on one check alone: its heartbeats on
/// the answering side's check of client certificates, the heartbeats to it on the dialling
/// side's check of the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_another_ca_fails_the_handshake_both_ways() {
    let (pki, other) = (Pki::new(), Pki::new());
    let mut impostor = other.credentials("n5");
    if let Some(tls) = &mut impostor.tls {
        tls.ca = pki.0.pem().into_bytes();
    }
    let TlsTrio {
        n1,
        third: n5,
        a3: a5,
        stop,
        ..
    } = tls_trio(&pki, "n5", &impostor).await;
    // From here n2 answers: what fails is n1's heartbeats to n5.
    let failed = |s: &proto::ClusterStatus| s.traffic.as_ref().map_or(0, |t| t.heartbeats_failed);
    let before = failed(&n1.status());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = n1.status();
    assert!(
        s.peers.iter().all(|p| p.node_id != "n5")
            && s.peers
                .iter()
                .filter(|p| p.address == a5.to_string())
                .all(|p| !p.live),
        "n5 is never heard from: {s:?}"
    );
    assert!(failed(&s) > before, "n1's heartbeats to n5 failed: {s:?}");
    let s5 = n5.status();
    assert!(
        s5.peers.iter().all(|p| !p.live && p.node_id.is_empty()),
        "n5 hears nobody: {s5:?}"
    );
    assert!(
        s5.traffic.as_ref().is_some_and(|t| t.heartbeats_failed > 0),
        "n5's heartbeats to n1 failed: {s5:?}"
    );
    stop.send_replace(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_named_by_dns_are_resolved_and_dialled() {
    let (l1, a1) = listener().await;
    let (l2, a2) = listener().await;
    let mut c1 = section("n1", a1, vec![]);
    c1.peers = vec![PeerAddr::Host {
        name: "localhost".into(),
        port: a2.port(),
    }];
    let n1 = Node::new(&c1, &token(), 1, true, policies(), 1024).expect("n1");
    let n2 = node("n2", a2, vec![a1]);
    // Not resolved yet: the name counts as a member, and the node is not alone.
    assert_eq!(n1.status().members, 2);
    assert_eq!(n1.share_view().phase, Phase::Connected);
    let (stop, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for (node, l) in [(&n1, l1), (&n2, l2)] {
        let (sink, _) = recorder();
        tasks.extend(node.run(l, sink, rx.clone()));
    }
    wait_for("localhost resolved and n2 live", || {
        n1.status()
            .peers
            .iter()
            .any(|p| p.live && p.node_id == "n2" && p.address == a2.to_string())
    })
    .await;
    // A reload that drops the name: the endpoint goes, the member stays counted a while.
    let mut c1 = section("n1", a1, vec![]);
    c1.peers.clear();
    n1.reconfigure(&c1, Some(TOKEN), policies())
        .expect("reconfigure");
    let s = n1.status();
    assert!(s.peers.iter().all(|p| p.address.is_empty()), "{s:?}");
    assert_eq!(s.members, 2, "n2 is still counted: {s:?}");
    stop.send_replace(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_is_this_node_is_not_counted() {
    let (l1, a1) = listener().await;
    let n1 = node("n1", a1, vec![a1]);
    let (stop, rx) = watch::channel(false);
    let (sink, share) = recorder();
    let _t = n1.run(l1, sink, rx);
    wait_for("n1 alone", || n1.status().phase == "alone").await;
    let s = n1.status();
    assert_eq!((s.members, s.agreed_members), (1, 1), "{s:?}");
    assert_eq!(
        share.load(Ordering::SeqCst),
        40,
        "the maps got the whole limit"
    );
    stop.send_replace(true);
}

#[test]
fn a_reload_cannot_drop_the_token_of_a_listener_without_tls() {
    let a: SocketAddr = "127.0.0.1:7201".parse().expect("addr");
    let n1 = node("n1", a, vec![]);
    let e = n1
        .reconfigure(&section("n1", a, vec![]), None, policies())
        .expect_err("no credentials left");
    assert!(matches!(e, NodeError::AuthChange), "{e}");
    assert!(n1.shared.token().is_some(), "the token in force stays");
}

/// A client the fast path reports hot while the node runs no rounds (joining after a start
/// without pins, where the share is 0 and every busy global client is dropped; or cut off)
/// is taken up once it splits again: the fast path reports a client once, when it moves into
/// `LIMITED`, and one that stays busy gets no second notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_notice_while_joining_is_taken_up_once_connected() {
    let (l1, a1) = listener().await;
    let (l2, a2) = listener().await;
    // n1 starts without pins: joining until n2 counts it.
    let n1 = Node::new(
        &section("n1", a1, vec![a2]),
        &token(),
        1,
        false,
        policies(),
        1024,
    )
    .expect("n1");
    let n2 = node("n2", a2, vec![a1]);
    n1.set_datapath(Busy::new(vec![[7; 16]]));
    assert_eq!(n1.status().phase, "joining");
    enrolment::round(&n1.shared);
    let (_stop1, rx1) = watch::channel(false);
    let (_stop2, rx2) = watch::channel(false);
    let (sink1, _) = recorder();
    let (sink2, _) = recorder();
    let _t1 = n1.run(l1, sink1, rx1);
    let _t2 = n2.run(l2, sink2, rx2);
    wait_for("n1 connected, views agreed", || {
        let s = n1.status();
        s.phase == "connected" && s.views_agree
    })
    .await;
    wait_for(
        "n1 holds the client reported hot while it was joining",
        || n1.shared.enrolment().counts(enrolment::monotonic()).held == 1,
    )
    .await;
}

/// Maps whose every entry is a client of `policies()`'s global policy, counting 1,000 packets a
/// second since they were made (hot against any share of its L = 40); `hot` is reported once.
struct Busy {
    hot: Vec<ClientKey>,
    since: Instant,
    /// What every entry is under.
    under: Under,
}

impl Busy {
    fn new(hot: Vec<ClientKey>) -> Box<Busy> {
        Box::new(Busy {
            hot,
            since: Instant::now(),
            under: Under::Global(policies().global[0].wire_name()),
        })
    }
}

impl Datapath for Busy {
    fn hot(&mut self) -> Vec<(ClientKey, PolicyName)> {
        let name = policies().global[0].wire_name();
        std::mem::take(&mut self.hot)
            .into_iter()
            .map(|client| (client, name))
            .collect()
    }

    fn entries(&mut self, clients: &[ClientKey]) -> Vec<Option<Entry>> {
        let policy = limiter_common::Policy {
            limit: 20,
            window_us: 1_000_000,
            id: 1,
            ..limiter_common::Policy::default()
        };
        let mut state = limiter_common::ClientState::fresh(&policy, 0);
        state.set_dropped_count(self.since.elapsed().as_millis() as u64);
        let entry = Entry {
            state,
            under: self.under,
        };
        vec![Some(entry); clients.len()]
    }

    fn write(
        &mut self,
        _: &[(ClientKey, Option<limiter_common::Grant>)],
    ) -> Vec<(usize, GrantsError)> {
        Vec::new()
    }

    fn grants(&self) -> Result<Vec<crate::cluster::enrolment::PinnedGrant>, GrantsError> {
        Ok(Vec::new())
    }
}

/// Two running nodes that list each other, on [`Busy`] maps; n1's fast path reports client
/// `[7; 16]` hot. The nodes stop when this is dropped.
struct BusyPair {
    n1: Node,
    n2: Node,
    a1: SocketAddr,
    a2: SocketAddr,
    _stop: [watch::Sender<bool>; 2],
}

impl BusyPair {
    async fn start() -> BusyPair {
        let (l1, a1) = listener().await;
        let (l2, a2) = listener().await;
        let node = |id: &str, a, peer| {
            Node::new(
                &section(id, a, vec![peer]),
                &token(),
                1,
                true,
                policies(),
                1024,
            )
            .expect(id)
        };
        let (n1, n2) = (node("n1", a1, a2), node("n2", a2, a1));
        n1.set_datapath(Busy::new(vec![[7; 16]]));
        n2.set_datapath(Busy::new(Vec::new()));
        let (stop1, rx1) = watch::channel(false);
        let (stop2, rx2) = watch::channel(false);
        let (sink1, _) = recorder();
        let (sink2, _) = recorder();
        drop(n1.run(l1, sink1, rx1));
        drop(n2.run(l2, sink2, rx2));
        BusyPair {
            n1,
            n2,
            a1,
            a2,
            _stop: [stop1, stop2],
        }
    }
}

/// A reload that renumbers a member's policies (a local policy added before the global one)
/// changes nothing of what it holds: members name policies by content, and enrolment keeps
/// those names, so the grants it gets stay its own (not foreign) and the client stays held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_renumbers_policies_keeps_what_is_held() {
    let pair = BusyPair::start().await;
    let (n1, n2, a1, a2) = (&pair.n1, &pair.n2, pair.a1, pair.a2);
    let counts = |n: &Node| n.shared.enrolment().counts(enrolment::monotonic());
    wait_for("both hold the client, with a grant", || {
        [&n1, &n2].iter().all(|n| {
            let c = counts(n);
            c.held == 1 && c.granted == 1
        })
    })
    .await;
    let mut renumbered = policies();
    renumbered.global[0].id = 2;
    n1.reconfigure(&section("n1", a1, vec![a2]), Some(TOKEN), renumbered)
        .expect("reconfigured");
    // Twenty sync intervals: grants keep coming under the policy's name.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for (name, n) in [("n1", &n1), ("n2", &n2)] {
        let c = counts(n);
        assert_eq!((c.held, c.granted, c.foreign), (1, 1, 0), "{name}: {c:?}");
    }
    assert!(n1.status().views_agree, "the views still agree");
}

/// A member that is heard from but not among this node's peers (the middle of a rolling add:
/// n2 does not list n1 yet) gets this node's reports in the answers to its heartbeats: a client
/// it owns is enrolled and granted, not left at its cold share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_only_heard_from_gets_its_reports_in_the_answers() {
    let (l1, a1) = listener().await;
    let (l2, a2) = listener().await;
    let n1 = node("n1", a1, vec![a2]);
    let n2 = node("n2", a2, vec![]);
    let members = [
        NodeId::new("n1").expect("id"),
        NodeId::new("n2").expect("id"),
    ];
    let client = (0u8..=255)
        .map(|b| [b; 16])
        .find(|k| crate::cluster::owner::owner(k, &members) == Some(&members[0]))
        .expect("a client n1 owns");
    n1.set_datapath(Busy::new(Vec::new()));
    n2.set_datapath(Busy::new(vec![client]));
    let (_stop1, rx1) = watch::channel(false);
    let (_stop2, rx2) = watch::channel(false);
    let (sink1, _) = recorder();
    let (sink2, _) = recorder();
    let _t1 = n1.run(l1, sink1, rx1);
    let _t2 = n2.run(l2, sink2, rx2);
    let counts = |n: &Node| n.shared.enrolment().counts(enrolment::monotonic());
    wait_for(
        "n1 owns the client n2 reported, and both hold it with a grant",
        || {
            let (c1, c2) = (counts(&n1), counts(&n2));
            c1.owned == 1 && c1.granted == 1 && c2.held == 1 && c2.granted == 1
        },
    )
    .await;
}

/// A refusal repeated at every heartbeat is said once, then again only when it changes.
#[tokio::test]
async fn a_repeated_warning_is_said_once_until_it_changes() {
    let (_l, a) = listener().await;
    let n = Node::new(&section("n1", a, vec![]), &token(), 1, true, policies(), 16).expect("n1");
    let say = |about: &str, message: &str| n.shared.say(about.to_owned(), message);
    assert!(say("refused 127.0.0.1:1", "wrong cluster token"));
    assert!(!say("refused 127.0.0.1:1", "wrong cluster token"));
    assert!(
        say("refused 127.0.0.2:1", "wrong cluster token"),
        "another peer"
    );
    assert!(
        say("refused 127.0.0.1:1", "the cluster token is required"),
        "it changed"
    );
}

/// A held client whose entry is now under a local policy (a reload gave its address a longer
/// local policy) is let go: the grants its global policy's owner sends are not its policy's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_client_whose_entry_turned_local_is_let_go() {
    let pair = BusyPair::start().await;
    let n1 = &pair.n1;
    let counts = |n: &Node| n.shared.enrolment().counts(enrolment::monotonic());
    wait_for("n1 holds the client, with a grant", || {
        let c = counts(n1);
        c.held == 1 && c.granted == 1
    })
    .await;
    n1.set_datapath(Box::new(Busy {
        under: Under::Local,
        ..*Busy::new(Vec::new())
    }));
    wait_for("n1 lets the client go", || counts(n1).held == 0).await;
}

/// A decommissioned member (its agent stopped, its `peers` entries removed) keeps counting on
/// the agents that dialled it, until an operator forgets it on each: then, once it has been
/// silent for the forget delay, the agreed count and the shares follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommissioned_member_is_forgotten_on_each_agent() {
    let listeners = [listener().await, listener().await, listener().await];
    let addrs: Vec<SocketAddr> = listeners.iter().map(|(_, a)| *a).collect();
    let others = |k: usize, n: usize| -> Vec<SocketAddr> {
        (0..n).filter(|&j| j != k).map(|j| addrs[j]).collect()
    };
    let nodes: Vec<Node> = (0..3)
        .map(|k| {
            Node::new(
                &section(&format!("n{}", k + 1), addrs[k], others(k, 3)),
                &token(),
                1,
                true,
                policies(),
                1024,
            )
            .expect("node")
        })
        .collect();
    let (mut stops, mut shares, mut tasks) = (Vec::new(), Vec::new(), Vec::new());
    for (node, (l, _)) in nodes.iter().zip(listeners) {
        let (stop, rx) = watch::channel(false);
        let (sink, share) = recorder();
        tasks.push(node.run(l, sink, rx));
        stops.push(stop);
        shares.push(share);
    }
    wait_for("three members, every peer live and agreeing", || {
        nodes.iter().all(|n| {
            let s = n.status();
            s.agreed_members == 3
                && s.views_agree
                && s.peers.len() == 2
                && s.peers.iter().all(|p| p.live && p.agrees)
        })
    })
    .await;
    // n3 is decommissioned: its agent stops, the others' configs no longer name it.
    stops[2].send_replace(true);
    for k in 0..2 {
        let config = section(&format!("n{}", k + 1), addrs[k], others(k, 2));
        nodes[k]
            .reconfigure(&config, Some(TOKEN), policies())
            .expect("reload");
    }
    let n3 = NodeId::new("n3").expect("id");
    wait_for("n3 silent on n1 and n2", || {
        nodes[..2].iter().all(|n| {
            n.status()
                .peers
                .iter()
                .any(|p| p.node_id == "n3" && !p.live)
        })
    })
    .await;
    assert_eq!(
        nodes[0].status().members,
        3,
        "n3 counts for the agent's life"
    );
    // Refused: this node, a member behind an endpoint, an id never counted.
    let refused = |id: &str| nodes[0].forget(&NodeId::new(id).expect("id")).unwrap_err();
    assert!(matches!(refused("n1"), ForgetRefusal::ThisNode(_)));
    assert!(matches!(refused("n2"), ForgetRefusal::Endpoint(..)));
    assert!(matches!(refused("n9"), ForgetRefusal::Unknown(_)));
    let forgotten = nodes[0].forget(&n3).expect("forget on n1");
    assert!(forgotten.was_learned, "{forgotten:?}");
    let leaves_in = forgotten.leaves_in.expect("leaves_in");
    assert!(
        leaves_in.seconds > 0 && leaves_in.seconds < 10,
        "heard within the 10 s forget delay: {forgotten:?}"
    );
    assert_eq!(
        (
            forgotten.members_before,
            forgotten.members_after,
            forgotten.agreed_members
        ),
        (3, 3, 3)
    );
    // Once n3 has been silent for the forget delay n1 counts two, but n2, which has not
    // forgotten it, still reports three: the shares stay at ⌊40/3⌋.
    let deadline = Instant::now() + Duration::from_secs(15);
    while nodes[0].status().members != 2 {
        assert!(
            Instant::now() < deadline,
            "n1 still counts n3 15 s after forgetting it: {:?}",
            nodes[0].status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = nodes[0].status();
    assert_eq!(s.agreed_members, 3, "n2 reports three: {s:?}");
    assert!(!s.views_agree);
    // The view of three is in force (the sink is called only when the view changes, and it
    // has not since the start).
    assert_eq!(nodes[0].share_view().share(40), 13);
    assert!(matches!(shares[0].load(Ordering::SeqCst), 13 | u32::MAX));
    // Silent past the delay on n2 too (n2 may have heard n3 last a little after n1 did: it
    // lists n3 until then), then forgotten there at once.
    wait_for("n3 silent past the forget delay on n2", || {
        !nodes[1].status().peers.iter().any(|p| p.node_id == "n3")
    })
    .await;
    let forgotten = nodes[1].forget(&n3).expect("forget on n2");
    assert_eq!(
        (forgotten.was_learned, forgotten.members_after),
        (true, 2),
        "{forgotten:?}"
    );
    assert_eq!(
        forgotten.leaves_in,
        prost_types::Duration::try_from(Duration::ZERO).ok()
    );
    wait_for("two members agreed, and the shares follow", || {
        nodes[..2].iter().all(|n| n.status().agreed_members == 2)
            && shares[..2].iter().all(|s| s.load(Ordering::SeqCst) == 20)
    })
    .await;
    for stop in &stops {
        stop.send_replace(true);
    }
}

/// When another writer left the maps with a view the node did not write (a reload that removed
/// the `cluster:` section and one that added it back, seen by the agent as one: the store wrote
/// a joining view, admitting nothing), the next round writes membership's view again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_another_writer_left_in_the_maps_is_replaced() {
    let (l, a) = listener().await;
    let node = node("n1", a, vec![]);
    let (_stop, rx) = watch::channel(false);
    let (sink, share) = recorder();
    let _tasks = node.run(l, sink, rx);
    // Alone from the start: the view in force is membership's, so nothing is written.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(share.load(Ordering::SeqCst), u32::MAX, "nothing written");
    let alone = node.share_view();
    node.maps_hold(ShareView::JOINING, ShareView::JOINING);
    assert_eq!(
        node.share_view(),
        alone,
        "not the view in force: nothing changes"
    );
    node.maps_hold(alone, ShareView::JOINING);
    wait_for("membership's view written again", || {
        share.load(Ordering::SeqCst) == 40
    })
    .await;
    assert_eq!(node.share_view().phase, Phase::Alone);
}
