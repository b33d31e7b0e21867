//! Load on a real `credits-ledger` process: charges through `POST …/credits/charges`, or usage
//! through the gateway's batched `POST /v3/gateway/sync`, while a reader measures the latency of
//! `GET …/credits/balance`. Also sets up customers for `bench/gateway.sh`.
//!
//! cargo run --release -p ledger --example ledger_bench -- --mode sync \
//!     --ledger target/release/credits-ledger --database sqlite:///tmp/bench.db --customers 10000 --clients 4 --seconds 5
//! … --mode setup --url http://127.0.0.1:8480 --customers 10000 --subject-prefix s   (customers only, then exit)
//!
//! Modes:
//! - `charges`: each client issues `credit_only` charges of 0.01 with unique keys back to back,
//!   round-robin over the customers.
//! - `sync`: each client is a gateway node; each request carries one usage range per subject for
//!   `--subjects-per-sync` subjects (at most the number of customers), each range
//!   `--calls-per-range` calls at 0.01. A *usage record* is one such range: the calls one node let
//!   through for one subject since its last report, booked as one movement under one idempotency
//!   key (see `crates/credits/src/sync.rs`). Reports ranges/s and calls/s.
//! - `setup`: creates the customers (subject keys `<prefix>0 … <prefix>N-1`, 1,000,000 USD each)
//!   in the ledger at `--url` and exits.
//!
//! `--instances N` starts N ledger processes on the one database (e.g. two on one PostgreSQL);
//! the clients take turns among them. `--node-customers` says which customers each node reports:
//! `shared` (the default) all of them in the same order, about in step, so that every sync wants
//! the row locks the others want at that moment; `shuffled` all of them, each node in an order of
//! its own, as gateway nodes behind one load balancer meet their customers; `own` a slice per node.
//!
//! `--warm-seconds N` runs the same load for N seconds before the measured `--seconds`: the
//! journal a ledger books into grows, and what a range costs grows with it (on SQLite markedly,
//! until the per-customer index of the journal is many times larger than one commit's ranges).
//! Besides the rates it reports what the ledger processes used per range over the measured
//! seconds: CPU (`ledger_cpu_us_per_range`) and bytes written (`ledger_written_bytes_per_range`).
//!
//! Prints one JSON object.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

const TOKEN: &str = "bench-token";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Charges,
    Sync,
    Setup,
}

struct Args {
    mode: Mode,
    ledger: String,
    url: Option<String>,
    database: String,
    customers: usize,
    clients: usize,
    seconds: u64,
    /// Seconds of the same load before the measured ones: the journal grows, and on SQLite each
    /// range costs more once its per-customer index outgrows a commit (bench/RESULTS.md §0k).
    warm_seconds: u64,
    subjects_per_sync: usize,
    calls_per_range: u64,
    subject_prefix: Option<String>,
    /// Ledger processes started on the one database; clients take turns among them.
    instances: usize,
    /// Which customers each node reports, in which order.
    node_customers: NodeCustomers,
}

/// Which customers the nodes of a `sync` run report, batch after batch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NodeCustomers {
    /// All of them, in the same order and about in step: every sync wants the rows the other
    /// nodes' syncs want at the same moment.
    Shared,
    /// All of them, each node in an order of its own (as nodes behind one load balancer meet
    /// them): syncs sent at the same moment share some customers.
    Shuffled,
    /// Each node its own slice: no two syncs want the same customer.
    Own,
}

