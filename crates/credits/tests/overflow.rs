//! Amounts that would overflow: every operation of the model refuses them with
//! `AmountOverflow` and leaves the book as it was — never a panic (rust_decimal's operators panic
//! with "Addition overflowed", which once killed the ledger).

mod common;

use common::*;
use credits::limits::MAX_BALANCE;
use credits::*;
use rust_decimal::Decimal;

/// The largest value rust_decimal holds: 79228162514264337593543950335.
fn huge() -> Amount {
    Amount::new(Decimal::MAX)
}

fn overflow() -> ModelError {
    ModelError::AmountOverflow(AmountOverflow)
}

#[test]
fn checked_sums_refuse_what_would_overflow_or_round() {
    assert_eq!(huge().try_add(huge()), Err(AmountOverflow));
    assert_eq!(huge().negated().try_sub(huge()), Err(AmountOverflow));
    // Beyond the bound the model keeps, though rust_decimal could still hold it.
    let bound = Amount::new(MAX_BALANCE);
    assert_eq!(bound.try_add(amt("0")), Ok(bound));
    assert_eq!(bound.try_add(amt("0.000000001")), Err(AmountOverflow));
    assert_eq!(Amount::try_sum([bound, bound.negated(), bound]), Ok(bound));
    assert_eq!(Amount::try_sum(vec![amt("1000000000000000"); 10_001]), Err(AmountOverflow));
    // Within the bounds every sum is exact, to the last of nine places.
    let widest = Amount::new(MAX_BALANCE).try_sub(amt("0.000000001")).unwrap();
    assert_eq!(widest.to_string(), "9999999999999999999.999999999");
    assert_eq!(widest.try_add(amt("0.000000001")), Ok(bound));
    // A sum that rust_decimal would have to round is refused, not rounded.
    assert_eq!(amt("1.0000000000000000000000000001").try_add(amt("10")), Err(AmountOverflow));
    // Products that would be rounded are refused too.
    assert_eq!(amt("0.00000000000001").checked_mul(Decimal::new(1, 20)), None);
    assert_eq!(amt("1.50").times(3), Some(amt("4.50")));
    // A zero product is exact (rust_decimal gives it scale 0; the places are kept).
    assert_eq!(amt("0.01").times(0).map(|a| a.to_string()), Some("0.00".to_owned()));
    assert_eq!(Amount::ZERO.checked_mul(Decimal::new(5, 3)), Some(amt("0.000")));
    assert_eq!(huge().times(2), None);
}

/// A grant of `amount` (`MAX_BALANCE`, or rust_decimal's largest value) named `id`.
fn big_grant(id: &'static str, amount: Decimal) -> Grant {
    Grant { amount: Amount::new(amount), ..grant(id, 1, None, "1").build() }
}

#[test]
fn grants_beyond_what_the_book_can_sum_are_refused_and_change_nothing() {
    let mut book = book_with(vec![grant("A", 1, None, "1").build()]);
    let before = book.clone();
    assert_eq!(book.add_grant(big_grant("H", Decimal::MAX), t(0)), Err(overflow()));
    assert_eq!(book, before, "nothing booked");
    let mut book = Book::new();
    book.add_grant(big_grant("B", MAX_BALANCE), t(0)).unwrap();
    let before = book.clone();
    assert_eq!(book.add_grant(big_grant("C", MAX_BALANCE), t(0)), Err(overflow()));
    assert_eq!(book, before, "nothing booked");
}

#[test]
fn operations_that_would_overflow_fail_without_changing_the_book() {
    let mut book = Book::new();
    book.add_grant(big_grant("B", MAX_BALANCE), t(0)).unwrap();
    let before = book.clone();
    let plus = big_grant("P", MAX_BALANCE);
    assert_eq!(book.adjust(usd(), plus.amount, Some(plus), t(1)), Err(overflow()));
    assert_eq!(book, before);
    let bound = Amount::new(MAX_BALANCE);
    let usage = Spend { currency: usd(), amount: bound, feature: None, mode: SettlementMode::CreditOnly };
    let mut in_debt = Book::new();
    in_debt.book_usage(&usage, t(1)).unwrap();
    let debt_before = in_debt.clone();
    assert_eq!(in_debt.book_usage(&usage, t(1)), Err(overflow()));
    assert!(in_debt.adjust(usd(), bound.negated(), None, t(1)).is_err());
    let lease = in_debt.place_hold(HoldId("l".into()), usd(), None, bound, t(2), t(1));
    assert_eq!(lease.map(|(granted, _)| granted), Ok(Amount::ZERO), "nothing live to hold");
    assert_eq!(in_debt.holds().len(), 1);
    in_debt = debt_before.clone();
    // Overage books no credit, so it cannot overflow the balance.
    let invoiced = Spend { mode: SettlementMode::CreditThenInvoice, ..usage.clone() };
    assert_eq!(in_debt.charge(&invoiced, t(1)).map(|out| out.overage), Ok(bound));
    assert_eq!(in_debt.try_balances(t(1), None).map(|b| b[0].settled), Ok(bound.negated()));
}

#[test]
fn due_bookings_and_balances_that_cannot_be_summed_are_an_error() {
    let mut book = Book::new();
    for id in ["A", "B"] {
        // Pending until T5: each alone is within the bound, both together are not.
        let g = Grant { amount: Amount::new(MAX_BALANCE), ..grant(id, 1, None, "1").effective(t(5)).build() };
        book.add_grant(g, t(0)).unwrap();
    }
    assert_eq!(book.try_balances(t(1), None), Err(overflow()), "pending credit beyond the bound");
    let before = book.clone();
    assert_eq!(book.try_advance(t(6)), Err(overflow()), "funding the second goes beyond it");
    assert_eq!(book, before, "nothing advanced");
}
