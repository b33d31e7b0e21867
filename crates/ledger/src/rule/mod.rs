//! Notification rules as clients write them and the ledger stores them. Pure definitions:
//! `store::rules` keeps them, `notify` evaluates them.

pub mod threshold;

use credits::{Currency, FeatureKey, IsoDuration};
use serde::{Deserialize, Serialize};
use threshold::Threshold;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RuleKind {
    /// Fires when a customer's balance crosses below one of the rule's thresholds.
    #[serde(rename = "credits.balance.threshold")]
    BalanceThreshold,
    /// Fires once per grant, `before` its expiry, while it still has unused credit.
    #[serde(rename = "credits.grant.expiring")]
    GrantExpiring,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::BalanceThreshold => "credits.balance.threshold",
            RuleKind::GrantExpiring => "credits.grant.expiring",
        }
    }
}

/// A rule's definition: the request body of create and replace, and what is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(rename = "type")]
    pub kind: RuleKind,
    pub name: String,
    /// Ids of the channels every event of the rule is delivered to.
    pub channels: Vec<String>,
    /// Required for threshold rules; for expiring rules, only grants of this currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<Currency>,
    /// The balance (or grants) in this feature's scope: unrestricted credit plus credit restricted
    /// to sets containing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_key: Option<FeatureKey>,
    /// Only these customers; empty or absent means every customer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub customer_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thresholds: Vec<Threshold>,
    /// How long before a grant's expiry its event fires (expiring rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<IsoDuration>,
}

impl RuleSpec {
    pub fn applies_to(&self, customer_id: &str) -> bool {
        self.customer_ids.is_empty() || self.customer_ids.iter().any(|c| c == customer_id)
    }
}
