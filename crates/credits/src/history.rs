//! Point-in-time balances from the journal: the settled balance at any past instant is the sum
//! of the movements booked at or before it.

use chrono::{DateTime, Utc};

use crate::book::{debt_in_scope, in_scope};
use crate::error::AmountOverflow;
use crate::feature::{FeatureFilter, FeatureScope};
use crate::grant::GrantId;
use crate::journal::Entry;
use crate::money::{Amount, Currency};

/// Settled balance of `currency` at `at`, in a feature's scope if given. `features_of` tells the
/// feature filter of a grant by id.
pub fn settled_at<'a, F>(
    entries: impl IntoIterator<Item = &'a Entry>,
    features_of: F,
    currency: Currency,
    at: DateTime<Utc>,
    scope: Option<&FeatureScope>,
) -> Result<Amount, AmountOverflow>
where
    F: Fn(&GrantId) -> Option<&'a FeatureFilter>,
{
    let grant_in_scope = |id: &GrantId| features_of(id).is_some_and(|f| in_scope(f, scope));
    let mut total = Amount::ZERO;
    for entry in entries {
        match entry {
            Entry::Movement(m) if m.currency == currency && m.booked_at <= at => {
                let counted = match &m.grant_id {
                    Some(id) => grant_in_scope(id),
                    None => debt_in_scope(m.feature.as_ref(), scope),
                };
                if counted {
                    total = total.try_add(m.amount)?;
                }
            }
            // A covered debt moves the usage from the debt's scope to the grant's scope.
            Entry::DebtCovered { grant_id, currency: c, feature, amount, at: covered_at }
                if *c == currency && *covered_at <= at =>
            {
                match (grant_in_scope(grant_id), debt_in_scope(feature.as_ref(), scope)) {
                    (true, false) => total = total.try_sub(*amount)?,
                    (false, true) => total = total.try_add(*amount)?,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    Ok(total)
}
