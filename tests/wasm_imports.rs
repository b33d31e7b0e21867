#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking
//! The built `.wasm` imports only what Kong's engine (ngx_wasm_module) and Envoy provide: an
//! import a host lacks stops the module from loading at all.

use std::collections::BTreeSet;

/// Host functions of the proxy-wasm ABI 0.2.1, all of which ngx_wasm_module (Kong 3.4–3.10) and
/// Envoy export. (Some trap when called under Kong — `proxy_get_status`, `proxy_done`,
/// `proxy_resolve_shared_queue`, gRPC, `proxy_continue_response` — the filter never calls them.)
const PROXY_WASM_ABI: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_status",
    "proxy_set_effective_context",
    "proxy_call_foreign_function",
    "proxy_done",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
];

/// WASI preview1 functions ngx_wasm_module provides (`ngx_wasi_preview1_host.c`).
const KONG_WASI: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "clock_time_get",
    "environ_get",
    "environ_sizes_get",
    "fd_close",
    "fd_fdstat_get",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_read",
    "fd_seek",
    "fd_write",
    "path_open",
    "proc_exit",
    "random_get",
    "sched_yield",
    "poll_oneoff",
];

/// WASI preview1 functions Envoy 1.40 provides.
const ENVOY_WASI: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "clock_time_get",
    "environ_get",
    "environ_sizes_get",
    "fd_close",
    "fd_fdstat_get",
    "fd_read",
    "fd_seek",
    "fd_write",
    "proc_exit",
    "random_get",
];

fn leb(bytes: &[u8], at: &mut usize) -> usize {
    let (mut value, mut shift) = (0usize, 0);
    loop {
        let b = bytes[*at];
        *at += 1;
        value |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b < 0x80 {
            return value;
        }
    }
}

fn name(bytes: &[u8], at: &mut usize) -> String {
    let len = leb(bytes, at);
    let s = String::from_utf8(bytes[*at..*at + len].to_vec()).expect("utf-8 name");
    *at += len;
    s
}

/// (module, name) of every function import of a wasm binary.
fn imports(wasm: &[u8]) -> Vec<(String, String)> {
    assert_eq!(&wasm[..4], b"\0asm", "a wasm binary");
    let mut at = 8;
    let mut out = Vec::new();
    while at < wasm.len() {
        let id = wasm[at];
        at += 1;
        let size = leb(wasm, &mut at);
        let end = at + size;
        if id == 2 {
            let mut p = at;
            for _ in 0..leb(wasm, &mut p) {
                let module = name(wasm, &mut p);
                let field = name(wasm, &mut p);
                let kind = wasm[p];
                p += 1;
                assert_eq!(kind, 0, "{module}.{field}: only function imports are expected");
                leb(wasm, &mut p);
                out.push((module, field));
            }
        }
        at = end;
    }
    out
}

#[test]
fn the_filter_imports_only_what_kong_and_envoy_provide() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/target/wasm32-wasip1/release/prepaid_credits.wasm");
    let wasm = std::fs::read(path).expect("build the filter first: cargo build --release --target wasm32-wasip1");
    let imports = imports(&wasm);
    assert!(imports.iter().any(|(_, f)| f == "proxy_http_call"), "the filter dispatches to the ledger");
    let abi: BTreeSet<&str> = PROXY_WASM_ABI.iter().copied().collect();
    let mut unexpected = Vec::new();
    for (module, field) in &imports {
        let ok = match module.as_str() {
            "env" => abi.contains(field.as_str()),
            "wasi_snapshot_preview1" => KONG_WASI.contains(&field.as_str()) && ENVOY_WASI.contains(&field.as_str()),
            _ => false,
        };
        if !ok {
            unexpected.push(format!("{module}.{field}"));
        }
    }
    assert!(unexpected.is_empty(), "imports a host does not provide: {unexpected:?}");
    // Nothing may sleep (Kong has no working poll_oneoff) or touch files.
    assert!(!imports.iter().any(|(_, f)| f == "poll_oneoff" || f == "path_open"), "{imports:?}");
}
