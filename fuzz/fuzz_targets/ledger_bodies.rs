#![no_main]
//! The ledger's request bodies through the code the endpoints use to read them: CloudEvents
//! ingest (single, batch, plain JSON), and the JSON bodies of customers, grants, settlements,
//! charges, adjustments and the gateway sync via their serde types. Any bytes are read or refused
//! with a 4xx problem naming what is wrong; never a panic.

use ledger::api::problem::Problem;
use ledger::api::request::parse_json;
use ledger::api::{charges, customers, events, grants};
use libfuzzer_sys::fuzz_target;

fn refused(p: Problem) {
    assert!(p.status.is_client_error(), "{p:?}");
    assert!(!p.detail.is_empty(), "{p:?}");
    let _ = p.body();
}

fn read<T: serde::de::DeserializeOwned>(bytes: &[u8]) {
    if let Err(p) = parse_json::<T>(bytes) {
        refused(p);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    match selector % 9 {
        0 => read::<customers::CustomerRequest>(body),
        1 => read::<grants::CreateGrantRequest>(body),
        2 => read::<grants::SettlementRequest>(body),
        3 => read::<charges::ChargeRequest>(body),
        4 => read::<charges::AdjustmentRequest>(body),
        5 => read::<credits::sync::SyncRequest>(body),
        kind => {
            let content_type =
                ["application/cloudevents+json", "application/cloudevents-batch+json", "application/json"]
                    [usize::from(kind - 6)];
            match events::parse_events(content_type, body) {
                // An empty batch is valid (the schema sets no minimum) and stores nothing.
                Ok(list) => assert!(list.len() <= credits::limits::MAX_EVENTS_PER_BATCH),
                Err(p) => refused(p),
            }
        }
    }
});
