//! Errors of the credit model. Each names what was wrong so the API can point at the field.

use thiserror::Error;

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ModelError {
    #[error("invalid amount {0:?}: expected a decimal such as \"12.50\" (no exponent, no separators)")]
    InvalidAmount(String),
    #[error("amount {0} is out of bounds: at most 1000000000000000 in magnitude, with at most 9 decimal places")]
    AmountOutOfBounds(String),
    #[error(transparent)]
    AmountOverflow(#[from] AmountOverflow),
    #[error("invalid currency {0:?}: expected three upper-case letters such as \"USD\"")]
    InvalidCurrency(String),
    #[error("invalid ISO-8601 duration {0:?}: expected e.g. \"P30D\", \"PT1H\" or \"P1M\"")]
    InvalidDuration(String),
    #[error("invalid feature key {0:?}: expected lower-case words joined by '_' (at most 64 characters)")]
    InvalidFeatureKey(String),
    #[error("priority {0} is outside 1..1000")]
    InvalidPriority(i64),
    #[error("amount must be greater than zero, got {0}")]
    NotPositive(String),
    #[error("per_unit_cost_basis must be greater than zero, got {0}")]
    InvalidCostBasis(String),
    #[error("funding method {0} requires purchase terms")]
    MissingPurchase(&'static str),
    #[error("funding method none takes no purchase terms")]
    UnexpectedPurchase,
    #[error("expiry lies outside the representable time range")]
    ExpiryOutOfRange,
    #[error("the purchase amount overflows")]
    PurchaseOverflow,
    #[error("only external grants are settled through this endpoint; this grant is funded by {0}")]
    NotExternal(&'static str),
    #[error("unknown grant {0}")]
    UnknownGrant(String),
    #[error("unknown hold {0}")]
    UnknownHold(String),
    #[error("hold {0} already exists")]
    DuplicateHold(String),
    #[error("grant {0} already exists")]
    DuplicateGrant(String),
    #[error("credit given back needs the id of the grant it becomes")]
    RefundWithoutId,
}

/// An arithmetic result the credit model cannot keep: beyond [`crate::limits::MAX_BALANCE`] in
/// magnitude, or not representable exactly. The operation that produced it changes nothing; the
/// ledger answers it as a refused request, never as a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the result would exceed the largest amount the ledger keeps exactly (10^19 in magnitude)")]
pub struct AmountOverflow;
