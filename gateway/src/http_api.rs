//! The HTTP API for bots and apps (SPEC §5), authenticated with a user or bot JWT.
//!
//! Each endpoint is a thin translation to a [`CellOp`] performed by the workspace's cell, the
//! same op a WebSocket request becomes, so both paths share one set of rules. Requests are
//! rate-limited per user with the client rate of SPEC §4.

use std::future::{ready, Ready};
use std::sync::Arc;
use std::time::Instant;

use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use confab_shared::client::ClientRequest;
use confab_shared::limits::MAX_PRESENCE_USERS;
use confab_shared::link::{Caller, CellOp, CellReply, ChannelOp, UserOp, WebhookOp, WorkspaceOp};
use confab_shared::server::{ChannelInfo, ChannelKind};
use confab_shared::wire::request_op;
use confab_shared::{ChannelId, ErrorCode, UserId};
use serde::Deserialize;
use serde_json::json;

use crate::api_error::ApiError;
use crate::auth::request_bearer;
use crate::server::Gateway;

/// Routes of the HTTP API.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/v1")
            .route("/channels", web::post().to(create_channel))
            .route("/channels", web::get().to(list_channels))
            .route("/channels/{id}", web::get().to(get_channel))
            .route("/channels/{id}/messages", web::post().to(post_message))
            .route("/channels/{id}/messages", web::get().to(get_messages))
            .route("/channels/{id}/members", web::post().to(add_member))
            .route("/channels/{id}/members", web::get().to(list_members))
            .route(
                "/channels/{id}/members/{user}",
                web::delete().to(remove_member),
            )
            .route("/dms", web::post().to(open_dm))
            .route("/presence", web::get().to(presence))
            .route("/webhooks", web::post().to(create_webhook))
            .route("/webhooks", web::get().to(list_webhooks))
            .route("/webhooks/{id}", web::delete().to(delete_webhook))
            .route("/webhooks/{id}/enable", web::post().to(enable_webhook)),
    );
}

/// The authenticated caller of an HTTP request.
pub struct UserAuth {
    gateway: Arc<Gateway>,
    caller: Caller,
}

impl UserAuth {
    /// The cell op of a request, checked as a WebSocket request is (one conversion,
    /// `confab_shared::wire::request_op`).
    fn cell_op(&self, request: ClientRequest) -> Result<CellOp, ApiError> {
        let max_text = self.gateway.config.limits.max_text_bytes;
        request_op(request, &self.caller.user, max_text)?
            .ok_or_else(|| ApiError::bad_request("not a cell request"))
    }
}

