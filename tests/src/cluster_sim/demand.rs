//! Demand shapes: where a client's packets arrive.

use super::Rng;

/// Where a client's packets arrive: `rate` packets per window in all, a fraction at each
/// member.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    pub rate: f64,
    pub at: Vec<(usize, f64)>,
}

/// 3·L spread 80/15/5 over three distinct members.
pub fn skewed(rng: &mut Rng, nodes: usize, limit: u32) -> Demand {
    let at = rng.distinct(nodes, 3);
    Demand {
        rate: 3.0 * f64::from(limit),
        at: vec![(at[0], 0.80), (at[1], 0.15), (at[2], 0.05)],
    }
}

/// `rate` spread evenly over every one of `nodes` members.
pub fn even(nodes: usize, rate: f64) -> Demand {
    Demand {
        rate,
        at: (0..nodes).map(|n| (n, 1.0 / nodes as f64)).collect(),
    }
}

/// The spread reversed (80/15/5 becomes 5/15/80 on the same members).
pub fn reversed(demand: &Demand) -> Demand {
    let fractions: Vec<f64> = demand.at.iter().rev().map(|(_, f)| *f).collect();
    Demand {
        rate: demand.rate,
        at: demand
            .at
            .iter()
            .zip(fractions)
            .map(|((n, _), f)| (*n, f))
            .collect(),
    }
}
