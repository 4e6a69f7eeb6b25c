//! What the datapath holds of this member's grants: the changes each round writes (grants in
//! force, capped by the adaptive loop), what the maps held at start (adopted), and what the
//! datapath refused.

use std::{collections::HashMap, time::Duration};

use limiter_common::addr::ClientKey;

use super::{Enrolment, Held, Timing, Write, WriteGrants};

/// The stamp of a grant whose holder is quiet (`Held::quiet_until`): wanted as it is, with no
/// look each round, until the holder is woken ([`wake`]).
pub(super) const QUIET: u64 = u64::MAX;

/// `held` (of `client`) is to be looked at in the next round, and its grant in the next
/// writes; a grant stamped [`QUIET`] is wanted again only if those writes want it.
pub(super) fn wake(held: &mut Held, written: &mut HashMap<ClientKey, Written>, client: &ClientKey) {
    if held.quiet_until.take().is_some() {
        unquiet(written, client);
    }
}

/// Stamps `client`'s grant [`QUIET`] if the last writes (number `made`) wanted it; returns
/// whether it did.
pub(super) fn hush(
    written: &mut HashMap<ClientKey, Written>,
    client: &ClientKey,
    made: u64,
) -> bool {
    match written.get_mut(client) {
        Some(w) if w.stamp == made => {
            w.stamp = QUIET;
            true
        }
        _ => false,
    }
}

fn unquiet(written: &mut HashMap<ClientKey, Written>, client: &ClientKey) {
    if let Some(w) = written.get_mut(client)
        && w.stamp == QUIET
    {
        w.stamp = 0;
    }
}

/// A grant as the datapath holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Written {
    pub(super) value: u32,
    pub(super) until: Option<Duration>,
    /// The grant's number (`None`: adopted from a previous run, or unknown after a refused
    /// change): what the reports say is applied.
    pub(super) seq: Option<u64>,
    /// The silence limit the holder keeps it under (stored with it in the maps).
    pub(super) silence: Duration,
    /// Adopted from a previous run (`Enrolment::adopt`) and not replaced since: kept while
    /// `adopted_until` runs, and never raised by a cap meanwhile.
    adopted: bool,
    /// A cut of a client let go for a change of the policies here ([`keep_cut`]): kept until
    /// then (CLOCK_MONOTONIC) unless replaced, and never raised by a cap meanwhile.
    kept_until: Option<Duration>,
    /// The number of the last `Enrolment::writes` call that wanted it written (0: none yet).
    stamp: u64,
}

impl Written {
    /// Adopted, and still with the lease it was pinned with (`until`): not replaced, cleared
    /// or ended by a suspension since.
    fn as_pinned(&self, until: Duration) -> bool {
        self.adopted && self.until == Some(until)
    }

    /// Kept at `now` as the cut of a client let go ([`keep_cut`]).
    fn kept(&self, now: Duration) -> bool {
        self.kept_until.is_some_and(|until| now < until)
    }
}

/// `client` is no longer held for a change of the policies on this node (its global policy is
/// gone or changed, or its entry is under another policy now): a cut it holds (a grant below
/// `cold`, the share its policy gave here) stays written for the silence limit it holds it
/// under, from `now`, unless a grant replaces it. Its owner, whose node may not have
/// that change yet (a rolling reload), goes on counting the cut it acknowledged until the
/// holder has been silent for that limit, and sizes raises of the other members by it: back
/// at the cold share at once, this node would admit more than the owner counts. A raise is
/// cleared as before: the owner counts the holder at the cold share at least. The next writes
/// take the kept cut's lease off, so that the kernel enforces the lower of it and the share of
/// whatever policy the client's entry is under now (`Grant::limit_at`), one under a local
/// policy included: at most what the old owner counts, and at most the new policy's share.
pub(super) fn keep_cut(
    written: &mut HashMap<ClientKey, Written>,
    client: &ClientKey,
    cold: Option<u32>,
    now: Duration,
) {
    if let Some(w) = written.get_mut(client)
        && cold.is_some_and(|cold| w.value < cold)
    {
        w.kept_until = Some(now.saturating_add(w.silence));
    }
}

