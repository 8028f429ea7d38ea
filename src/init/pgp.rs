//! `init.recovery_pgp_keys`: one public key per key holder, from S3 or a file, handed to
//! Vault in the form `sys/init` expects (base64 of the binary `gpg --export`). Vault then
//! encrypts each share to its holder, and the agent escrows the encrypted shares.

use crate::aws::s3::ObjectStore;
use crate::error::{Error, Result};
use crate::retry;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::time::Duration;

/// Loads every key source in order.
pub async fn load_all<S: ObjectStore>(
    sources: &[String],
    s3: &S,
    deadline: Duration,
) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(sources.len());
    for src in sources {
        let bytes = if src.starts_with("s3://") {
            let (bucket, key) =
                crate::aws::s3::parse_url(src).ok_or_else(|| Error::ConfigInvalid {
                    path: "config".into(),
                    key: "init.recovery_pgp_keys".into(),
                    message: format!("{src:?} is not s3://bucket/key"),
                })?;
            retry::retry("fetch a PGP public key", deadline, || s3.get(&bucket, &key)).await?
        } else {
            std::fs::read(src).map_err(|e| Error::ConfigInvalid {
                path: "config".into(),
                key: "init.recovery_pgp_keys".into(),
                message: format!("cannot read {src}: {e}"),
            })?
        };
        out.push(normalize(&bytes).ok_or_else(|| Error::ConfigInvalid {
            path: "config".into(),
            key: "init.recovery_pgp_keys".into(),
            message: format!("{src} is not a PGP public key (binary, base64 or ASCII-armored)"),
        })?);
    }
    Ok(out)
}

/// Binary export -> base64; armored -> its base64 body; base64 text -> as is.
pub fn normalize(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok().map(str::trim);
    match text {
        Some(t) if t.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----") => {
            let body: String = t
                .lines()
                .skip(1)
                .skip_while(|l| l.contains(':'))
                .take_while(|l| !l.starts_with("-----END"))
                .filter(|l| !l.trim().is_empty() && !l.starts_with('='))
                .map(str::trim)
                .collect();
            B64.decode(&body).ok().map(|_| body)
        }
        Some(t) if !t.is_empty() && B64.decode(t.replace(['\n', '\r'], "")).is_ok() => {
            Some(t.replace(['\n', '\r'], ""))
        }
        // An OpenPGP packet starts with a byte that has the high bit set.
        _ if bytes.first().is_some_and(|b| b & 0x80 != 0) => Some(B64.encode(bytes)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_are_normalized() {
        let bin = [0x99u8, 0x01, 0x0d, 0x04, 0xaa];
        let b64 = B64.encode(bin);
        assert_eq!(normalize(&bin).unwrap(), b64);
        assert_eq!(normalize(format!("{b64}\n").as_bytes()).unwrap(), b64);
        let armored = format!(
            "-----BEGIN PGP PUBLIC KEY BLOCK-----\nComment: test\n\n{b64}\n=abcd\n-----END PGP PUBLIC KEY BLOCK-----\n"
        );
        assert_eq!(normalize(armored.as_bytes()).unwrap(), b64);
        assert!(normalize(b"hello world!").is_none());
    }
}
