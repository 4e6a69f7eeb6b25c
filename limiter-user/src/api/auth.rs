//! Authentication of TCP clients: the bearer token, compared in constant time.

use std::{os::unix::fs::PermissionsExt as _, path::Path, sync::Arc};

use anyhow::Context as _;
use tonic::{Request, Status, service::Interceptor};

/// Checks `authorization: Bearer TOKEN` on every request (TCP only), in constant time.
#[derive(Clone)]
pub struct BearerAuth {
    token: Arc<Vec<u8>>,
}

impl BearerAuth {
    pub fn new(token: &str) -> BearerAuth {
        BearerAuth {
            token: Arc::new(token.as_bytes().to_vec()),
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes);
        match given {
            Some(given) if constant_time_eq(given, &self.token) => Ok(request),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated(
                "missing credentials: send `authorization: Bearer <token>`",
            )),
        }
    }
}

/// Compares without an early exit on the first differing byte (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a token file: the token is its content without surrounding whitespace; it must not be
/// empty and the file must not be readable by others.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("token file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        anyhow::bail!(
            "token file {} is readable by group or others (mode {:o}): chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    let token = token.trim();
    if token.len() < 16 {
        anyhow::bail!(
            "token file {}: the token must be at least 16 characters",
            path.display()
        );
    }
    Ok(token.to_string())
}
