//! How a global client's limit L is split between the members: the cold share every member
//! enforces without any sync, and the owner's max-min (water-filling) split of what the cold
//! shares of the members that are not enrolled leave over.
//!
//! Everything here is whole packets per policy window, in `u64` so that sums of `u32` limits
//! never overflow.

/// The share a member enforces for a global client nobody has enrolled: ⌊L/N⌋, which sums to at
/// most L over N members with no sync at all. `members` is the agreed member count (0 is taken as
/// 1: a node alone enforces all of L).
pub fn cold_share(limit: u32, members: u32) -> u32 {
    limit / members.max(1)
}

/// What the owner asks for on behalf of a node that reported `demand` packets per window: its
/// demand plus about 10% (at least one packet), so a polite client whose rate creeps up between
/// two syncs is not cut at once. Saturates at `u32::MAX`.
pub fn with_headroom(demand: u32) -> u32 {
    demand.saturating_add(demand.div_ceil(10).max(1))
}

/// The budget the enrolled members share: L less the cold shares of the `others` members that
/// are not enrolled (they enforce their cold share without asking).
pub fn enrolled_budget(limit: u32, cold: u32, others: u32) -> u64 {
    u64::from(limit).saturating_sub(u64::from(cold) * u64::from(others))
}

/// What an owner grants toward, from the enrolled members' `demands` (packets per window, one per
/// member in a fixed order), out of `budget`:
/// - the demands with their headroom fit: [`water_fill`] over them (each member its demand, its
///   headroom, and an even part of the rest);
/// - only the demands fit: each member its demand, and what is left goes to the headroom,
///   max-min;
/// - the demands do not fit (the client is over L in all): [`water_fill`] over the demands
///   alone. Headroom keeps a polite client (under L in all) from dropping when its rate creeps
///   up between two syncs; a client over L has no slack to keep, and headroom reserved for its
///   light members would go unused while its heavy member drops (at L = 10 spread 80/15/5 that
///   was a tenth of L).
///
/// The targets sum to at most `budget`.
pub fn targets(budget: u64, demands: &[u32]) -> Vec<u32> {
    let sum = |v: &[u32]| v.iter().map(|&x| u64::from(x)).sum::<u64>();
    let wants: Vec<u32> = demands.iter().map(|&d| with_headroom(d)).collect();
    if sum(&wants) <= budget {
        return water_fill(budget, &wants);
    }
    if sum(demands) <= budget {
        let headroom: Vec<u32> = wants.iter().zip(demands).map(|(w, d)| w - d).collect();
        let more = water_fill(budget - sum(demands), &headroom);
        return demands
            .iter()
            .zip(more)
            .map(|(d, m)| d.saturating_add(m))
            .collect();
    }
    water_fill(budget, demands)
}

