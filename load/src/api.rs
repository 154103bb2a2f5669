//! Talking to confab outside the WebSocket: minting tokens and setting up channels over the
//! HTTP API (SPEC §5, §7), and checking that a target answers at all.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use confab_shared::claims::Claims;
use confab_shared::{UserId, WorkspaceId};
use serde::Deserialize;

/// Token lifetime: long enough for the longest run.
const TOKEN_TTL_S: u64 = 6 * 3600;

/// How client tokens are obtained.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// Signed here with the deployment's JWT secret (HS256), like an app backend would.
    Jwt { secret: String },
    /// Minted by the server through `POST /admin/v1/tokens`.
    Admin { admin_token: String },
}

/// An HTTP client for one confab target.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    workspace: String,
    tokens: TokenSource,
}

#[derive(Deserialize)]
struct TokenReply {
    token: String,
}

#[derive(Deserialize)]
struct ChannelReply {
    id: String,
}

impl Api {
    /// `base` is the target's `http://host:port`.
    pub fn new(base: &str, workspace: &str, tokens: TokenSource) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build()
            .context("building the http client")?;
        Ok(Api {
            http,
            base: base.trim_end_matches('/').to_string(),
            workspace: workspace.to_string(),
            tokens,
        })
    }

    pub fn workspace(&self) -> &str {
        &self.workspace
    }

    /// A client token for `user` of the workspace.
    pub async fn token(&self, user: &str) -> Result<String> {
        match &self.tokens {
            TokenSource::Jwt { secret } => mint_jwt(secret, &self.workspace, user, TOKEN_TTL_S),
            TokenSource::Admin { admin_token } => {
                let reply = self
                    .http
                    .post(format!("{}/admin/v1/tokens", self.base))
                    .bearer_auth(admin_token)
                    .json(&serde_json::json!({
                        "workspace": self.workspace, "user": user, "ttl_s": TOKEN_TTL_S
                    }))
                    .send()
                    .await
                    .context("POST /admin/v1/tokens")?;
                let reply: TokenReply = expect_status(reply, 201, "POST /admin/v1/tokens")
                    .await?
                    .json()
                    .await
                    .context("reading the token reply")?;
                Ok(reply.token)
            }
        }
    }

    /// Creates a public channel named `name` with the caller and up to 1,000 `members`
    /// (SPEC §5); returns its id.
    pub async fn create_channel(
        &self,
        token: &str,
        name: &str,
        members: &[String],
    ) -> Result<String> {
        let reply = self
            .http
            .post(format!("{}/v1/channels", self.base))
            .bearer_auth(token)
            .json(&serde_json::json!({"name": name, "kind": "public", "members": members}))
            .send()
            .await
            .context("POST /v1/channels")?;
        let reply: ChannelReply = expect_status(reply, 201, "POST /v1/channels")
            .await?
            .json()
            .await
            .context("reading the channel reply")?;
        Ok(reply.id)
    }

    /// Adds `user` to `channel` (the caller must be a member).
    pub async fn add_member(&self, token: &str, channel: &str, user: &str) -> Result<()> {
        let reply = self
            .http
            .post(format!("{}/v1/channels/{channel}/members", self.base))
            .bearer_auth(token)
            .json(&serde_json::json!({"user": user}))
            .send()
            .await
            .context("POST /v1/channels/{id}/members")?;
        expect_status(reply, 200, "POST /v1/channels/{id}/members").await?;
        Ok(())
    }
}

/// Signs an HS256 client token with the claims of SPEC §3.
pub fn mint_jwt(secret: &str, workspace: &str, user: &str, ttl_s: u64) -> Result<String> {
    let claims = Claims {
        sub: UserId::new(user).with_context(|| format!("user id {user:?}"))?,
        wsp: WorkspaceId::new(workspace).with_context(|| format!("workspace id {workspace:?}"))?,
        exp: confab_shared::now_ms() / 1000 + ttl_s,
        name: None,
        bot: None,
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .context("signing a token")
}

async fn expect_status(
    reply: reqwest::Response,
    want: u16,
    what: &str,
) -> Result<reqwest::Response> {
    let status = reply.status();
    if status.as_u16() == want {
        return Ok(reply);
    }
    let body = reply.text().await.unwrap_or_default();
    bail!(
        "{what} answered {status}: {}",
        body.chars().take(300).collect::<String>()
    )
}

/// Checks that something accepts TCP connections at `base` (`http://host:port`), with a clear
/// error when nothing does.
pub async fn check_reachable(base: &str) -> Result<()> {
    let addr = host_port(base)?;
    match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => bail!("target {base} is unreachable: {e}"),
        Err(_) => bail!("target {base} is unreachable: no answer within 3 s"),
    }
}

/// `host:port` of an `http://` or `ws://` base URL.
pub fn host_port(base: &str) -> Result<String> {
    let rest = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("ws://"))
        .with_context(|| format!("target {base:?} must start with http:// (or ws://)"))?;
    let host_port = rest.split('/').next().unwrap_or(rest);
    if !host_port.contains(':') {
        bail!("target {base:?} must name a port");
    }
    Ok(host_port.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_token_verifies_with_the_secret_and_carries_the_claims() {
        let token = mint_jwt("dev-secret", "demo", "alice", 60).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"dev-secret"),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims.sub.as_ref(), "alice");
        assert_eq!(data.claims.wsp.as_ref(), "demo");
        assert!(jsonwebtoken::decode::<Claims>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"other"),
            &validation,
        )
        .is_err());
        assert!(mint_jwt("s", "demo", "not valid!", 60).is_err());
    }

    #[test]
    fn host_port_of_targets() {
        assert_eq!(
            host_port("http://127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080"
        );
        assert_eq!(host_port("ws://localhost:9/v1/ws").unwrap(), "localhost:9");
        assert!(host_port("127.0.0.1:8080").is_err());
        assert!(host_port("http://127.0.0.1").is_err());
    }

    #[tokio::test]
    async fn unreachable_target_is_a_clear_error() {
        // Bind then drop to get a port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = check_reachable(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("unreachable"), "{err}");
    }
}