impl FromRequest for UserAuth {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

fn authenticate(req: &HttpRequest) -> Result<UserAuth, ApiError> {
    let (gateway, token) = request_bearer(req)?;
    let token = token.ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
    let claims = gateway
        .tokens
        .verify(token)
        .map_err(|_| ApiError::unauthorized("bad or expired token"))?;
    if let Err(retry_after_ms) = gateway.http_rate(&claims.wsp, &claims.sub, Instant::now()) {
        let mut e = ApiError::new(ErrorCode::RateLimited, "too many requests");
        e.retry_after_ms = Some(retry_after_ms);
        return Err(e);
    }
    Ok(UserAuth {
        gateway,
        caller: Caller {
            workspace: claims.wsp,
            user: claims.sub,
            session: None,
        },
    })
}

impl UserAuth {
    async fn perform(&self, op: impl Into<CellOp>) -> Result<CellReply, ApiError> {
        let op = op.into();
        Ok(self.gateway.links.request(self.caller.clone(), op).await?)
    }
}

fn unexpected(reply: &CellReply) -> ApiError {
    tracing::error!(?reply, "cell sent a reply of the wrong kind");
    ApiError::unavailable("unexpected reply from the cell")
}

#[derive(Deserialize)]
struct CreateChannelBody {
    name: String,
    kind: ChannelKind,
    #[serde(default)]
    members: Vec<UserId>,
}

async fn create_channel(
    auth: UserAuth,
    body: web::Json<CreateChannelBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    if body.kind == ChannelKind::Dm {
        return Err(ApiError::bad_request(
            "use POST /v1/dms for direct messages",
        ));
    }
    let op = WorkspaceOp::CreateChannel {
        name: body.name,
        kind: body.kind,
        members: body.members,
    };
    match auth.perform(op).await? {
        CellReply::Channel(info) => Ok(HttpResponse::Created().json(info)),
        other => Err(unexpected(&other)),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    scope: Option<String>,
}

async fn list_channels(
    auth: UserAuth,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let public = match query.scope.as_deref() {
        None | Some("member") | Some("mine") => false,
        Some("public") => true,
        Some(other) => return Err(ApiError::bad_request(format!("unknown scope {other:?}"))),
    };
    let channels = channels(&auth, public).await?;
    Ok(HttpResponse::Ok().json(json!({ "channels": channels })))
}

async fn channels(auth: &UserAuth, public: bool) -> Result<Vec<ChannelInfo>, ApiError> {
    match auth.perform(UserOp::ListChannels { public }).await? {
        CellReply::Channels(channels) => Ok(channels),
        other => Err(unexpected(&other)),
    }
}

async fn get_channel(auth: UserAuth, id: web::Path<ChannelId>) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    for public in [false, true] {
        if let Some(info) = channels(&auth, public)
            .await?
            .into_iter()
            .find(|c| c.id == id)
        {
            return Ok(HttpResponse::Ok().json(info));
        }
    }
    Err(ApiError::not_found("channel not found"))
}

#[derive(Deserialize)]
struct PostMessageBody {
    text: String,
    #[serde(default)]
    client_msg_id: Option<String>,
    #[serde(default)]
    thread: Option<u64>,
}

/// The `Idempotency-Key` header, an alias of the body's `client_msg_id` (SPEC additions: a
/// retry after `unavailable` must carry the same key, since the first attempt may have been
/// stored). Both given and different is a contradiction the client must resolve.
fn idempotency_key(
    req: &HttpRequest,
    client_msg_id: Option<String>,
) -> Result<Option<String>, ApiError> {
    let Some(header) = req.headers().get("idempotency-key") else {
        return Ok(client_msg_id);
    };
    let header = header
        .to_str()
        .map_err(|_| ApiError::bad_request("Idempotency-Key must be visible ASCII"))?
        .to_string();
    match client_msg_id {
        Some(id) if id != header => Err(ApiError::bad_request(
            "Idempotency-Key and client_msg_id differ",
        )),
        _ => Ok(Some(header)),
    }
}

async fn post_message(
    auth: UserAuth,
    req: HttpRequest,
    id: web::Path<ChannelId>,
    body: web::Json<PostMessageBody>,
) -> Result<HttpResponse, ApiError> {
    let mut body = body.into_inner();
    body.client_msg_id = idempotency_key(&req, body.client_msg_id)?;
    let request = ClientRequest::Send {
        channel: id.into_inner(),
        text: body.text,
        client_msg_id: body.client_msg_id,
        thread: body.thread,
    };
    match auth.perform(auth.cell_op(request)?).await? {
        CellReply::Ack { channel, seq, ts } => {
            Ok(HttpResponse::Created().json(json!({"channel": channel, "seq": seq, "ts": ts})))
        }
        other => Err(unexpected(&other)),
    }
}

#[derive(Deserialize)]
struct HistoryQuery {
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<u32>,
}

async fn get_messages(
    auth: UserAuth,
    id: web::Path<ChannelId>,
    query: web::Query<HistoryQuery>,
) -> Result<HttpResponse, ApiError> {
    let request = ClientRequest::History {
        channel: id.into_inner(),
        before: query.before,
        after: query.after,
        limit: query.limit,
    };
    match auth.perform(auth.cell_op(request)?).await? {
        CellReply::History {
            messages, has_more, ..
        } => Ok(HttpResponse::Ok().json(json!({"messages": messages, "has_more": has_more}))),
        other => Err(unexpected(&other)),
    }
}

#[derive(Deserialize)]
struct UserBody {
    user: UserId,
}

async fn add_member(
    auth: UserAuth,
    id: web::Path<ChannelId>,
    body: web::Json<UserBody>,
) -> Result<HttpResponse, ApiError> {
    let op = CellOp::channel(
        id.into_inner(),
        ChannelOp::AddMember {
            user: body.into_inner().user,
        },
    );
    seq_reply(auth.perform(op).await?)
}

async fn remove_member(
    auth: UserAuth,
    path: web::Path<(ChannelId, UserId)>,
) -> Result<HttpResponse, ApiError> {
    let (channel, user) = path.into_inner();
    seq_reply(
        auth.perform(CellOp::channel(channel, ChannelOp::RemoveMember { user }))
            .await?,
    )
}

fn seq_reply(reply: CellReply) -> Result<HttpResponse, ApiError> {
    match reply {
        CellReply::Ack { seq, .. } => Ok(HttpResponse::Ok().json(json!({ "seq": seq }))),
        other => Err(unexpected(&other)),
    }
}

async fn list_members(auth: UserAuth, id: web::Path<ChannelId>) -> Result<HttpResponse, ApiError> {
    let op = CellOp::channel(id.into_inner(), ChannelOp::ListMembers);
    match auth.perform(op).await? {
        CellReply::Members(members) => Ok(HttpResponse::Ok().json(json!({ "members": members }))),
        other => Err(unexpected(&other)),
    }
}

async fn open_dm(auth: UserAuth, body: web::Json<UserBody>) -> Result<HttpResponse, ApiError> {
    let op = WorkspaceOp::OpenDm {
        user: body.into_inner().user,
    };
    match auth.perform(op).await? {
        CellReply::Channel(info) => Ok(HttpResponse::Ok().json(info)),
        other => Err(unexpected(&other)),
    }
}

#[derive(Deserialize)]
struct CreateWebhookBody {
    url: String,
    events: Vec<String>,
    #[serde(default)]
    channels: Option<Vec<ChannelId>>,
}

/// `POST /v1/webhooks` (SPEC §5, §6): the secret is in this answer only.
async fn create_webhook(
    auth: UserAuth,
    body: web::Json<CreateWebhookBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let op = WebhookOp::Create {
        url: body.url,
        events: body.events,
        channels: body.channels,
    };
    match auth.perform(op).await? {
        CellReply::WebhookCreated { id, secret } => {
            Ok(HttpResponse::Created().json(json!({"id": id, "secret": secret})))
        }
        other => Err(unexpected(&other)),
    }
}

async fn list_webhooks(auth: UserAuth) -> Result<HttpResponse, ApiError> {
    match auth.perform(WebhookOp::List).await? {
        CellReply::Webhooks(webhooks) => {
            Ok(HttpResponse::Ok().json(json!({ "webhooks": webhooks })))
        }
        other => Err(unexpected(&other)),
    }
}

/// A webhook id from a path: ids are `[A-Za-z0-9_-]`, 1 to 64 characters; anything else
/// names no webhook.
fn webhook_id(raw: String) -> Result<String, ApiError> {
    let valid = !raw.is_empty()
        && raw.len() <= 64
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(raw)
    } else {
        Err(ApiError::not_found("webhook not found"))
    }
}

