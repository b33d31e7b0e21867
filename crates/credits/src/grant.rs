//! Grants: credit given to a customer, with priority, effectivity, expiry and feature filters.

use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::duration::IsoDuration;
use crate::error::ModelError;
use crate::feature::{FeatureFilter, FeatureKey};
use crate::money::{Amount, Currency};

/// A grant's identifier (a ULID assigned by the ledger).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GrantId(pub String);

impl fmt::Display for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Draw-down priority, 1..=1000; lower is consumed first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Priority(u16);

impl Priority {
    pub const DEFAULT: Priority = Priority(10);

    pub fn new(value: i64) -> Result<Self, ModelError> {
        match u16::try_from(value) {
            Ok(v) if (1..=1000).contains(&v) => Ok(Priority(v)),
            _ => Err(ModelError::InvalidPriority(value)),
        }
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

impl Default for Priority {
    fn default() -> Self {
        Priority::DEFAULT
    }
}

impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Priority::new(i64::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettlementStatus {
    Pending,
    Authorized,
    Settled,
}

/// What the customer pays for credit bought through a funding workflow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purchase {
    pub currency: Currency,
    pub per_unit_cost_basis: Amount,
    /// Derived: credit amount × cost basis.
    pub amount: Amount,
    pub settlement_status: SettlementStatus,
}

/// How a grant is funded. Promotional credit (`None`) costs the customer nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Funding {
    None,
    Invoice(Purchase),
    External(Purchase),
}

impl Funding {
    pub fn method(&self) -> FundingMethod {
        match self {
            Funding::None => FundingMethod::None,
            Funding::Invoice(_) => FundingMethod::Invoice,
            Funding::External(_) => FundingMethod::External,
        }
    }

    pub fn purchase(&self) -> Option<&Purchase> {
        match self {
            Funding::None => None,
            Funding::Invoice(p) | Funding::External(p) => Some(p),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FundingMethod {
    None,
    Invoice,
    External,
}

impl FundingMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            FundingMethod::None => "none",
            FundingMethod::Invoice => "invoice",
            FundingMethod::External => "external",
        }
    }
}

/// Purchase terms as requested; the amount is derived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PurchaseTerms {
    pub currency: Currency,
    /// Defaults to 1.0.
    pub per_unit_cost_basis: Option<Amount>,
}

/// A grant as a client asks for it, before the ledger assigns identity and time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantSpec {
    pub currency: Currency,
    pub amount: Amount,
    pub funding_method: FundingMethod,
    pub purchase: Option<PurchaseTerms>,
    pub priority: Priority,
    /// Defaults to the creation time.
    pub effective_at: Option<DateTime<Utc>>,
    pub expires_after: Option<IsoDuration>,
    pub features: FeatureFilter,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantStatus {
    Pending,
    Active,
    Expired,
    Voided,
}

/// A grant with identity and resolved times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub id: GrantId,
    pub currency: Currency,
    pub amount: Amount,
    pub funding: Funding,
    pub priority: Priority,
    pub effective_at: DateTime<Utc>,
    pub expires_after: Option<IsoDuration>,
    pub expires_at: Option<DateTime<Utc>>,
    pub features: FeatureFilter,
    pub created_at: DateTime<Utc>,
    /// Creation order among grants created at the same instant (the ledger's insertion order).
    pub seq: i64,
    pub voided_at: Option<DateTime<Utc>>,
}

impl Grant {
    /// Validates a spec and resolves its defaults. `created_at` is the ledger's clock.
    pub fn new(spec: GrantSpec, id: GrantId, created_at: DateTime<Utc>, seq: i64) -> Result<Self, ModelError> {
        if !spec.amount.is_positive() {
            return Err(ModelError::NotPositive(spec.amount.to_string()));
        }
        let funding = match (spec.funding_method, spec.purchase) {
            (FundingMethod::None, None) => Funding::None,
            (FundingMethod::None, Some(_)) => return Err(ModelError::UnexpectedPurchase),
            (method, None) => return Err(ModelError::MissingPurchase(method.as_str())),
            (method, Some(terms)) => {
                let basis = terms.per_unit_cost_basis.unwrap_or(Amount::new(Decimal::ONE));
                if !basis.is_positive() {
                    return Err(ModelError::InvalidCostBasis(basis.to_string()));
                }
                let purchase = Purchase {
                    currency: terms.currency,
                    per_unit_cost_basis: basis,
                    amount: spec.amount.checked_mul(basis.decimal()).ok_or(ModelError::PurchaseOverflow)?,
                    settlement_status: SettlementStatus::Pending,
                };
                if method == FundingMethod::Invoice {
                    Funding::Invoice(purchase)
                } else {
                    Funding::External(purchase)
                }
            }
        };
        let effective_at = spec.effective_at.unwrap_or(created_at);
        let expires_at = match spec.expires_after {
            Some(d) => Some(d.add_to(effective_at).ok_or(ModelError::ExpiryOutOfRange)?),
            None => None,
        };
        Ok(Grant {
            id,
            currency: spec.currency,
            amount: spec.amount,
            funding,
            priority: spec.priority,
            effective_at,
            expires_after: spec.expires_after,
            expires_at,
            features: spec.features,
            created_at,
            seq,
            voided_at: None,
        })
    }

    pub fn is_effective_at(&self, at: DateTime<Utc>) -> bool {
        self.effective_at <= at
    }

    pub fn is_expired_at(&self, at: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|e| e <= at)
    }

    pub fn status_at(&self, at: DateTime<Utc>) -> GrantStatus {
        if self.voided_at.is_some_and(|v| v <= at) {
            GrantStatus::Voided
        } else if self.is_expired_at(at) {
            GrantStatus::Expired
        } else if self.is_effective_at(at) {
            GrantStatus::Active
        } else {
            GrantStatus::Pending
        }
    }

    /// Can this grant pay a charge of `feature` in `currency` at `at` (ignoring what is left)?
    pub fn admits(&self, currency: Currency, feature: Option<&FeatureKey>, at: DateTime<Utc>) -> bool {
        self.currency == currency && self.status_at(at) == GrantStatus::Active && self.features.admits(feature)
    }

    /// The draw-down order: priority asc, expires_at asc (never-expiring last), creation asc.
    pub fn draw_down_key(&self) -> (Priority, bool, Option<DateTime<Utc>>, DateTime<Utc>, i64) {
        (self.priority, self.expires_at.is_none(), self.expires_at, self.created_at, self.seq)
    }

    /// Settles the purchase of an external grant; invoice and promotional grants have no such step.
    /// Whether the status changed (a retry of the same status changes nothing).
    pub fn set_settlement_status(&mut self, status: SettlementStatus) -> Result<bool, ModelError> {
        match &mut self.funding {
            Funding::External(p) => Ok(std::mem::replace(&mut p.settlement_status, status) != status),
            other => Err(ModelError::NotExternal(other.method().as_str())),
        }
    }
}