/// A grant the maps held at start (a previous run's, pinned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedGrant {
    pub client: ClientKey,
    pub value: u32,
    /// The end of its lease on CLOCK_MONOTONIC (`None`: none, a cut).
    pub until: Option<Duration>,
    /// The silence limit it was held under (`None`: not recorded).
    pub silence: Option<Duration>,
}

/// Takes the lease off `client`'s grant `w` (a raise ends, a cut stays), recording it as the
/// maps hold it in `before` (for `Enrolment::unwritten`); returns the write that does it.
fn lease_off(
    client: ClientKey,
    w: &mut Written,
    before: &mut HashMap<ClientKey, Option<Written>>,
) -> Write {
    before.entry(client).or_insert(Some(*w));
    w.until = None;
    Write::Set {
        client,
        value: w.value,
        until: None,
        silence: w.silence,
    }
}

/// Records that `want` is to be written for `client`: a set when the datapath holds anything
/// else, only the newer number and stamp when it holds the same enforcement.
fn want_written(
    written: &mut HashMap<ClientKey, Written>,
    before: &mut HashMap<ClientKey, Option<Written>>,
    sets: &mut Vec<Write>,
    client: ClientKey,
    want: Written,
) {
    match written.get_mut(&client) {
        // The same enforcement under a newer number: nothing to write.
        Some(w) if (w.value, w.until, w.silence) == (want.value, want.until, want.silence) => {
            w.seq = want.seq;
            w.stamp = want.stamp;
            // Wanted now: no longer kept for a client let go (a cap keeps what it had).
            w.kept_until = want.kept_until;
        }
        _ => {
            sets.push(Write::Set {
                client,
                value: want.value,
                until: want.until,
                silence: want.silence,
            });
            let previous = written.insert(client, want);
            before.entry(client).or_insert(previous);
        }
    }
}

impl Enrolment {
    /// Grants the datapath held when this agent started (pinned maps of a previous run): kept
    /// as written (a raise lapses on its own in the kernel), cleared when no owner confirms
    /// them within the silence limit (see [`Enrolment::adopt`]).
    pub fn adopt(&mut self, now: Duration, grants: impl IntoIterator<Item = PinnedGrant>) {
        let mut silence = self.timing.silence();
        let longest = now.saturating_add(Timing::MAX_LEASE);
        for mut g in grants {
            // Recorded by this agent from its owners' terms; an earlier version took terms of
            // up to 100 h from a peer, which would keep a hostile owner's cut that long.
            g.silence = g.silence.map(|s| s.min(Timing::MAX_SILENCE));
            // A lease past the longest this version grants (an earlier version's, or a hostile
            // owner's it took in) would be reported as such, and owners refuse a report whose
            // `raise_left` is past it, with the whole heartbeat: shortened with the first
            // writes, in the maps (recorded shortened only once they hold it: reporting less
            // than the kernel holds would let the owner count it lapsed early).
            if let Some(until) = g.until.filter(|&until| until > longest) {
                self.shorten.push((g.client, until, longest));
            }
            // At start, before any round (a held client's grant would be its holder's).
            if let Some(held) = self.held.get_mut(&g.client) {
                wake(held, &mut self.written, &g.client);
            }
            self.written.insert(
                g.client,
                Written {
                    value: g.value,
                    until: g.until,
                    seq: None,
                    silence: g.silence.unwrap_or(silence),
                    adopted: true,
                    kept_until: None,
                    stamp: 0,
                },
            );
            // The owner counts a cut until *its* silence limit has passed: keep every adopted
            // grant at least as long as the longest limit any of them was held under.
            silence = silence.max(g.silence.unwrap_or_default());
        }
        self.adopted_until = Some(now + silence);
    }

