//! What a list request asks for, as the store reads it: string filters and pages (by number or
//! by cursor). The API layer parses them from query strings (`api::request`).

/// A string filter: `filter[name]=v` (eq) or `filter[name][eq|oeq|neq|contains|ocontains]=v`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringFilter {
    Eq(String),
    OneOf(Vec<String>),
    Neq(String),
    Contains(String),
    ContainsAny(Vec<String>),
    /// Several operators on one field: all must hold.
    All(Vec<StringFilter>),
}

impl StringFilter {
    pub fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (StringFilter::Neq(v), None) => !v.is_empty(),
            (StringFilter::All(fs), None) => fs.iter().all(|f| f.matches(None)),
            (_, None) => false,
            (StringFilter::Eq(v), Some(x)) => v == x,
            (StringFilter::OneOf(vs), Some(x)) => vs.iter().any(|v| v == x),
            (StringFilter::Neq(v), Some(x)) => v != x,
            (StringFilter::Contains(v), Some(x)) => x.contains(v.as_str()),
            (StringFilter::ContainsAny(vs), Some(x)) => vs.iter().any(|v| x.contains(v.as_str())),
            (StringFilter::All(fs), x) => fs.iter().all(|f| f.matches(x)),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Page {
    pub size: i64,
    pub number: i64,
}

impl Page {
    /// Items before this page; saturates (a page beyond i64::MAX items is simply empty).
    pub fn offset(&self) -> i64 {
        self.number.saturating_sub(1).saturating_mul(self.size)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CursorPosition {
    Start,
    /// Items after this one in list order (older, for newest-first lists).
    After(i64),
    /// Items before this one in list order (newer).
    Before(i64),
}

#[derive(Clone, Copy, Debug)]
pub struct CursorPage {
    pub size: i64,
    pub position: CursorPosition,
}
