//! Agent credentials: `bk_` + 32 base62 characters of randomness (190 bits) + a 6-character
//! checksum.
//!
//! The checksum lets a malformed or mistyped key be refused before any store lookup. Keys are
//! stored only as SHA-256 hashes (the key carries enough entropy that a fast hash is safe), and
//! a key never prints: it has no `Display`, and its `Debug` shows only the type name.

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "bk_";
const BODY_LEN: usize = 32;
const CHECK_LEN: usize = 6;
/// Length of every well-formed key.
pub const KEY_LEN: usize = PREFIX.len() + BODY_LEN + CHECK_LEN;
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A well-formed agent key (checksum verified). Never printed.
#[derive(Clone)]
pub struct ApiKey(String);

/// The stored form of a key: SHA-256, hex encoded.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyHash(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHash(..)")
    }
}

fn checksum(body: &str) -> String {
    let digest = Sha256::digest(body.as_bytes());
    let mut n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    let mut out = [0u8; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(out.to_vec()).expect("ascii")
}

/// Random base62 text of `len` characters (for ids and tokens).
pub fn random_base62(rng: &mut impl Rng, len: usize) -> String {
    (0..len).map(|_| ALPHABET[rng.random_range(0..62)] as char).collect()
}

impl ApiKey {
    /// Draws a new key from `rng` (which must be a cryptographically secure generator).
    pub fn generate(rng: &mut impl Rng) -> ApiKey {
        let body = random_base62(rng, BODY_LEN);
        let check = checksum(&body);
        ApiKey(format!("{PREFIX}{body}{check}"))
    }

    /// Accepts only the exact shape of a key with a correct checksum.
    pub fn parse(s: &str) -> Option<ApiKey> {
        if s.len() != KEY_LEN || !s.starts_with(PREFIX) || !s.is_ascii() {
            return None;
        }
        let rest = &s[PREFIX.len()..];
        if !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return None;
        }
        let (body, check) = rest.split_at(BODY_LEN);
        let want = checksum(body);
        if bool::from(want.as_bytes().ct_eq(check.as_bytes())) { Some(ApiKey(s.to_owned())) } else { None }
    }

    /// Looks like a Bulkhead key (prefix only); used to tell agent keys from the admin token.
    pub fn looks_like_key(s: &str) -> bool {
        s.starts_with(PREFIX)
    }

    /// The secret itself, for the one answer that shows it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash(hex_lower(&Sha256::digest(self.0.as_bytes())))
    }
}

/// Lower-case hex of `bytes`, as `hex::encode` writes it, without its character-by-character
/// collection (this runs for every request that carries a key).
pub fn hex_lower(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    // The buffer is exactly twice as long as the input and hex digits are ASCII: neither fails.
    let _ = hex::encode_to_slice(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

impl KeyHash {
    pub fn from_stored(s: String) -> KeyHash {
        KeyHash(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        self.0.len() == other.0.len() && bool::from(self.0.as_bytes().ct_eq(other.0.as_bytes()))
    }
}

/// Constant-time equality of two secrets of any length (the admin token).
pub fn secret_eq(a: &str, b: &str) -> bool {
    let ha = Sha256::digest(a.as_bytes());
    let hb = Sha256::digest(b.as_bytes());
    bool::from(ha.ct_eq(&hb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_lower_matches_hex_encode() {
        for bytes in [&b""[..], &[0u8, 1, 0x7f, 0x80, 0xab, 0xff][..], &Sha256::digest(b"bh_key")[..]] {
            assert_eq!(hex_lower(bytes), hex::encode(bytes));
        }
    }

    #[test]
    fn generated_keys_parse_and_tampering_is_caught() {
        let mut rng = rand::rng();
        let k = ApiKey::generate(&mut rng);
        assert_eq!(k.expose().len(), KEY_LEN);
        assert!(ApiKey::parse(k.expose()).is_some());
        assert_eq!(format!("{k:?}"), "ApiKey(..)");
        // Flip every position of the body: the checksum must notice each change.
        let s = k.expose().to_string();
        for i in PREFIX.len()..s.len() {
            let mut b = s.clone().into_bytes();
            b[i] = if b[i] == b'a' { b'b' } else { b'a' };
            let t = String::from_utf8(b).unwrap();
            if t != s {
                assert!(ApiKey::parse(&t).is_none(), "position {i}");
            }
        }
        assert!(ApiKey::parse("").is_none());
        assert!(ApiKey::parse("bk_").is_none());
        assert!(ApiKey::parse(&s[..s.len() - 1]).is_none());
    }

    #[test]
    fn hashes_compare() {
        let mut rng = rand::rng();
        let a = ApiKey::generate(&mut rng);
        let b = ApiKey::generate(&mut rng);
        assert!(a.hash().ct_eq(&a.hash()));
        assert!(!a.hash().ct_eq(&b.hash()));
        assert!(secret_eq("x", "x") && !secret_eq("x", "y"));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,60}") {
            let _ = ApiKey::parse(&s);
        }
    }
}
