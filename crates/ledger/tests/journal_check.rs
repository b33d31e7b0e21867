//! `credits-ledger check` finds a broken journal: every other test asserts that a sound journal
//! passes, so here each invariant is broken by hand, in SQL, and the check must name it (and the
//! command must exit non-zero with the report).

mod support;

use std::process::Command;

use serde_json::json;
use support::{grant_body, Backend, Ledger, TestDb};

/// A journal the ledger wrote itself: customer `a` with a grant of 10 of which a charge used 3,
/// customer `b` with a grant of its own.
struct World {
    db: TestDb,
    ledger: Ledger,
    customer: String,
    grant: String,
    other_grant: String,
    consumed: String,
}

async fn world(backend: Backend) -> World {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let customer = ledger.customer("a").await;
    let grant = ledger.grant(&customer, grant_body("10", json!({}))).await["id"].as_str().expect("id").to_owned();
    let (status, body) = ledger.charge(&customer, "3", "charge-1").await;
    assert_eq!(status, 201, "{body}");
    let other = ledger.customer("b").await;
    let other_grant = ledger.grant(&other, grant_body("5", json!({}))).await["id"].as_str().expect("id").to_owned();
    let consumed: String = sqlx::query_scalar("SELECT id FROM movements WHERE customer_id = $1 AND kind = 'consumed'")
        .bind(&customer)
        .fetch_one(ledger.state.db.pool())
        .await
        .expect("the charge's movement");
    assert!(ledger.check().await.is_empty(), "the untouched journal is sound");
    World { db, ledger, customer, grant, other_grant, consumed }
}

impl World {
    /// Runs `sql` with `{customer}`, `{grant}`, `{other_grant}` and `{consumed}` filled in.
    async fn corrupt(&self, sql: &str) {
        let sql = sql
            .replace("{customer}", &self.customer)
            .replace("{other_grant}", &self.other_grant)
            .replace("{grant}", &self.grant)
            .replace("{consumed}", &self.consumed);
        let done = sqlx::query(&sql).execute(self.ledger.state.db.pool()).await.expect("corrupting statement");
        assert!(done.rows_affected() > 0, "the statement changed something: {sql}");
    }

    /// `credits-ledger check` on this database: exit success and what it printed.
    fn check_command(&self) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_credits-ledger"))
            .args(["check", "--database", &self.db.url])
            .output()
            .expect("run credits-ledger check");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// One way to break the journal and the words of the problem the check must report.
const CORRUPTIONS: &[(&str, &str, &str)] = &[
    (
        "an entry whose postings do not sum to zero",
        "UPDATE postings SET amount = '-2.99' WHERE entry_id = '{consumed}' AND account <> 'customer_credit'",
        "not 0",
    ),
    (
        "a posting to an account the ledger does not have",
        "UPDATE postings SET account = 'petty_cash' WHERE entry_id = '{consumed}' AND account <> 'customer_credit'",
        "unknown account \"petty_cash\"",
    ),
    ("a movement without postings", "DELETE FROM postings WHERE entry_id = '{consumed}'", "has no postings"),
    (
        "a movement whose balances do not follow from its amount",
        "UPDATE movements SET balance_after = '100' WHERE id = '{consumed}'",
        "!= 100",
    ),
    (
        "a credit account that differs from the customer's movements",
        "UPDATE postings SET amount = '-4' WHERE entry_id = '{consumed}' AND account = 'customer_credit'",
        "!= sum of movements",
    ),
    (
        "a grant consumed beyond its amount",
        "UPDATE grants SET amount = '1' WHERE id = '{grant}'",
        "taken from a grant of 1",
    ),
    (
        "a grant snapshot that disagrees with the journal",
        "UPDATE grants SET used = '0' WHERE id = '{grant}'",
        "in the journal but 0 in the snapshot",
    ),
    (
        "a movement booked on another customer's grant",
        "UPDATE movements SET grant_id = '{other_grant}' WHERE id = '{consumed}'",
        "which is not a grant of customer",
    ),
    (
        "a debt no uncovered usage explains",
        "INSERT INTO debts (customer_id, currency, feature, amount) VALUES ('{customer}', 'USD', '', '5')",
        "but debt snapshot 5",
    ),
];

async fn check_reports_each_broken_invariant(backend: Backend) {
    for (what, sql, expected) in CORRUPTIONS {
        let world = world(backend).await;
        world.corrupt(sql).await;
        let problems = world.ledger.check().await;
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{what}: expected a problem with {expected:?}, got {problems:?}"
        );
    }
}

async fn check_command_exits_non_zero_with_the_report(backend: Backend) {
    let world = world(backend).await;
    let (ok, out) = world.check_command();
    assert!(ok && out.contains("journal OK"), "a sound journal passes: {out}");

    world.corrupt("UPDATE grants SET amount = '1' WHERE id = '{grant}'").await;
    let (ok, out) = world.check_command();
    assert!(!ok, "a broken journal fails the command: {out}");
    assert!(out.contains("journal check FAILED"), "{out}");
    assert!(out.contains(&format!("grant {}: ", world.grant)) && out.contains("taken from a grant of 1"), "{out}");
}

/// `check` verifies a journal that exists. Pointed at an SQLite file that is not there (a typo,
/// another directory: the default is `credits-ledger.db` in the current one) it fails naming the
/// database and creates nothing, instead of creating an empty journal and reporting it sound.
#[test]
fn check_of_a_database_that_is_not_there_fails_and_creates_nothing() {
    let dir = support::tempdir::TempDir::new();
    let missing = dir.0.join("missing.db");
    let check = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_credits-ledger"))
            .args(args)
            .current_dir(&dir.0)
            .env_remove("CREDITS_LEDGER_DATABASE")
            .output()
            .expect("run credits-ledger check");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), said)
    };
    let (ok, said) = check(&["check", "--database", &format!("sqlite://{}", missing.display())]);
    assert!(!ok && !said.contains("journal OK"), "a check of nothing must not pass: {said}");
    assert!(said.contains("missing.db"), "the error names the database: {said}");
    assert!(!missing.exists(), "check created {}", missing.display());
    let (ok, said) = check(&["check"]);
    assert!(!ok && !said.contains("journal OK"), "{said}");
    assert!(!dir.0.join("credits-ledger.db").exists(), "check created credits-ledger.db");
}

on_both_backends!(check_reports_each_broken_invariant, check_command_exits_non_zero_with_the_report);
