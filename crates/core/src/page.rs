//! Offset pagination shared by every list endpoint.

use serde::{Deserialize, Serialize};

/// Largest page a caller may ask for.
pub const MAX_PAGE_SIZE: u32 = 100;
/// Page size used when the caller does not say.
pub const DEFAULT_PAGE_SIZE: u32 = 20;

/// Which page to read: 1-based page number and page size (clamped to
/// [`MAX_PAGE_SIZE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRequest {
    pub page: u32,
    pub per_page: u32,
}

impl Default for PageRequest {
    fn default() -> Self {
        Self {
            page: 1,
            per_page: DEFAULT_PAGE_SIZE,
        }
    }
}

impl PageRequest {
    /// Builds a request from optional user input, clamping to valid bounds.
    pub fn new(page: Option<u32>, per_page: Option<u32>) -> Self {
        Self {
            page: page.unwrap_or(1).max(1),
            per_page: per_page
                .unwrap_or(DEFAULT_PAGE_SIZE)
                .clamp(1, MAX_PAGE_SIZE),
        }
    }

    pub fn offset(&self) -> i64 {
        i64::from(self.page.saturating_sub(1)) * i64::from(self.per_page)
    }

    pub fn limit(&self) -> i64 {
        i64::from(self.per_page)
    }
}

/// One page of results with the total count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub page: u32,
    pub per_page: u32,
    pub total: u64,
}

impl<T> Page<T> {
    pub fn new(items: Vec<T>, req: PageRequest, total: u64) -> Self {
        Self {
            items,
            page: req.page,
            per_page: req.per_page,
            total,
        }
    }

    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            page: self.page,
            per_page: self.per_page,
            total: self.total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamps_and_computes_offsets() {
        let r = PageRequest::new(Some(0), Some(10_000));
        assert_eq!((r.page, r.per_page), (1, MAX_PAGE_SIZE));
        let r = PageRequest::new(Some(3), Some(25));
        assert_eq!((r.offset(), r.limit()), (50, 25));
        assert_eq!(PageRequest::new(None, Some(0)).per_page, 1);
    }
}
