//! A Kong-like proxy-wasm host (ngx_wasm_module rules) in wasmtime, for the built `.wasm`.
//!
//! Shared data and the clock live outside the instance (`Node`), so a test can drop an instance
//! (as Kong does after a trap) and start a fresh one on the same node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use wasmtime::{
    bail, Caller, Engine, Extern, Instance, Linker, Memory, Module, Result, Store, WasmParams, WasmResults,
};

const OK: i32 = 0;
const NOT_FOUND: i32 = 1;
const CAS_MISMATCH: i32 = 8;

const BUFFER_HTTP_REQUEST_BODY: i32 = 0;
const BUFFER_HTTP_RESPONSE_BODY: i32 = 1;
const BUFFER_HTTP_CALL_RESPONSE_BODY: i32 = 4;
const BUFFER_PLUGIN_CONFIGURATION: i32 = 7;

const MAP_REQUEST_HEADERS: i32 = 0;
const MAP_RESPONSE_HEADERS: i32 = 2;
const MAP_HTTP_CALL_RESPONSE_HEADERS: i32 = 6;

pub const ROOT_ID: u32 = 1;

/// Instances started so far (seeds each one's randomness).
static INSTANCES: AtomicU64 = AtomicU64::new(1);

/// Kong's shared-data key identity: a hash of the key, never the key itself.
pub type KeyHash = fn(&str) -> u32;

pub type Headers = Vec<(String, String)>;

