//! Adaptive windows (issue 3): the pure [`controller`] that decides each client's window and
//! allowance from its traffic and the system's load, the [`tuner`] loop that feeds it once per
//! period from the datapath and writes its decisions back through the test-run frame runner,
//! the CPU [`load`] sources it samples, and the caps it puts on [`global`] clients, which the
//! cluster's enrolment enforces. The knobs are the config's `adaptive` section
//! ([`crate::config::AdaptiveConfig`]).

pub mod controller;
pub mod global;
pub mod load;
pub mod tuner;

pub use self::{
    controller::{
        Band, ClientDecision, ClientObservation, Controller, FairDemand, LoadSample, StepOutput,
        effective, fair_shares, step_toward,
    },
    global::GlobalCaps,
    load::{FileLoad, LoadSource, SystemLoad},
    tuner::{PeriodReport, Tuner, TunerError},
};
