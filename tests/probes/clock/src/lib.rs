//! An engine probe for `tests/kong_clock.rs`: how long a dispatch that the engine fails at its
//! timeout took, as a filter sees it on the clock it reads (`get_current_time`, in whole
//! milliseconds, as `prepaid_credits` reads it). Each call dispatches to the address and with the
//! timeout its configuration names (`<host:port> <timeout ms>`), reading the clock just before,
//! and is answered 200 from the dispatch's callback with `x-probe-elapsed-ms` and
//! `x-probe-dispatch-status`. Built like the filter (`cargo build --release --target
//! wasm32-wasip1 -p clock-probe`); it compiles only for wasm (natively the host's imports do not
//! exist).

#[cfg(target_arch = "wasm32")]
mod probe;
