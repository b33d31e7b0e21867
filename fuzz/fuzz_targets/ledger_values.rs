#![no_main]
//! The value parsers behind every ledger request and the credit model: amounts, currencies,
//! ISO-8601 durations, feature keys, timestamps. Any text is a value or an error; a value prints
//! back to text that parses to the same value; durations add to any date without a panic.

use credits::{Amount, Currency, FeatureKey, IsoDuration};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(amount) = Amount::parse(text) {
        let printed = amount.to_string();
        assert_eq!(Amount::parse(&printed).ok(), Some(amount), "{text:?} printed as {printed:?}");
        let _ = (amount.is_positive(), amount.is_negative());
    }
    if let Ok(currency) = Currency::parse(text) {
        assert_eq!(Currency::parse(&currency.to_string()).ok(), Some(currency));
    }
    if let Ok(key) = FeatureKey::parse(text) {
        assert_eq!(FeatureKey::parse(key.as_str()).ok(), Some(key));
    }
    if let Ok(duration) = IsoDuration::parse(text) {
        let printed = duration.to_string();
        assert_eq!(IsoDuration::parse(&printed).ok(), Some(duration), "{text:?} printed as {printed:?}");
        for at in
            [chrono::DateTime::<chrono::Utc>::MIN_UTC, chrono::Utc::now(), chrono::DateTime::<chrono::Utc>::MAX_UTC]
        {
            let _ = duration.add_to(at);
        }
    }
    if let Ok(at) = ledger::api::fields::parse_timestamp("timestamp", text) {
        let printed = ledger::api::fields::timestamp(at);
        assert!(ledger::api::fields::parse_timestamp("timestamp", &printed).is_ok(), "{printed:?}");
    }
});
