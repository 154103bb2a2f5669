//! Tokens: HS256 JWT verification and minting (SPEC §3), and the admin token check.

use confab_shared::claims::Claims;
use confab_shared::limits::JWT_LEEWAY_S;
use confab_shared::{UserId, WorkspaceId};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
}

/// Verifies and mints client and bot tokens with one secret.
#[derive(Clone)]
pub struct TokenKeys {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

impl TokenKeys {
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = JWT_LEEWAY_S;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        TokenKeys {
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// Verifies signature, algorithm, expiry (with 60 s leeway) and claim types.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        Ok(jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?.claims)
    }

    /// Mints a token for `user` of `workspace`, valid for `ttl_s` seconds.
    pub fn mint(
        &self,
        workspace: &WorkspaceId,
        user: &UserId,
        bot: bool,
        ttl_s: u64,
    ) -> Result<String, TokenError> {
        let claims = Claims {
            sub: user.clone(),
            wsp: workspace.clone(),
            exp: confab_shared::now_ms() / 1000 + ttl_s,
            name: None,
            bot: bot.then_some(true),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }
}

/// Compares two secrets in time independent of where they differ.
pub fn secrets_match(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The gateway of a request and the bearer token it carries, if any: what both the HTTP API's
/// and the admin API's authentication start from.
pub fn request_bearer(
    req: &actix_web::HttpRequest,
) -> Result<(std::sync::Arc<crate::server::Gateway>, Option<&str>), crate::api_error::ApiError> {
    let gateway = req
        .app_data::<actix_web::web::Data<crate::server::Gateway>>()
        .map(|g| g.clone().into_inner())
        .ok_or_else(|| crate::api_error::ApiError::unavailable("gateway not configured"))?;
    let header = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok());
    Ok((gateway, bearer(header)))
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_and_other_secrets_do_not() {
        let keys = TokenKeys::new("s1");
        let ws = WorkspaceId::new("demo").unwrap_or_else(|e| panic!("{e}"));
        let user = UserId::new("alice").unwrap_or_else(|e| panic!("{e}"));
        let token = keys.mint(&ws, &user, false, 60).unwrap_or_default();
        let claims = keys.verify(&token).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(claims.sub, user);
        assert!(TokenKeys::new("s2").verify(&token).is_err());
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(secrets_match("dev-admin", "dev-admin"));
        assert!(!secrets_match("dev-admim", "dev-admin"));
        assert!(!secrets_match("dev", "dev-admin"));
    }
}
