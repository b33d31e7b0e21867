//! `prepaid_credits`: a proxy-wasm HTTP filter that meters, prices and enforces prepaid credit.
//!
//! Decisions live in plain Rust modules tested natively; the proxy-wasm adapter (`host`) only
//! moves bytes between the host and those decisions.

pub mod config;
pub mod customer;
pub mod decision;
pub mod pricing;
pub mod problem;
pub mod registry;
pub mod shared;
pub mod sync;
pub mod units;

#[cfg(test)]
mod simulation;

#[cfg(target_arch = "wasm32")]
mod host;