impl NodeCustomers {
    fn name(self) -> &'static str {
        match self {
            NodeCustomers::Shared => "shared",
            NodeCustomers::Shuffled => "shuffled",
            NodeCustomers::Own => "own",
        }
    }

    /// The customers (indexes among `n`) of batch `batch` of node `node`, `per` of them.
    fn batch(self, node: usize, nodes: usize, batch: usize, per: usize, n: usize) -> Vec<usize> {
        match self {
            NodeCustomers::Shared => {
                let start = (batch * per + node * 7) % n;
                (0..per).map(|j| (start + j) % n).collect()
            }
            NodeCustomers::Shuffled => {
                // i ↦ a·i + node mod n is a permutation of 0..n when a and n are coprime: a
                // different stride a per node gives each its own order.
                let mut a = 1 + node * 7919 % n.max(1);
                while gcd(a, n) != 1 {
                    a += 1;
                }
                (0..per).map(|j| (a * ((batch * per + j) % n) + node) % n).collect()
            }
            NodeCustomers::Own => {
                let slice = (n / nodes.max(1)).max(1);
                (0..per.min(slice)).map(|j| (node * slice + (batch * per + j) % slice) % n).collect()
            }
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn args() -> Args {
    let mut a = Args {
        mode: Mode::Charges,
        ledger: "target/release/credits-ledger".into(),
        url: None,
        database: String::new(),
        customers: 1,
        clients: 1,
        seconds: 5,
        warm_seconds: 0,
        subjects_per_sync: 1000,
        calls_per_range: 10,
        subject_prefix: None,
        instances: 1,
        node_customers: NodeCustomers::Shared,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--mode" => {
                a.mode = match value.as_str() {
                    "charges" => Mode::Charges,
                    "sync" => Mode::Sync,
                    "setup" => Mode::Setup,
                    other => panic!("unknown mode {other}"),
                }
            }
            "--ledger" => a.ledger = value,
            "--url" => a.url = Some(value),
            "--database" => a.database = value,
            "--customers" => a.customers = value.parse().unwrap_or(1),
            "--clients" => a.clients = value.parse().unwrap_or(1),
            "--seconds" => a.seconds = value.parse().unwrap_or(5),
            "--warm-seconds" => a.warm_seconds = value.parse().unwrap_or(0),
            "--subjects-per-sync" => a.subjects_per_sync = value.parse().unwrap_or(1000),
            "--calls-per-range" => a.calls_per_range = value.parse().unwrap_or(10),
            "--subject-prefix" => a.subject_prefix = Some(value),
            "--instances" => a.instances = value.parse().unwrap_or(1).max(1),
            "--node-customers" => {
                a.node_customers = match value.as_str() {
                    "shared" => NodeCustomers::Shared,
                    "shuffled" => NodeCustomers::Shuffled,
                    "own" => NodeCustomers::Own,
                    other => panic!("unknown --node-customers {other}: shared, shuffled or own"),
                }
            }
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(a.url.is_some() || !a.database.is_empty(), "--database (or --url of a running ledger) is required");
    a
}

/// The ledger under test: one this example started (killed on drop), or one at `--url`.
struct Target {
    base: String,
    child: Option<Child>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn start(a: &Args, http: &reqwest::Client) -> Target {
    let target = match &a.url {
        Some(url) => Target { base: url.trim_end_matches('/').to_owned(), child: None },
        None => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|x| x.port())
                .expect("port");
            let child = Command::new(&a.ledger)
                .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--database", &a.database, "--token", TOKEN])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start credits-ledger");
            Target { base: format!("http://127.0.0.1:{port}"), child: Some(child) }
        }
    };
    for _ in 0..200 {
        if http.get(format!("{}/healthz", target.base)).send().await.is_ok_and(|r| r.status().is_success()) {
            return target;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the ledger at {} did not become healthy", target.base);
}

/// What the ledger processes this run started have used so far; `None` for a ledger at `--url`
/// or where `/proc` cannot be read.
#[derive(Clone, Copy)]
struct LedgerUsage {
    /// User and system CPU seconds, from `/proc/<pid>/stat` (in Linux's USER_HZ of 100 ticks a
    /// second).
    cpu_seconds: f64,
    /// Bytes handed to `write(2)` and its kin (`wchar` of `/proc/<pid>/io`): on SQLite mostly its
    /// write-ahead log and the checkpoints that copy it into the database file (every page a commit
    /// dirtied, whole); on PostgreSQL the database server writes, and this is mostly HTTP answers.
    written_bytes: u64,
}

impl LedgerUsage {
    fn read(targets: &[Target]) -> Option<Self> {
        let (mut ticks, mut written_bytes) = (0u64, 0u64);
        for t in targets {
            let pid = t.child.as_ref()?.id();
            ticks += cpu_ticks(&pid.to_string())?;
            let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
            let wchar = io.lines().find_map(|line| line.strip_prefix("wchar:"))?;
            written_bytes += wchar.trim().parse::<u64>().ok()?;
        }
        Some(LedgerUsage { cpu_seconds: ticks as f64 / 100.0, written_bytes })
    }

    fn since(self, before: Self) -> Self {
        LedgerUsage {
            cpu_seconds: self.cpu_seconds - before.cpu_seconds,
            written_bytes: self.written_bytes.saturating_sub(before.written_bytes),
        }
    }
}

/// The machine's cores (those this process may run on).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// User and system CPU ticks a process has used, from `/proc/<pid>/stat`.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces), counted from the state (field 3): utime
    // and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Where the machine's CPU went over the measured seconds, so that a rate can be set against
/// what the machine has: everything busy, this process (the load), and the processes named
/// `postgres` (a PostgreSQL server on this machine; its backends live as long as the ledger's
/// connections, so none of the measured work is lost with an exited one).
#[derive(Clone, Copy)]
struct MachineUsage {
    busy_ticks: u64,
    total_ticks: u64,
    bench_ticks: u64,
    postgres_ticks: u64,
}

impl MachineUsage {
    fn read() -> Option<Self> {
        // The first line of /proc/stat: `cpu user nice system idle iowait irq softirq steal …`.
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks: Vec<u64> =
            stat.lines().next()?.split_whitespace().skip(1).take(8).filter_map(|v| v.parse().ok()).collect();
        let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks[..] else { return None };
        let busy_ticks = user + nice + system + irq + softirq;
        let postgres_ticks = std::fs::read_dir("/proc")
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
            .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres"))
            .filter_map(|pid| cpu_ticks(&pid))
            .sum();
        Some(MachineUsage {
            busy_ticks,
            total_ticks: busy_ticks + idle + iowait + steal,
            bench_ticks: cpu_ticks("self")?,
            postgres_ticks,
        })
    }

    fn since(self, before: Self) -> Self {
        MachineUsage {
            busy_ticks: self.busy_ticks.saturating_sub(before.busy_ticks),
            total_ticks: self.total_ticks.saturating_sub(before.total_ticks),
            bench_ticks: self.bench_ticks.saturating_sub(before.bench_ticks),
            postgres_ticks: self.postgres_ticks.saturating_sub(before.postgres_ticks),
        }
    }
}

/// Creates the customers (16 at a time: the ledger serialises writes anyway); returns their ids.
async fn create_customers(http: &reqwest::Client, base: &str, prefix: &str, n: usize) -> Vec<String> {
    let base = format!("{base}/v3/openmeter");
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (http, base, prefix, next) = (http.clone(), base.clone(), prefix.to_owned(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut made = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    return made;
                }
                let subject = format!("{prefix}{i}");
                let body = json!({"name": subject, "key": subject, "usage_attribution": {"subject_keys": [subject]}});
                let c: serde_json::Value = http
                    .post(format!("{base}/customers"))
                    .bearer_auth(TOKEN)
                    .json(&body)
                    .send()
                    .await
                    .expect("customer")
                    .json()
                    .await
                    .expect("json");
                let id = c["id"].as_str().unwrap_or_else(|| panic!("no customer id in {c}")).to_owned();
                let grant = json!({"name": "bench", "funding_method": "none", "currency": "USD", "amount": "1000000"});
                let status = http
                    .post(format!("{base}/customers/{id}/credits/grants"))
                    .bearer_auth(TOKEN)
                    .json(&grant)
                    .send()
                    .await
                    .expect("grant")
                    .status();
                assert_eq!(status, 201, "grant for {subject}");
                made.push((i, id));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("setup task"));
    }
    all.sort();
    all.into_iter().map(|(_, id)| id).collect()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let ms = sorted.get(((sorted.len() as f64 - 1.0) * p) as usize).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    (ms * 100.0).round() / 100.0
}

/// One request of a client: `Some(ranges booked)` if it succeeded. `next_call` is the client's
/// next call number per subject (sync mode).
#[allow(clippy::too_many_arguments)]
async fn one_request(
    a: &Args,
    http: &reqwest::Client,
    base: &str,
    customers: &[String],
    subjects: &[String],
    client: usize,
    n: usize,
    next_call: &mut [u64],
) -> Option<u64> {
    match a.mode {
        Mode::Charges => {
            let customer = &customers[(client + n * 7) % customers.len()];
            let body = json!({"amount": "0.01", "currency": "USD", "settlement_mode": "credit_only", "key": format!("c{client}-{n}")});
            let url = format!("{base}/v3/openmeter/customers/{customer}/credits/charges");
            let ok = http.post(url).bearer_auth(TOKEN).json(&body).send().await.is_ok_and(|r| r.status() == 201);
            ok.then_some(1)
        }
        Mode::Sync => {
            let per = a.subjects_per_sync.min(subjects.len()).max(1);
            let k = a.calls_per_range;
            let amount = rust_decimal::Decimal::new(i64::try_from(k).unwrap_or(i64::MAX), 2).to_string();
            // Batch n of this node: the next `per` subjects round-robin. Like a gateway node, the
            // client numbers each subject's calls from 0 and reports them in contiguous ranges,
            // and sends a range again (unchanged) when its sync failed.
            let picked = a.node_customers.batch(client, a.clients, n, per, subjects.len());
            let node = format!("bench-node-{client}");
            let body = wire::Sync {
                node: &node,
                subjects: picked
                    .iter()
                    .map(|&i| wire::Subject {
                        subject: &subjects[i],
                        currency: "USD",
                        feature_key: "api_requests",
                        usage: wire::Usage {
                            from: next_call[i],
                            to: next_call[i] + k,
                            amount: &amount,
                            settlement_mode: "credit_only",
                        },
                    })
                    .collect(),
            };
            let reply =
                http.post(format!("{base}/v3/gateway/sync")).bearer_auth(TOKEN).json(&body).send().await.ok()?;
            if reply.status() != 200 {
                return None;
            }
            let bytes = reply.bytes().await.ok()?;
            let answer: wire::Answer = serde_json::from_slice(&bytes).ok()?;
            for &i in &picked {
                next_call[i] += k;
            }
            let booked = answer.subjects.iter().filter(|s| s.status == "ok" && s.usage == Some("booked")).count();
            Some(booked as u64)
        }
        Mode::Setup => None,
    }
}

/// The sync request and answer, typed: a client that builds and parses them through
/// `serde_json::Value` spent as much CPU as the ledger serving them, on the same two cores.
mod wire {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize)]
    pub struct Sync<'a> {
        pub node: &'a str,
        pub subjects: Vec<Subject<'a>>,
    }

    #[derive(Serialize)]
    pub struct Subject<'a> {
        pub subject: &'a str,
        pub currency: &'a str,
        pub feature_key: &'a str,
        pub usage: Usage<'a>,
    }

    #[derive(Serialize)]
    pub struct Usage<'a> {
        pub from: u64,
        pub to: u64,
        pub amount: &'a str,
        pub settlement_mode: &'a str,
    }

    #[derive(Deserialize)]
    pub struct Answer<'a> {
        #[serde(borrow)]
        pub subjects: Vec<Answered<'a>>,
    }

    #[derive(Deserialize)]
    pub struct Answered<'a> {
        pub status: &'a str,
        #[serde(default)]
        pub usage: Option<&'a str>,
    }
}

