//! The path of a proxied call: `/proxy/{upstream}/{rest}`, checked so that `rest` can never
//! leave the upstream's base path.
//!
//! Servers and intermediaries differ in how they treat dot segments, encoded dots, encoded
//! slashes and backslashes, path parameters (`..;x`, which Tomcat, Jetty and Spring read as `..`)
//! and overlong UTF-8 (`%C0%AE`, which lenient decoders read as `.`), so any of them anywhere in
//! `rest` refuses the call instead of being normalised: what is forwarded is exactly what was
//! checked.

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
        // Escapes must decode to well-formed UTF-8: an overlong form (`%C0%AE` for `.`, `%C0%AF`
        // for `/`) is what a lenient decoder downstream would turn into a separator or a dot.
        if std::str::from_utf8(&d).is_err() {
            return Err(PathError::Tricky("an escape that is not well-formed UTF-8"));
        }
        // Servers that take `;` as the start of path parameters (Tomcat, Jetty, Spring) see only
        // what comes before it: `..;x` is `..` to them, and `;x` an empty segment.
        let base = d.split(|&c| c == b';').next().unwrap_or_default();
        if base.is_empty() {
            return Err(PathError::Tricky("an empty path segment before path parameters"));
        }
        // A decoded dot-only segment of any length is refused (some servers trim or fold them);
        // so are encoded separators and control characters.
        if base.iter().all(|&c| c == b'.') {
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

    /// Hardening finding 7: path parameters and overlong UTF-8 hide dot segments from a
    /// checker that does not know them, while Tomcat/Jetty/Spring upstreams read them as `..`.
    #[test]
    fn gateway_paths_with_path_parameters_or_overlong_utf8_are_refused() {
        for p in [
            "..;/v1/agents",
            "v1/..;/admin",
            "v1/..;jsessionid=x/admin",
            "%2e%2e;/admin",
            "%2E%2e;x/admin",
            ".;/v1",
            "v1/.;x",
            "v1/;x/admin",
            "v1/%3b/admin",
            "..%3b/admin",
            "v1/%C0%AE%C0%AE/admin",
            "v1/%c0%ae/admin",
            "v1%C0%AFadmin",
            "v1/%E0%80%AE%E0%80%AE/admin",
            "v1/%ff",
            "v1/%80",
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
        // Path parameters on an ordinary segment and UTF-8 escapes are fine.
        for p in ["v1/files;v=2", "v1/%C3%A9t%C3%A9", "v1/a;b;c/d"] {
            assert_eq!(check_segments(p, true), Ok(()), "{p:?}");
        }
    }

    /// How a lenient server may read a path it was sent: percent-decoding repeated until
    /// nothing changes, overlong two- and three-byte forms decoded, backslashes as slashes,
    /// and `;` parameters cut off each segment. Returns its segments.
    fn lenient_segments(rest: &str) -> Vec<Vec<u8>> {
        let mut bytes = rest.as_bytes().to_vec();
        for _ in 0..4 {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let mut out = Vec::new();
            let b = text.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'%'
                    && let (Some(h), Some(l)) =
                        (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex))
                {
                    out.push(h << 4 | l);
                    i += 3;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            if out == bytes {
                break;
            }
            bytes = out;
        }
        // Overlong forms: C0/C1 xx and E0 80..9F xx decode to ASCII.
        let mut folded = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                0xC0 | 0xC1 if i + 1 < bytes.len() => {
                    folded.push(((bytes[i] & 0x1F) << 6) | (bytes[i + 1] & 0x3F));
                    i += 2;
                }
                0xE0 if i + 2 < bytes.len() && bytes[i + 1] < 0xA0 => {
                    folded.push(((bytes[i + 1] & 0x3F) << 6) | (bytes[i + 2] & 0x3F));
                    i += 3;
                }
                b'\\' => {
                    folded.push(b'/');
                    i += 1;
                }
                c => {
                    folded.push(c);
                    i += 1;
                }
            }
        }
        folded.split(|&c| c == b'/').map(|seg| seg.split(|&c| c == b';').next().unwrap_or_default().to_vec()).collect()
    }

    proptest::proptest! {
        /// Whatever pieces a path is made of, a path the gateway accepts has no segment that a
        /// lenient upstream would read as `.` or `..` (or as empty, folding into its neighbour).
        #[test]
        fn an_accepted_path_never_climbs_out_for_a_lenient_upstream(pieces in proptest::collection::vec(
            proptest::sample::select(vec![
                "v1", "a", ".", "..", "/", ";", ";x", "%2e", "%2E", "%2f", "%5c", "\\", "%25", "2e", "%c0", "%ae",
                "%C0%AE", "%e0%80%ae", "%3b", "%00", "%", "x=1", "%C3%A9",
            ]),
            1..8,
        )) {
            let rest: String = pieces.concat();
            if check_segments(&rest, true).is_ok() {
                let segs = lenient_segments(&rest);
                let n = segs.len();
                for (i, seg) in segs.iter().enumerate() {
                    let folds = seg.is_empty() && i + 1 < n;
                    let dots = !seg.is_empty() && seg.iter().all(|&c| c == b'.');
                    proptest::prop_assert!(
                        !folds && !dots,
                        "accepted {rest:?}, read leniently as {segs:?}"
                    );
                }
            }
        }
    }
}
