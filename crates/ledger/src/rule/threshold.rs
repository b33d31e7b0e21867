//! Balance thresholds: what a rule watches and when it is crossed. Pure: the booking hook
//! ([`crate::notify::on_bookings`]) feeds it books and keeps the fired state.

use chrono::{DateTime, Utc};
use credits::book::in_scope;
use credits::{Amount, Book, Currency, CurrencyBalance, FeatureKey, FeatureScope, GrantStatus};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdKind {
    /// An amount of the rule's currency.
    Absolute,
    /// A percentage of the credit granted and not yet expired (or voided).
    Percent,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    #[serde(rename = "type")]
    pub kind: ThresholdKind,
    pub value: Amount,
}

impl Threshold {
    /// A stable name for the fired state: equal thresholds written differently ("5", "5.00") share it.
    pub fn key(&self) -> String {
        let kind = match self.kind {
            ThresholdKind::Absolute => "absolute",
            ThresholdKind::Percent => "percent",
        };
        format!("{kind}:{}", self.value.decimal().normalize())
    }

    /// The balance at or below which this threshold counts as crossed; `None` on overflow.
    pub fn level(&self, granted: Amount) -> Option<Amount> {
        match self.kind {
            ThresholdKind::Absolute => Some(self.value),
            ThresholdKind::Percent => granted
                .decimal()
                .checked_mul(self.value.decimal())
                .and_then(|v| v.checked_div(Decimal::ONE_HUNDRED))
                .map(Amount::new),
        }
    }
}

/// What a threshold rule sees of one customer's book.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The balance `GET …/credits/balance` reports for the rule's currency and feature.
    pub balance: CurrencyBalance,
    /// Credit granted in that scope that is effective and neither expired nor voided: the base
    /// of percent thresholds.
    pub granted: Amount,
}

impl Observation {
    /// `None` when the customer never had anything in this currency (no grant, debt or hold):
    /// a customer without credit is not "low" on it.
    pub fn of(book: &Book, currency: Currency, feature: Option<&FeatureKey>, now: DateTime<Utc>) -> Option<Self> {
        let scope = feature.map(|f| FeatureScope::Eq(f.clone()));
        let balance = book.try_balances(now, scope.as_ref()).ok()?.into_iter().find(|b| b.currency == currency)?;
        let granted = Amount::try_sum(
            book.grants()
                .iter()
                .filter(|g| g.grant.currency == currency && g.grant.status_at(now) == GrantStatus::Active)
                .filter(|g| in_scope(&g.grant.features, scope.as_ref()))
                .map(|g| g.grant.amount),
        )
        .ok()?;
        Some(Observation { balance, granted })
    }

    /// Is the spendable (live) balance at or below the threshold? `None` if its level overflows.
    pub fn is_below(&self, threshold: &Threshold) -> Option<bool> {
        threshold.level(self.granted).map(|level| self.balance.live <= level)
    }
}

/// What to do with one threshold of one customer, given whether it has fired since it was last armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Crossed below while armed: send an event and remember that it fired.
    Fire,
    /// Back above after firing: forget, so the next crossing fires again.
    Rearm,
    Unchanged,
}

pub fn transition(below: bool, fired: bool) -> Transition {
    match (below, fired) {
        (true, false) => Transition::Fire,
        (false, true) => Transition::Rearm,
        _ => Transition::Unchanged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use credits::{FeatureFilter, FundingMethod, Grant, GrantId, GrantSpec, Priority};

    fn amount(s: &str) -> Amount {
        Amount::parse(s).expect("amount")
    }

    fn usd() -> Currency {
        Currency::parse("USD").expect("currency")
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("time").to_utc()
    }

    fn grant(book: &mut Book, id: &str, value: &str, features: &[&str], expires_after: Option<&str>) {
        let spec = GrantSpec {
            currency: usd(),
            amount: amount(value),
            funding_method: FundingMethod::None,
            purchase: None,
            priority: Priority::DEFAULT,
            effective_at: None,
            expires_after: expires_after.map(|d| credits::IsoDuration::parse(d).expect("duration")),
            features: FeatureFilter::only(features.iter().map(|f| FeatureKey::parse(f).expect("feature")).collect()),
        };
        let now = at("2030-01-01T00:00:00Z");
        let g = Grant::new(spec, GrantId(id.into()), now, 0).expect("grant");
        book.add_grant(g, now).expect("added");
    }

    #[test]
    fn percent_thresholds_are_a_share_of_unexpired_credit_in_scope() {
        let mut book = Book::new();
        grant(&mut book, "a", "100", &[], None);
        grant(&mut book, "b", "50", &["tokens"], Some("P1D"));
        grant(&mut book, "c", "30", &["other"], None);
        let percent = Threshold { kind: ThresholdKind::Percent, value: amount("20") };
        let now = at("2030-01-01T12:00:00Z");
        let all = Observation::of(&book, usd(), None, now).expect("observed");
        assert_eq!(all.granted, amount("180"));
        assert_eq!(percent.level(all.granted), Some(amount("36")));
        let tokens = FeatureKey::parse("tokens").expect("feature");
        let scoped = Observation::of(&book, usd(), Some(&tokens), now).expect("observed");
        assert_eq!(scoped.granted, amount("150"));
        // After b expired only a counts in the tokens scope.
        let later = Observation::of(&book, usd(), Some(&tokens), at("2030-01-03T00:00:00Z")).expect("observed");
        assert_eq!(later.granted, amount("100"));
        assert_eq!(later.balance.live, amount("100"));
    }

    #[test]
    fn crossing_is_at_or_below_the_live_balance() {
        let mut book = Book::new();
        grant(&mut book, "a", "10", &[], None);
        let now = at("2030-01-01T00:00:01Z");
        let five = Threshold { kind: ThresholdKind::Absolute, value: amount("5.00") };
        let obs = Observation::of(&book, usd(), None, now).expect("observed");
        assert_eq!(obs.is_below(&five), Some(false));
        let spend = credits::Spend {
            currency: usd(),
            amount: amount("5"),
            feature: None,
            mode: credits::SettlementMode::CreditOnly,
        };
        book.charge(&spend, now).expect("charged");
        let obs = Observation::of(&book, usd(), None, now).expect("observed");
        assert_eq!(obs.is_below(&five), Some(true));
        assert!(Observation::of(&book, Currency::parse("EUR").expect("eur"), None, now).is_none());
    }

    #[test]
    fn a_threshold_fires_once_and_rearms_above() {
        assert_eq!(transition(true, false), Transition::Fire);
        assert_eq!(transition(true, true), Transition::Unchanged);
        assert_eq!(transition(false, true), Transition::Rearm);
        assert_eq!(transition(false, false), Transition::Unchanged);
    }

    #[test]
    fn equal_thresholds_share_a_key() {
        let a = Threshold { kind: ThresholdKind::Absolute, value: amount("5") };
        let b = Threshold { kind: ThresholdKind::Absolute, value: amount("5.00") };
        let c = Threshold { kind: ThresholdKind::Percent, value: amount("5") };
        assert_eq!(a.key(), b.key());
        assert_ne!(a.key(), c.key());
    }
}