/// Max-min fair split of `budget` over `wants` (one per enrolled member, in a fixed order).
///
/// When the wants fit, each member gets its want and the rest of the budget is spread evenly
/// (the first members in order get the one-packet remainders), so a member whose demand grows
/// before the next sync finds slack. When they do not fit, the water level ℓ is the largest with
/// Σ min(wᵢ, ℓ) ≤ budget; each member gets min(wᵢ, ℓ), and the packets left below the next level
/// go one each to the first members still wanting more. Either way the grants sum to exactly
/// `budget` (to Σ wants at most when `wants` is empty: nothing), and a member that got less than
/// it wanted got no less than any other member's grant minus one.
pub fn water_fill(budget: u64, wants: &[u32]) -> Vec<u32> {
    let n = wants.len() as u64;
    if n == 0 {
        return Vec::new();
    }
    let total: u64 = wants.iter().map(|&w| u64::from(w)).sum();
    if total <= budget {
        let surplus = budget - total;
        let each = surplus / n;
        let mut extra = surplus % n;
        return wants
            .iter()
            .map(|&w| {
                let bonus = each + u64::from(extra > 0);
                extra = extra.saturating_sub(1);
                clamp_u32(u64::from(w) + bonus)
            })
            .collect();
    }
    // The level: raise it want by want, smallest first, while everything below it still fits.
    let mut sorted: Vec<u64> = wants.iter().map(|&w| u64::from(w)).collect();
    sorted.sort_unstable();
    let mut below = 0u64; // Σ of the wants already under the level
    let mut level = 0u64;
    for (i, &w) in sorted.iter().enumerate() {
        let above = n - i as u64; // members whose want is ≥ w
        if below + w * above <= budget {
            below += w;
            level = w;
        } else {
            level = (budget - below) / above;
            break;
        }
    }
    let mut grants: Vec<u64> = wants.iter().map(|&w| u64::from(w).min(level)).collect();
    let mut left = budget - grants.iter().sum::<u64>();
    for (grant, &w) in grants.iter_mut().zip(wants) {
        if left == 0 {
            break;
        }
        if *grant < u64::from(w) {
            *grant += 1;
            left -= 1;
        }
    }
    grants.into_iter().map(clamp_u32).collect()
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn cold_shares_never_sum_above_the_limit() {
        assert_eq!(cold_share(40, 3), 13);
        assert_eq!(cold_share(40, 0), 40);
        assert_eq!(cold_share(2, 3), 0);
    }

    #[test]
    fn a_client_at_three_times_the_limit_spread_80_15_5_gets_the_limit() {
        // L = 100, three nodes, demand 240/45/15 per window: all enrolled, budget 100.
        let grants = targets(enrolled_budget(100, cold_share(100, 3), 0), &[240, 45, 15]);
        assert_eq!(grants.iter().sum::<u32>(), 100);
        // Over L in all: no headroom; 15 is satisfied, the other two share the rest evenly.
        assert_eq!(grants, vec![43, 42, 15]);
        // At L = 10 (24/4/2 a window): the heavy node gets what the light ones do not use.
        assert_eq!(targets(10, &[24, 4, 2]), vec![4, 4, 2]);
    }

    #[test]
    fn a_polite_client_on_one_node_keeps_its_rate() {
        // 0.9 L on one node of three, the two others idle but enrolled.
        let grants = targets(100, &[90, 0, 0]);
        assert!(
            grants[0] >= 98,
            "its demand and most of its headroom: {grants:?}"
        );
        assert_eq!(grants.iter().sum::<u32>(), 100);
        // 0.95 L: its demand, and the headroom that is left, max-min.
        assert_eq!(targets(100, &[95, 0, 0]), vec![98, 1, 1]);
    }

    #[test]
    fn enrolled_budget_leaves_the_cold_shares_of_the_others() {
        assert_eq!(enrolled_budget(100, 33, 1), 67);
        assert_eq!(enrolled_budget(10, 33, 1), 0);
    }

    proptest! {
        #[test]
        fn water_fill_is_exact_and_max_min_fair(
            budget in 0u64..5_000_000_000,
            wants in prop::collection::vec(any::<u32>(), 0..40),
        ) {
            let grants = water_fill(budget, &wants);
            prop_assert_eq!(grants.len(), wants.len());
            let sum: u64 = grants.iter().map(|&g| u64::from(g)).sum();
            if wants.is_empty() {
                prop_assert_eq!(sum, 0);
                return Ok(());
            }
            let total: u64 = wants.iter().map(|&w| u64::from(w)).sum();
            if total <= budget {
                // Everyone gets its want; the surplus is spread (up to u32 saturation).
                for (g, w) in grants.iter().zip(&wants) {
                    prop_assert!(g >= w);
                }
                prop_assert!(sum <= budget);
            } else {
                prop_assert_eq!(sum, budget);
                let max = grants.iter().copied().max().unwrap_or(0);
                for (g, w) in grants.iter().zip(&wants) {
                    prop_assert!(g <= w);
                    if g < w {
                        // Short of its want: within one packet of the largest grant.
                        prop_assert!(*g + 1 >= max, "grants {:?} wants {:?}", grants, wants);
                    }
                }
            }
        }

        #[test]
        fn targets_fit_the_budget_and_keep_demand_and_headroom_while_they_fit(
            budget in 0u64..100_000,
            demands in prop::collection::vec(0u32..20_000, 0..20),
        ) {
            let got = targets(budget, &demands);
            prop_assert_eq!(got.len(), demands.len());
            let sum: u64 = got.iter().map(|&g| u64::from(g)).sum();
            prop_assert!(sum <= budget || demands.is_empty());
            let total: u64 = demands.iter().map(|&d| u64::from(d)).sum();
            let with: u64 = demands.iter().map(|&d| u64::from(with_headroom(d))).sum();
            for (g, d) in got.iter().zip(&demands) {
                if with <= budget {
                    prop_assert!(*g >= with_headroom(*d));
                } else if total <= budget {
                    prop_assert!(g >= d && *g <= with_headroom(*d));
                } else {
                    prop_assert!(g <= d);
                }
            }
        }

        #[test]
        fn headroom_is_at_least_one_and_about_a_tenth(demand in any::<u32>()) {
            let w = with_headroom(demand);
            prop_assert!(w > demand || demand == u32::MAX);
            prop_assert!(u64::from(w) <= u64::from(demand) + u64::from(demand) / 10 + 1);
        }
    }
}
