//! `prepaid_credits`: a proxy-wasm HTTP filter that meters, prices and enforces prepaid credit.
//!
//! Decisions live in plain Rust modules tested natively; the proxy-wasm adapter (`host`) only
//! moves bytes between the host and those modules. `docs/ARCHITECTURE.md` maps them.

pub mod call;
pub mod config;
pub mod customer;
pub mod decision;
pub mod engine;
pub mod fields;
pub mod lease;
pub mod node;
pub mod pricing;
pub mod problem;
pub mod registry;
pub mod shared;
pub mod sync;
pub mod tracker;
pub mod units;
pub mod unknown;
pub mod waiting;
pub mod worker;

#[cfg(test)]
mod simulation;

#[cfg(target_arch = "wasm32")]
mod host;