pub fn crc32(key: &str) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for b in key.bytes() {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// `shm_kv` as ngx_wasm_module (Kong 3.8+) implements it: keys compared by hash, and a zone of
/// bounded size that evicts the least recently used values to make room (its default `slru`
/// policy, here across sizes rather than per slab size class).
pub struct Shm {
    pub hash: KeyHash,
    /// hash → (first key written, value, cas)
    pub entries: BTreeMap<u32, (String, Vec<u8>, u32)>,
    pub cas_mismatches: u64,
    /// The zone's size in bytes (each value with its key); `None`: unbounded.
    pub capacity: Option<usize>,
    /// When each value was last read or written (a counter): the oldest is evicted first.
    used: HashMap<u32, u64>,
    clock: u64,
    /// Writes that changed a value's size: the engine allocates a new node before it frees the old.
    pub moves: u64,
    pub evictions: u64,
}

impl Shm {
    fn new(hash: KeyHash, capacity: Option<usize>) -> Shm {
        Shm {
            hash,
            entries: BTreeMap::new(),
            cas_mismatches: 0,
            capacity,
            used: HashMap::new(),
            clock: 0,
            moves: 0,
            evictions: 0,
        }
    }

    fn touch(&mut self, h: u32) {
        self.clock += 1;
        self.used.insert(h, self.clock);
    }

    fn size(&self) -> usize {
        self.entries.values().map(|(k, v, _)| k.len() + v.len()).sum()
    }

    /// Evicts the least recently used values until `more` bytes fit. ngx_wasm_module allocates a
    /// moved value's new node while the old one is still in the zone; when the old one is the
    /// one evicted, the engine frees it twice and the worker dies holding the zone's lock
    /// (SIGSEGV): the harness panics there.
    fn make_room(&mut self, more: usize, moving: Option<u32>) {
        let Some(capacity) = self.capacity else { return };
        while self.size() + more > capacity {
            let Some((&oldest, _)) = self.used.iter().min_by_key(|(_, t)| **t) else { return };
            assert_ne!(Some(oldest), moving, "worker crashed: a value moved under eviction pressure evicted itself");
            self.used.remove(&oldest);
            self.entries.remove(&oldest);
            self.evictions += 1;
        }
    }

    fn get(&mut self, key: &str) -> Option<(Vec<u8>, u32)> {
        let h = (self.hash)(key);
        let found = self.entries.get(&h).map(|(_, v, cas)| (v.clone(), *cas));
        if found.is_some() {
            self.touch(h);
        }
        found
    }

    /// `if (cas != (n == NULL ? 0 : n->cas))` → not written; value NULL deletes.
    fn set(&mut self, key: &str, value: Option<Vec<u8>>, cas: u32) -> i32 {
        let h = (self.hash)(key);
        let stored = self.entries.get(&h).map_or(0, |e| e.2);
        if cas != stored {
            self.cas_mismatches += 1;
            return CAS_MISMATCH;
        }
        match value {
            None => {
                self.entries.remove(&h);
                self.used.remove(&h);
            }
            Some(v) => {
                let name = self.entries.get(&h).map_or_else(|| key.to_owned(), |e| e.0.clone());
                match self.entries.get(&h).map(|e| e.1.len()) {
                    Some(len) if len == v.len() => {}
                    Some(_) => {
                        self.moves += 1;
                        self.make_room(name.len() + v.len(), Some(h));
                    }
                    None => self.make_room(name.len() + v.len(), None),
                }
                self.entries.insert(h, (name, v, stored + 1));
                self.touch(h);
            }
        }
        OK
    }
}

/// What outlives an instance: the node's shared memory and the clock.
#[derive(Clone)]
pub struct Node {
    pub shm: Arc<Mutex<Shm>>,
    pub clock_ms: Arc<Mutex<u64>>,
}

impl Node {
    pub fn new(hash: KeyHash) -> Node {
        Node::with_zone(hash, None)
    }

    /// A node whose zone holds `capacity` bytes of keys and values (`None`: unbounded).
    pub fn with_zone(hash: KeyHash, capacity: Option<usize>) -> Node {
        Node { shm: Arc::new(Mutex::new(Shm::new(hash, capacity))), clock_ms: Arc::new(Mutex::new(1_750_000_000_000)) }
    }

    pub fn now_ms(&self) -> u64 {
        *self.clock_ms.lock().unwrap()
    }

    pub fn advance(&self, ms: u64) {
        *self.clock_ms.lock().unwrap() += ms;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Idle,
    VmStart,
    Configure,
    Tick,
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    CallResponse,
    Log,
    Done,
}

#[derive(Clone, Debug)]
pub struct HttpCall {
    pub token: u32,
    pub context: u32,
    pub phase: Phase,
    pub upstream: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
    /// The node's clock when it went out.
    pub sent_ms: u64,
}

impl HttpCall {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Debug)]
pub struct LocalResponse {
    pub status: u32,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl LocalResponse {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Default)]
pub struct Request {
    pub request_headers: Vec<(String, String)>,
    pub request_body: Vec<u8>,
    pub response_headers: Vec<(String, String)>,
    /// The chunk of the response body the current callback sees.
    pub response_chunk: Vec<u8>,
    pub local: Option<LocalResponse>,
    /// Explicit `proxy_continue_stream` calls.
    pub resumed: u32,
    /// The engine let the request go on to the upstream: its request callback returned
    /// `Continue`, or (ngx_wasm_module) the last of its dispatches was answered without a local
    /// response — the engine resumes it whether or not the filter asked.
    pub proceeded: bool,
    /// Dispatches of this call not answered yet.
    pub pending_dispatches: u32,
}

pub struct Host {
    pub node: Node,
    pub phase: Phase,
    /// The context the current callback is for (or the effective context set by the filter).
    pub current: u32,
    pub plugin_config: Vec<u8>,
    pub tick_period_ms: HashMap<u32, u32>,
    pub requests: HashMap<u32, Request>,
    pub call_response: Option<(Headers, Vec<u8>)>,
    pub calls: Vec<HttpCall>,
    pub next_token: u32,
    pub metrics: HashMap<u32, (String, u32, i64)>,
    pub logs: Vec<(i32, String)>,
    /// Property reads from a root context (Kong ≤ 3.9 may crash on request-scoped ones there).
    pub root_property_reads: Vec<String>,
    /// `set_effective_context` to another context than the running one: (running, asked).
    pub effective_context_switches: Vec<(u32, u32)>,
    /// Kong's nginx defines `$kong_request_id`; a bare ngx_wasm_module does not.
    pub kong: bool,
    rng: u64,
}

impl Host {
    fn headers(&mut self, map: i32) -> Result<&mut Vec<(String, String)>> {
        let current = self.current;
        if map == MAP_HTTP_CALL_RESPONSE_HEADERS {
            return match self.call_response.as_mut() {
                Some((h, _)) => Ok(h),
                None => bail!("http call response headers read outside on_http_call_response"),
            };
        }
        let Some(request) = self.requests.get_mut(&current) else {
            bail!("header map {map} read in context {current}, which is not a request");
        };
        match map {
            MAP_REQUEST_HEADERS => Ok(&mut request.request_headers),
            MAP_RESPONSE_HEADERS => Ok(&mut request.response_headers),
            _ => bail!("header map type {map} not supported by this harness"),
        }
    }
}

fn memory(caller: &mut Caller<'_, Host>) -> Result<Memory> {
    match caller.get_export("memory").and_then(Extern::into_memory) {
        Some(m) => Ok(m),
        None => bail!("the module exports no memory"),
    }
}

fn read(caller: &mut Caller<'_, Host>, ptr: i32, len: i32) -> Result<Vec<u8>> {
    let mem = memory(caller)?;
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    match mem.data(&caller).get(start..start + len) {
        Some(b) => Ok(b.to_vec()),
        None => bail!("guest pointer out of bounds"),
    }
}

fn read_string(caller: &mut Caller<'_, Host>, ptr: i32, len: i32) -> Result<String> {
    Ok(String::from_utf8_lossy(&read(caller, ptr, len)?).into_owned())
}

fn write(caller: &mut Caller<'_, Host>, ptr: i32, bytes: &[u8]) -> Result<()> {
    let mem = memory(caller)?;
    mem.write(caller, ptr as u32 as usize, bytes)?;
    Ok(())
}

fn write_u32(caller: &mut Caller<'_, Host>, ptr: i32, value: u32) -> Result<()> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Hands bytes to the guest the way hosts do: allocated with its `proxy_on_memory_allocate`.
fn give(caller: &mut Caller<'_, Host>, bytes: &[u8], ret_ptr: i32, ret_size: i32) -> Result<()> {
    let Some(alloc) = caller.get_export("proxy_on_memory_allocate").and_then(Extern::into_func) else {
        bail!("the module exports no proxy_on_memory_allocate");
    };
    let alloc = alloc.typed::<i32, i32>(&caller)?;
    let ptr = alloc.call(&mut *caller, bytes.len() as i32)?;
    if ptr == 0 {
        bail!("proxy_on_memory_allocate returned null");
    }
    write(caller, ptr, bytes)?;
    write_u32(caller, ret_ptr, ptr as u32)?;
    write_u32(caller, ret_size, bytes.len() as u32)
}

fn serialize_pairs(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend(k.as_bytes());
        out.push(0);
        out.extend(v.as_bytes());
        out.push(0);
    }
    out
}

fn deserialize_pairs(bytes: &[u8]) -> Result<Vec<(String, String)>> {
    let word = |i: usize| -> Result<usize> {
        match bytes.get(i..i + 4) {
            Some(b) => Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize),
            None => bail!("truncated header map"),
        }
    };
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let n = word(0)?;
    let mut at = 4 + 8 * n;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (kl, vl) = (word(4 + 8 * i)?, word(8 + 8 * i)?);
        let (Some(k), Some(v)) = (bytes.get(at..at + kl), bytes.get(at + kl + 1..at + kl + 1 + vl)) else {
            bail!("truncated header map");
        };
        out.push((String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned()));
        at += kl + vl + 2;
    }
    Ok(out)
}

