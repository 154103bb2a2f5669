//! Workspace-level operations that create channels: the [`WorkspaceOp`]s (`CreateChannel`,
//! `OpenDm`, run on the caller's user actor) and the admin ops.
//!
//! Creating is two steps: the store claims the id, name or DM pair atomically (so two racing
//! creations cannot both win), then the new channel's actor logs the initial `member_joined`
//! events, exactly as later joins are logged.

use std::sync::Arc;

use confab_shared::link::{AdminOp, Caller, CellError, CellReply, WorkspaceOp};
use confab_shared::server::{ChannelInfo, ChannelKind};
use confab_shared::{limits, ChannelId, ErrorCode, UserId, WorkspaceId};
use rand::distributions::Alphanumeric;
use rand::Rng;

use crate::channel::store_unavailable;
use crate::messages::SeedMembers;
use crate::registry::Registry;
use crate::store::{ChannelMeta, CreateOutcome, NewChannel};
use crate::user::inspect;

/// Random ids tried before giving up (a collision of 62^10 ids is already unheard of).
const ID_ATTEMPTS: usize = 5;

fn conflict(message: impl Into<String>) -> CellError {
    CellError::new(ErrorCode::Conflict, message)
}

/// The refusal of a join that would put `user` in more than `max` channels.
pub(crate) fn user_full(user: &UserId, max: usize) -> CellError {
    conflict(format!(
        "{user} is already a member of {max} channels, the most one user may be in"
    ))
}

/// The refusal of a join beyond a channel's `max` members.
pub(crate) fn channel_full(max: usize) -> CellError {
    conflict(format!(
        "the channel has {max} members, the most one channel may have"
    ))
}

/// Refuses (`conflict`) when one of `users` is already in as many channels as a user may be,
/// before anything is created. The join itself checks again atomically, so a race past this
/// check only leaves that user out.
async fn check_room(
    reg: &Arc<Registry>,
    ws: &WorkspaceId,
    users: &[UserId],
) -> Result<(), CellError> {
    let max = reg.settings.max_channels_per_user;
    let counts = reg
        .store
        .channel_counts(ws, users)
        .await
        .map_err(|e| store_unavailable(&e))?;
    match users.iter().zip(counts).find(|(_, n)| *n >= max as u64) {
        Some((user, _)) => Err(user_full(user, max)),
        None => Ok(()),
    }
}

/// Refuses (`bad_request`) a channel created with more members than a channel may have.
fn check_member_count(reg: &Registry, members: &[UserId]) -> Result<(), CellError> {
    let max = reg.settings.max_members_per_channel;
    if members.len() > max {
        return Err(CellError::bad_request(format!(
            "{} members named, more than the {max} one channel may have",
            members.len()
        )));
    }
    Ok(())
}

/// The refusal of a channel beyond the workspace's `max`.
fn workspace_full(max: usize) -> CellError {
    conflict(format!(
        "the workspace has {max} channels, the most one workspace may have"
    ))
}

fn generated_id(prefix: char) -> Result<ChannelId, CellError> {
    let suffix: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(10)
        .map(char::from)
        .collect();
    ChannelId::new(&format!("{prefix}{suffix}"))
        .map_err(|e| CellError::unavailable(format!("could not make a channel id: {e}")))
}

/// Checks a channel name: 1–80 bytes, not blank.
pub(crate) fn check_name(name: &str) -> Result<(), CellError> {
    if name.trim().is_empty() {
        return Err(CellError::bad_request("channel name is blank"));
    }
    if name.len() > limits::MAX_CHANNEL_NAME_BYTES {
        return Err(CellError::bad_request("channel name is over 80 bytes"));
    }
    Ok(())
}

