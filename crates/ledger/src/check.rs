//! `credits-ledger check`: verifies the whole journal and the snapshots derived from it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use credits::{Account, Amount, Currency, MovementKind};
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::Db;
use crate::store::{self, grants, StoreResult};

/// Checks every invariant; returns the violations found (empty when the journal is sound).
pub async fn run(db: &Db) -> StoreResult<Vec<String>> {
    let mut conn = db.pool().acquire().await?;
    let mut check = Check::default();
    check.postings(&mut conn).await?;
    let grant_rows = grants_by_id(&mut conn).await?;
    check.movements(&mut conn, &grant_rows).await?;
    check.debt_covers(&mut conn).await?;
    check.debts(&mut conn).await?;
    check.grants(&grant_rows);
    Ok(check.problems)
}

type CustomerCurrency = (String, Currency);
/// Customer, currency, feature (empty for none).
type DebtKey = (String, Currency, String);

/// What the check has summed so far, and what it found wrong. Every sum is checked: a sum
/// beyond what the ledger keeps exactly is reported as a violation, never wrapped or panicked on.
#[derive(Default)]
struct Check {
    problems: Vec<String>,
    entry_sums: BTreeMap<(String, Currency), Amount>,
    /// The entries that have postings (looked up once per movement: a scan of `entry_sums` made
    /// the check quadratic in the journal).
    posted: HashSet<String>,
    credit_accounts: BTreeMap<CustomerCurrency, Amount>,
    movement_sums: BTreeMap<CustomerCurrency, Amount>,
    per_grant: HashMap<String, GrantUse>,
    uncovered: BTreeMap<DebtKey, Amount>,
}

/// `*sum += amount`, or a problem naming `what` when the sum would overflow.
fn add(problems: &mut Vec<String>, sum: &mut Amount, amount: Amount, what: impl FnOnce() -> String) {
    match sum.try_add(amount) {
        Ok(total) => *sum = total,
        Err(e) => problems.push(format!("{}: {e}", what())),
    }
}

impl Check {
    /// 1. Postings of every entry sum to zero per currency.
    async fn postings(&mut self, conn: &mut sqlx::AnyConnection) -> StoreResult<()> {
        let rows = sqlx::query("SELECT entry_id, customer_id, account, currency, amount FROM postings")
            .fetch_all(&mut *conn)
            .await?;
        for r in rows {
            let currency = store::currency("postings", "currency", r.try_get("currency")?)?;
            let amount = store::amount("postings", "amount", r.try_get("amount")?)?;
            let entry: String = r.try_get("entry_id")?;
            let account: String = r.try_get("account")?;
            if Account::parse(&account).is_none() {
                self.problems.push(format!("posting of entry {entry} uses unknown account {account:?}"));
            }
            if account == Account::CustomerCredit.as_str() {
                let sum = self.credit_accounts.entry((r.try_get("customer_id")?, currency)).or_default();
                add(&mut self.problems, sum, amount, || format!("credit account of entry {entry}'s customer"));
            }
            let sum = self.entry_sums.entry((entry.clone(), currency)).or_default();
            add(&mut self.problems, sum, amount, || format!("entry {entry}"));
            self.posted.insert(entry);
        }
        for ((entry, currency), sum) in &self.entry_sums {
            if !sum.is_zero() {
                self.problems.push(format!("entry {entry}: postings in {currency} sum to {sum}, not 0"));
            }
        }
        Ok(())
    }