fn engine_and_module() -> &'static (Engine, Module) {
    static COMPILED: OnceLock<(Engine, Module)> = OnceLock::new();
    COMPILED.get_or_init(|| {
        // `PREPAID_CREDITS_WASM` runs the harness against another build (e.g. an older one, to see
        // a test fail without its fix).
        let path = std::env::var_os("PREPAID_CREDITS_WASM").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/wasm32-wasip1/release/prepaid_credits.wasm")
        });
        let engine = Engine::default();
        let module = Module::from_file(&engine, &path).unwrap_or_else(|e| {
            panic!("{}: {e:?} (build it: cargo build --release --target wasm32-wasip1)", path.display())
        });
        (engine, module)
    })
}

fn linker(engine: &Engine, module: &Module) -> Result<Linker<Host>> {
    let mut l = Linker::<Host>::new(engine);

    l.func_wrap("env", "proxy_log", |mut c: Caller<'_, Host>, level: i32, ptr: i32, len: i32| -> Result<i32> {
        let message = read_string(&mut c, ptr, len)?;
        eprintln!("[filter log {level}] {message}");
        c.data_mut().logs.push((level, message));
        Ok(OK)
    })?;
    l.func_wrap("env", "proxy_get_current_time_nanoseconds", |mut c: Caller<'_, Host>, ret: i32| -> Result<i32> {
        let ns = c.data().node.now_ms() * 1_000_000;
        write(&mut c, ret, &ns.to_le_bytes())?;
        Ok(OK)
    })?;
    l.func_wrap("env", "proxy_set_tick_period_milliseconds", |mut c: Caller<'_, Host>, period: i32| -> Result<i32> {
        let h = c.data_mut();
        if h.current != ROOT_ID {
            bail!("Kong: set_tick_period from non-root context {}", h.current);
        }
        let period = period as u32;
        if period != 0 && h.tick_period_ms.get(&h.current).is_some_and(|p| *p != 0) {
            bail!("Kong: tick_period already set");
        }
        h.tick_period_ms.insert(h.current, period);
        Ok(OK)
    })?;
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_, Host>, kind: i32, start: i32, max: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
            let current = c.data().current;
            let request = c.data().requests.get(&current);
            let buffer = match kind {
                BUFFER_PLUGIN_CONFIGURATION => Some(c.data().plugin_config.clone()),
                BUFFER_HTTP_CALL_RESPONSE_BODY => c.data().call_response.as_ref().map(|(_, b)| b.clone()),
                BUFFER_HTTP_REQUEST_BODY => request.map(|r| r.request_body.clone()),
                BUFFER_HTTP_RESPONSE_BODY => request.map(|r| r.response_chunk.clone()),
                _ => None,
            };
            let Some(buffer) = buffer else { return Ok(NOT_FOUND) };
            let start = (start as u32 as usize).min(buffer.len());
            let end = start.saturating_add(max as u32 as usize).min(buffer.len());
            if start == end {
                write_u32(&mut c, ret_ptr, 0)?;
                write_u32(&mut c, ret_size, 0)?;
                return Ok(OK);
            }
            give(&mut c, &buffer[start..end], ret_ptr, ret_size)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_, Host>, map: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
            let pairs = serialize_pairs(c.data_mut().headers(map)?);
            give(&mut c, &pairs, ret_ptr, ret_size)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: Caller<'_, Host>, map: i32, kp: i32, kl: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
            let key = read_string(&mut c, kp, kl)?.to_ascii_lowercase();
            let value = c.data_mut().headers(map)?.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
            match value {
                Some(v) => {
                    give(&mut c, v.as_bytes(), ret_ptr, ret_size)?;
                    Ok(OK)
                }
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: Caller<'_, Host>, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Result<i32> {
            let (k, v) = (read_string(&mut c, kp, kl)?.to_ascii_lowercase(), read_string(&mut c, vp, vl)?);
            c.data_mut().headers(map)?.push((k, v));
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: Caller<'_, Host>, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Result<i32> {
            let (k, v) = (read_string(&mut c, kp, kl)?.to_ascii_lowercase(), read_string(&mut c, vp, vl)?);
            let headers = c.data_mut().headers(map)?;
            headers.retain(|(name, _)| *name != k);
            headers.push((k, v));
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: Caller<'_, Host>, map: i32, kp: i32, kl: i32| -> Result<i32> {
            let k = read_string(&mut c, kp, kl)?.to_ascii_lowercase();
            c.data_mut().headers(map)?.retain(|(name, _)| *name != k);
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: Caller<'_, Host>, pp: i32, pl: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
            let path = read_string(&mut c, pp, pl)?;
            let parts: Vec<&str> = path.split('\0').filter(|p| !p.is_empty()).collect();
            let current = c.data().current;
            if !c.data().requests.contains_key(&current) {
                c.data_mut().root_property_reads.push(parts.join("."));
            }
            // ngx_wasm_module serves any nginx variable as `ngx.<name>` (request-scoped ones only in
            // a request); `$kong_request_id` exists only in Kong's nginx template.
            let value = match parts.as_slice() {
                ["ngx", "nginx_version"] => Some("1.27.4".to_owned()),
                ["ngx", "request_id"] if c.data().requests.contains_key(&current) => Some(format!("{current:032x}")),
                ["ngx", "kong_request_id"] if c.data().kong && c.data().requests.contains_key(&current) => {
                    Some(format!("kong-req-{current}"))
                }
                _ => None,
            };
            match value {
                Some(v) => {
                    give(&mut c, v.as_bytes(), ret_ptr, ret_size)?;
                    Ok(OK)
                }
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: Caller<'_, Host>, kp: i32, kl: i32, ret_ptr: i32, ret_size: i32, ret_cas: i32| -> Result<i32> {
            let key = read_string(&mut c, kp, kl)?;
            let found = c.data().node.shm.lock().unwrap().get(&key);
            match found {
                Some((value, cas)) => {
                    give(&mut c, &value, ret_ptr, ret_size)?;
                    write_u32(&mut c, ret_cas, cas)?;
                    Ok(OK)
                }
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: Caller<'_, Host>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> Result<i32> {
            let key = read_string(&mut c, kp, kl)?;
            let value = if vp == 0 { None } else { Some(read(&mut c, vp, vl)?) };
            let status = c.data().node.shm.lock().unwrap().set(&key, value, cas as u32);
            Ok(status)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: Caller<'_, Host>,
         up: i32,
         upl: i32,
         hp: i32,
         hl: i32,
         bp: i32,
         bl: i32,
         _tp: i32,
         _tl: i32,
         timeout: i32,
         ret_token: i32|
         -> Result<i32> {
            let phase = c.data().phase;
            if !matches!(phase, Phase::RequestHeaders | Phase::RequestBody | Phase::Tick | Phase::CallResponse) {
                bail!("Kong: can only send HTTP dispatch during on_request_headers, on_request_body, on_tick, on_dispatch_response (not {phase:?})");
            }
            let upstream = read_string(&mut c, up, upl)?;
            let headers = deserialize_pairs(&read(&mut c, hp, hl)?)?;
            for required in [":method", ":path"] {
                if !headers.iter().any(|(k, _)| k == required) {
                    bail!("Kong: dispatch failed: no {required}");
                }
            }
            let body = if bl > 0 { read(&mut c, bp, bl)? } else { Vec::new() };
            let h = c.data_mut();
            h.next_token += 1;
            let token = h.next_token;
            let sent_ms = h.node.now_ms();
            let call = HttpCall {
                token,
                context: h.current,
                phase,
                upstream,
                headers,
                body,
                timeout_ms: timeout as u32,
                sent_ms,
            };
            if let Some(request) = h.requests.get_mut(&call.context) {
                request.pending_dispatches += 1;
            }
            h.calls.push(call);
            write_u32(&mut c, ret_token, token)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: Caller<'_, Host>,
         status: i32,
         _dp: i32,
         _dl: i32,
         bp: i32,
         bl: i32,
         hp: i32,
         hl: i32,
         _grpc: i32|
         -> Result<i32> {
            let body = if bl > 0 { read(&mut c, bp, bl)? } else { Vec::new() };
            let headers = deserialize_pairs(&read(&mut c, hp, hl)?)?;
            let h = c.data_mut();
            let phase = h.phase;
            let failed_dispatch =
                h.call_response.as_ref().is_some_and(|(headers, _)| !headers.iter().any(|(k, _)| k == ":status"));
            if !matches!(
                phase,
                Phase::RequestHeaders | Phase::RequestBody | Phase::CallResponse | Phase::ResponseHeaders
            ) {
                bail!("Kong: send_local_response not allowed in {phase:?}");
            }
            let current = h.current;
            let Some(request) = h.requests.get_mut(&current) else {
                bail!("send_local_response in context {current}, which is not a request");
            };
            if request.local.is_some() {
                bail!("Kong: local response already stashed");
            }
            if phase == Phase::CallResponse && failed_dispatch && !body.is_empty() {
                // Seen on the real engine: the body's buffer is recycled with the failed
                // dispatch's socket; the client gets its Content-Length and no body.
                bail!("ngx_wasm_module: a local response body made in a failed dispatch's callback is lost");
            }
            request.local = Some(LocalResponse { status: status as u32, body, headers });
            Ok(OK)
        },
    )?;
    l.func_wrap("env", "proxy_continue_stream", |mut c: Caller<'_, Host>, _stream: i32| -> Result<i32> {
        let h = c.data_mut();
        let current = h.current;
        match h.requests.get_mut(&current) {
            Some(r) => {
                r.resumed += 1;
                Ok(OK)
            }
            None => bail!("continue_stream in context {current}, which is not a request"),
        }
    })?;
    // ngx_wasm_module's proxy_set_effective_context is a no-op returning Ok: host calls keep
    // acting on the context whose callback is running. Recorded, so a test can see it was used.
    l.func_wrap("env", "proxy_set_effective_context", |mut c: Caller<'_, Host>, id: i32| -> Result<i32> {
        let h = c.data_mut();
        let current = h.current;
        if id as u32 != current {
            h.effective_context_switches.push((current, id as u32));
        }
        Ok(OK)
    })?;
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Caller<'_, Host>, kind: i32, np: i32, nl: i32, ret_id: i32| -> Result<i32> {
            let name = read_string(&mut c, np, nl)?;
            let h = c.data_mut();
            let id = match h.metrics.iter().find(|(_, (n, _, _))| *n == name) {
                Some((id, _)) => *id,
                None => {
                    let id = h.metrics.len() as u32 + 1;
                    h.metrics.insert(id, (name, kind as u32, 0));
                    id
                }
            };
            write_u32(&mut c, ret_id, id)?;
            Ok(OK)
        },
    )?;
    l.func_wrap("env", "proxy_increment_metric", |mut c: Caller<'_, Host>, id: i32, by: i64| -> Result<i32> {
        match c.data_mut().metrics.get_mut(&(id as u32)) {
            Some(m) => {
                m.2 += by;
                Ok(OK)
            }
            None => Ok(NOT_FOUND),
        }
    })?;
    l.func_wrap("env", "proxy_record_metric", |mut c: Caller<'_, Host>, id: i32, value: i64| -> Result<i32> {
        match c.data_mut().metrics.get_mut(&(id as u32)) {
            Some(m) => {
                m.2 = value;
                Ok(OK)
            }
            None => Ok(NOT_FOUND),
        }
    })?;

    // WASI, as ngx_wasm_module provides it.
    l.func_wrap(
        "wasi_snapshot_preview1",
        "random_get",
        |mut c: Caller<'_, Host>, ptr: i32, len: i32| -> Result<i32> {
            let mut bytes = Vec::with_capacity(len as u32 as usize);
            for _ in 0..len {
                let h = c.data_mut();
                h.rng ^= h.rng << 13;
                h.rng ^= h.rng >> 7;
                h.rng ^= h.rng << 17;
                bytes.push(h.rng as u8);
            }
            write(&mut c, ptr, &bytes)?;
            Ok(0)
        },
    )?;
    l.func_wrap("wasi_snapshot_preview1", "environ_get", |_: Caller<'_, Host>, _: i32, _: i32| -> Result<i32> {
        Ok(0)
    })?;
    l.func_wrap(
        "wasi_snapshot_preview1",
        "environ_sizes_get",
        |mut c: Caller<'_, Host>, count: i32, size: i32| -> Result<i32> {
            write_u32(&mut c, count, 0)?;
            write_u32(&mut c, size, 0)?;
            Ok(0)
        },
    )?;
    l.func_wrap(
        "wasi_snapshot_preview1",
        "fd_write",
        |mut c: Caller<'_, Host>, _fd: i32, iovs: i32, n: i32, written: i32| -> Result<i32> {
            let mut total = 0u32;
            for i in 0..n {
                let iov = read(&mut c, iovs + 8 * i, 8)?;
                let (p, l) = (
                    i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]),
                    i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]),
                );
                eprint!("{}", read_string(&mut c, p, l)?);
                total += l as u32;
            }
            write_u32(&mut c, written, total)?;
            Ok(0)
        },
    )?;
    l.func_wrap("wasi_snapshot_preview1", "proc_exit", |_: Caller<'_, Host>, code: i32| -> Result<()> {
        bail!("proc_exit({code})")
    })?;
    // Everything else (proxy_done, proxy_get_status, …): a trap, as Kong's NYI functions.
    l.define_unknown_imports_as_traps(module)?;
    Ok(l)
}

