//! The floor of any proxy-wasm HTTP filter, for `bench/gateway.sh`: per call it crosses the
//! host ABI once to read one request header (the work every metering filter must do to find its
//! customer) and lets the call through. Built like the real filter
//! (`cargo build --release --target wasm32-wasip1 -p noop-filter`), so the difference between the
//! two is what `prepaid_credits` itself costs. Like the real filter's adapter it compiles only
//! for wasm (natively the host's imports do not exist).

#[cfg(target_arch = "wasm32")]
mod filter;
