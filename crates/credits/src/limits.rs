//! Every bound that the ledger and the gateway filter enforce, in one place, each with the reason
//! for its value. Both sides compile this module, so the filter can refuse at the edge what the
//! ledger would refuse after a round trip, and the two can never disagree about a limit.
//!
//! Pure constants (a leaf: the checks that use them are `Amount::bounded` and
//! `Amount::within_balance_bound`).

use rust_decimal::Decimal;

// ---- Money -------------------------------------------------------------------------------------

/// The largest magnitude of any single amount accepted at an edge: 10^15 (one quadrillion) in the
/// currency's unit. It applies to grant amounts and cost bases, adjustments, charges, the price a
/// gateway asks the ledger to authorise, usage ranges and lease requests in a sync, and the
/// filter's configured `price` and `unit_price`. No business grants, charges or reports a
/// quadrillion dollars (or credits) in one request; a larger number is a mistake or an attack.
pub const MAX_AMOUNT: Decimal = Decimal::from_parts(0xA4C6_8000, 0x0003_8D7E, 0, false, 0);

/// The most decimal places of an amount accepted at an edge: 9. Token prices go down to a few
/// billionths of a dollar (e.g. 0.000000075 per token), so 9 places price every unit we know of
/// exactly; together with [`MAX_AMOUNT`] and [`MAX_BALANCE`] it keeps every sum exact (below).
pub const MAX_AMOUNT_SCALE: u32 = 9;

/// The largest magnitude of any sum the credit model keeps or answers: 10^19 — a balance, a
/// grant's use, a debt, a hold, the total of a customer's account in the journal check.
///
/// Why it can never overflow: `rust_decimal` holds a 96-bit mantissa (up to 7.9 × 10^28). An
/// amount with at most 9 decimal places and a magnitude up to 10^19 needs a mantissa of at most
/// 10^28, so every sum and difference of amounts within these bounds is represented exactly,
/// never rounded. Reaching the bound takes 10,000 maximal grants to one customer in one currency
/// — no real journal comes near it; an operation that would go beyond it is refused with
/// [`crate::AmountOverflow`] instead of rounding or panicking.
pub const MAX_BALANCE: Decimal = Decimal::from_parts(0x89E8_0000, 0x8AC7_2304, 0, false, 0);

// ---- Names and keys ----------------------------------------------------------------------------

/// Bytes of a subject (a Kong consumer username or a header value naming the customer): 256.
/// Subjects are index keys of the ledger and part of every usage key; Kong's usernames are far
/// shorter.
pub const MAX_SUBJECT_LEN: usize = 256;

/// Bytes of a gateway node's id: 128. It is part of every usage key the node sends.
pub const MAX_NODE_LEN: usize = 128;

/// Bytes of a usage range's origin (the incarnation of the node's record that numbered its
/// calls): 64, without '/'. It takes the node's place in the range's usage key.
pub const MAX_ORIGIN_LEN: usize = 64;

/// Bytes of a lease id: 512. The node builds it from an origin, the subject and the scope
/// (64 + 256 + currency and feature key with separators fit with room to spare).
pub const MAX_LEASE_ID_LEN: usize = 512;

/// Bytes of a feature key: 64 (Konnect's limit for keys).
pub const MAX_FEATURE_KEY_LEN: usize = 64;

/// Characters of a resource name (customer, grant, adjustment, charge): 256.
pub const MAX_NAME_CHARS: usize = 256;

/// Characters of a description: 1024.
pub const MAX_DESCRIPTION_CHARS: usize = 1024;

/// Characters of an idempotency or resource key: 256.
pub const MAX_KEY_CHARS: usize = 256;

/// Labels per resource (Konnect's limit): 50.
pub const MAX_LABELS: usize = 50;

/// Bytes of a label key or value (Konnect's limit, as Kubernetes labels): 63.
pub const MAX_LABEL_LEN: usize = 63;

// ---- Time --------------------------------------------------------------------------------------