/// Reads balances of random customers every 10 ms until `stop`; the latencies.
async fn read_balances(
    http: reqwest::Client,
    base: String,
    customers: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let customer = &customers[(n * 7919) % customers.len()];
        let t = Instant::now();
        let ok = http
            .get(format!("{base}/v3/openmeter/customers/{customer}/credits/balance"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            latencies.push(t.elapsed());
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    latencies
}

#[tokio::main]
async fn main() {
    let a = Arc::new(args());
    let http = reqwest::Client::builder().pool_max_idle_per_host(a.clients * 2 + 16).build().expect("client");
    let mut targets = Vec::new();
    for _ in 0..if a.url.is_some() { 1 } else { a.instances } {
        targets.push(start(&a, &http).await);
    }
    let target = &targets[0];
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let prefix = a.subject_prefix.clone().unwrap_or_else(|| format!("bench-{run}-"));
    let setup_started = Instant::now();
    let customers = Arc::new(create_customers(&http, &target.base, &prefix, a.customers).await);
    let setup_seconds = setup_started.elapsed().as_secs_f64();
    if a.mode == Mode::Setup {
        println!("{}", json!({"mode": "setup", "customers": customers.len(), "setup_seconds": setup_seconds}));
        return;
    }
    let subjects: Arc<Vec<String>> = Arc::new((0..a.customers).map(|i| format!("{prefix}{i}")).collect());
    let ops = Arc::new(AtomicU64::new(0));
    let records = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Requests that start before `measured_from` warm up: sent, not counted.
    let measured_from = Instant::now() + Duration::from_secs(a.warm_seconds);
    let deadline = measured_from + Duration::from_secs(a.seconds);
    let mut tasks = Vec::new();
    for client in 0..a.clients {
        let (a, http, base, customers, subjects) = (
            a.clone(),
            http.clone(),
            targets[client % targets.len()].base.clone(),
            customers.clone(),
            subjects.clone(),
        );
        let (ops, records, failed) = (ops.clone(), records.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0usize;
            let mut next_call = vec![0u64; subjects.len()];
            while Instant::now() < deadline {
                let t = Instant::now();
                let booked = one_request(&a, &http, &base, &customers, &subjects, client, n, &mut next_call).await;
                n += 1;
                if t < measured_from {
                    continue;
                }
                latencies.push(t.elapsed());
                match booked {
                    Some(r) => {
                        ops.fetch_add(1, Ordering::Relaxed);
                        records.fetch_add(r, Ordering::Relaxed);
                    }
                    None => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    tokio::time::sleep_until(measured_from.into()).await;
    let reader = tokio::spawn(read_balances(http.clone(), target.base.clone(), customers.clone(), stop.clone()));
    let usage_before = LedgerUsage::read(&targets);
    let machine_before = MachineUsage::read();
    let started = Instant::now();
    let mut latencies: Vec<Duration> = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("client"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ledger_usage = LedgerUsage::read(&targets).zip(usage_before).map(|(after, before)| after.since(before));
    let machine = MachineUsage::read().zip(machine_before).map(|(after, before)| after.since(before));
    let ledger_cpu = ledger_usage.map(|u| u.cpu_seconds);
    stop.store(true, Ordering::Relaxed);
    let mut reads = reader.await.expect("reader");
    latencies.sort();
    reads.sort();
    let backend = match &a.url {
        Some(_) => "external",
        None if a.database.starts_with("sqlite") => "sqlite",
        None => "postgres",
    };
    let (ops, records) = (ops.load(Ordering::Relaxed), records.load(Ordering::Relaxed));
    let mut result = json!({
        "mode": if a.mode == Mode::Sync { "sync" } else { "charges" },
        "backend": backend,
        "customers": a.customers,
        "clients": a.clients,
        "instances": targets.len(),
        "node_customers": a.node_customers.name(),
        "seconds": elapsed,
        "setup_seconds": setup_seconds,
        "warm_seconds": a.warm_seconds,
        "requests": ops,
        "failed": failed.load(Ordering::Relaxed),
        "requests_per_second": (ops as f64 / elapsed).round(),
        "p50_ms": percentile(&latencies, 0.50),
        "p99_ms": percentile(&latencies, 0.99),
        "balance_reads": reads.len(),
        "balance_p50_ms": percentile(&reads, 0.50),
        "balance_p99_ms": percentile(&reads, 0.99),
        "ledger_cpu_seconds": ledger_cpu,
    });
    match a.mode {
        Mode::Charges => result["charges_per_second"] = json!((ops as f64 / elapsed).round()),
        Mode::Sync => {
            let per = a.subjects_per_sync.min(a.customers).max(1);
            result["ranges_per_sync"] = json!(per);
            result["calls_per_range"] = json!(a.calls_per_range);
            result["ranges_per_second"] = json!((records as f64 / elapsed).round());
            result["calls_per_second"] = json!((records as f64 * a.calls_per_range as f64 / elapsed).round());
            // Less sensitive than the rate to what else the machine runs (the load generator, a
            // neighbour's steal): what one range cost the ledger processes, balance reads included.
            result["ledger_cpu_us_per_range"] =
                json!(ledger_cpu.map(|cpu| (cpu * 1e6 / records.max(1) as f64 * 10.0).round() / 10.0));
            result["ledger_written_bytes_per_range"] =
                json!(ledger_usage.map(|u| (u.written_bytes as f64 / records.max(1) as f64).round()));
            // The same per range for the rest of the machine: with the ledger's, what a range costs
            // the whole machine, and so the most ranges/s its cores could book.
            let per_range = |ticks: u64| ((ticks as f64 * 1e4 / records.max(1) as f64) * 10.0).round() / 10.0;
            if let Some(m) = machine {
                result["machine_busy_cores"] = json!(
                    ((m.busy_ticks as f64 / m.total_ticks.max(1) as f64 * cores() as f64) * 100.0).round() / 100.0
                );
                result["machine_cpu_us_per_range"] = json!(per_range(m.busy_ticks));
                result["bench_cpu_us_per_range"] = json!(per_range(m.bench_ticks));
                if backend == "postgres" {
                    result["postgres_cpu_us_per_range"] = json!(per_range(m.postgres_ticks));
                }
            }
        }
        Mode::Setup => {}
    }
    println!("{result}");
}
