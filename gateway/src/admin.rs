//! The admin API (SPEC §7), authenticated with the admin token: cells (drain, undrain),
//! workspaces (create, list, move), tokens.

use std::future::{ready, Ready};
use std::sync::Arc;

use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use confab_directory::{place, CreateWorkspaceError, WorkspaceRecord};
use confab_shared::link::AdminOp;
use confab_shared::server::ChannelKind;
use confab_shared::{CellId, ChannelId, ErrorCode, UserId, WorkspaceId};
use serde::Deserialize;
use serde_json::json;

use crate::api_error::ApiError;
use crate::auth::{request_bearer, secrets_match};
use crate::moves::MoveError;
use crate::server::Gateway;

/// Longest token lifetime `POST /admin/v1/tokens` mints: one year.
const MAX_TOKEN_TTL_S: u64 = 365 * 24 * 3600;
/// Token lifetime when none is asked: one day.
const DEFAULT_TOKEN_TTL_S: u64 = 24 * 3600;

/// Routes of the admin API.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/admin/v1")
            .route("/cells", web::get().to(list_cells))
            .route("/cells/{id}/drain", web::post().to(drain_cell))
            .route("/cells/{id}/undrain", web::post().to(undrain_cell))
            .route("/workspaces", web::get().to(list_workspaces))
            .route("/workspaces", web::post().to(create_workspace))
            .route("/workspaces/{id}", web::get().to(get_workspace))
            .route("/workspaces/{id}/move", web::post().to(move_workspace))
            .route("/workspaces/{id}/channels", web::post().to(seed_channel))
            .route("/tokens", web::post().to(mint_token)),
    );
}

/// Proof that the request carries the admin token.
pub struct AdminAuth(Arc<Gateway>);

impl FromRequest for AdminAuth {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

fn authenticate(req: &HttpRequest) -> Result<AdminAuth, ApiError> {
    let (gateway, token) = request_bearer(req)?;
    match token {
        Some(token) if secrets_match(token, &gateway.config.admin_token) => Ok(AdminAuth(gateway)),
        _ => Err(ApiError::unauthorized("admin token required")),
    }
}

async fn list_cells(AdminAuth(gateway): AdminAuth) -> Result<HttpResponse, ApiError> {
    let now = confab_shared::now_ms();
    let cells: Vec<_> = gateway
        .directory
        .cells()
        .await?
        .into_iter()
        .map(|c| {
            json!({
                "id": c.id,
                "region": c.region,
                "url": c.url,
                "status": c.status(now),
                "workspaces": c.workspaces,
                "connections": c.connections,
                "max_workspaces": c.max_workspaces,
                "max_connections": c.max_connections,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "cells": cells })))
}

#[derive(Deserialize, Default)]
struct DrainBody {
    #[serde(default, rename = "move")]
    move_workspaces: bool,
}

/// `POST /admin/v1/cells/{id}/drain`: no new workspace is placed there (`200`); with
/// `{"move":true}`, `202` and its workspaces then move off it, one at a time. The body is
/// optional.
async fn drain_cell(
    AdminAuth(gateway): AdminAuth,
    id: web::Path<CellId>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let body: DrainBody = if body.iter().all(u8::is_ascii_whitespace) {
        DrainBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("bad drain body: {e}")))?
    };
    if !gateway.directory.drain_cell(&id).await? {
        return Err(ApiError::not_found(format!("cell {id} not found")));
    }
    if !body.move_workspaces {
        return Ok(HttpResponse::Ok().json(json!({"id": id, "status": "draining"})));
    }
    crate::moves::start_drain(&gateway, &id);
    let workspaces = gateway
        .directory
        .workspaces()
        .await?
        .iter()
        .filter(|w| w.cell == id)
        .count();
    Ok(HttpResponse::Accepted()
        .json(json!({"id": id, "status": "draining", "workspaces": workspaces})))
}

/// `POST /admin/v1/cells/{id}/undrain`: the cell takes new workspaces again; a drain with
/// move under way stops after the workspace it is moving.
async fn undrain_cell(
    AdminAuth(gateway): AdminAuth,
    id: web::Path<CellId>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    if !gateway.directory.undrain_cell(&id).await? {
        return Err(ApiError::not_found(format!("cell {id} not found")));
    }
    let now = confab_shared::now_ms();
    let status = gateway
        .directory
        .cells()
        .await?
        .into_iter()
        .find(|c| c.id == id)
        .map(|c| c.status(now))
        .unwrap_or(confab_directory::CellStatus::Healthy);
    Ok(HttpResponse::Ok().json(json!({"id": id, "status": status})))
}

#[derive(Deserialize)]
struct WorkspacesQuery {
    cell: Option<CellId>,
}

/// `GET /admin/v1/workspaces[?cell=ID]`.
async fn list_workspaces(
    AdminAuth(gateway): AdminAuth,
    query: web::Query<WorkspacesQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    let workspaces: Vec<_> = gateway
        .directory
        .workspaces()
        .await?
        .into_iter()
        .filter(|w| query.cell.as_ref().is_none_or(|c| &w.cell == c))
        .map(|w| json!({"id": w.id, "cell": w.cell, "region": w.region}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "workspaces": workspaces })))
}

#[derive(Deserialize)]
struct CreateWorkspaceBody {
    id: Option<WorkspaceId>,
    name: Option<String>,
    region: String,
}