/// One filter instance (an nginx worker's VM) with one root context.
pub struct Kong {
    pub store: Store<Host>,
    instance: Instance,
    next_id: u32,
    /// Tick timers driving the root context: ngx_wasm_module starts one more each time a trapped
    /// instance is replaced in the same worker (the old timer keeps firing).
    timers: u32,
}

impl Kong {
    pub fn new(node: &Node) -> Kong {
        Kong::with_timers(node, 1)
    }

    fn with_timers(node: &Node, timers: u32) -> Kong {
        let (engine, module) = engine_and_module();
        let linker = linker(engine, module).unwrap();
        let host = Host {
            node: node.clone(),
            phase: Phase::Idle,
            current: ROOT_ID,
            plugin_config: Vec::new(),
            tick_period_ms: HashMap::new(),
            requests: HashMap::new(),
            call_response: None,
            calls: Vec::new(),
            next_token: 0,
            metrics: HashMap::new(),
            logs: Vec::new(),
            root_property_reads: Vec::new(),
            effective_context_switches: Vec::new(),
            kong: std::env::var_os("KONG_HARNESS_KONG_TEMPLATE").is_some(),
            // Every instance its own randomness, as every nginx worker has (two nodes that drew the
            // same node id would share their leases).
            rng: node.now_ms()
                ^ 0x9E37_79B9_7F4A_7C15
                ^ INSTANCES.fetch_add(1, Ordering::Relaxed).wrapping_mul(0xBF58_476D_1CE4_E5B9),
        };
        let mut store = Store::new(engine, host);
        let instance = linker.instantiate(&mut store, module).unwrap();
        let mut kong = Kong { store, instance, next_id: ROOT_ID + 1, timers };
        kong.call::<(), ()>(Phase::Idle, ROOT_ID, "_initialize", ()).unwrap();
        kong.call::<(i32, i32), ()>(Phase::Idle, ROOT_ID, "proxy_on_context_create", (ROOT_ID as i32, 0)).unwrap();
        let started = kong.call::<(i32, i32), i32>(Phase::VmStart, ROOT_ID, "proxy_on_vm_start", (ROOT_ID as i32, 0));
        assert_eq!(started.unwrap(), 1, "on_vm_start");
        kong
    }

