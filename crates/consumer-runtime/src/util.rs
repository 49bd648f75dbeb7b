//! Small helpers without a better home.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher, RandomState};

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let mut h = RandomState::new().build_hasher();
        h.write_u64(std::process::id() as u64);
        h.finish() | 1
    });
}

/// A fast, non-cryptographic random number (xorshift64*), for jitter and instance ids.
pub(crate) fn random_u64() -> u64 {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// Checks that `name` is a plain SQL identifier, so that it can be spliced into SQL text.
pub(crate) fn check_identifier(what: &str, name: &str) -> Result<(), crate::Error> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(crate::Error::Config(format!(
            "{what} `{name}` is not a plain identifier; use lowercase letters, digits and underscores (at most 48, not starting with a digit)"
        )))
    }
}