async fn create_workspace(
    AdminAuth(gateway): AdminAuth,
    body: web::Json<CreateWorkspaceBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    if body.region.trim().is_empty() || body.region.len() > 64 {
        return Err(ApiError::bad_request("region must be 1 to 64 characters"));
    }
    if body.name.as_ref().is_some_and(|n| n.len() > 200) {
        return Err(ApiError::bad_request("name is longer than 200 bytes"));
    }
    let id = match body.id {
        Some(id) => id,
        None => generated_workspace_id(),
    };
    let cells = gateway.directory.cells().await?;
    // A region with no healthy cell and one whose cells are all full are both 503, each
    // with its own message.
    let cell = place(&cells, &body.region, confab_shared::now_ms())
        .map_err(|e| ApiError::unavailable(e.to_string()))?
        .id
        .clone();
    let record = WorkspaceRecord {
        id: id.clone(),
        cell: cell.clone(),
        region: body.region.clone(),
        name: body.name.clone(),
    };
    match gateway.directory.create_workspace(record).await {
        Ok(()) => {}
        Err(CreateWorkspaceError::Exists(_)) => {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("workspace {id} already exists"),
            ))
        }
        Err(CreateWorkspaceError::Engine(e)) => return Err(e.into()),
    }
    let op = AdminOp::CreateWorkspace {
        workspace: id.clone(),
        name: body.name,
    };
    if let Err(e) = gateway.links.admin(&cell, op).await {
        // The cell did not take the workspace: undo the directory entry so the id stays free.
        let _ = gateway.directory.delete_workspace(&id).await;
        return Err(ApiError::unavailable(format!(
            "cell {cell} could not create the workspace: {}",
            e.message
        )));
    }
    Ok(HttpResponse::Created().json(json!({"id": id, "cell": cell, "region": body.region})))
}

fn generated_workspace_id() -> WorkspaceId {
    let id = format!("w{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    WorkspaceId::new(&id).unwrap_or_else(|_| unreachable!("hex is a valid id"))
}

async fn get_workspace(
    AdminAuth(gateway): AdminAuth,
    id: web::Path<WorkspaceId>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let record = gateway
        .directory
        .workspace(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("workspace {id} not found")))?;
    Ok(HttpResponse::Ok()
        .json(json!({"id": record.id, "cell": record.cell, "region": record.region})))
}

#[derive(Deserialize)]
struct MoveBody {
    cell: CellId,
}

/// `POST /admin/v1/workspaces/{id}/move`: `200` once the workspace is served by the new cell.
async fn move_workspace(
    AdminAuth(gateway): AdminAuth,
    id: web::Path<WorkspaceId>,
    body: web::Json<MoveBody>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let to = body.into_inner().cell;
    match crate::moves::move_workspace(&gateway, &id, &to).await {
        Ok(report) => Ok(HttpResponse::Ok().json(json!({
            "id": report.workspace,
            "cell": report.cell,
            "region": report.region,
            "from": report.from,
            "moved": report.moved,
            "keys": report.keys,
            "freeze_ms": report.freeze.as_millis() as u64,
            "duration_ms": report.total.as_millis() as u64,
        }))),
        Err(e) => Err(move_error(e)),
    }
}

fn move_error(e: MoveError) -> ApiError {
    let code = match &e {
        MoveError::UnknownWorkspace(_) | MoveError::UnknownCell(_) => ErrorCode::NotFound,
        MoveError::Busy(..) => ErrorCode::Conflict,
        MoveError::TargetUnavailable(..) | MoveError::Failed(_) => ErrorCode::Unavailable,
    };
    ApiError::new(code, e.to_string())
}

#[derive(Deserialize)]
struct SeedChannelBody {
    id: ChannelId,
    kind: ChannelKind,
    #[serde(default)]
    members: Vec<UserId>,
}

/// `POST /admin/v1/workspaces/{id}/channels`: creates a channel with a chosen id and members
/// (as `confab dev` seeds `general`); a no-op when it exists. An addition to SPEC §7 for
/// operators who provision workspaces.
async fn seed_channel(
    AdminAuth(gateway): AdminAuth,
    workspace: web::Path<WorkspaceId>,
    body: web::Json<SeedChannelBody>,
) -> Result<HttpResponse, ApiError> {
    let workspace = workspace.into_inner();
    let body = body.into_inner();
    if body.members.len() > confab_shared::limits::MAX_INITIAL_MEMBERS {
        return Err(ApiError::bad_request("at most 1000 members"));
    }
    let record = gateway
        .directory
        .workspace(&workspace)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("workspace {workspace} not found")))?;
    let op = AdminOp::SeedChannel {
        workspace,
        channel: body.id.clone(),
        kind: body.kind,
        members: body.members,
    };
    gateway.links.admin(&record.cell, op).await?;
    Ok(HttpResponse::Created().json(json!({ "id": body.id })))
}

#[derive(Deserialize)]
struct TokenBody {
    workspace: WorkspaceId,
    user: UserId,
    #[serde(default)]
    bot: bool,
    ttl_s: Option<u64>,
}

async fn mint_token(
    AdminAuth(gateway): AdminAuth,
    body: web::Json<TokenBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let ttl_s = body.ttl_s.unwrap_or(DEFAULT_TOKEN_TTL_S);
    if !(1..=MAX_TOKEN_TTL_S).contains(&ttl_s) {
        return Err(ApiError::bad_request(
            "ttl_s must be between 1 and 31536000",
        ));
    }
    if gateway
        .directory
        .workspace(&body.workspace)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found(format!(
            "workspace {} not found",
            body.workspace
        )));
    }
    let token = gateway
        .tokens
        .mint(&body.workspace, &body.user, body.bot, ttl_s)
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(HttpResponse::Created().json(json!({ "token": token })))
}
