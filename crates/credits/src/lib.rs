//! The credit model shared by the ledger and the gateway filter: exact money, grants, draw-down,
//! expiry, holds, balances and double-entry postings. No I/O and no clock: time is always passed in.

pub mod book;
pub mod duration;
pub mod error;
pub mod feature;
pub mod gateway;
pub mod grant;
pub mod history;
pub mod journal;
pub mod money;
pub mod sync;

pub use book::{Book, CurrencyBalance, Debt, GrantState, Hold, HoldId, Refusal, SettlementMode, Spend, SpendOutcome};
pub use duration::IsoDuration;
pub use error::ModelError;
pub use feature::{FeatureFilter, FeatureKey, FeatureScope};
pub use grant::{
    Funding, FundingMethod, Grant, GrantId, GrantSpec, GrantStatus, Priority, Purchase, PurchaseTerms, SettlementStatus,
};
pub use journal::{Account, Entry, Movement, MovementKind, Posting};
pub use money::{Amount, Currency};
