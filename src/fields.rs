//! Configuration errors and the validators of single fields, shared by every part of the
//! configuration (`config`, `pricing`). A leaf: it knows no configuration type.

use std::fmt;
use std::marker::PhantomData;

use credits::limits::MAX_AMOUNT_SCALE;
use credits::Amount;
use serde::de::value::{MapAccessDeserializer, MapDeserializer};
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Unexpected, Visitor};

/// A configuration that cannot be used, naming the offending field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration at {}: {}", self.field, self.message)
    }
}

pub fn error(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { field: field.to_owned(), message: message.into() }
}

pub fn bounded(field: &str, value: Option<u64>, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    let v = value.unwrap_or(default);
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(error(field, format!("must be between {min} and {max}, got {v}")))
    }
}

pub fn to_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// Header names are lower-case tokens (HTTP/2 and proxy-wasm hosts use lower case).
pub fn header_name(field: &str, name: &str) -> Result<String, ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(name.to_owned())
    } else {
        Err(error(field, format!("{name:?} is not a lower-case header name")))
    }
}

pub fn status(field: &str, value: Option<u64>, default: u16) -> Result<u16, ConfigError> {
    let v = bounded(field, value, u64::from(default), 400, 499)?;
    Ok(u16::try_from(v).unwrap_or(default))
}

/// `text` as the schema's decimal patterns write a number from 0 to 10^`digits` with at most
/// `places` decimal places: `[0-9]{1,digits}(\.[0-9]{1,places})?`, or 10^`digits` itself (`1`
/// and `digits` zeros, only zeros after the point). No sign, space or exponent, and no more
/// digits than the pattern allows even where they are leading zeros: Kong refuses those.
pub fn written_within(text: &str, digits: usize, places: usize) -> bool {
    let (int, frac) = match text.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (text, None),
    };
    let digits_up_to = |s: &str, max: usize| (1..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    let at_bound = int.strip_prefix('1').is_some_and(|z| z.len() == digits && z.bytes().all(|b| b == b'0'))
        && frac.is_none_or(|f| f.bytes().all(|b| b == b'0'));
    frac.is_none_or(|f| digits_up_to(f, places)) && (digits_up_to(int, digits) || at_bound)
}

/// A non-negative amount of at most 10^`digits` (at most `credits::limits::MAX_AMOUNT`, 10^15),
/// with at most `MAX_AMOUNT_SCALE` decimal places, written as [`written_within`] says: what the
/// ledger would refuse, or the schema, the filter refuses when it is configured.
pub fn amount(field: &str, text: &str, digits: usize) -> Result<Amount, ConfigError> {
    let places = MAX_AMOUNT_SCALE as usize;
    if !written_within(text, digits, places) {
        let why = format!("{text:?} is not a decimal from 0 to 1{} with at most {places} places", "0".repeat(digits));
        return Err(error(field, why));
    }
    let a = Amount::parse_bounded(text).map_err(|e| error(field, e.to_string()))?;
    if a.is_negative() {
        return Err(error(field, "must not be negative"));
    }
    Ok(a)
}

// How the configuration's JSON is read where serde's defaults differ from the schema as Kong runs
// it (lua-resty-ljsonschema, from `kong/db/schema/json.lua`).

/// A member given, `None` when absent. `null` is refused like any other wrong type: the schema
/// makes only `response_headers.*` nullable, and Kong hands a filter its configuration as written
/// (a JSON field it validates and encodes again), adding no `null` for members left out.
pub fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A whole number of the configuration, `None` when absent. Kong's validator takes any number
/// without a fraction for an integer (`1e3`, and `-0` where 0 is allowed: `sync.unknown_ttl_ms`),
/// and cjson hands over `-0` as `-0`, which serde reads as a float: read as the whole number it
/// is, under Envoy too. A fraction, or a number below 0, is refused.
pub fn whole<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Whole;
    impl Visitor<'_> for Whole {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a whole number, at least 0")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
            // Up to 2^53, where every whole number has an exact float (the schema's bounds are far
            // below it).
            const EXACT: f64 = 9_007_199_254_740_992.0;
            if v.fract() == 0.0 && (0.0..=EXACT).contains(&v) {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                return Ok(v as u64);
            }
            Err(E::invalid_value(Unexpected::Float(v), &self))
        }
    }
    d.deserialize_any(Whole).map(Some)
}

/// An object of the configuration. Kong reads JSON into Lua tables, where an empty array and an
/// empty object are the same empty table, and its validator takes that for either (`array_mt =
/// false`); Kong may then encode it either way. So `[]` reads as `{}`; any other array is refused
/// (serde alone reads a struct from an array, member by member, which the schema refuses).
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Expect<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Expect<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Object)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Object<T>, A::Error> {
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_type(de::Unexpected::Seq, &self));
                }
                T::deserialize(MapDeserializer::<_, A::Error>::new(std::iter::empty::<((), ())>())).map(Object)
            }
        }
        d.deserialize_any(Expect(PhantomData))
    }
}

/// A member that is an [`Object`].
pub fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Object::deserialize(d).map(|Object(t)| t)
}

/// An optional member that is an [`Object`] (`null` refused, see [`present`]).
pub fn some_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    object(d).map(Some)
}

/// An array of the configuration: `{}` reads as `[]`, for the reason given at [`Object`].
pub fn list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    struct Expect<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Expect<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element()? {
                items.push(item);
            }
            Ok(items)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<T>, A::Error> {
            if map.next_key::<IgnoredAny>()?.is_some() {
                return Err(de::Error::invalid_type(de::Unexpected::Map, &self));
            }
            Ok(Vec::new())
        }
    }
    d.deserialize_any(Expect(PhantomData))
}
