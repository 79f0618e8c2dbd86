//! API keys: `xck_` + a 12-hex-digit id + `_` + 64 hex digits of secret. The daemon keeps the
//! id, a random salt and SHA-256(salt || secret); a presented key is checked by recomputing
//! the hash and comparing in constant time. Keys are random (256 bits), so a fast hash is
//! enough: nothing can be guessed from it that a brute force over 2^256 would not need.

use crate::model::{now, StoredKey};
use crate::ControlError;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// `n` random bytes from the kernel.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], ControlError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b)
        .map_err(|e| ControlError::io("reading random bytes", std::io::Error::other(e.to_string())))?;
    Ok(b)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hash(salt: &[u8], secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(secret.as_bytes());
    hex(&h.finalize())
}

/// The bytes of a hex string (None if it is not one).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A new key for `tenant`: what to store, and the key to show once.
pub fn new_key(tenant: &str) -> Result<(StoredKey, String), ControlError> {
    let id = hex(&random_bytes::<6>()?);
    let secret = hex(&random_bytes::<32>()?);
    let salt = random_bytes::<16>()?;
    let stored = StoredKey {
        id: id.clone(),
        tenant: tenant.into(),
        salt: hex(&salt),
        hash: hash(&salt, &secret),
        created: now(),
    };
    Ok((stored, format!("xck_{id}_{secret}")))
}

/// Splits a presented key into its id and secret.
pub fn parse_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("xck_")?;
    let (id, secret) = rest.split_once('_')?;
    let hexy = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hexy(id, 12) && hexy(secret, 64)).then_some((id, secret))
}

/// Whether `secret` is the secret of `stored`.
pub fn verify(stored: &StoredKey, secret: &str) -> bool {
    let Some(salt) = unhex(&stored.salt) else {
        return false;
    };
    hash(&salt, secret).as_bytes().ct_eq(stored.hash.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_verifies_and_a_changed_one_does_not() {
        let (stored, key) = new_key("acme").expect("key");
        let (id, secret) = parse_key(&key).expect("parse");
        assert_eq!(id, stored.id);
        assert!(verify(&stored, secret));
        let mut wrong = secret.to_string();
        wrong.replace_range(0..1, if secret.starts_with('0') { "1" } else { "0" });
        assert!(!verify(&stored, &wrong));
        assert!(!key.contains(&stored.hash));
    }

    #[test]
    fn malformed_keys_do_not_parse() {
        for bad in [
            "",
            "xck_",
            "xck_abc_def",
            "Bearer x",
            &format!("xck_{}_{}", "g".repeat(12), "0".repeat(64)),
        ] {
            assert!(parse_key(bad).is_none(), "{bad}");
        }
    }
}