    /// 2. Movements: balance before/after agree, each has its postings, each points at a grant of
    ///    its customer (or is uncovered usage), and every customer's credit account equals the
    ///    sum of its movements.
    async fn movements(
        &mut self,
        conn: &mut sqlx::AnyConnection,
        grant_rows: &HashMap<String, grants::GrantRecord>,
    ) -> StoreResult<()> {
        let sql = "SELECT id, customer_id, kind, amount, currency, grant_id, feature, balance_before, balance_after \
                   FROM movements ORDER BY seq";
        for r in sqlx::query(sql).fetch_all(&mut *conn).await? {
            self.movement(&r, grant_rows)?;
        }
        for (key, sum) in &self.movement_sums {
            let account = self.credit_accounts.get(key).copied().unwrap_or_default();
            if account != *sum {
                self.problems
                    .push(format!("customer {} {}: credit account {account} != sum of movements {sum}", key.0, key.1));
            }
        }
        for (key, account) in &self.credit_accounts {
            if !self.movement_sums.contains_key(key) && !account.is_zero() {
                self.problems.push(format!("customer {} {}: credit account {account} without movements", key.0, key.1));
            }
        }
        Ok(())
    }

    fn movement(&mut self, r: &AnyRow, grant_rows: &HashMap<String, grants::GrantRecord>) -> StoreResult<()> {
        let id: String = r.try_get("id")?;
        let customer: String = r.try_get("customer_id")?;
        let currency = store::currency("movements", "currency", r.try_get("currency")?)?;
        let amount = store::amount("movements", "amount", r.try_get("amount")?)?;
        let before = store::amount("movements", "balance_before", r.try_get("balance_before")?)?;
        let after = store::amount("movements", "balance_after", r.try_get("balance_after")?)?;
        let kind_text: String = r.try_get("kind")?;
        let Some(kind) = MovementKind::parse(&kind_text) else {
            self.problems.push(format!("movement {id} has unknown kind {kind_text:?}"));
            return Ok(());
        };
        if before.try_add(amount) != Ok(after) {
            self.problems.push(format!("movement {id}: balance {before} + {amount} != {after}"));
        }
        if !self.posted.contains(&id) {
            self.problems.push(format!("movement {id} has no postings"));
        }
        let sum = self.movement_sums.entry((customer.clone(), currency)).or_default();
        add(&mut self.problems, sum, amount, || format!("movements of customer {customer} in {currency}"));
        let grant_id: Option<String> = r.try_get("grant_id")?;
        match grant_id {
            Some(g) => match grant_rows.get(&g) {
                Some(grant) if grant.customer_id == customer && grant.state.grant.currency == currency => {
                    let problems = &mut self.problems;
                    self.per_grant.entry(g.clone()).or_default().book(problems, kind, amount, &g);
                }
                _ => self.problems.push(format!(
                    "movement {id} ({kind_text}) points at grant {g}, which is not a grant of customer {customer} in {currency}"
                )),
            },
            None if kind == MovementKind::Consumed || kind == MovementKind::Adjusted => {
                let feature: Option<String> = r.try_get("feature")?;
                let key = (customer, currency, feature.unwrap_or_default());
                let sum = self.uncovered.entry(key).or_default();
                add(&mut self.problems, sum, amount.negated(), || format!("uncovered usage of movement {id}"));
            }
            None => self.problems.push(format!("movement {id} ({kind_text}) has no grant")),
        }
        Ok(())
    }

    /// 3. Uncovered usage later covered by a grant counts as that grant's use.
    async fn debt_covers(&mut self, conn: &mut sqlx::AnyConnection) -> StoreResult<()> {
        let sql = "SELECT customer_id, grant_id, currency, feature, amount FROM debt_covers";
        for r in sqlx::query(sql).fetch_all(&mut *conn).await? {
            let grant_id: String = r.try_get("grant_id")?;
            let amount = store::amount("debt_covers", "amount", r.try_get("amount")?)?;
            let currency = store::currency("debt_covers", "currency", r.try_get("currency")?)?;
            let feature: Option<String> = r.try_get("feature")?;
            let used = &mut self.per_grant.entry(grant_id.clone()).or_default().used;
            add(&mut self.problems, used, amount, || format!("use of grant {grant_id}"));
            let key = (r.try_get("customer_id")?, currency, feature.unwrap_or_default());
            let sum = self.uncovered.entry(key).or_default();
            add(&mut self.problems, sum, amount.negated(), || format!("uncovered usage covered by grant {grant_id}"));
        }
        Ok(())
    }

