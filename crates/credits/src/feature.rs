//! Feature keys and the feature restriction of a grant.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::ModelError;

/// A feature key such as `api_requests` or `input_tokens` (`^[a-z0-9]+(?:_[a-z0-9]+)*$`, ≤ 64).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct FeatureKey(String);

impl FeatureKey {
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        let valid = !text.is_empty()
            && text.len() <= crate::limits::MAX_FEATURE_KEY_LEN
            && text
                .split('_')
                .all(|word| !word.is_empty() && word.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        if valid {
            Ok(FeatureKey(text.to_owned()))
        } else {
            Err(ModelError::InvalidFeatureKey(text.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FeatureKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for FeatureKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        FeatureKey::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The features a grant's credit may pay for. Empty means unrestricted (shared by all features).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FeatureFilter(Vec<FeatureKey>);

impl FeatureFilter {
    pub fn unrestricted() -> Self {
        FeatureFilter(Vec::new())
    }

    pub fn only(features: Vec<FeatureKey>) -> Self {
        let mut features = features;
        features.sort();
        features.dedup();
        FeatureFilter(features)
    }

    pub fn is_unrestricted(&self) -> bool {
        self.0.is_empty()
    }

    pub fn features(&self) -> &[FeatureKey] {
        &self.0
    }

    /// Can credit under this filter pay for a charge of `feature`? A charge without a feature
    /// may only use unrestricted credit.
    pub fn admits(&self, feature: Option<&FeatureKey>) -> bool {
        self.is_unrestricted() || feature.is_some_and(|f| self.0.contains(f))
    }
}

/// Which features a balance is asked for (`filter[feature_key][…]` on the API). Credit counts
/// toward the scope when it is unrestricted or restricted to a set with a matching feature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeatureScope {
    Eq(FeatureKey),
    OneOf(Vec<FeatureKey>),
    Neq(FeatureKey),
    Contains(String),
    ContainsAny(Vec<String>),
    /// Several conditions on the feature key, all of which must hold.
    All(Vec<FeatureScope>),
}

impl FeatureScope {
    pub fn matches(&self, feature: &FeatureKey) -> bool {
        match self {
            FeatureScope::Eq(f) => f == feature,
            FeatureScope::OneOf(fs) => fs.contains(feature),
            FeatureScope::Neq(f) => f != feature,
            FeatureScope::Contains(part) => feature.as_str().contains(part.as_str()),
            FeatureScope::ContainsAny(parts) => parts.iter().any(|p| feature.as_str().contains(p.as_str())),
            FeatureScope::All(scopes) => scopes.iter().all(|s| s.matches(feature)),
        }
    }

    /// Does credit under `filter` count toward this scope?
    pub fn includes(&self, filter: &FeatureFilter) -> bool {
        filter.is_unrestricted() || filter.features().iter().any(|f| self.matches(f))
    }
}

impl From<FeatureKey> for FeatureScope {
    fn from(feature: FeatureKey) -> Self {
        FeatureScope::Eq(feature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_keys_follow_the_resource_key_pattern() {
        for ok in ["api_requests", "input_tokens", "a", "gpt4_tokens"] {
            assert!(FeatureKey::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Api", "a__b", "_a", "a_", "a-b", "a b", &"x".repeat(65)] {
            assert!(FeatureKey::parse(bad).is_err(), "{bad}");
        }
    }
}