async fn delete_webhook(auth: UserAuth, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = webhook_id(id.into_inner())?;
    match auth.perform(WebhookOp::Delete { id }).await? {
        CellReply::Done => Ok(HttpResponse::Ok().json(json!({}))),
        other => Err(unexpected(&other)),
    }
}

async fn enable_webhook(auth: UserAuth, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = webhook_id(id.into_inner())?;
    match auth.perform(WebhookOp::Enable { id: id.clone() }).await? {
        CellReply::Done => Ok(HttpResponse::Ok().json(json!({"id": id, "status": "active"}))),
        other => Err(unexpected(&other)),
    }
}

#[derive(Deserialize)]
struct PresenceQuery {
    users: Option<String>,
}

async fn presence(
    auth: UserAuth,
    query: web::Query<PresenceQuery>,
) -> Result<HttpResponse, ApiError> {
    let raw = query.users.as_deref().unwrap_or("");
    let users = raw
        .split(',')
        .filter(|u| !u.is_empty())
        .map(|u| UserId::new(u).map_err(|e| ApiError::bad_request(format!("user {u:?}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    if users.len() > MAX_PRESENCE_USERS {
        return Err(ApiError::bad_request("at most 500 users"));
    }
    let users = auth
        .gateway
        .presence
        .statuses(&auth.caller.workspace, users)
        .await;
    Ok(HttpResponse::Ok().json(json!({ "users": users })))
}
