//! `credits-ledger check`: verifies the whole journal and the snapshots derived from it.

use std::collections::{BTreeMap, HashMap};

use credits::{Account, Amount, Currency, MovementKind};
use sqlx::Row;

use crate::db::Db;
use crate::store::{self, grants, StoreResult};

/// Checks every invariant; returns the violations found (empty when the journal is sound).
pub async fn run(db: &Db) -> StoreResult<Vec<String>> {
    let mut conn = db.pool().acquire().await?;
    let mut problems = Vec::new();

    // 1. Postings of every entry sum to zero per currency.
    let mut entry_sums: BTreeMap<(String, Currency), Amount> = BTreeMap::new();
    let mut credit_accounts: BTreeMap<(String, Currency), Amount> = BTreeMap::new();
    for r in sqlx::query("SELECT entry_id, customer_id, account, currency, amount FROM postings")
        .fetch_all(&mut *conn)
        .await?
    {
        let currency = store::currency("postings", "currency", r.try_get("currency")?)?;
        let amount = store::amount("postings", "amount", r.try_get("amount")?)?;
        *entry_sums.entry((r.try_get("entry_id")?, currency)).or_default() += amount;
        let account: String = r.try_get("account")?;
        if Account::parse(&account).is_none() {
            problems.push(format!(
                "posting of entry {} uses unknown account {account:?}",
                r.try_get::<String, _>("entry_id")?
            ));
        }
        if account == Account::CustomerCredit.as_str() {
            *credit_accounts.entry((r.try_get("customer_id")?, currency)).or_default() += amount;
        }
    }
    for ((entry, currency), sum) in &entry_sums {
        if !sum.is_zero() {
            problems.push(format!("entry {entry}: postings in {currency} sum to {sum}, not 0"));
        }
    }

    // 2. Movements: balance before/after agree, each has its postings, and every customer's
    //    credit account equals the sum of its movements.
    let grant_rows = grants_by_id(&mut conn).await?;
    let mut movement_sums: BTreeMap<(String, Currency), Amount> = BTreeMap::new();
    let mut per_grant: HashMap<String, GrantUse> = HashMap::new();
    let mut uncovered: BTreeMap<(String, Currency, String), Amount> = BTreeMap::new();
    for r in sqlx::query("SELECT id, customer_id, kind, amount, currency, grant_id, feature, balance_before, balance_after FROM movements ORDER BY seq")
        .fetch_all(&mut *conn)
        .await?
    {
        let id: String = r.try_get("id")?;
        let customer: String = r.try_get("customer_id")?;
        let currency = store::currency("movements", "currency", r.try_get("currency")?)?;
        let amount = store::amount("movements", "amount", r.try_get("amount")?)?;
        let before = store::amount("movements", "balance_before", r.try_get("balance_before")?)?;
        let after = store::amount("movements", "balance_after", r.try_get("balance_after")?)?;
        let kind_text: String = r.try_get("kind")?;
        let Some(kind) = MovementKind::parse(&kind_text) else {
            problems.push(format!("movement {id} has unknown kind {kind_text:?}"));
            continue;
        };
        if before + amount != after {
            problems.push(format!("movement {id}: balance {before} + {amount} != {after}"));
        }
        if !entry_sums.keys().any(|(e, _)| e == &id) {
            problems.push(format!("movement {id} has no postings"));
        }
        *movement_sums.entry((customer.clone(), currency)).or_default() += amount;
        let grant_id: Option<String> = r.try_get("grant_id")?;
        match grant_id {
            Some(g) => match grant_rows.get(&g) {
                Some(grant) if grant.customer_id == customer && grant.state.grant.currency == currency => {
                    let u = per_grant.entry(g).or_default();
                    match kind {
                        MovementKind::Funded => u.funded += amount,
                        MovementKind::Adjusted if amount.is_positive() => u.funded += amount,
                        MovementKind::Consumed | MovementKind::Adjusted => u.used -= amount,
                        MovementKind::Expired => u.expired -= amount,
                        MovementKind::Voided => u.voided -= amount,
                    }
                }
                _ => problems.push(format!("movement {id} ({kind_text}) points at grant {g}, which is not a grant of customer {customer} in {currency}")),
            },
            None if kind == MovementKind::Consumed || kind == MovementKind::Adjusted => {
                let feature: Option<String> = r.try_get("feature")?;
                *uncovered.entry((customer, currency, feature.unwrap_or_default())).or_default() -= amount;
            }
            None => problems.push(format!("movement {id} ({kind_text}) has no grant")),
        }
    }
    for (key, sum) in &movement_sums {
        let account = credit_accounts.get(key).copied().unwrap_or_default();
        if account != *sum {
            problems.push(format!("customer {} {}: credit account {account} != sum of movements {sum}", key.0, key.1));
        }
    }
    for (key, account) in &credit_accounts {
        if !movement_sums.contains_key(key) && !account.is_zero() {
            problems.push(format!("customer {} {}: credit account {account} without movements", key.0, key.1));
        }
    }

    // 3. Uncovered usage later covered by a grant counts as that grant's use.
    for r in sqlx::query("SELECT customer_id, grant_id, currency, feature, amount FROM debt_covers")
        .fetch_all(&mut *conn)
        .await?
    {
        let grant_id: String = r.try_get("grant_id")?;
        let amount = store::amount("debt_covers", "amount", r.try_get("amount")?)?;
        let currency = store::currency("debt_covers", "currency", r.try_get("currency")?)?;
        let feature: Option<String> = r.try_get("feature")?;
        per_grant.entry(grant_id).or_default().used += amount;
        *uncovered.entry((r.try_get("customer_id")?, currency, feature.unwrap_or_default())).or_default() -= amount;
    }
    let mut debts: BTreeMap<(String, Currency, String), Amount> = BTreeMap::new();
    for r in sqlx::query("SELECT customer_id, currency, feature, amount FROM debts").fetch_all(&mut *conn).await? {
        let currency = store::currency("debts", "currency", r.try_get("currency")?)?;
        debts.insert(
            (r.try_get("customer_id")?, currency, r.try_get("feature")?),
            store::amount("debts", "amount", r.try_get("amount")?)?,
        );
    }
    for (key, outstanding) in &uncovered {
        let recorded = debts.get(key).copied().unwrap_or_default();
        if recorded != *outstanding {
            problems.push(format!(
                "customer {} {} feature {:?}: uncovered usage {outstanding} but debt snapshot {recorded}",
                key.0, key.1, key.2
            ));
        }
    }

    // 4. No grant consumed beyond its amount, and every grant snapshot matches its movements.
    for (id, record) in &grant_rows {
        let s = &record.state;
        let u = per_grant.get(id).cloned().unwrap_or_default();
        let removed = u.used + u.expired + u.voided;
        if removed > s.grant.amount {
            problems.push(format!("grant {id}: {removed} taken from a grant of {}", s.grant.amount));
        }
        let funded = if s.funded { s.grant.amount } else { Amount::ZERO };
        if u.funded != funded {
            problems.push(format!("grant {id}: funded movements {} but snapshot says {funded}", u.funded));
        }
        for (what, journal, snapshot) in
            [("used", u.used, s.used), ("expired", u.expired, s.expired), ("voided", u.voided, s.voided)]
        {
            if journal != snapshot {
                problems.push(format!("grant {id}: {what} is {journal} in the journal but {snapshot} in the snapshot"));
            }
        }
    }
    Ok(problems)
}

#[derive(Clone, Default)]
struct GrantUse {
    funded: Amount,
    used: Amount,
    expired: Amount,
    voided: Amount,
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
