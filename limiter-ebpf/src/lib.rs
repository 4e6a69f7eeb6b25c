//! Exists so that limiter-user can name this crate as a build-dependency (cargo then rebuilds the
//! agent when the program changes); the program itself is the `limiter` binary.
#![no_std]
