//! Small shared building blocks for the Muse crates: a clock, secrets that
//! never print, random tokens and their digests, and pagination types.
//!
//! Nothing here knows about HTTP or databases.

pub mod clock;
pub mod page;
pub mod secret;
pub mod token;

pub use clock::{Clock, FixedClock, SystemClock};
pub use page::{Page, PageRequest};
pub use secret::Secret;
