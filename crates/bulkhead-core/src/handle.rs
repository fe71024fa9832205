//! Agent handles: 1–64 of `a-z 0-9 . _ -`, starting with a letter or digit.

use std::fmt;

/// The longest handle accepted.
pub const HANDLE_LEN_MAX: usize = 64;

/// A valid agent handle.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Handle(String);

impl Handle {
    pub fn parse(s: &str) -> Result<Handle, String> {
        if s.is_empty() || s.len() > HANDLE_LEN_MAX {
            return Err(format!("a handle has 1 to {HANDLE_LEN_MAX} characters"));
        }
        let first = s.as_bytes()[0];
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err("a handle starts with a lowercase letter or a digit".into());
        }
        if !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')) {
            return Err("a handle uses only a-z, 0-9, '.', '_' and '-'".into());
        }
        Ok(Handle(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles() {
        for ok in ["a", "invoice-processor-prod-01", "9.x_y-z", &"a".repeat(64)] {
            assert!(Handle::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "_a", "A", "a b", "a/b", "é", &"a".repeat(65), "a\n"] {
            assert!(Handle::parse(bad).is_err(), "{bad:?}");
        }
    }
}
