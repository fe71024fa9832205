//! The path of a proxied call: `/proxy/{upstream}/{rest}`, checked so that `rest` can never
//! leave the upstream's base path.
//!
//! Servers and intermediaries differ in how they treat dot segments, encoded dots, encoded
//! slashes and backslashes, so any of them anywhere in `rest` refuses the call instead of being
//! normalised: what is forwarded is exactly what was checked.

/// Why a path is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PathError {
    /// Not under `/proxy/`, or no upstream name.
    NotProxy,
    /// A dot segment, an encoded separator, a bad escape or a control character.
    Tricky(&'static str),
}

/// Splits the raw request path into the upstream name and the rest, without the slash between
/// them (`""` for `/proxy/name` and `/proxy/name/`; a trailing slash of the rest is kept).
pub fn split(raw: &str) -> Result<(&str, &str), PathError> {
    let after = raw.strip_prefix("/proxy/").ok_or(PathError::NotProxy)?;
    let (name, rest) = match after.split_once('/') {
        Some((n, r)) => (n, r),
        None => (after, ""),
    };
    if name.is_empty() {
        return Err(PathError::NotProxy);
    }
    Ok((name, rest))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes one segment (bytes); a malformed escape is an error.
fn decode(seg: &str) -> Result<Vec<u8>, PathError> {
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (Some(h), Some(l)) = (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) else {
                return Err(PathError::Tricky("a malformed percent escape"));
            };
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Checks every `/`-separated segment of `rest`. An empty final segment (a trailing slash) is
/// allowed when `trailing_slash_ok`; empty inner segments never are.
pub fn check_segments(rest: &str, trailing_slash_ok: bool) -> Result<(), PathError> {
    if rest.is_empty() {
        return Ok(());
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let last = segs.len() - 1;
    for (i, seg) in segs.iter().enumerate() {
        if seg.is_empty() {
            if i == last && trailing_slash_ok {
                continue;
            }
            return Err(PathError::Tricky("an empty path segment"));
        }
        let d = decode(seg)?;
        if d == b"." || d == b".." {
            return Err(PathError::Tricky("a dot segment"));
        }
        // A decoded dot-only segment of any length is refused too (some servers trim or fold
        // them); so are encoded separators and control characters.
        if d.iter().all(|&c| c == b'.') {
            return Err(PathError::Tricky("a dot segment"));
        }
        if d.iter().any(|&c| c == b'/' || c == b'\\' || c < 0x20 || c == 0x7f) {
            return Err(PathError::Tricky("an encoded separator or control character"));
        }
        // A double-encoded escape (`%252e`) decodes to another escape: refused, since a second
        // decoder downstream would see a different path.
        if d.windows(3).any(|w| w[0] == b'%' && hex(w[1]).is_some() && hex(w[2]).is_some()) {
            return Err(PathError::Tricky("a double-encoded escape"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_name_and_rest() {
        assert_eq!(split("/proxy/openai/v1/chat/completions"), Ok(("openai", "v1/chat/completions")));
        assert_eq!(split("/proxy/openai"), Ok(("openai", "")));
        assert_eq!(split("/proxy/openai/"), Ok(("openai", "")));
        assert_eq!(split("/proxy/openai/v1/models/"), Ok(("openai", "v1/models/")));
        assert_eq!(split("/proxy//v1"), Err(PathError::NotProxy));
        assert_eq!(split("/proxyx/a"), Err(PathError::NotProxy));
        // A dot name is not an upstream (the caller answers 404).
        assert_eq!(split("/proxy/../v1/agents"), Ok(("..", "v1/agents")));
    }

    #[test]
    fn refuses_tricks() {
        for p in [
            "..",
            "../v1/agents",
            "v1/../../v1/agents",
            "./v1",
            "v1/.",
            "%2e%2e/v1",
            "%2E%2E/v1",
            ".%2e/v1",
            "%2e./v1",
            "%2e",
            "...",
            "v1%2f..%2fagents",
            "v1%2Fagents",
            "v1%5c..",
            "v1\\..\\x",
            "v1//x",
            "v1/%00",
            "v1/%0d%0aHost:%20evil",
            "v1/%zz",
            "v1/%2",
            "v1/%252e%252e",
        ] {
            assert!(check_segments(p, true).is_err(), "accepted {p:?}");
        }
    }

    #[test]
    fn accepts_ordinary_paths() {
        for p in
            ["", "v1/chat/completions", "v1/models/", "v1/files/file-abc.jsonl", "a%20b", "v1/x.y", "v1/.well-known"]
        {
            assert_eq!(check_segments(p, true), Ok(()), "{p:?}");
        }
        assert!(check_segments("v1/", false).is_err());
    }
}
