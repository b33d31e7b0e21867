//! Standard Webhooks signatures: `webhook-signature: v1,<base64 HMAC-SHA256>` over
//! `"{webhook-id}.{webhook-timestamp}.{body}"`, keyed by the bytes the channel's secret encodes
//! (`whsec_` + base64).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The prefix of every signing secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Random bytes in a generated secret.
const GENERATED_SECRET_BYTES: usize = 32;
/// Key lengths a given secret may decode to (Standard Webhooks asks for 24..=64 bytes).
const KEY_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// The key bytes of a secret, or why it is not one.
pub fn key(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).ok_or_else(|| format!("must start with {SECRET_PREFIX}"))?;
    let key = STANDARD.decode(encoded).map_err(|_| format!("must be {SECRET_PREFIX} followed by base64"))?;
    if KEY_BYTES.contains(&key.len()) {
        Ok(key)
    } else {
        Err(format!("must encode between {} and {} bytes", KEY_BYTES.start(), KEY_BYTES.end()))
    }
}

/// A new secret from the operating system's random source.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; GENERATED_SECRET_BYTES];
    getrandom::fill(&mut bytes)?;
    Ok(format!("{SECRET_PREFIX}{}", STANDARD.encode(bytes)))
}

/// The `webhook-signature` header value for one delivery attempt.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else { return String::new() };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference vector of the Standard Webhooks libraries.
    #[test]
    fn signs_the_standard_webhooks_reference_vector() {
        let key = key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid secret");
        let signature = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn generated_secrets_are_valid_and_distinct() {
        let (a, b) = (generate().expect("random"), generate().expect("random"));
        assert_ne!(a, b);
        assert_eq!(key(&a).expect("valid").len(), GENERATED_SECRET_BYTES);
    }

    #[test]
    fn malformed_secrets_are_refused() {
        for bad in ["", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_", "whsec_!!!", "whsec_c2hvcnQ="] {
            assert!(key(bad).is_err(), "{bad}");
        }
    }
}