    /// The debt snapshots equal the uncovered usage the journal leaves outstanding.
    async fn debts(&mut self, conn: &mut sqlx::AnyConnection) -> StoreResult<()> {
        let mut debts: BTreeMap<DebtKey, Amount> = BTreeMap::new();
        for r in sqlx::query("SELECT customer_id, currency, feature, amount FROM debts").fetch_all(&mut *conn).await? {
            let currency = store::currency("debts", "currency", r.try_get("currency")?)?;
            debts.insert(
                (r.try_get("customer_id")?, currency, r.try_get("feature")?),
                store::amount("debts", "amount", r.try_get("amount")?)?,
            );
        }
        // Both ways: a debt the journal does not explain is as wrong as usage the debts miss.
        let keys: BTreeSet<&DebtKey> = self.uncovered.keys().chain(debts.keys()).collect();
        for key in keys {
            let outstanding = self.uncovered.get(key).copied().unwrap_or_default();
            let recorded = debts.get(key).copied().unwrap_or_default();
            if recorded != outstanding {
                self.problems.push(format!(
                    "customer {} {} feature {:?}: uncovered usage {outstanding} but debt snapshot {recorded}",
                    key.0, key.1, key.2
                ));
            }
        }
        Ok(())
    }

    /// 4. No grant consumed beyond its amount, and every grant snapshot matches its movements.
    fn grants(&mut self, grant_rows: &HashMap<String, grants::GrantRecord>) {
        for (id, record) in grant_rows {
            let s = &record.state;
            let u = self.per_grant.get(id).cloned().unwrap_or_default();
            match Amount::try_sum([u.used, u.expired, u.voided]) {
                Ok(removed) if removed > s.grant.amount => {
                    self.problems.push(format!("grant {id}: {removed} taken from a grant of {}", s.grant.amount))
                }
                Ok(_) => {}
                Err(e) => self.problems.push(format!("grant {id}: what was taken from it cannot be summed: {e}")),
            }
            let funded = if s.funded { s.grant.amount } else { Amount::ZERO };
            if u.funded != funded {
                self.problems.push(format!("grant {id}: funded movements {} but snapshot says {funded}", u.funded));
            }
            for (what, journal, snapshot) in
                [("used", u.used, s.used), ("expired", u.expired, s.expired), ("voided", u.voided, s.voided)]
            {
                if journal != snapshot {
                    self.problems
                        .push(format!("grant {id}: {what} is {journal} in the journal but {snapshot} in the snapshot"));
                }
            }
        }
    }
}

#[derive(Clone, Default)]
struct GrantUse {
    funded: Amount,
    used: Amount,
    expired: Amount,
    voided: Amount,
}

impl GrantUse {
    /// Counts a movement of the grant by its kind.
    fn book(&mut self, problems: &mut Vec<String>, kind: MovementKind, amount: Amount, grant: &str) {
        let (sum, amount) = match kind {
            MovementKind::Funded => (&mut self.funded, amount),
            MovementKind::Adjusted if amount.is_positive() => (&mut self.funded, amount),
            MovementKind::Consumed | MovementKind::Adjusted => (&mut self.used, amount.negated()),
            MovementKind::Expired => (&mut self.expired, amount.negated()),
            MovementKind::Voided => (&mut self.voided, amount.negated()),
        };
        add(problems, sum, amount, || format!("{} movements of grant {grant}", kind.as_str()));
    }
}

async fn grants_by_id(conn: &mut sqlx::AnyConnection) -> StoreResult<HashMap<String, grants::GrantRecord>> {
    let customers: Vec<String> = sqlx::query("SELECT id FROM customers")
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let mut out = HashMap::new();
    for c in customers {
        for g in grants::of_customer(&mut *conn, &c).await? {
            out.insert(g.state.grant.id.0.clone(), g);
        }
    }
    Ok(out)
}
