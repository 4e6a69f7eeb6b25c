//! The command-line client: its connection to an agent's API ([`client`]), the rendering of
//! what it prints ([`render`]), and the commands that ask a running agent: [`check`],
//! [`limits`], [`cluster`] (`status` and `forget`) and [`stats`] (`limiter stats` through the API, and `limiter
//! top`). Their arguments are parsed in `main.rs`.

pub mod check;
pub mod client;
pub mod cluster;
pub mod limits;
pub mod render;
pub mod stats;
