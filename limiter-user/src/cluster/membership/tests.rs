use super::*;

const TIMEOUT: Duration = Duration::from_secs(1);

fn id(s: &str) -> NodeId {
    NodeId::new(s).expect("id")
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn report(node: &str, seq: u64, members: u32, hash: u64) -> Report {
    Report {
        node: id(node),
        incarnation: 1,
        seq,
        members,
        view_hash: hash,
        policies_hash: 0,
        share_members: members,
    }
}

fn three(adopted: bool, partition: Partition, t0: Instant) -> Membership {
    let mut m = Membership::new(id("n1"), Timing::new(TIMEOUT), partition, adopted, t0);
    m.set_endpoints([addr(7202), addr(7203)]);
    m
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn configured_peers_count_before_they_answer_and_once_they_do() {
    let t0 = Instant::now();
    let mut m = three(true, Partition::Share, t0);
    assert_eq!(m.members(t0), 3);
    let hash = m.view_hash(t0);
    m.answered(addr(7202), t0, &report("n2", 1, 3, hash), t0 + ms(5))
        .expect("answer");
    assert_eq!(m.members(t0 + ms(5)), 3, "n2 replaces its placeholder");
    assert_eq!(m.share_view(t0 + ms(5)).phase, Phase::Connected);
    assert_eq!(m.share_view(t0 + ms(5)).share(40), 13);
}

#[test]
fn a_larger_view_lowers_the_share_until_forgotten() {
    let t0 = Instant::now();
    let mut m = three(true, Partition::Share, t0);
    m.answered(addr(7202), t0, &report("n2", 1, 5, 9), t0)
        .expect("answer");
    assert_eq!(m.agreed_members(t0), 5);
    assert!(!m.agreed(t0), "n2's view differs");
    assert_eq!(m.share_view(t0).share(100), 20);
    // Still counted long after n2 went silent (its program may still enforce its share)...
    let later = t0 + Timing::new(TIMEOUT).forget;
    assert_eq!(m.agreed_members(later), 5);
    // ...and forgotten after `forget`.
    assert_eq!(m.agreed_members(later + ms(1)), 3);
}

#[test]
fn a_claim_in_a_heartbeat_hides_an_endpoint_for_a_peer_timeout_at_most() {
    let t0 = Instant::now();
    let mut m = three(true, Partition::Share, t0);
    // n2 heartbeats first: taken for one of the endpoints that have not answered yet (every
    // member lists every other), so three.
    m.heard(&report("n2", 1, 3, 0), t0).expect("heard");
    assert_eq!(m.members(t0), 3);
    // `peer_timeout` after it was first heard, 7202 and 7203 count until they answer (perhaps
    // as someone else), and n2 by its id: four, which is safe.
    let later = t0 + TIMEOUT;
    m.heard(&report("n2", 2, 3, 0), later).expect("heard");
    assert_eq!(m.members(later), 4);
    m.answered(addr(7202), later, &report("n2", 3, 3, 0), later)
        .expect("answer");
    assert_eq!(m.members(later), 3);
}

/// Restarting an agent of a running cluster: its peers' heartbeats arrive before the answers
/// to its own. Counted by id and by endpoint, it reported five members for a sync interval,
/// and every member of the cluster took the shares of five (found by hand: 13 of L = 40 fell to
/// 8 on all three nodes).
#[test]
fn a_start_counts_each_peer_once_whichever_speaks_first() {
    let t0 = Instant::now();
    let mut m = three(false, Partition::Share, t0);
    m.heard(&report("n2", 1, 3, 0), t0 + ms(10)).expect("heard");
    m.heard(&report("n3", 1, 3, 0), t0 + ms(20)).expect("heard");
    assert_eq!(m.members(t0 + ms(20)), 3);
    let view = m.share_view(t0 + ms(20));
    assert_eq!(view.phase, Phase::Joining);
    assert_eq!(m.report(2, 1, t0 + ms(20), &view).members, 3);
    // One answer: that endpoint is n3; n2 is still taken for the other.
    m.answered(addr(7203), t0 + ms(50), &report("n3", 2, 3, 0), t0 + ms(51))
        .expect("answer");
    assert_eq!(m.members(t0 + ms(51)), 3);
    m.answered(addr(7202), t0 + ms(50), &report("n2", 2, 3, 0), t0 + ms(52))
        .expect("answer");
    assert_eq!(m.members(t0 + ms(52)), 3);
    assert_eq!(m.agreed_members(t0 + ms(52)), 3);
}

/// What a heard member is taken for: only endpoints that have not answered at all, never more
/// of them than there are members heard from that no endpoint answered as, and only for
/// `peer_timeout` after it was first heard.
#[test]
fn a_heard_member_is_taken_only_for_an_endpoint_that_has_not_answered() {
    let t0 = Instant::now();
    // One endpoint answered as n2; n3 heard from: 7203 may be n3.
    let mut m = three(true, Partition::Share, t0);
    m.answered(addr(7202), t0, &report("n2", 1, 3, 0), t0)
        .expect("answer");
    m.heard(&report("n3", 1, 3, 0), t0).expect("heard");
    assert_eq!(m.members(t0), 3);
    // n2 heard too, by its own heartbeat: it is 7202's, and takes no other endpoint's place.
    m.heard(&report("n2", 2, 3, 0), t0).expect("heard");
    assert_eq!(m.members(t0), 3);
    // Three members heard from, one endpoint unanswered: one of them is taken for it.
    m.heard(&report("n4", 1, 4, 0), t0).expect("heard");
    assert_eq!(m.members(t0), 4);
    // An endpoint that answered with this node's id (another node using it) counts on its own.
    let mut m = three(true, Partition::Share, t0);
    m.answered(addr(7202), t0, &report("n2", 1, 3, 0), t0)
        .expect("answer");
    m.answered_as_this_node(addr(7203), false);
    m.heard(&report("n3", 1, 3, 0), t0).expect("heard");
    assert_eq!(m.members(t0), 4, "n2, 7203 (as n1 again) and n3");
    // A peer that starts long after this node (a cluster brought up member by member), from
    // when it is first heard; hearing it again does not extend that.
    let mut m = three(true, Partition::Share, t0);
    let t1 = t0 + TIMEOUT * 5;
    m.heard(&report("n3", 1, 3, 0), t1).expect("heard");
    assert_eq!(m.members(t1), 3);
    m.heard(&report("n3", 2, 3, 0), t1 + TIMEOUT / 2)
        .expect("heard");
    assert_eq!(m.members(t1 + TIMEOUT - ms(1)), 3);
    assert_eq!(m.members(t1 + TIMEOUT), 4);
}

#[test]
fn a_member_heard_only_counts_as_one_more() {
    let t0 = Instant::now();
    let mut m = three(true, Partition::Share, t0);
    // Taken for an endpoint not answered yet at first, then counted on its own.
    m.heard(&report("n4", 1, 4, 0), t0).expect("heard");
    assert_eq!(m.members(t0), 3);
    let later = t0 + TIMEOUT;
    assert_eq!(m.members(later), 4);
    assert_eq!(m.peers(later).len(), 3);
    // With both endpoints answered, even at the start.
    let mut m = three(true, Partition::Share, t0);
    m.answered(addr(7202), t0, &report("n2", 1, 3, 0), t0)
        .expect("answer");
    m.answered(addr(7203), t0, &report("n3", 1, 3, 0), t0)
        .expect("answer");
    m.heard(&report("n4", 1, 4, 0), t0).expect("heard");
    assert_eq!(m.members(t0), 4);
}

#[test]
fn liveness_needs_an_echo_of_a_recent_heartbeat() {
    let t0 = Instant::now();
    let mut m = three(true, Partition::Share, t0);
    // A heartbeat of theirs arriving proves nothing about ours reaching them.
    m.heard(&report("n2", 1, 3, 0), t0 + TIMEOUT)
        .expect("heard");
    assert_eq!(m.phase(t0 + TIMEOUT + ms(1)), Phase::CutOff);
    // An answer to a heartbeat sent long ago does not make it live either.
    m.answered(addr(7202), t0, &report("n2", 2, 3, 0), t0 + TIMEOUT * 2)
        .expect("answer");
    assert_eq!(m.phase(t0 + TIMEOUT * 2), Phase::CutOff);
    m.answered(
        addr(7202),
        t0 + TIMEOUT * 2,
        &report("n2", 3, 3, 0),
        t0 + TIMEOUT * 2,
    )
    .expect("answer");
    assert_eq!(m.phase(t0 + TIMEOUT * 2), Phase::Connected);
    assert_eq!(m.phase(t0 + TIMEOUT * 3), Phase::Connected);
    assert_eq!(m.phase(t0 + TIMEOUT * 3 + ms(1)), Phase::CutOff);
}

#[test]
fn partition_policies_decide_a_cut_off_share() {
    let t0 = Instant::now();
    let later = t0 + TIMEOUT * 2;
    for (partition, share) in [
        (Partition::Share, 13),
        (Partition::Local, 40),
        (Partition::Deny, 0),
    ] {
        let mut m = three(true, partition, t0);
        let view = m.share_view(later);
        assert_eq!(view.phase, Phase::CutOff);
        assert_eq!(view.share(40), share, "{partition}");
    }
    // Not cut off before a peer_timeout has passed since the start.
    assert_eq!(
        three(true, Partition::Deny, t0)
            .share_view(t0 + ms(10))
            .share(40),
        13
    );
}

#[test]
fn a_node_without_pins_admits_nothing_until_counted() {
    let t0 = Instant::now();
    let mut m = three(false, Partition::Share, t0);
    assert_eq!(m.share_view(t0).share(40), 0);
    // n2 answers but counts only 2 members: it has not counted us yet.
    m.answered(addr(7202), t0, &report("n2", 1, 2, 0), t0 + ms(10))
        .expect("answer");
    m.answered(addr(7203), t0, &report("n3", 1, 3, 0), t0 + ms(10))
        .expect("answer");
    assert_eq!(m.phase(t0 + ms(10)), Phase::Joining);
    m.answered(addr(7202), t0 + ms(50), &report("n2", 2, 3, 0), t0 + ms(60))
        .expect("answer");
    // Counted by both: the gate is open, and one stretched lease of holding follows.
    let hold = Timing::new(TIMEOUT).hold;
    assert!(hold > TIMEOUT, "a lease stretched by drift: {hold:?}");
    assert_eq!(m.share_view(t0 + ms(60)).share(40), 0);
    assert_eq!(m.phase(t0 + ms(60) + hold - ms(1)), Phase::Joining);
    // Answers keep coming (the peers stay live).
    let later = t0 + ms(60) + hold;
    for (port, node) in [(7202, "n2"), (7203, "n3")] {
        m.answered(addr(port), later, &report(node, 9, 3, 0), later)
            .expect("answer");
    }
    let view = m.share_view(later);
    assert_eq!(view.phase, Phase::Connected);
    assert_eq!(view.share(40), 13);
    // Latched: n2 forgetting us for a moment does not stop admission.
    m.answered(addr(7202), later, &report("n2", 10, 2, 0), later + ms(10))
        .expect("answer");
    assert_eq!(m.phase(later + ms(10)), Phase::Connected);
}

#[test]
fn a_peers_own_heartbeat_does_not_open_the_join_gate() {
    // After a restart, a peer's heartbeats count us from before: only an answer to one of
    // ours shows that it has seen this incarnation (and that its owners count us afresh).
    let t0 = Instant::now();
    let mut m = three(false, Partition::Share, t0);
    m.heard(&report("n2", 1, 3, 0), t0).expect("heard");
    m.heard(&report("n3", 1, 3, 0), t0).expect("heard");
    m.answered(addr(7202), t0, &report("n2", 2, 3, 0), t0 + ms(1))
        .expect("answer");
    assert_eq!(m.phase(t0 + ms(1)), Phase::Joining);
    assert!(!m.joined, "n3's endpoint has not answered");
    m.answered(addr(7203), t0, &report("n3", 2, 3, 0), t0 + ms(2))
        .expect("answer");
    assert_eq!(m.phase(t0 + ms(2)), Phase::Joining, "holding");
    assert!(m.joined);
}

#[test]
fn a_new_incarnation_is_told_apart() {
    let t0 = Instant::now();
    let mut m = three(true, Partition::Share, t0);
    assert_eq!(m.heard(&report("n2", 5, 3, 0), t0), Ok(Heard::Known));
    assert_eq!(m.heard(&report("n2", 6, 3, 0), t0), Ok(Heard::Known));
    let again = Report {
        incarnation: 2,
        ..report("n2", 1, 3, 0)
    };
    assert_eq!(m.answered(addr(7202), t0, &again, t0), Ok(Heard::Restarted));
    assert_eq!(m.heard(&again, t0), Ok(Heard::Known), "told once");
    // A late report of the earlier incarnation is not a restart.
    assert_eq!(m.heard(&report("n2", 7, 3, 0), t0), Ok(Heard::Known));
}

#[test]
fn the_join_gate_opens_after_its_limit() {
    let t0 = Instant::now();
    let mut m = three(false, Partition::Share, t0);
    // Counted at three before this restart (the state directory says so).
    m.set_floor(3, t0);
    let Timing {
        join_limit, hold, ..
    } = Timing::new(TIMEOUT);
    assert_eq!(m.phase(t0 + join_limit - ms(1)), Phase::Joining);
    assert_eq!(m.phase(t0 + join_limit), Phase::Joining, "holding");
    assert_eq!(m.phase(t0 + join_limit + hold - ms(1)), Phase::Joining);
    // Nobody answered: cut off, and `share` keeps the cold share.
    let view = m.share_view(t0 + join_limit + hold);
    assert_eq!(view.phase, Phase::CutOff);
    assert_eq!(view.share(40), 13);
}

#[test]
fn peers_cannot_claim_our_id_or_a_zero_count() {
    let t0 = Instant::now();
    let mut m = three(true, Partition::Share, t0);
    assert_eq!(
        m.heard(&report("n1", 1, 3, 0), t0),
        Err(Refusal::OwnId(id("n1")))
    );
    assert_eq!(m.heard(&report("n2", 1, 0, 0), t0), Err(Refusal::NoMembers));
    // An endpoint that answers with this node's id is refused, and changes nothing by itself.
    assert_eq!(
        m.answered(addr(7203), t0, &report("n1", 1, 3, 0), t0),
        Err(Refusal::OwnId(id("n1")))
    );
    assert_eq!(m.members(t0), 3);
    // Another node using this node's id (its answer carries another nonce): still a member.
    m.answered_as_this_node(addr(7203), false);
    assert_eq!(m.members(t0), 3);
    // This node itself (the answer carries its own nonce): not counted.
    m.answered_as_this_node(addr(7203), true);
    assert_eq!(m.members(t0), 2);
    // The address now answers as another node that uses this node's id: counted again.
    m.answered_as_this_node(addr(7203), false);
    assert_eq!(m.members(t0), 3);
}

#[test]
fn stale_reports_do_not_replace_newer_views() {
    let t0 = Instant::now();
    let mut m = three(true, Partition::Share, t0);
    // Heard only (its endpoint has not answered): n1, n2 and two unknown endpoints.
    m.heard(&report("n2", 5, 6, 0), t0).expect("heard");
    m.heard(&report("n2", 3, 9, 0), t0).expect("heard");
    assert_eq!(m.agreed_members(t0), 6, "the older report's 9 is ignored");
    // A new incarnation starts its sequence again.
    m.heard(
        &Report {
            incarnation: 2,
            ..report("n2", 1, 5, 0)
        },
        t0,
    )
    .expect("heard");
    assert_eq!(m.agreed_members(t0), 5);
}

#[test]
fn the_member_table_is_bounded() {
    let t0 = Instant::now();
    let mut m = three(true, Partition::Share, t0);
    let mut refused = 0;
    for i in 0..(MAX_MEMBERS + 10) {
        if m.heard(&report(&format!("x{i}"), 1, 2, 0), t0).is_err() {
            refused += 1;
        }
    }
    assert!(refused >= 10);
    // The table of members heard is bounded; the count is never capped below the truth (once
    // those heard are no longer taken for the endpoints that have not answered).
    assert_eq!(
        m.members(t0 + TIMEOUT),
        MAX_MEMBERS as u32 + 3,
        "256 heard, this node, two endpoints"
    );
}

#[test]
fn alone_is_the_whole_cluster() {
    let t0 = Instant::now();
    let mut m = Membership::new(id("n1"), Timing::new(TIMEOUT), Partition::Deny, false, t0);
    let view = m.share_view(t0 + TIMEOUT * 5);
    assert_eq!(view.phase, Phase::Alone);
    assert_eq!(view.share(40), 40);
}

#[test]
fn a_peer_name_not_resolved_yet_counts_and_keeps_the_node_from_being_alone() {
    let t0 = Instant::now();
    let mut m = Membership::new(id("n1"), Timing::new(TIMEOUT), Partition::Share, false, t0);
    m.set_unresolved(1);
    assert_eq!(m.members(t0), 2);
    let view = m.share_view(t0);
    assert_eq!(view.phase, Phase::Joining, "not alone, and not counted yet");
    assert_eq!(view.share(40), 0);
    // Resolved and answered as n2, counting both: the gate opens.
    m.set_unresolved(0);
    m.set_endpoints([addr(7202)]);
    m.answered(addr(7202), t0, &report("n2", 1, 2, 0), t0)
        .expect("answer");
    assert_eq!(m.share_view(t0).share(40), 0, "holding");
    let hold = Timing::new(TIMEOUT).hold;
    m.answered(addr(7202), t0 + hold, &report("n2", 2, 2, 0), t0 + hold)
        .expect("answer");
    assert_eq!(m.share_view(t0 + hold).share(40), 20);
}

#[test]
fn a_member_found_through_an_endpoint_counts_after_the_endpoint_goes() {
    let t0 = Instant::now();
    let mut m = three(true, Partition::Share, t0);
    m.answered(addr(7202), t0, &report("n2", 1, 3, 0), t0)
        .expect("answer");
    // Its DNS record goes (a pod not ready): long after, it still counts.
    m.set_endpoints([addr(7203)]);
    let later = t0 + Duration::from_secs(3600);
    assert_eq!(m.members(later), 3);
}

#[test]
fn an_operator_forgets_a_decommissioned_member_once_it_is_silent() {
    let t0 = Instant::now();
    let mut m = three(true, Partition::Share, t0);
    let forget = Timing::new(TIMEOUT).forget;
    for (port, node) in [(7202, "n2"), (7203, "n3")] {
        m.answered(addr(port), t0, &report(node, 1, 3, 0), t0)
            .expect("answer");
    }
    let n3 = id("n3");
    assert_eq!(
        m.forget_member(&n3, t0 + ms(10)),
        Err(ForgetRefusal::Endpoint(n3.clone(), addr(7203))),
        "an endpoint's member counts while the endpoint is configured"
    );
    // n3's host is decommissioned: its `peers` entry goes, its id stays counted.
    m.set_endpoints([addr(7202)]);
    assert_eq!(
        m.forget_member(&n3, t0 + ms(500)),
        Err(ForgetRefusal::Live(n3.clone(), ms(500))),
        "heard within peer_timeout"
    );
    assert_eq!(m.members(t0 + ms(500)), 3, "refusals change nothing");
    // Forgotten 2 s after it was last heard: it still counts until `forget` of silence.
    let at = t0 + Duration::from_secs(2);
    let forgotten = m.forget_member(&n3, at).expect("forget");
    assert_eq!(
        forgotten,
        Forgotten {
            was_learned: true,
            leaves_in: forget - Duration::from_secs(2),
            members_before: 3,
            members_after: 3,
        }
    );
    assert_eq!(m.members(t0 + forget), 3, "not before `forget` of silence");
    assert_eq!(m.members(t0 + forget + ms(1)), 2);
    assert_eq!(m.agreed_members(t0 + forget + ms(1)), 2);
    assert_eq!(
        m.forget_member(&n3, t0 + forget + ms(1)),
        Err(ForgetRefusal::Unknown(n3.clone())),
        "forgotten already"
    );
}

#[test]
fn a_member_silent_past_the_delay_is_forgotten_at_once_and_others_are_refused() {
    let t0 = Instant::now();
    let mut m = three(true, Partition::Share, t0);
    let forget = Timing::new(TIMEOUT).forget;
    m.answered(addr(7202), t0, &report("n2", 1, 3, 0), t0)
        .expect("answer");
    m.set_endpoints([addr(7203)]);
    let later = t0 + forget + ms(1);
    assert_eq!(m.members(later), 3, "n2 counts for the life of the process");
    let forgotten = m.forget_member(&id("n2"), later).expect("forget");
    assert_eq!(forgotten.leaves_in, Duration::ZERO);
    assert_eq!((forgotten.members_before, forgotten.members_after), (3, 2));
    assert_eq!(m.members(later), 2);
    // If its endpoint answers again, it counts again.
    m.set_endpoints([addr(7202), addr(7203)]);
    m.answered(addr(7202), later, &report("n2", 2, 3, 0), later)
        .expect("answer");
    assert_eq!(m.members(later), 3);
    assert_eq!(
        m.forget_member(&id("n1"), later),
        Err(ForgetRefusal::ThisNode(id("n1")))
    );
    assert_eq!(
        m.forget_member(&id("n9"), later),
        Err(ForgetRefusal::Unknown(id("n9")))
    );
    // A member only heard from (it dials us) leaves on its own: forgetting it changes nothing
    // but says when.
    m.heard(&report("n4", 1, 4, 0), later).expect("heard");
    let at = later + Duration::from_secs(3);
    let heard_only = m.forget_member(&id("n4"), at).expect("forget");
    assert!(!heard_only.was_learned);
    assert_eq!(heard_only.leaves_in, forget - Duration::from_secs(3));
    assert_eq!(
        (heard_only.members_before, heard_only.members_after),
        (4, 4)
    );
}

#[test]
fn endpoints_past_the_table_still_count() {
    let t0 = Instant::now();
    let mut m = Membership::new(id("n1"), Timing::new(TIMEOUT), Partition::Share, true, t0);
    m.set_endpoints((0..300).map(|p| addr(10_000 + p)));
    assert_eq!(m.endpoints().count(), MAX_MEMBERS);
    assert_eq!(m.members(t0), 301);
}

#[test]
fn a_restart_counts_at_least_the_members_of_its_previous_run() {
    let t0 = Instant::now();
    // The previous run had agreed on four (a member added that this config does not list yet).
    let mut m = three(true, Partition::Share, t0);
    m.set_floor(4, t0);
    assert_eq!(m.share_view(t0).share(40), 10);
    let forget = Timing::new(TIMEOUT).forget;
    assert_eq!(m.agreed_members(t0 + forget), 4);
    assert_eq!(m.agreed_members(t0 + forget + Duration::from_millis(1)), 3);
}

/// With views that differ, status says what differs, from the policies hash heartbeats carry
/// apart from the view hash: the policies (or `peer_timeout`), the member list, or both; nothing
/// for a peer that sends no policies hash (an older agent).
#[test]
fn a_peer_whose_view_differs_is_shown_with_what_differs() {
    let t0 = Instant::now();
    let mut m = three(true, Partition::Share, t0);
    m.set_policies_hash(11);
    let at = t0 + ms(5);
    let with = |node: &str, seq: u64, view_hash: u64, policies_hash: u64| Report {
        policies_hash,
        ..report(node, seq, 3, view_hash)
    };
    m.answered(addr(7202), t0, &with("n2", 1, 0xbad, 11), at)
        .expect("answer");
    m.answered(addr(7203), t0, &with("n3", 1, 0xbad, 12), at)
        .expect("answer");
    // What n3 would send counting the members this node counts (n1, n2, n3).
    let same_list = |m: &Membership, policies_hash| m.view_hash_with(at, policies_hash);
    let differs = |m: &Membership, id: &str| {
        m.peers(at)
            .into_iter()
            .find(|p| p.node.as_ref().is_some_and(|n| n.as_str() == id))
            .map(|p| (p.agrees, p.differs))
    };
    assert_eq!(differs(&m, "n2"), Some((false, vec![Differs::Members])));
    assert_eq!(
        differs(&m, "n3"),
        Some((false, vec![Differs::Policies, Differs::Members])),
        "both, with the same member count"
    );
    let hash = same_list(&m, 12);
    m.answered(addr(7203), t0, &with("n3", 2, hash, 12), at)
        .expect("answer");
    assert_eq!(differs(&m, "n3"), Some((false, vec![Differs::Policies])));
    let hash = same_list(&m, 11);
    m.answered(addr(7203), t0, &with("n3", 3, hash, 11), at)
        .expect("answer");
    assert_eq!(differs(&m, "n3"), Some((true, vec![])), "agrees");
    m.answered(addr(7203), t0, &with("n3", 4, 0xbad, 0), at)
        .expect("answer");
    assert_eq!(differs(&m, "n3"), Some((false, vec![])), "an older agent");
}

#[test]
fn each_member_is_counted_at_the_count_its_maps_hold() {
    let t0 = Instant::now();
    let mut m = three(true, Partition::Share, t0);
    let hash = m.view_hash(t0);
    // `members` counted, `share` the count its maps hold.
    let says = |node: &str, seq: u64, members: u32, share: u32| Report {
        share_members: share,
        ..report(node, seq, members, 0)
    };
    m.answered(addr(7202), t0, &report("n2", 1, 3, hash), t0)
        .expect("answer");
    m.answered(addr(7203), t0, &report("n3", 1, 3, hash), t0)
        .expect("answer");
    let view = m.share_view(t0);
    let three_ids = [id("n1"), id("n2"), id("n3")];
    assert_eq!(m.counts(t0, &three_ids, &view), [Some(3); 3]);
    // n4 joins. n2 has taken it up; n3 counts it but its maps hold three still (the write
    // comes at its next sync interval, later if it stalls): it enforces the share of three,
    // and is counted so.
    let t1 = t0 + ms(10);
    m.heard(&says("n4", 1, 4, 0), t1).expect("heard");
    m.answered(addr(7202), t1, &says("n2", 2, 4, 4), t1)
        .expect("answer");
    m.answered(addr(7203), t1, &says("n3", 2, 4, 3), t1)
        .expect("answer");
    let four = m.share_view(t1);
    assert_eq!(four.members, 4);
    let (ids, _, _) = m.enrolment_view(t1);
    assert_eq!(ids, [id("n1"), id("n2"), id("n3"), id("n4")]);
    // n4 is joining: its maps admit nothing now, and the share it will write is of at least the
    // count it reports (two, when it has heard of few members yet), never above ours.
    assert_eq!(
        m.counts(t1, &ids, &four),
        [Some(4), Some(4), Some(3), Some(4)]
    );
    m.heard(&says("n4", 2, 2, 0), t1).expect("heard");
    assert_eq!(m.counts(t1, &ids, &four)[3], Some(2));
    m.heard(&says("n4", 3, 9, 0), t1).expect("heard");
    assert_eq!(m.counts(t1, &ids, &four)[3], Some(4));
    // This node's own is what its maps hold, not what it counts.
    assert_eq!(m.counts(t1, &ids, &view)[0], Some(3));
    // A leave the other way: n3 has forgotten a member its maps still hold (it counts fewer):
    // counted at what its maps hold, not at the smaller count it reports.
    let t2 = t0 + ms(30);
    m.answered(addr(7203), t1, &says("n3", 3, 3, 4), t2)
        .expect("answer");
    assert_eq!(m.counts(t2, &ids, &four)[2], Some(4));
    // An agent that predates the field (0) is counted at the count it reports.
    m.answered(addr(7202), t1, &says("n2", 3, 3, 0), t2)
        .expect("answer");
    assert_eq!(m.counts(t2, &ids, &four)[1], Some(3));
    // A leave: this node forgets n4 (silent for `forget`) while n2 and n3 still report four:
    // each may take the leave up as soon as it hears this node report three, before its
    // heartbeat says so, and is counted at the larger share of three from now on.
    let forget = Timing::new(TIMEOUT).forget;
    let t3 = t1 + forget + ms(1);
    m.answered(addr(7202), t3, &says("n2", 5, 4, 4), t3)
        .expect("answer");
    m.answered(addr(7203), t3, &says("n3", 5, 4, 4), t3)
        .expect("answer");
    assert_eq!(m.members(t3), 3, "n4 forgotten");
    // n4 itself, silent and forgotten, at this node's count.
    assert_eq!(
        m.counts(t3, &ids, &four),
        [Some(4), Some(3), Some(3), Some(3)]
    );
    // A member silent since is counted at what it reported last until it is forgotten, then
    // at this node's count. n4 is back, n3's maps hold three still, and n3 goes silent.
    let t4 = t3 + ms(10);
    m.heard(&says("n4", 4, 4, 4), t4).expect("heard");
    m.answered(addr(7203), t4, &says("n3", 6, 4, 3), t4)
        .expect("answer");
    m.heard(&says("n4", 5, 4, 4), t4 + forget).expect("heard");
    assert_eq!(m.counts(t4 + forget, &ids, &four)[2], Some(3));
    assert_eq!(m.counts(t4 + forget + ms(1), &ids, &four)[2], Some(4));
    // A count past what any view holds is refused, as a member count is.
    assert_eq!(
        m.heard(&says("n5", 1, 4, MAX_REPORTED_MEMBERS + 1), t4 + forget),
        Err(Refusal::TooManyMembers(MAX_REPORTED_MEMBERS + 1))
    );
}

/// With the table of ids endpoints answered as full, a member heard from may be one whose
/// endpoint answered and went, in neither table: it is taken for no endpoint (the review of
/// `heard_for_endpoints`).
#[test]
fn a_full_table_of_answered_ids_takes_no_heard_member_for_an_endpoint() {
    let t0 = Instant::now();
    let mut m = Membership::new(id("n0"), Timing::new(TIMEOUT), Partition::Share, true, t0);
    m.set_endpoints((0..=MAX_MEMBERS as u16).map(|i| addr(8000 + i)));
    for i in 0..MAX_MEMBERS as u16 {
        m.answered(addr(8000 + i), t0, &report(&format!("e{i}"), 1, 2, 0), t0)
            .expect("answer");
    }
    // Their heartbeats are forgotten, the ids they answered as are not.
    let t1 = t0 + Timing::new(TIMEOUT).forget + ms(1);
    m.heard(&report("y", 1, 2, 0), t1).expect("heard");
    assert_eq!(
        m.members(t1),
        MAX_MEMBERS as u32 + 3,
        "this node, the ids learned, the endpoint that never answered, and y"
    );
}