    /// Takes the adaptive loop's caps (all of them; see the `caps` field). They reach the
    /// datapath with the next writes, and the reports with the next round.
    pub fn set_caps(&mut self, caps: HashMap<ClientKey, u32>) {
        // A quiet holder's grant is written capped as it was: one whose cap changed is woken.
        let changed: Vec<ClientKey> = caps
            .iter()
            .filter(|&(c, v)| self.caps.get(c) != Some(v))
            .map(|(c, _)| *c)
            .chain(self.caps.keys().filter(|c| !caps.contains_key(*c)).copied())
            .collect();
        for client in changed {
            if let Some(held) = self.held.get_mut(&client) {
                wake(held, &mut self.written, &client);
            }
        }
        self.caps = caps;
    }

    /// Writes the grant changes since the last call; what `write` refuses is offered again.
    pub(super) fn flush(&mut self, now: Duration, write: &mut WriteGrants<'_>) {
        let writes = self.writes(now);
        if writes.is_empty() {
            return;
        }
        self.stir(&writes);
        let refused = write(&writes);
        self.unwritten(&refused);
        self.shortened();
    }

    /// The grant changes since the last call. A capped client gets at most its cap: below what
    /// its owner granted (which the owner goes on counting, so the sum stays safe), or, not
    /// held, as a cut of its cold share written by this node alone (no lease: a cap is below
    /// the cold share, and `Grant::limit_at` keeps a value below it with or without one).
    fn writes(&mut self, now: Duration) -> Vec<Write> {
        // One pass over the held clients, one over the caps, one over what is written, with no
        // map built per round: what this call wants written is stamped with its number, and
        // what is written without that stamp is cleared.
        self.writes_made += 1;
        let stamp = self.writes_made;
        self.before.clear();
        let mut sets = Vec::new();
        let mut wanted = 0;
        for (client, held) in &self.held {
            let quiet = held.quiet_until.map(|until| now < until);
            if quiet == Some(false) {
                // Quiet no more (its round wakes it): wanted only if wanted now.
                unquiet(&mut self.written, client);
            }
            let Some((value, until)) = held.holder.in_force(now) else {
                continue;
            };
            wanted += 1;
            if quiet == Some(true) {
                continue; // stamped QUIET: wanted as it is
            }
            want_written(
                &mut self.written,
                &mut self.before,
                &mut sets,
                *client,
                Written {
                    value: self.caps.get(client).map_or(value, |&cap| value.min(cap)),
                    until,
                    seq: held.holder.in_force_seq(now),
                    silence: held.holder.silence_limit(),
                    adopted: false,
                    kept_until: None,
                    stamp,
                },
            );
        }
        let keep_adopted = self.adopted_until.is_some_and(|until| now < until);
        // Grants written for caps alone fit in what `GRANTS` has left after the held clients
        // (it holds `capacity` entries, never evicted): a held client's grant is never refused
        // for a cap's. A capped client left out keeps its share (safe).
        for (client, &cap) in &self.caps {
            let written = self.written.get(client);
            if written.is_some_and(|w| w.stamp == stamp || w.stamp == QUIET) {
                continue; // held, with its grant capped above
            }
            if wanted >= self.capacity {
                break;
            }
            // An adopted grant (a previous run's, which its owner may still count) is never
            // raised by a cap while it is kept, nor is a kept cut: the lower of the two holds.
            let adopted = written
                .filter(|w| (w.adopted && keep_adopted) || w.kept(now))
                .copied();
            let capped = match adopted {
                Some(w) if w.value <= cap => Written { stamp, ..w },
                Some(w) => Written {
                    value: cap,
                    until: None,
                    stamp,
                    ..w
                },
                None => Written {
                    value: cap,
                    until: None,
                    seq: None,
                    silence: self.timing.silence(),
                    adopted: false,
                    kept_until: None,
                    stamp,
                },
            };
            wanted += 1;
            want_written(
                &mut self.written,
                &mut self.before,
                &mut sets,
                *client,
                capped,
            );
        }
        // Clears first, so that they free room in the map before the sets take it. While
        // adopted grants are kept, only what this run wrote itself is cleared; a kept cut
        // ([`keep_cut`]) is cleared once its time is over.
        let mut writes = Vec::new();
        let held = &self.held;
        let before = &mut self.before;
        self.written.retain(|client, w| {
            // A grant is stamped QUIET only while its holder is quiet: every way out wakes it.
            debug_assert!(
                w.stamp != QUIET || held.get(client).is_some_and(|h| h.quiet_until.is_some()),
                "a grant stamped QUIET without a quiet holder"
            );
            let keep =
                w.stamp == stamp || w.stamp == QUIET || (keep_adopted && w.adopted) || w.kept(now);
            if !keep {
                writes.push(Write::Clear(*client));
                before.entry(*client).or_insert(Some(*w));
            } else if w.kept(now) && w.until.is_some() {
                // A kept cut loses its lease: the kernel then enforces at most the share of the
                // policy the client's entry is under now (`Grant::limit_at`), never the cut's
                // value above it.
                sets.push(lease_off(*client, w, before));
            }
            keep
        });
        // Adopted raises shortened, while they are as pinned (not replaced, cleared, or ended
        // by a suspension since). Each stays queued until the maps no longer hold it as pinned
        // (see `flush`): a refused write, this one or one that replaced it, puts it back.
        for &(client, pinned, short) in &self.shorten {
            let Some(w) = self
                .written
                .get_mut(&client)
                .filter(|w| w.as_pinned(pinned))
            else {
                continue;
            };
            self.before.entry(client).or_insert(Some(*w));
            w.until = Some(short);
            writes.push(Write::Set {
                client,
                value: w.value,
                until: w.until,
                silence: w.silence,
            });
        }
        writes.append(&mut sets);
        writes
    }

