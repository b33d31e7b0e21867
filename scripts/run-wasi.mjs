// Runs a wasm32-wasip1 test binary under Node's WASI, so the credit model's tests execute as wasm.
// Cargo passes the .wasm path and the test harness arguments (see CARGO_TARGET_WASM32_WASIP1_RUNNER).
import { readFile } from "node:fs/promises";
import { WASI } from "node:wasi";
import { argv, env, exit } from "node:process";

const [wasmPath, ...args] = argv.slice(2);
const wasi = new WASI({ version: "preview1", args: [wasmPath, ...args], env, returnOnExit: true });
const module = await WebAssembly.compile(await readFile(wasmPath));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
exit(wasi.start(instance));
