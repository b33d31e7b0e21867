// bench/decide-profile built for wasm32-wasip1, run under V8 (Node's WASI), the engine family
// Envoy runs the filter on: its per-call decision (`call_ns`) and a worker's tick (`tick_us`)
// in wall-clock time, to compare two builds of the filter's code on one machine, run after run.
// No host calls (they are Envoy's), no callgrind (bench/profile.sh counts instructions natively).
//
//   cargo build --release --target wasm32-wasip1 -p decide-profile
//   node bench/v8.mjs target/wasm32-wasip1/release/decide-profile.wasm [calls] [subjects] [ticks]
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';

const [wasmPath, ...args] = process.argv.slice(2);
const wasi = new WASI({ version: 'preview1', args: ['decide-profile', ...args], env: {} });
const module = await WebAssembly.compile(await readFile(wasmPath));
const imports = wasi.getImportObject();
// The filter library's proxy-wasm imports, which this binary never calls.
imports.env = Object.fromEntries(WebAssembly.Module.imports(module).filter((i) => i.module === 'env')
  .map((i) => [i.name, () => { throw new Error(`host call ${i.name} outside a proxy-wasm host`); }]));
const instance = await WebAssembly.instantiate(module, imports);
// The library's reactor export (`_initialize`) is not this command's entry point: Node's
// WASI.start refuses a module that has one.
wasi.start({ exports: { ...instance.exports, _initialize: undefined } });