    /// What the datapath holds of these clients changes: their holders are looked at in the
    /// next round (a report says which grant is applied).
    fn stir(&mut self, writes: &[Write]) {
        for w in writes {
            let client = w.client();
            if let Some(held) = self.held.get_mut(&client) {
                wake(held, &mut self.written, &client);
            }
        }
    }

    /// The node's phase gives no cold share to split by (cut off, joining): every grant is
    /// written as lapsed (raises end now, cuts stay), and no round runs until it is connected
    /// again; returns the writes.
    pub fn suspend(&mut self) -> Vec<Write> {
        let mut writes = Vec::new();
        self.before.clear();
        for (client, grant) in self.written.iter_mut() {
            if grant.until.is_some() {
                writes.push(lease_off(*client, grant, &mut self.before));
            }
        }
        self.stir(&writes);
        writes
    }

    /// Forgets the raises to shorten that the maps no longer hold as pinned (shortened,
    /// replaced or cleared).
    fn shortened(&mut self) {
        let written = &self.written;
        self.shorten.retain(|(client, pinned, _)| {
            written.get(client).is_some_and(|w| w.as_pinned(*pinned))
        });
    }

    /// The datapath refused these writes (of the last [`Enrolment::writes`] or
    /// [`Enrolment::suspend`]): it holds what it held before them, recorded again, so that
    /// reports say what is applied and the next writes offer them again (or clear what is not
    /// wanted). A write of unknown origin leaves the client's grant unknown: reports then say
    /// none is applied.
    pub fn unwritten(&mut self, writes: &[Write]) {
        self.unwritten += writes.len() as u64;
        // Each set of writes is answered once.
        let before = std::mem::take(&mut self.before);
        for w in writes {
            let client = w.client();
            match before.get(&client) {
                Some(Some(before)) => {
                    // Its holder is woken below (`stir`), so it is quiet no more.
                    let stamp = if before.stamp == QUIET {
                        0
                    } else {
                        before.stamp
                    };
                    self.written.insert(client, Written { stamp, ..*before });
                }
                Some(None) => {
                    self.written.remove(&client);
                }
                None => {
                    self.written.insert(
                        client,
                        Written {
                            value: u32::MAX,
                            until: None,
                            seq: None,
                            silence: self.timing.silence(),
                            adopted: false,
                            kept_until: None,
                            stamp: 0,
                        },
                    );
                }
            }
        }
        self.stir(writes);
    }
}
