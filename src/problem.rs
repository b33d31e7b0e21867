//! The answers the gateway gives instead of the upstream's: `application/problem+json`.

use credits::{Amount, Currency, FeatureKey};
use serde_json::{json, Value};

use crate::fields::ConfigError;

/// A local reply: status and problem body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub status: u16,
    pub body: Value,
}

impl Problem {
    fn new(status: u16, title: &str, detail: String) -> Self {
        Problem {
            status,
            body: json!({
                "type": format!("https://httpstatuses.com/{status}"),
                "title": title,
                "status": status,
                "detail": detail,
            }),
        }
    }

    fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        if let Value::Object(map) = &mut self.body {
            map.insert(key.to_owned(), value.into());
        }
        self
    }

    /// Adds the host's request id (Kong's `ngx.kong_request_id`, Envoy's `x-request-id`).
    pub fn with_request_id(self, request_id: Option<String>) -> Self {
        match request_id {
            Some(id) if !id.is_empty() => self.with("instance", format!("urn:request:{id}")),
            _ => self,
        }
    }

    pub fn body_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body).unwrap_or_default()
    }

    /// `price` is what the call needs in the scope that refused it (its estimate, for calls
    /// priced by what they use), `feature` that scope's feature.
    pub fn payment_required(
        subject: &str,
        currency: Currency,
        feature: Option<&FeatureKey>,
        price: Amount,
        available: Amount,
    ) -> Self {
        let scope = feature.map_or(String::new(), |f| format!(" for {f}"));
        let problem = Problem::new(
            402,
            "Payment Required",
            format!(
                "customer [{subject}] has {available} {currency} of credit{scope}; this call needs {price} {currency}"
            ),
        )
        .with("customer", subject)
        .with("currency", currency.to_string())
        .with("price", price.to_string())
        .with("available", available.to_string());
        match feature {
            Some(f) => problem.with("feature", f.as_str()),
            None => problem,
        }
    }

    pub fn unidentified(header: &str, required: &[String], status: u16) -> Self {
        let detail = if required.is_empty() {
            format!("the request does not name a customer (header {header} is missing or empty)")
        } else {
            format!(
                "the request does not name an authenticated customer (headers {header}, {} must all be set)",
                required.join(", ")
            )
        };
        Problem::new(status, reason(status), detail)
    }

    pub fn unknown_customer(subject: &str, status: u16) -> Self {
        Problem::new(status, reason(status), format!("no customer has the subject [{subject}]"))
            .with("customer", subject)
    }

    pub fn unavailable(reason: &str) -> Self {
        Problem::new(503, "Service Unavailable", format!("{reason}; the call was not let through"))
    }

    pub fn invalid_config(error: &ConfigError) -> Self {
        Problem::new(
            500,
            "Internal Server Error",
            format!("the prepaid_credits filter is misconfigured: {}: {}", error.field, error.message),
        )
        .with("field", error.field.clone())
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Client Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payment_required_names_customer_currency_price_and_balance() {
        let p = Problem::payment_required(
            "alice",
            Currency::parse("USD").unwrap(),
            None,
            Amount::parse("0.10").unwrap(),
            Amount::parse("0.05").unwrap(),
        );
        assert_eq!(p.status, 402);
        assert_eq!(p.body["customer"], "alice");
        assert_eq!(p.body["currency"], "USD");
        assert_eq!(p.body["price"], "0.10");
        assert_eq!(p.body["available"], "0.05");
        assert!(p.body.get("feature").is_none());
        let tokens = FeatureKey::parse("output_tokens").unwrap();
        let p = Problem::payment_required(
            "alice",
            Currency::parse("USD").unwrap(),
            Some(&tokens),
            Amount::parse("0.008").unwrap(),
            Amount::parse("0").unwrap(),
        );
        assert_eq!(p.body["feature"], "output_tokens");
        assert!(p.body["detail"].as_str().unwrap().contains("for output_tokens"));
    }
}