/// The longest TTL a lease may ask for: one hour (3,600,000 ms). A lease holds credit away from
/// every other node; a node that dies gives it back only when the TTL runs out, so an hour bounds
/// how long credit can be stranded.
pub const MAX_LEASE_TTL_MS: u64 = 3_600_000;

// ---- Lists and batches -------------------------------------------------------------------------

/// Subjects in one gateway sync: 1,000. One sync is one write transaction; this bounds its
/// duration and its body (see [`DEFAULT_MAX_BODY_BYTES`]).
pub const MAX_SUBJECTS_PER_SYNC: usize = 1000;

/// The highest call number a usage range may end at: 2^63 − 1. The ledger stores a stream's mark
/// (booked through call n) as a signed 64-bit integer; a node numbers from 0 and never gets near it.
pub const MAX_CALL_NUMBER: u64 = i64::MAX as u64;

/// Calls in one usage range: 1,000,000. Far above what one node serves a subject in one tick;
/// it bounds the damage of a corrupt range.
pub const MAX_CALLS_PER_RANGE: u64 = 1_000_000;

/// CloudEvents in one ingest request: 1,000 (one write transaction).
pub const MAX_EVENTS_PER_BATCH: usize = 1000;

/// Bytes of a metering event's `id` and of its `source`: together they are the event's unique key,
/// and PostgreSQL indexes at most ≈ 2.7 KB of one.
pub const MAX_EVENT_ID_LEN: usize = 1024;

/// Subject keys of one customer: 100. Each request checks them pairwise for duplicates.
pub const MAX_SUBJECT_KEYS_PER_CUSTOMER: usize = 100;

/// Features one grant may be restricted to: 100.
pub const MAX_FEATURES_PER_GRANT: usize = 100;

/// Values in one list filter (`filter[…][oeq]=a,b,…`, `filter[…][ocontains]=…`): 100. Each value
/// becomes a bound parameter of a query; a few dozen cover any real selection.
pub const MAX_FILTER_VALUES: usize = 100;

/// Items per page when a list request does not say: 100.
pub const DEFAULT_PAGE_SIZE: i64 = 100;

/// Items per page at most: 1,000 (one page is read in one query and answered in one body).
pub const MAX_PAGE_SIZE: i64 = 1000;

// ---- Bodies ------------------------------------------------------------------------------------

/// The request body the ledger reads unless `--max-body-bytes` says otherwise: 1 MiB. A sync
/// body must fit in it (a larger one is refused with 413, nothing booked), so the filter sizes
/// each sync by its serialised bytes below the ledger's limit.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// The smallest `--max-body-bytes` the ledger accepts: 1 KiB (one subject of a sync fits).
pub const MIN_MAX_BODY_BYTES: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Amount;

    #[test]
    fn the_money_bounds_are_the_powers_of_ten_they_claim() {
        assert_eq!(MAX_AMOUNT, Decimal::from(10i64.pow(15)));
        assert_eq!(MAX_BALANCE, Decimal::from(10u64.pow(19)));
        // Every amount within the bounds is exact at the largest scale with room to spare.
        let widest = Decimal::from_i128_with_scale(10i128.pow(19 + MAX_AMOUNT_SCALE), MAX_AMOUNT_SCALE);
        assert_eq!(widest, MAX_BALANCE);
    }

    #[test]
    fn amounts_beyond_the_edge_bound_are_refused() {
        for ok in ["0", "1000000000000000", "-1000000000000000", "0.000000001", "999999999999999.999999999"] {
            assert!(Amount::parse(ok).unwrap().bounded().is_ok(), "{ok}");
        }
        for bad in ["1000000000000000.000000001", "-1000000000000001", "0.0000000001", "1.0000000000"] {
            let err = Amount::parse(bad).unwrap().bounded().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
        assert!(Amount::new(Decimal::MAX).bounded().is_err());
    }

    #[test]
    fn balances_are_bounded_by_the_sum_bound() {
        assert!(Amount::new(MAX_BALANCE).within_balance_bound().is_ok());
        assert!(Amount::new(-MAX_BALANCE).within_balance_bound().is_ok());
        assert!(Amount::parse("10000000000000000000.000000001").unwrap().within_balance_bound().is_err());
    }
}