    pub fn host(&self) -> &Host {
        self.store.data()
    }

    fn call<P: WasmParams, R: WasmResults>(&mut self, phase: Phase, context: u32, name: &str, params: P) -> Result<R> {
        let f = self.instance.get_typed_func::<P, R>(&mut self.store, name)?;
        let h = self.store.data_mut();
        h.phase = phase;
        h.current = context;
        let result = f.call(&mut self.store, params);
        self.store.data_mut().phase = Phase::Idle;
        result
    }

    /// `on_configure` with this JSON; the filter's answer.
    pub fn configure(&mut self, config: &str) -> Result<bool> {
        self.store.data_mut().plugin_config = config.as_bytes().to_vec();
        let len = config.len() as i32;
        let r = self.call::<(i32, i32), i32>(Phase::Configure, ROOT_ID, "proxy_on_configure", (ROOT_ID as i32, len))?;
        Ok(r != 0)
    }

    /// One tick period: the root's `on_tick` once per timer.
    pub fn tick(&mut self) -> Result<()> {
        assert!(self.host().tick_period_ms.get(&ROOT_ID).is_some_and(|p| *p != 0), "no tick period set");
        for _ in 0..self.timers {
            self.call::<i32, ()>(Phase::Tick, ROOT_ID, "proxy_on_tick", ROOT_ID as i32)?;
        }
        Ok(())
    }

