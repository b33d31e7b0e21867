//! What the host calls of a credit check cost on their own, for `bench/gateway.sh` and
//! `bench/kong.py`: a filter that makes a credit check's host calls with none of its decisions,
//! so that the benchmarks can split what `prepaid_credits` adds over the no-op filter into the
//! crossings of the host ABI (which no filter code can make cheaper) and the filter's own work.
//! Its configuration (a plain string) picks the shape:
//!
//! - `floor` (the default): the fewest a check on shared data can make: read the subject header,
//!   read the customer's entry and write it back with compare-and-swap, read `:status`, set one
//!   response header. Five per call; a call that failed upstream writes once more (a refund:
//!   the price was taken when it was let through).
//! - `prepaid`: the calls `prepaid_credits` makes on its warm path today, under its defaults: the
//!   subject header, the clock, the entry read and compare-and-swapped when the call is let
//!   through (charged then), `:status`, two response headers. Seven per call; a call that failed
//!   upstream writes again, as in `floor`. (Until §0u of `bench/RESULTS.md` the filter made nine:
//!   a second read and compare-and-swap when the call completed.)
//! - `local`: `floor` with the balance kept in the worker's own memory instead of shared data
//!   (what a design where each worker spends a slice of the lease of its own, and writes shared
//!   data only per tick, would make): the subject, `:status`, one response header. Three per call.
//!
//! The entry is as long as the real filter's (300 bytes) and holds a balance that each call
//! lowers, so the engine copies what it would copy. Built like the real filter
//! (`cargo build --release --target wasm32-wasip1 -p floor-filter`); it compiles only for wasm
//! (natively the host's imports do not exist).

#[cfg(target_arch = "wasm32")]
mod filter;
