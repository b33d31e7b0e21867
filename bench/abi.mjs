// A whole call through a proxy-wasm filter under V8 (Node), host included: this file is a
// minimal proxy-wasm ABI 0.2.1 host in JavaScript (headers, shared data with Envoy's CAS rules,
// clock, local replies, dispatched calls answered at once by a ledger that grants every lease and
// books every range). It measures what the gateway benchmarks cannot separate from Envoy: the
// filter's own code per call — the proxy-wasm SDK's context bookkeeping, the adapter and the
// decision — with host calls that cost next to nothing. Run it for the no-op filter, the floor
// filter and prepaid_credits, and the differences are each filter's code.
//
//   node bench/abi.mjs <filter.wasm> [calls, default 200000] [subjects, default 1] [configuration]
//
// One request per call (context created, request headers, response headers 200, log, done,
// deleted), the clock advancing 50 µs per call, a tick every second of that clock. Prints JSON:
// `call_ns` (wall clock per call, ticks included), `host_calls_per_call` by import, and what the
// last response carried. `node --cpu-prof bench/abi.mjs …` on a build that keeps its name section
// (`--config profile.release.strip=false`) shows the filter's functions by name. The filter's log
// lines at level ABI_LOG_LEVEL (default 3, warn) and above go to stderr.
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';

const [wasmPath, callsArg = '200000', subjectsArg = '1', configArg] = process.argv.slice(2);
const calls = Number(callsArg);
const subjects = Number(subjectsArg);
// bench/gateway.py's configuration for prepaid_credits (its defaults, one price per call).
const configuration = configArg ?? JSON.stringify({
  ledger: { upstream: 'ledger', token: 'bench-token', timeout_ms: 1000 },
  subject: { header: 'x-consumer-username' }, price: '0.01', currency: 'USD',
  feature_key: 'api_requests', settlement_mode: 'credit_only',
});

const OK = 0, NOT_FOUND = 1, CAS_MISMATCH = 8;
const enc = new TextEncoder(), dec = new TextDecoder();
const module = await WebAssembly.compile(await readFile(wasmPath));
let exports, mem;
// Views of the filter's memory, made again only when it grows (the host should cost little).
let views = { buffer: null, u8: null, dv: null };
function view() {
  if (views.buffer !== mem.buffer) views = { buffer: mem.buffer, u8: new Uint8Array(mem.buffer), dv: new DataView(mem.buffer) };
  return views;
}
const u8 = () => view().u8;
const dv = () => view().dv;
const str = (ptr, len) => dec.decode(u8().subarray(ptr, ptr + len));
const bytes = (ptr, len) => u8().slice(ptr, ptr + len);
// Hands `data` to the filter the way hosts do: memory from its allocator, pointer and size written back.
function give(data, ptrOut, sizeOut) {
  const b = typeof data === 'string' ? enc.encode(data) : data;
  const at = b.length ? exports.proxy_on_memory_allocate(b.length) : 0;
  if (b.length) u8().set(b, at);
  dv().setUint32(ptrOut, at, true);
  dv().setUint32(sizeOut, b.length, true);
  return OK;
}

let nowNs = 1_780_000_000_000_000_000n;
const shared = new Map(); // key -> { value, cas }
let nextCas = 1;
const maps = [new Map([[':method', 'GET'], [':path', '/api/v1/things']]), null, new Map(), null, null, null, new Map()];
const buffers = { 4: new Uint8Array(), 7: enc.encode(configuration) };
const pendingCalls = []; // { context, token, body }
let nextToken = 1;
let current = 0;
const counts = {};
const count = (name) => { counts[name] = (counts[name] ?? 0) + 1; };

const env = {
  proxy_log: (level, ptr, len) => { count('log'); if (level >= Number(process.env.ABI_LOG_LEVEL ?? 3)) console.error(`filter log ${level}: ${str(ptr, len)}`); return OK; },
  proxy_get_current_time_nanoseconds: (out) => { count('clock'); dv().setBigUint64(out, nowNs, true); return OK; },
  proxy_set_tick_period_milliseconds: () => OK,
  proxy_get_buffer_bytes: (type, start, max, ptrOut, sizeOut) => {
    count('get_buffer');
    const b = buffers[type];
    // Sizes are u32: `usize::MAX` arrives as -1.
    return b ? give(b.subarray(start >>> 0, (start >>> 0) + (max >>> 0)), ptrOut, sizeOut) : NOT_FOUND;
  },
  proxy_get_header_map_value: (type, kp, kl, ptrOut, sizeOut) => {
    count('get_header');
    const v = maps[type]?.get(str(kp, kl));
    return v === undefined ? NOT_FOUND : give(v, ptrOut, sizeOut);
  },
  proxy_add_header_map_value: (type, kp, kl, vp, vl) => { count('set_header'); maps[type].set(str(kp, kl), str(vp, vl)); return OK; },
  proxy_replace_header_map_value: (type, kp, kl, vp, vl) => { count('set_header'); maps[type].set(str(kp, kl), str(vp, vl)); return OK; },
  proxy_remove_header_map_value: (type, kp, kl) => { count('set_header'); maps[type].delete(str(kp, kl)); return OK; },
  proxy_get_shared_data: (kp, kl, ptrOut, sizeOut, casOut) => {
    count('shared_get');
    const e = shared.get(str(kp, kl));
    if (!e) return NOT_FOUND;
    dv().setUint32(casOut, e.cas, true);
    return give(e.value, ptrOut, sizeOut);
  },
  // Envoy's rules: a CAS other than 0 must match an existing key's; a missing key is created.
  proxy_set_shared_data: (kp, kl, vp, vl, cas) => {
    count('shared_set');
    const key = str(kp, kl), e = shared.get(key);
    if (e && cas !== 0 && cas !== e.cas) return CAS_MISMATCH;
    if (vl === 0 && vp === 0) { shared.delete(key); return OK; }
    shared.set(key, { value: bytes(vp, vl), cas: nextCas++ });
    return OK;
  },
  proxy_get_property: () => { count('property'); return NOT_FOUND; },
  proxy_define_metric: (type, np, nl, idOut) => { dv().setUint32(idOut, 1, true); return OK; },
  proxy_increment_metric: () => { count('metric'); return OK; },
  proxy_record_metric: () => { count('metric'); return OK; },
  proxy_continue_stream: () => { count('resume'); return OK; },
  proxy_set_effective_context: (id) => { current = id; return OK; },
  proxy_send_local_response: (status) => { count('local_response'); maps[2].clear(); maps[2].set(':status', String(status)); return OK; },
  proxy_http_call: (up, ul, hp, hl, bp, bl, tp, tl, timeout, tokenOut) => {
    count('dispatch');
    const token = nextToken++;
    pendingCalls.push({ context: current, token, body: JSON.parse(str(bp, bl)) });
    dv().setUint32(tokenOut, token, true);
    return OK;
  },
};
for (const i of WebAssembly.Module.imports(module)) {
  if (i.module === 'env' && !env[i.name]) env[i.name] = () => { throw new Error(`host call ${i.name} not in this host`); };
}
const wasi = new WASI({ version: 'preview1', args: [], env: {}, returnOnExit: true });
const instance = await WebAssembly.instantiate(module, { env, ...wasi.getImportObject() });
exports = instance.exports;
mem = exports.memory;
wasi.initialize({ exports: { ...exports, _start: undefined } });