    /// The instance trapped: ngx_wasm_module replaces it in the same worker (its memory, and so
    /// the filter's worker state, is gone; shared memory stays) and configures the new one. A
    /// dispatch of a request still pending then crashes the worker when its answer arrives (seen
    /// on the real engine: signal 11), so that is an error here.
    pub fn replace_after_trap(self, config: &str) -> Result<Kong> {
        let pending: Vec<u32> =
            self.host().requests.iter().filter(|(_, r)| r.pending_dispatches > 0).map(|(id, _)| *id).collect();
        if !pending.is_empty() {
            bail!("ngx_wasm_module: the worker crashes when the dispatches of calls {pending:?} are answered");
        }
        let node = self.host().node.clone();
        let mut next = Kong::with_timers(&node, self.timers + 1);
        next.store.data_mut().kong = self.host().kong;
        next.configure(config)?;
        Ok(next)
    }

    /// A new request: its context and the action of `on_request_headers` (0 continue, 1 pause).
    pub fn request(&mut self, headers: &[(&str, &str)]) -> Result<(u32, i32)> {
        self.request_with_body(headers, None)
    }

    /// A new request with a body (Kong reads the whole body, then calls `on_request_body` once
    /// with eof): its context and the action of the last request callback.
    pub fn request_with_body(&mut self, headers: &[(&str, &str)], body: Option<&[u8]>) -> Result<(u32, i32)> {
        let id = self.next_id;
        self.next_id += 1;
        let mut all: Vec<(String, String)> =
            [(":method", "GET"), (":path", "/anything"), (":authority", "kong"), (":scheme", "http")]
                .iter()
                .chain(headers)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        // A client's request declares its body (nginx reads it by these headers).
        let declared = all.iter().any(|(k, _)| k == "content-length" || k == "transfer-encoding");
        if let Some(body) = body.filter(|_| !declared) {
            all.push(("content-length".to_owned(), body.len().to_string()));
        }
        let n = all.len() as i32;
        self.store.data_mut().requests.insert(id, Request { request_headers: all, ..Request::default() });
        self.call::<(i32, i32), ()>(Phase::Idle, ROOT_ID, "proxy_on_context_create", (id as i32, ROOT_ID as i32))?;
        // Kong always passes eof = false to header callbacks.
        let mut action = self.call::<(i32, i32, i32), i32>(
            Phase::RequestHeaders,
            id,
            "proxy_on_request_headers",
            (id as i32, n, 0),
        )?;
        if let (0, Some(body)) = (action, body) {
            let r = self.store.data_mut().requests.get_mut(&id).unwrap();
            r.request_body = body.to_vec();
            let size = body.len() as i32;
            action = self.call::<(i32, i32, i32), i32>(
                Phase::RequestBody,
                id,
                "proxy_on_request_body",
                (id as i32, size, 1),
            )?;
        }
        self.settle_request(id, action);
        Ok((id, action))
    }

