//! The credit model shared by the ledger and the gateway filter: exact money, grants, draw-down,
//! expiry, holds, balances and double-entry postings. No I/O and no clock: time is always passed in.
//!
//! Money arithmetic is checked: every sum the model keeps is exact and bounded
//! ([`limits::MAX_BALANCE`]), and an operation that would leave those bounds fails with
//! [`AmountOverflow`] and changes nothing. The lint below keeps unchecked operators out.
#![deny(clippy::arithmetic_side_effects)]

pub mod book;
pub mod duration;
pub mod error;
pub mod feature;
pub mod gateway;
pub mod grant;
pub mod history;
pub mod journal;
pub mod limits;
pub mod money;
pub mod sync;
pub mod usage_mark;

pub use book::{
    Book, ChargeError, CurrencyBalance, Debt, GrantState, Hold, HoldBacking, HoldId, Refusal, SettlementMode, Spend,
    SpendOutcome,
};
pub use duration::IsoDuration;
pub use error::{AmountOverflow, ModelError};
pub use feature::{FeatureFilter, FeatureKey, FeatureScope};
pub use grant::{
    Funding, FundingMethod, Grant, GrantId, GrantSpec, GrantStatus, Priority, Purchase, PurchaseTerms, SettlementStatus,
};
pub use journal::{Account, Entry, Movement, MovementKind, Posting};
pub use money::{Amount, Currency};
