//! The command-line client: its connection to an agent's API ([`client`]) and the rendering of
//! what it prints ([`render`]). The commands themselves are `main.rs`.

pub mod client;
pub mod render;