    /// What the engine does with a request after one of its callbacks: it goes on when the filter
    /// says continue, or when its last dispatch was answered without a local response.
    fn settle_request(&mut self, id: u32, action: i32) {
        if let Some(r) = self.store.data_mut().requests.get_mut(&id) {
            r.proceeded |= r.local.is_none() && action == 0;
        }
    }

    pub fn response_headers(&mut self, id: u32) -> Result<i32> {
        let r = self.store.data_mut().requests.get_mut(&id).unwrap();
        if r.response_headers.is_empty() {
            let status = r.local.as_ref().map_or(200, |l| l.status).to_string();
            r.response_headers = vec![(":status".into(), status), ("content-type".into(), "text/plain".into())];
        }
        let n = r.response_headers.len() as i32;
        let action = self.call::<(i32, i32, i32), i32>(
            Phase::ResponseHeaders,
            id,
            "proxy_on_response_headers",
            (id as i32, n, 0),
        )?;
        if action != 0 && self.request_state(id).local.is_none() {
            bail!("Kong: \"ResponseHeaders\" returned \"PAUSE\": local response expected but none produced");
        }
        Ok(action)
    }

    /// One chunk of the response body (`eof` on the last).
    pub fn response_body(&mut self, id: u32, chunk: &[u8], eof: bool) -> Result<i32> {
        self.store.data_mut().requests.get_mut(&id).unwrap().response_chunk = chunk.to_vec();
        let size = chunk.len() as i32;
        self.call::<(i32, i32, i32), i32>(
            Phase::ResponseBody,
            id,
            "proxy_on_response_body",
            (id as i32, size, i32::from(eof)),
        )
    }

