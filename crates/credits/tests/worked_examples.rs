//! The worked examples of DESIGN.md "Credit semantics", each as its own test.

mod common;

use common::*;
use credits::*;

#[test]
fn draw_down_charge_90_takes_a_50_b_40_c_0() {
    let mut book = book_with(vec![
        grant("A", 1, Some(t(10)), "50").seq(1).build(),
        grant("B", 1, Some(t(20)), "80").seq(2).build(),
        grant("C", 2, None, "100").seq(3).build(),
    ]);
    let out = book.charge(&spend("90", None, SettlementMode::CreditOnly), t(1)).unwrap();
    assert_eq!(consumed(&out), vec![("A".into(), amt("50")), ("B".into(), amt("40"))]);
    let movements: Vec<_> = out
        .entries
        .iter()
        .filter_map(|e| match e {
            Entry::Movement(m) => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(movements.len(), 2, "one consumed movement per grant drawn from");
    assert!(movements.iter().all(|m| m.kind == MovementKind::Consumed));
    assert_eq!(book.grant(&GrantId("C".into())).unwrap().remaining().unwrap(), amt("100"));
}

#[test]
fn draw_down_charge_150_takes_all_of_a_and_50_of_b() {
    let mut book = book_with(vec![
        grant("A", 1, Some(t(10)), "100").seq(1).build(),
        grant("B", 1, Some(t(20)), "100").seq(2).build(),
        grant("C", 2, None, "100").seq(3).build(),
    ]);
    let out = book.charge(&spend("150", None, SettlementMode::CreditOnly), t(1)).unwrap();
    assert_eq!(consumed(&out), vec![("A".into(), amt("100")), ("B".into(), amt("50"))]);
}

#[test]
fn never_expiring_grants_come_last_and_creation_order_breaks_ties() {
    let mut book = book_with(vec![
        grant("late", 5, None, "10").seq(2).build(),
        grant("early", 5, None, "10").seq(1).build(),
        grant("expiring", 5, Some(t(30)), "10").seq(3).build(),
    ]);
    let out = book.charge(&spend("25", None, SettlementMode::CreditOnly), t(1)).unwrap();
    assert_eq!(
        consumed(&out),
        vec![("expiring".into(), amt("10")), ("early".into(), amt("10")), ("late".into(), amt("5"))]
    );
}

#[test]
fn expiry_removes_only_the_unused_70_after_consuming_30_of_100() {
    let mut book = book_with(vec![grant("G", 1, Some(t(10)), "100").build()]);
    book.charge(&spend("30", None, SettlementMode::CreditOnly), t(5)).unwrap();
    let entries = book.try_advance(t(10)).unwrap();
    let expired: Vec<_> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Movement(m) if m.kind == MovementKind::Expired => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].amount, amt("-70"));
    assert_eq!(expired[0].booked_at, t(10));
    assert_eq!(expired[0].balance_before, amt("70"));
    assert_eq!(expired[0].balance_after, amt("0"));
}

#[test]
fn settled_balance_is_100_70_0_at_t1_t5_t10() {
    let mut book = book_with(vec![grant("G", 1, Some(t(10)), "100").build()]);
    let mut journal = book.try_advance(t(1)).unwrap();
    assert_eq!(settled(&book, t(1)), amt("100"));
    journal.extend(book.charge(&spend("30", None, SettlementMode::CreditOnly), t(5)).unwrap().entries);
    assert_eq!(settled(&book, t(5)), amt("70"));
    // Visible at T10 without any job having booked the expiry ...
    assert_eq!(settled(&book, t(10)), amt("0"));
    // ... and not a moment before it.
    assert_eq!(settled(&book, t(10) - chrono::TimeDelta::nanoseconds(1)), amt("70"));
}

#[test]
fn consumption_reduces_the_grant_the_order_picks_so_only_20_of_a_expire_at_t10() {
    let mut book = book_with(vec![
        grant("A", 1, Some(t(10)), "50").seq(1).build(),
        grant("B", 1, Some(t(20)), "50").seq(2).build(),
    ]);
    let out = book.charge(&spend("30", None, SettlementMode::CreditOnly), t(5)).unwrap();
    assert_eq!(consumed(&out), vec![("A".into(), amt("30"))]);
    let expired: Vec<_> = book
        .try_advance(t(10))
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            Entry::Movement(m) if m.kind == MovementKind::Expired => Some((m.grant_id.unwrap().0, m.amount)),
            _ => None,
        })
        .collect();
    assert_eq!(expired, vec![("A".into(), amt("-20"))]);
    assert_eq!(settled(&book, t(10)), amt("50"));
}

#[test]
fn feature_scope_counts_unrestricted_and_sets_containing_the_feature() {
    let book = book_with(vec![
        grant("unrestricted", 1, None, "1").seq(1).build(),
        grant("input", 1, None, "10").features(&["input_tokens"]).seq(2).build(),
        grant("both", 1, None, "100").features(&["input_tokens", "output_tokens"]).seq(3).build(),
        grant("storage", 1, None, "1000").features(&["storage"]).seq(4).build(),
    ]);
    let input = FeatureScope::Eq(feature("input_tokens"));
    let scoped = book.try_balances(t(1), Some(&input)).unwrap();
    assert_eq!(scoped[0].settled, amt("111"));
    assert_eq!(book.try_balances(t(1), None).unwrap()[0].settled, amt("1111"));
    let storage = FeatureScope::Eq(feature("storage"));
    assert_eq!(book.try_balances(t(1), Some(&storage)).unwrap()[0].settled, amt("1001"));
}

