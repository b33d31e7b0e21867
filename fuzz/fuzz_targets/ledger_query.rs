#![no_main]
//! The ledger's query parameters: Konnect's deepObject filters (`filter[feature_key][oeq]=…`),
//! page and cursor pagination, the balance's feature scope. Any query string is read or refused
//! with a 400 naming a parameter; a cursor the ledger issued reads back as itself.

use ledger::api::request::{encode_cursor, CursorPosition, Query};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let query = Query(form_urlencoded::parse(data).into_owned().collect());
    let refused = |p: ledger::api::problem::Problem| {
        assert_eq!(p.status.as_u16(), 400, "{p:?}");
        // The parameter at fault is named (its name may be "" in `?=1`).
        assert!(p.field.is_some() && !p.detail.is_empty(), "{p:?}");
    };
    let ops = ["eq", "oeq", "neq", "contains", "ocontains"];
    for field in ["feature_key", "currency", "key", "subject"] {
        if let Err(p) = query.string_filter(field, &ops) {
            refused(p);
        }
    }
    if let Err(p) = ledger::api::balance::feature_scope(&query) {
        refused(p);
    }
    match query.page() {
        Ok(page) => assert!(page.size >= 1 && page.size <= 1000 && page.offset() >= 0, "{page:?}"),
        Err(p) => refused(p),
    }
    match query.cursor() {
        Ok(c) => {
            assert!(c.size >= 1 && c.size <= 1000);
            if let CursorPosition::After(seq) | CursorPosition::Before(seq) = c.position {
                let again = Query(vec![("page[after]".into(), encode_cursor(seq))]).cursor();
                assert!(matches!(again.map(|c| c.position), Ok(CursorPosition::After(s)) if s == seq));
            }
        }
        Err(p) => refused(p),
    }
    if let Err(p) = query.only(&["page[size]", "page[after]", "filter[feature_key][*]"]) {
        refused(p);
    }
});