    pub fn log(&mut self, id: u32) -> Result<()> {
        self.call::<i32, ()>(Phase::Log, id, "proxy_on_log", id as i32)
    }

    pub fn done(&mut self, id: u32) -> Result<()> {
        self.call::<i32, i32>(Phase::Done, id, "proxy_on_done", id as i32)?;
        self.call::<i32, ()>(Phase::Done, id, "proxy_on_delete", id as i32)?;
        self.store.data_mut().requests.remove(&id);
        Ok(())
    }

    /// The rest of a request's life as Kong runs it (response callbacks run after a local response too).
    pub fn finish(&mut self, id: u32) -> Result<()> {
        self.response_headers(id)?;
        self.log(id)?;
        self.done(id)
    }

    /// A request the filter paused with nothing that could ever resume it: no local response,
    /// no dispatch of its own pending (under ngx_wasm_module only its own dispatch resumes it).
    pub fn hanging(&self, id: u32) -> bool {
        let r = self.request_state(id);
        !r.proceeded && r.local.is_none() && r.pending_dispatches == 0
    }

    pub fn request_state(&self, id: u32) -> &Request {
        &self.host().requests[&id]
    }

    pub fn calls(&self) -> &[HttpCall] {
        &self.host().calls
    }

    /// Delivers an answer to the dispatch `token` to the context that made it; `num_headers` is what
    /// the host passes (Kong 3.9 passes 0 for a failed dispatch, with only `:dispatch_status` set).
    pub fn answer(&mut self, token: u32, headers: &[(&str, &str)], num_headers: i32, body: &[u8]) -> Result<()> {
        let call = self.host().calls.iter().find(|c| c.token == token).cloned().unwrap();
        let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.store.data_mut().call_response = Some((headers, body.to_vec()));
        if let Some(r) = self.store.data_mut().requests.get_mut(&call.context) {
            r.pending_dispatches = r.pending_dispatches.saturating_sub(1);
        }
        let r = self.call::<(i32, i32, i32, i32, i32), ()>(
            Phase::CallResponse,
            call.context,
            "proxy_on_http_call_response",
            (call.context as i32, token as i32, num_headers, body.len() as i32, 0),
        );
        self.store.data_mut().call_response = None;
        // ngx_wasm_module resumes the request once its last dispatch is answered, unless the
        // filter produced a local response.
        if let Some(req) = self.store.data_mut().requests.get_mut(&call.context) {
            if req.pending_dispatches == 0 && req.local.is_none() {
                req.proceeded = true;
            }
        }
        r
    }

    /// The engine fails dispatch `token` at its timeout, reported the Kong 3.9 way. ngx_wasm_module
    /// times a dispatch on nginx's monotonic millisecond clock (`ngx_add_timer` on
    /// `ngx_current_msec`) while `proxy_get_current_time_nanoseconds` reads the wall clock
    /// (`ngx_timeofday`), each cut to the millisecond at its own phase: the filter's clock may
    /// show one millisecond less than the timeout, and this harness shows it so.
    pub fn time_out(&mut self, token: u32) -> Result<()> {
        let call = self.host().calls.iter().find(|c| c.token == token).cloned().unwrap();
        let node = self.host().node.clone();
        let at_ms = call.sent_ms + u64::from(call.timeout_ms) - 1;
        node.advance(at_ms.saturating_sub(node.now_ms()));
        self.answer(token, &[(":dispatch_status", "timeout")], 0, b"")
    }

    /// A 200 answer with this JSON body.
    pub fn answer_ok(&mut self, token: u32, body: &[u8]) -> Result<()> {
        self.answer(token, &[(":status", "200"), ("content-type", "application/json")], 2, body)
    }

    pub fn metric(&self, name: &str) -> i64 {
        self.host().metrics.values().find(|(n, _, _)| n == name).map_or(0, |m| m.2)
    }

    pub fn roots(&self) -> HashSet<u32> {
        self.host().tick_period_ms.keys().copied().collect()
    }
}