#[test]
fn live_is_settled_minus_open_holds_100_settled_25_held_75_live() {
    let mut book = book_with(vec![grant("G", 1, None, "100").build()]);
    let (granted, _) = book.place_hold(HoldId("lease".into()), usd(), None, amt("25"), t(9), t(1)).unwrap();
    assert_eq!(granted, amt("25"));
    let b = &book.try_balances(t(2), None).unwrap()[0];
    assert_eq!((b.settled, b.live), (amt("100"), amt("75")));
    // The hold expires at T9: its credit is live again.
    let b = &book.try_balances(t(9), None).unwrap()[0];
    assert_eq!((b.settled, b.live), (amt("100"), amt("100")));
}

#[test]
fn a_hold_never_outlives_the_credit_behind_it() {
    // A(p1, T5, 10) is the only credit: a hold asked until T9 closes at T5 with A.
    let mut book = book_with(vec![grant("A", 1, Some(t(5)), "10").build()]);
    let lease = HoldId("lease".into());
    let (granted, _) = book.place_hold(lease.clone(), usd(), None, amt("4"), t(9), t(1)).unwrap();
    assert_eq!((granted, book.spend_by(&lease).unwrap()), (amt("4"), t(5)));
    // Usage captured before T5 is paid by A; at T5 the rest of A expires, and the hold with it.
    let out = book.capture(&lease, &spend("3", None, SettlementMode::CreditOnly), t(4)).unwrap();
    assert_eq!((consumed(&out), out.uncovered), (vec![("A".into(), amt("3"))], amt("0")));
    let b = &book.try_balances(t(5), None).unwrap()[0];
    assert_eq!((b.settled, b.live), (amt("0"), amt("0")));
}

#[test]
fn a_hold_prefers_credit_that_outlives_it_and_renews_onto_it() {
    // A(p1, T5, 10) expires before the hold's TTL, C(p2, never, 10) does not: the hold sits on
    // C and lasts its TTL, while charges still draw A first.
    let mut book =
        book_with(vec![grant("A", 1, Some(t(5)), "10").seq(1).build(), grant("C", 2, None, "10").seq(2).build()]);
    let lease = HoldId("lease".into());
    book.place_hold(lease.clone(), usd(), None, amt("6"), t(9), t(1)).unwrap();
    assert_eq!(book.spend_by(&lease).unwrap(), t(9));
    let out = book.charge(&spend("2", None, SettlementMode::CreditOnly), t(2)).unwrap();
    assert_eq!(consumed(&out), vec![("A".into(), amt("2"))]);
    // More than C can back: the rest sits on A and the hold is now spent by T5 …
    let (added, _) = book.extend_hold(&lease, amt("8"), t(9), t(3)).unwrap();
    assert_eq!((added, book.spend_by(&lease).unwrap()), (amt("8"), t(5)));
    // … until what it no longer needs is captured and a renewal moves it back onto C.
    book.capture(&lease, &spend("9", None, SettlementMode::CreditOnly), t(4)).unwrap();
    book.extend_hold(&lease, amt("0"), t(20), t(4)).unwrap();
    assert_eq!((book.hold(&lease).unwrap().amount, book.spend_by(&lease).unwrap()), (amt("5"), t(20)));
}

#[test]
fn an_expiry_takes_its_credit_out_of_a_hold_and_leaves_the_rest() {
    // Usage spent in time but reported after A expired is still covered by what C backs.
    let mut book =
        book_with(vec![grant("A", 1, Some(t(5)), "2").seq(1).build(), grant("C", 2, None, "3").seq(2).build()]);
    let lease = HoldId("lease".into());
    book.place_hold(lease.clone(), usd(), None, amt("5"), t(9), t(1)).unwrap();
    assert_eq!(book.spend_by(&lease).unwrap(), t(5));
    book.try_advance(t(6)).unwrap();
    assert_eq!((book.hold(&lease).unwrap().amount, book.spend_by(&lease).unwrap()), (amt("3"), t(9)));
    let out = book.capture(&lease, &spend("3", None, SettlementMode::CreditOnly), t(6)).unwrap();
    assert_eq!((consumed(&out), out.uncovered), (vec![("C".into(), amt("3"))], amt("0")));
}

#[test]
fn a_void_shrinks_the_holds_it_backed() {
    let mut book = book_with(vec![grant("A", 1, None, "10").seq(1).build(), grant("B", 2, None, "3").seq(2).build()]);
    let lease = HoldId("lease".into());
    book.place_hold(lease.clone(), usd(), None, amt("12"), t(9), t(1)).unwrap();
    book.void(&GrantId("A".into()), t(2)).unwrap();
    assert_eq!(book.hold(&lease).unwrap().amount, amt("2"));
    let b = &book.try_balances(t(2), None).unwrap()[0];
    assert_eq!((b.settled, b.live), (amt("3"), amt("1")));
}

