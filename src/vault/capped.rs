//! Vault's answers read with a bound. vaultrs' HTTP client (rustify's) reads a whole answer
//! into memory however long it is: whatever answers at `vault.address` (a faulty node, a load
//! balancer's error page, anything in between) could make one cache miss hold gigabytes until
//! `vault.timeout`. The calls a client's request can cause, and the ones made on their own (a
//! connection read, a token lookup, a mount's description), go through [`exec`] instead,
//! which reads at most [`MAX_ANSWER`] bytes of an answer and refuses a longer one unread.

use async_trait::async_trait;
use rustify::endpoint::Endpoint as _;
use rustify::errors::ClientError as RestError;
use vaultrs::api::{EndpointError, EndpointResult};
use vaultrs::client::{Client as _, VaultClient};
use vaultrs::error::ClientError;

/// The most of one answer read from Vault. A connection's KV v2 read is a few KiB, a token's
/// lookup less; a megabyte leaves room for connections with many fields.
pub const MAX_ANSWER: usize = 1 << 20;

/// An answer longer than [`MAX_ANSWER`]: refused before the rest of it is read.
#[derive(Debug, thiserror::Error)]
#[error("an answer longer than {0} bytes")]
pub struct TooLong(pub usize);

/// A rustify client that sends through vaultrs' HTTP client (its settings, its connections)
/// and reads the answer's body up to `limit` bytes.
struct Capped<'a> {
    inner: &'a rustify::clients::reqwest::Client,
    limit: usize,
}

#[async_trait]
impl rustify::client::Client for Capped<'_> {
    fn base(&self) -> &str {
        &self.inner.base
    }

    async fn send(
        &self,
        req: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>, RestError> {
        let request = reqwest::Request::try_from(req)
            .map_err(|source| RestError::ReqwestBuildError { source })?;
        let url = request.url().to_string();
        let method = request.method().to_string();
        let mut response =
            self.inner
                .http
                .execute(request)
                .await
                .map_err(|e| RestError::RequestError {
                    source: e.into(),
                    url,
                    method,
                })?;
        let too_long = || RestError::ResponseError {
            source: TooLong(self.limit).into(),
        };
        if response
            .content_length()
            .is_some_and(|n| n > self.limit as u64)
        {
            return Err(too_long());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| RestError::ResponseError { source: e.into() })?
        {
            if body.len() + chunk.len() > self.limit {
                return Err(too_long());
            }
            body.extend_from_slice(&chunk);
        }
        let mut answer = http::Response::builder().status(response.status().as_u16());
        for (name, value) in response.headers() {
            answer = answer.header(name, value);
        }
        answer
            .body(body)
            .map_err(|e| RestError::ResponseError { source: e.into() })
    }
}

/// `vaultrs::api::exec_with_result`, reading at most [`MAX_ANSWER`] bytes of the answer: the
/// endpoint's `data`, an error status with Vault's `errors` as [`ClientError::APIError`], or
/// an empty `data` as [`ClientError::ResponseDataEmptyError`].
pub async fn exec<E>(client: &VaultClient, endpoint: E) -> Result<E::Response, ClientError>
where
    E: rustify::Endpoint,
{
    exec_within(client, endpoint, MAX_ANSWER).await
}

async fn exec_within<E>(
    client: &VaultClient,
    endpoint: E,
    limit: usize,
) -> Result<E::Response, ClientError>
where
    E: rustify::Endpoint,
{
    let capped = Capped {
        inner: client.http(),
        limit,
    };
    endpoint
        .with_middleware(client.middle())
        .exec(&capped)
        .await
        .map_err(api_error)?
        .wrap::<EndpointResult<_>>()
        .map_err(ClientError::from)?
        .data
        .ok_or(ClientError::ResponseDataEmptyError)
}

/// An error status whose body is Vault's `{"errors": [...]}`, as vaultrs reports it.
fn api_error(e: RestError) -> ClientError {
    if let RestError::ServerResponseError {
        code,
        content: Some(body),
    } = &e
    {
        if let Ok(said) = serde_json::from_str::<EndpointError>(body) {
            return ClientError::APIError {
                code: *code,
                errors: said.errors,
            };
        }
    }
    ClientError::from(e)
}