// The ledger: every range booked, every lease granted what it wanted (held until its usage is
// booked against it or it is released), for an hour. Amounts in millionths.
const leases = new Map();
let revision = 0; // the ledger's books change with every answer that grants or books
const micros = (text) => { const [w, f = ''] = text.split('.'); return BigInt(w) * 1_000_000n + BigInt((f + '000000').slice(0, 6)); };
const decimal = (m) => `${m / 1_000_000n}.${String(m % 1_000_000n).padStart(6, '0')}`;
function answer(request) {
  const nowMs = Number(nowNs / 1_000_000n);
  return {
    server_time: new Date(nowMs).toISOString(),
    subjects: request.subjects.map((s) => {
      const usedFrom = s.usage?.lease_id;
      if (usedFrom && leases.has(usedFrom)) {
        const held = leases.get(usedFrom) - micros(s.usage.amount);
        leases.set(usedFrom, held > 0n ? held : 0n);
      }
      let lease;
      if (s.lease) {
        const want = s.lease.release ? 0n : micros(s.lease.want);
        const held = s.lease.release ? 0n : (leases.get(s.lease.lease_id) ?? 0n) + want;
        leases.set(s.lease.lease_id, held);
        lease = { lease_id: s.lease.lease_id, held: decimal(held), granted: decimal(want),
          expires_at: new Date(nowMs + 3_600_000).toISOString(), closed: s.lease.release };
      }
      return { subject: s.subject, status: 'ok', customer_id: `c-${s.subject}`, live: '1000000', revision: ++revision,
        ...(s.usage ? { usage: 'booked' } : {}), ...(lease ? { lease } : {}) };
    }),
  };
}
function deliverCalls() {
  while (pendingCalls.length) {
    const { context, token, body } = pendingCalls.shift();
    const reply = enc.encode(JSON.stringify(answer(body)));
    maps[6].set(':status', '200');
    buffers[4] = reply;
    current = context;
    exports.proxy_on_http_call_response(context, token, 1, reply.length, 0);
  }
}

const ROOT = 1;
exports.proxy_on_context_create(ROOT, 0);
exports.proxy_on_vm_start(ROOT, 0);
if (!exports.proxy_on_configure(ROOT, buffers[7].length)) throw new Error('configuration refused');
let context = 2, lastTickNs = nowNs;
const names = Array.from({ length: subjects }, (_, i) => (subjects === 1 ? 'payer0' : `payer${i}`));
function oneCall(i) {
  nowNs += 50_000n;
  if (nowNs - lastTickNs >= 1_000_000_000n) {
    lastTickNs = nowNs;
    current = ROOT;
    exports.proxy_on_tick(ROOT);
    deliverCalls();
  }
  const id = context++;
  current = id;
  maps[0].set('x-consumer-username', names[i % subjects]);
  maps[2].clear();
  maps[2].set(':status', '200');
  exports.proxy_on_context_create(id, ROOT);
  const flow = exports.proxy_on_request_headers(id, 3, 1);
  if (flow !== 0) deliverCalls(); // paused for the ledger: answered at once
  current = id;
  exports.proxy_on_response_headers(id, 1, 0);
  exports.proxy_on_log(id);
  exports.proxy_on_done(id);
  exports.proxy_on_delete(id);
}
// Warm-up: every subject met and leased, V8's optimizing tier reached.
for (let i = 0; i < Math.max(20_000, 3 * subjects); i++) oneCall(i);
for (const k of Object.keys(counts)) delete counts[k];
const started = process.hrtime.bigint();
for (let i = 0; i < calls; i++) oneCall(i);
const elapsed = Number(process.hrtime.bigint() - started);
const perCall = Object.fromEntries(Object.entries(counts).map(([k, v]) => [k, +(v / calls).toFixed(3)]));
console.log(JSON.stringify({ wasm: wasmPath, calls, subjects, call_ns: +(elapsed / calls).toFixed(1),
  memory_bytes: mem.buffer.byteLength, host_calls_per_call: perCall, last_response: Object.fromEntries(maps[2]) }));