/// `members` with duplicates removed, `first` (when given) leading.
fn ordered_members(first: Option<&UserId>, members: Vec<UserId>) -> Vec<UserId> {
    let mut out: Vec<UserId> = first.into_iter().cloned().collect();
    for m in members {
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

/// Logs the initial members of a channel just created.
async fn seed(
    reg: &Arc<Registry>,
    ws: &WorkspaceId,
    channel: &ChannelId,
    members: Vec<UserId>,
    by: Option<UserId>,
) -> Result<ChannelInfo, CellError> {
    reg.channel(ws, channel)
        .send(SeedMembers { members, by })
        .await
        .map_err(|_| CellError::unavailable("channel unavailable, retry"))?
}

/// Performs a workspace op for `caller` (run on the caller's user actor).
pub(crate) async fn perform(
    reg: &Arc<Registry>,
    caller: Caller,
    op: WorkspaceOp,
) -> Result<CellReply, CellError> {
    match op {
        WorkspaceOp::CreateChannel {
            name,
            kind,
            members,
        } => create_channel(reg, &caller, name, kind, members).await,
        WorkspaceOp::OpenDm { user } => open_dm(reg, &caller, user).await,
    }
}

/// Creates a public or private channel with a generated id; the caller and `members` join.
async fn create_channel(
    reg: &Arc<Registry>,
    caller: &Caller,
    name: String,
    kind: ChannelKind,
    members: Vec<UserId>,
) -> Result<CellReply, CellError> {
    check_name(&name)?;
    if kind == ChannelKind::Dm {
        return Err(CellError::bad_request(
            "dm channels are opened, not created",
        ));
    }
    if members.len() > limits::MAX_INITIAL_MEMBERS {
        return Err(CellError::bad_request("more than 1000 initial members"));
    }
    let members = ordered_members(Some(&caller.user), members);
    check_member_count(reg, &members)?;
    let ws = &caller.workspace;
    check_room(reg, ws, &members).await?;
    let max_channels = reg.settings.max_channels_per_workspace;
    let mut created = None;
    for _ in 0..ID_ATTEMPTS {
        let id = generated_id('C')?;
        let new = NewChannel {
            meta: ChannelMeta {
                id: id.clone(),
                name: name.clone(),
                kind,
            },
            dm_pair: None,
            max_channels: Some(max_channels as u64),
        };
        match reg.store.create_channel(ws, &new).await {
            Ok(CreateOutcome::Created) => {
                created = Some(id);
                break;
            }
            Ok(CreateOutcome::IdTaken) => continue,
            Ok(CreateOutcome::NameTaken) => {
                return Err(conflict(format!("a public channel named {name:?} exists")))
            }
            Ok(CreateOutcome::TooManyChannels) => return Err(workspace_full(max_channels)),
            Ok(CreateOutcome::UnknownWorkspace) => return Err(CellError::not_found("workspace")),
            Ok(CreateOutcome::DmExists(_)) => return Err(conflict("channel exists")),
            Err(e) => return Err(store_unavailable(&e)),
        }
    }
    let id = created.ok_or_else(|| CellError::unavailable("could not pick a free channel id"))?;
    let info = seed(reg, ws, &id, members, Some(caller.user.clone())).await?;
    Ok(CellReply::Channel(info))
}

/// The DM channel between the caller and `other`, created on first use.
async fn open_dm(
    reg: &Arc<Registry>,
    caller: &Caller,
    other: UserId,
) -> Result<CellReply, CellError> {
    let ws = &caller.workspace;
    let pair = if caller.user <= other {
        (caller.user.clone(), other.clone())
    } else {
        (other.clone(), caller.user.clone())
    };
    let existing = reg
        .store
        .dm_channel(ws, (&pair.0, &pair.1))
        .await
        .map_err(|e| store_unavailable(&e))?;
    if let Some(id) = existing {
        return existing_dm(reg, caller, &other, &id).await;
    }
    check_room(
        reg,
        ws,
        &ordered_members(Some(&caller.user), vec![other.clone()]),
    )
    .await?;
    for _ in 0..ID_ATTEMPTS {
        let id = generated_id('D')?;
        let new = NewChannel {
            meta: ChannelMeta {
                id: id.clone(),
                name: format!("{},{}", pair.0, pair.1),
                kind: ChannelKind::Dm,
            },
            dm_pair: Some(pair.clone()),
            max_channels: None,
        };
        match reg.store.create_channel(ws, &new).await {
            Ok(CreateOutcome::Created) => {
                let members = ordered_members(Some(&caller.user), vec![other]);
                let info = seed(reg, ws, &id, members, Some(caller.user.clone())).await?;
                return Ok(CellReply::Channel(info));
            }
            Ok(CreateOutcome::DmExists(id)) => return existing_dm(reg, caller, &other, &id).await,
            Ok(CreateOutcome::IdTaken) => continue,
            Ok(CreateOutcome::UnknownWorkspace) => return Err(CellError::not_found("workspace")),
            Ok(CreateOutcome::NameTaken | CreateOutcome::TooManyChannels) => {
                return Err(conflict("channel exists"))
            }
            Err(e) => return Err(store_unavailable(&e)),
        }
    }
    Err(CellError::unavailable("could not pick a free channel id"))
}

/// The DM `id` of the caller and `other`. Either of them missing from it (a join left out by
/// the channel limit, in a race past [`check_room`]) joins now, room permitting.
async fn existing_dm(
    reg: &Arc<Registry>,
    caller: &Caller,
    other: &UserId,
    id: &ChannelId,
) -> Result<CellReply, CellError> {
    let members = ordered_members(Some(&caller.user), vec![other.clone()]);
    seed(
        reg,
        &caller.workspace,
        id,
        members,
        Some(caller.user.clone()),
    )
    .await?;
    let mut info = inspect(reg, &caller.workspace, id, &caller.user).await?;
    let markers = reg
        .store
        .read_markers(&caller.workspace, &caller.user)
        .await
        .map_err(|e| store_unavailable(&e))?;
    info.read_seq = markers.get(id).copied().unwrap_or(0);
    Ok(CellReply::Channel(info))
}

/// Performs an operator request.
pub(crate) async fn admin(reg: &Arc<Registry>, op: AdminOp) -> Result<CellReply, CellError> {
    match op {
        AdminOp::CreateWorkspace { workspace, name } => {
            refuse_past_max_workspaces(reg, &workspace).await?;
            let created = reg
                .store
                .create_workspace(&workspace, name.as_deref())
                .await
                .map_err(|e| store_unavailable(&e))?;
            if created {
                tracing::info!(workspace = %workspace, "workspace created");
                refresh_workspace_count(reg).await;
            }
            Ok(CellReply::Done)
        }
        AdminOp::SeedChannel {
            workspace,
            channel,
            kind,
            members,
        } => seed_channel(reg, workspace, channel, kind, members).await,
        AdminOp::Move(step) => crate::moving::step(reg, step).await,
    }
}

async fn seed_channel(
    reg: &Arc<Registry>,
    ws: WorkspaceId,
    channel: ChannelId,
    kind: ChannelKind,
    members: Vec<UserId>,
) -> Result<CellReply, CellError> {
    if members.len() > limits::MAX_INITIAL_MEMBERS {
        return Err(CellError::bad_request("more than 1000 initial members"));
    }
    let members = ordered_members(None, members);
    check_member_count(reg, &members)?;
    // No `check_room` here: seeding a channel that exists is a no-op, and must stay one for
    // members who are in it already. A member without room is left out by the join itself.
    let max_channels = reg.settings.max_channels_per_workspace;
    let dm_pair = match (kind, members.as_slice()) {
        (ChannelKind::Dm, [a, b]) if a <= b => Some((a.clone(), b.clone())),
        (ChannelKind::Dm, [a, b]) => Some((b.clone(), a.clone())),
        (ChannelKind::Dm, _) => return Err(CellError::bad_request("a dm has two members")),
        _ => None,
    };
    let new = NewChannel {
        meta: ChannelMeta {
            id: channel.clone(),
            name: channel.to_string(),
            kind,
        },
        dm_pair,
        max_channels: Some(max_channels as u64),
    };
    match reg.store.create_channel(&ws, &new).await {
        Ok(CreateOutcome::Created) => {
            seed(reg, &ws, &channel, members, None).await?;
            tracing::info!(workspace = %ws, channel = %channel, "channel seeded");
            Ok(CellReply::Done)
        }
        Ok(CreateOutcome::IdTaken) => Ok(CellReply::Done),
        Ok(CreateOutcome::NameTaken) | Ok(CreateOutcome::DmExists(_)) => {
            Err(conflict("another channel holds that name or dm pair"))
        }
        Ok(CreateOutcome::TooManyChannels) => Err(workspace_full(max_channels)),
        Ok(CreateOutcome::UnknownWorkspace) => Err(CellError::not_found("workspace")),
        Err(e) => Err(store_unavailable(&e)),
    }
}

/// Reloads the workspace count shown in [`crate::CellStats`].
pub(crate) async fn refresh_workspace_count(reg: &Arc<Registry>) {
    match reg.store.workspace_count().await {
        Ok(n) => reg
            .workspaces
            .store(n, std::sync::atomic::Ordering::Relaxed),
        Err(e) => tracing::warn!(error = %e, "could not count workspaces"),
    }
}

/// Refuses a new workspace on a cell holding its `max_workspaces` already (placement skips
/// such a cell; this catches two placements racing for its last place). Creating one that
/// exists is allowed: it changes nothing.
async fn refuse_past_max_workspaces(
    reg: &Registry,
    workspace: &WorkspaceId,
) -> Result<(), CellError> {
    let Some(max) = reg.settings.bounds.max_workspaces else {
        return Ok(());
    };
    let count = reg
        .store
        .workspace_count()
        .await
        .map_err(|e| store_unavailable(&e))?;
    if count < max {
        return Ok(());
    }
    let exists = reg
        .store
        .workspace_exists(workspace)
        .await
        .map_err(|e| store_unavailable(&e))?;
    if exists {
        return Ok(());
    }
    Err(CellError::unavailable(format!(
        "this cell is full: it holds its --max-workspaces of {max} workspaces"
    )))
}
