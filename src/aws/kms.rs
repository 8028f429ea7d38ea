//! KMS: encrypt/decrypt with an encryption context, and data keys, behind a trait.

use crate::aws::sdk_error;
use crate::error::Result;
use aws_smithy_types::Blob;
use std::future::Future;
use zeroize::Zeroizing;

/// An encryption context: names what a ciphertext is, so it cannot be swapped for another.
pub type Context = Vec<(String, String)>;

pub trait Kms: Send + Sync {
    fn encrypt(
        &self,
        key_id: &str,
        plaintext: &[u8],
        ctx: &Context,
    ) -> impl Future<Output = Result<Vec<u8>>> + Send;
    fn decrypt(
        &self,
        ciphertext: &[u8],
        ctx: &Context,
    ) -> impl Future<Output = Result<Zeroizing<Vec<u8>>>> + Send;
    /// `DescribeKey`: the key's ARN, proving it exists and is reachable (a harmless call).
    fn describe(&self, key_id: &str) -> impl Future<Output = Result<String>> + Send {
        let _ = key_id;
        async {
            Err(crate::error::Error::Internal(
                "describe not supported".into(),
            ))
        }
    }
    /// (plaintext AES-256 key, its ciphertext).
    fn data_key(
        &self,
        key_id: &str,
        ctx: &Context,
    ) -> impl Future<Output = Result<(Zeroizing<Vec<u8>>, Vec<u8>)>> + Send;
}

pub struct SdkKms {
    client: aws_sdk_kms::Client,
}

impl SdkKms {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        SdkKms {
            client: aws_sdk_kms::Client::new(config),
        }
    }
}

fn describe(ctx: &Context) -> String {
    ctx.iter()
        .map(|(_, v)| v.as_str())
        .collect::<Vec<_>>()
        .join("/")
}

impl Kms for SdkKms {
    async fn describe(&self, key_id: &str) -> Result<String> {
        let out = self
            .client
            .describe_key()
            .key_id(key_id)
            .send()
            .await
            .map_err(|e| sdk_error("kms:DescribeKey", key_id.to_owned(), e))?;
        Ok(out
            .key_metadata()
            .map(|m| m.arn().unwrap_or(m.key_id()).to_owned())
            .unwrap_or_default())
    }

    async fn encrypt(&self, key_id: &str, plaintext: &[u8], ctx: &Context) -> Result<Vec<u8>> {
        let mut req = self
            .client
            .encrypt()
            .key_id(key_id)
            .plaintext(Blob::new(plaintext));
        for (k, v) in ctx {
            req = req.encryption_context(k, v);
        }
        let out = req
            .send()
            .await
            .map_err(|e| sdk_error("kms:Encrypt", format!("{key_id} ({})", describe(ctx)), e))?;
        Ok(out
            .ciphertext_blob()
            .map(|b| b.as_ref().to_vec())
            .unwrap_or_default())
    }

    async fn decrypt(&self, ciphertext: &[u8], ctx: &Context) -> Result<Zeroizing<Vec<u8>>> {
        let mut req = self.client.decrypt().ciphertext_blob(Blob::new(ciphertext));
        for (k, v) in ctx {
            req = req.encryption_context(k, v);
        }
        let out = req
            .send()
            .await
            .map_err(|e| sdk_error("kms:Decrypt", describe(ctx), e))?;
        Ok(Zeroizing::new(
            out.plaintext()
                .map(|b| b.as_ref().to_vec())
                .unwrap_or_default(),
        ))
    }

    async fn data_key(&self, key_id: &str, ctx: &Context) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>)> {
        let mut req = self
            .client
            .generate_data_key()
            .key_id(key_id)
            .key_spec(aws_sdk_kms::types::DataKeySpec::Aes256);
        for (k, v) in ctx {
            req = req.encryption_context(k, v);
        }
        let out = req.send().await.map_err(|e| {
            sdk_error(
                "kms:GenerateDataKey",
                format!("{key_id} ({})", describe(ctx)),
                e,
            )
        })?;
        Ok((
            Zeroizing::new(
                out.plaintext()
                    .map(|b| b.as_ref().to_vec())
                    .unwrap_or_default(),
            ),
            out.ciphertext_blob()
                .map(|b| b.as_ref().to_vec())
                .unwrap_or_default(),
        ))
    }
}