#[test]
fn pending_is_credit_granted_for_the_future() {
    let book = book_with(vec![
        grant("now", 1, None, "10").seq(1).build(),
        grant("later", 1, None, "5").effective(t(7)).seq(2).build(),
    ]);
    let b = &book.try_balances(t(3), None).unwrap()[0];
    assert_eq!((b.settled, b.pending), (amt("10"), amt("5")));
    let b = &book.try_balances(t(7), None).unwrap()[0];
    assert_eq!((b.settled, b.pending), (amt("15"), amt("0")));
}

#[test]
fn credit_only_refuses_an_uncovered_charge_and_changes_nothing() {
    let mut book = book_with(vec![grant("G", 1, None, "10").build()]);
    let before = book.clone();
    let refusal = book.charge(&spend("10.01", None, SettlementMode::CreditOnly), t(1)).unwrap_err();
    assert_eq!(refusal, ChargeError::NotCovered(Refusal { requested: amt("10.01"), available: amt("10") }));
    assert_eq!(book, before);
}

#[test]
fn credit_then_invoice_consumes_what_is_there_and_reports_overage() {
    let mut book = book_with(vec![grant("G", 1, None, "10").build()]);
    let out = book.charge(&spend("12.50", None, SettlementMode::CreditThenInvoice), t(1)).unwrap();
    assert_eq!(consumed(&out), vec![("G".into(), amt("10"))]);
    assert_eq!(out.overage, amt("2.50"));
    assert_eq!(settled(&book, t(1)), amt("0"));
}

#[test]
fn usage_after_the_fact_leaves_a_negative_balance_that_new_credit_covers_first() {
    let mut book = book_with(vec![grant("G", 1, None, "1").build()]);
    let out = book.book_usage(&spend("3", None, SettlementMode::CreditOnly), t(1)).unwrap();
    assert_eq!(out.uncovered, amt("2"));
    assert_eq!(settled(&book, t(1)), amt("-2"));
    let top_up = grant("H", 1, Some(t(10)), "10").effective(t(2)).build();
    let entries = book.add_grant(top_up, t(2)).unwrap();
    assert!(entries.iter().any(|e| matches!(e, Entry::DebtCovered { amount, .. } if *amount == amt("2"))));
    assert_eq!(settled(&book, t(2)), amt("8"));
    // The covered part no longer expires: only 8 leave at T10.
    assert_eq!(settled(&book, t(10)), amt("0"));
}

#[test]
fn restricted_credit_pays_only_for_its_features() {
    let mut book = book_with(vec![grant("input", 1, None, "10").features(&["input_tokens"]).build()]);
    assert!(book.charge(&spend("1", Some("output_tokens"), SettlementMode::CreditOnly), t(1)).is_err());
    assert!(book.charge(&spend("1", None, SettlementMode::CreditOnly), t(1)).is_err());
    assert!(book.charge(&spend("1", Some("input_tokens"), SettlementMode::CreditOnly), t(1)).is_ok());
}

#[test]
fn voiding_removes_the_unused_remainder_by_a_new_movement() {
    let mut book = book_with(vec![grant("G", 1, None, "10").build()]);
    book.charge(&spend("4", None, SettlementMode::CreditOnly), t(1)).unwrap();
    let entries = book.void(&GrantId("G".into()), t(2)).unwrap();
    assert!(matches!(&entries[..], [Entry::Movement(m)] if m.kind == MovementKind::Voided && m.amount == amt("-6")));
    assert_eq!(book.grant(&GrantId("G".into())).unwrap().grant.status_at(t(2)), GrantStatus::Voided);
    assert_eq!(settled(&book, t(3)), amt("0"));
}

#[test]
fn purchase_amount_is_credit_times_cost_basis() {
    let spec = GrantSpec {
        currency: usd(),
        amount: amt("100.00"),
        funding_method: FundingMethod::External,
        purchase: Some(PurchaseTerms { currency: usd(), per_unit_cost_basis: Some(amt("0.50")) }),
        priority: Priority::DEFAULT,
        effective_at: None,
        expires_after: Some(IsoDuration::parse("P1M").unwrap()),
        features: FeatureFilter::unrestricted(),
    };
    let g = Grant::new(spec, GrantId("G".into()), t(0), 0).unwrap();
    let p = g.funding.purchase().unwrap();
    assert_eq!(p.amount.to_string(), "50.0000");
    assert_eq!(p.amount, amt("50"));
    assert_eq!(p.settlement_status, SettlementStatus::Pending);
    assert_eq!(g.expires_at, Some(t(31)));
    assert_eq!(g.priority.get(), 10);
}

#[test]
fn priority_outside_1_to_1000_is_refused() {
    assert!(Priority::new(0).is_err());
    assert!(Priority::new(1001).is_err());
    assert!(Priority::new(1).is_ok() && Priority::new(1000).is_ok());
}
