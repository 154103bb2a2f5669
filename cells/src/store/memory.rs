//! [`MemoryStore`]: the in-process [`CellStore`] engine of `confab dev` and the tests.
//!
//! One mutex per workspace guards all of its data; every call locks it once and never across
//! an await, so each call is atomic exactly as a Redis `MULTI` or script would be.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use confab_shared::server::{ChannelKind, Event, MessageView};
use confab_shared::{ChannelId, UserId, WorkspaceId};
use dashmap::DashMap;
use parking_lot::Mutex;

use super::{
    side_effect, CellStore, ChannelMeta, ChannelSnapshot, ChannelSummary, CreateOutcome,
    MessageQuery, NewChannel, ReadMarker, SideEffect, StoreError, StoreResult, WebhookCreate,
    WebhookRecord, WebhookState,
};

/// Cell state held in memory; lost when the process exits.
#[derive(Default)]
pub struct MemoryStore {
    workspaces: DashMap<WorkspaceId, Arc<Mutex<WorkspaceData>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn workspace(&self, workspace: &WorkspaceId) -> Option<Arc<Mutex<WorkspaceData>>> {
        // Clone the Arc out so the DashMap shard lock is released before the mutex is taken.
        self.workspaces.get(workspace).map(|w| w.clone())
    }
}

#[derive(Default)]
struct WorkspaceData {
    channels: HashMap<ChannelId, ChannelData>,
    names: HashMap<String, ChannelId>,
    dms: HashMap<(UserId, UserId), ChannelId>,
    user_channels: HashMap<UserId, BTreeSet<ChannelId>>,
    markers: HashMap<UserId, HashMap<ChannelId, u64>>,
    /// Public and private channels (DMs are not counted).
    named_channels: u64,
    /// Webhooks by id, each with its delivery cursors by channel.
    webhooks: BTreeMap<String, (WebhookRecord, HashMap<ChannelId, u64>)>,
}

struct ChannelData {
    meta: ChannelMeta,
    /// Retained events; `log[i]` has seq `first_seq + i`.
    log: VecDeque<Event>,
    first_seq: u64,
    members: BTreeSet<UserId>,
    messages: BTreeMap<u64, MessageView>,
    idempotency: HashMap<(UserId, String), (u64, u64)>,
}

impl ChannelData {
    fn new(meta: ChannelMeta) -> Self {
        ChannelData {
            meta,
            log: VecDeque::new(),
            first_seq: 1,
            members: BTreeSet::new(),
            messages: BTreeMap::new(),
            idempotency: HashMap::new(),
        }
    }

    fn last_seq(&self) -> u64 {
        self.first_seq + self.log.len() as u64 - 1
    }

    fn summary(&self) -> ChannelSummary {
        ChannelSummary {
            meta: self.meta.clone(),
            last_seq: self.last_seq(),
        }
    }

    fn trim(&mut self, retention: u64) {
        while self.log.len() as u64 > retention.max(1) {
            let Some(old) = self.log.pop_front() else {
                break;
            };
            self.first_seq += 1;
            if let Event::Message {
                seq,
                user,
                client_msg_id: Some(cmid),
                ..
            } = old
            {
                let key = (user, cmid);
                if self.idempotency.get(&key).is_some_and(|(s, _)| *s == seq) {
                    self.idempotency.remove(&key);
                }
            }
        }
    }
}

impl WorkspaceData {
    fn channel(&self, channel: &ChannelId) -> Option<&ChannelData> {
        self.channels.get(channel)
    }

    /// [`CellStore::append`] within the workspace's lock.
    fn append(&mut self, channel: &ChannelId, event: &Event, retention: u64) -> StoreResult<()> {
        let (Some(seq), Some(effect)) = (event.seq(), side_effect(event)) else {
            return Err(StoreError::NotLoggable(event.type_name()));
        };
        let data = self
            .channels
            .get_mut(channel)
            .ok_or_else(|| StoreError::NoSuchChannel(channel.clone()))?;
        let expected = data.last_seq() + 1;
        if seq != expected {
            return Err(StoreError::SeqConflict {
                channel: channel.clone(),
                expected,
                got: seq,
            });
        }
        data.log.push_back(event.clone());
        self.apply(channel, effect)?;
        if let Some(data) = self.channels.get_mut(channel) {
            data.trim(retention);
        }
        Ok(())
    }

    /// Whether `user` may join `channel` without being a member of more than `max` channels.
    fn has_room(&self, user: &UserId, channel: &ChannelId, max: u64) -> bool {
        !self
            .user_channels
            .get(user)
            .is_some_and(|set| !set.contains(channel) && set.len() as u64 >= max)
    }

    fn apply(&mut self, channel: &ChannelId, effect: SideEffect<'_>) -> StoreResult<()> {
        let data = self
            .channels
            .get_mut(channel)
            .ok_or_else(|| StoreError::NoSuchChannel(channel.clone()))?;
        match effect {
            SideEffect::NewMessage(view) => {
                if let Some(cmid) = &view.client_msg_id {
                    data.idempotency
                        .insert((view.user.clone(), cmid.clone()), (view.seq, view.ts));
                }
                data.messages.insert(view.seq, view);
            }
            SideEffect::Edited { target, text } => {
                if let Some(m) = data.messages.get_mut(&target) {
                    m.text = text.to_string();
                    m.edited = true;
                }
            }
            SideEffect::Deleted { target } => {
                if let Some(m) = data.messages.get_mut(&target) {
                    m.text.clear();
                    m.deleted = true;
                }
            }
            SideEffect::Joined(user) => {
                data.members.insert(user.clone());
                self.user_channels
                    .entry(user.clone())
                    .or_default()
                    .insert(channel.clone());
            }
            SideEffect::Left(user) => {
                data.members.remove(user);
                if let Some(set) = self.user_channels.get_mut(user) {
                    set.remove(channel);
                    if set.is_empty() {
                        self.user_channels.remove(user);
                    }
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl CellStore for MemoryStore {
    async fn create_workspace(
        &self,
        workspace: &WorkspaceId,
        _name: Option<&str>,
    ) -> StoreResult<bool> {
        let mut created = false;
        self.workspaces.entry(workspace.clone()).or_insert_with(|| {
            created = true;
            Arc::default()
        });
        Ok(created)
    }

    async fn workspace_exists(&self, workspace: &WorkspaceId) -> StoreResult<bool> {
        Ok(self.workspaces.contains_key(workspace))
    }

    async fn workspace_count(&self) -> StoreResult<u64> {
        Ok(self.workspaces.len() as u64)
    }

    async fn create_channel(
        &self,
        workspace: &WorkspaceId,
        channel: &NewChannel,
    ) -> StoreResult<CreateOutcome> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(CreateOutcome::UnknownWorkspace);
        };
        let mut ws = ws.lock();
        let id = &channel.meta.id;
        if ws.channels.contains_key(id) {
            return Ok(CreateOutcome::IdTaken);
        }
        if let Some(pair) = &channel.dm_pair {
            if let Some(existing) = ws.dms.get(pair) {
                return Ok(CreateOutcome::DmExists(existing.clone()));
            }
            ws.dms.insert(pair.clone(), id.clone());
        } else if channel.meta.kind != ChannelKind::Dm {
            let public = channel.meta.kind == ChannelKind::Public;
            if public && ws.names.contains_key(&channel.meta.name) {
                return Ok(CreateOutcome::NameTaken);
            }
            if channel
                .max_channels
                .is_some_and(|max| ws.named_channels >= max)
            {
                return Ok(CreateOutcome::TooManyChannels);
            }
            if public {
                ws.names.insert(channel.meta.name.clone(), id.clone());
            }
            ws.named_channels += 1;
        }
        ws.channels
            .insert(id.clone(), ChannelData::new(channel.meta.clone()));
        Ok(CreateOutcome::Created)
    }

    async fn load_channel(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
    ) -> StoreResult<Option<ChannelSnapshot>> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(None);
        };
        let ws = ws.lock();
        Ok(ws.channel(channel).map(|c| ChannelSnapshot {
            meta: c.meta.clone(),
            last_seq: c.last_seq(),
            first_seq: c.first_seq,
            members: c.members.iter().cloned().collect(),
        }))
    }

    async fn channel_summaries(
        &self,
        workspace: &WorkspaceId,
        channels: &[ChannelId],
    ) -> StoreResult<Vec<ChannelSummary>> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(Vec::new());
        };
        let ws = ws.lock();
        Ok(channels
            .iter()
            .filter_map(|id| ws.channel(id).map(ChannelData::summary))
            .collect())
    }

    async fn public_channels(&self, workspace: &WorkspaceId) -> StoreResult<Vec<ChannelSummary>> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(Vec::new());
        };
        let ws = ws.lock();
        let mut list: Vec<ChannelSummary> = ws
            .channels
            .values()
            .filter(|c| c.meta.kind == ChannelKind::Public)
            .map(ChannelData::summary)
            .collect();
        list.sort_by(|a, b| a.meta.id.cmp(&b.meta.id));
        Ok(list)
    }

    async fn dm_channel(
        &self,
        workspace: &WorkspaceId,
        pair: (&UserId, &UserId),
    ) -> StoreResult<Option<ChannelId>> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(None);
        };
        let key = (pair.0.clone(), pair.1.clone());
        let found = ws.lock().dms.get(&key).cloned();
        Ok(found)
    }

    async fn append(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        event: &Event,
        retention: u64,
    ) -> StoreResult<()> {
        if side_effect(event).is_none() {
            return Err(StoreError::NotLoggable(event.type_name()));
        }
        let ws = self
            .workspace(workspace)
            .ok_or_else(|| StoreError::NoSuchChannel(channel.clone()))?;
        let mut ws = ws.lock();
        ws.append(channel, event, retention)
    }

    async fn append_joins(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        events: &[Event],
        retention: u64,
        max_user_channels: u64,
    ) -> StoreResult<usize> {
        let ws = self
            .workspace(workspace)
            .ok_or_else(|| StoreError::NoSuchChannel(channel.clone()))?;
        let mut ws = ws.lock();
        for (appended, event) in events.iter().enumerate() {
            let Event::MemberJoined { user, .. } = event else {
                return Err(StoreError::NotAJoin(event.type_name()));
            };
            if !ws.has_room(user, channel, max_user_channels) {
                return Ok(appended);
            }
            ws.append(channel, event, retention)?;
        }
        Ok(events.len())
    }

    async fn raise_last_seq(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        expected: u64,
        to: u64,
    ) -> StoreResult<()> {
        let ws = self
            .workspace(workspace)
            .ok_or_else(|| StoreError::NoSuchChannel(channel.clone()))?;
        let mut ws = ws.lock();
        let data = ws
            .channels
            .get_mut(channel)
            .ok_or_else(|| StoreError::NoSuchChannel(channel.clone()))?;
        let last = data.last_seq();
        if last != expected || to <= last {
            return Err(StoreError::SeqConflict {
                channel: channel.clone(),
                expected: last + 1,
                got: to,
            });
        }
        // The log is contiguous here, so it restarts empty above the gap; the retained events
        // before it are dropped (their messages stay, for history).
        data.log.clear();
        data.first_seq = to + 1;
        Ok(())
    }

    async fn events_after(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        after: u64,
        max: usize,
    ) -> StoreResult<Vec<Event>> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(Vec::new());
        };
        let ws = ws.lock();
        let Some(data) = ws.channel(channel) else {
            return Ok(Vec::new());
        };
        // Index of the first event with seq > after (0 when `after` predates the log).
        let skip = after.saturating_add(1).saturating_sub(data.first_seq);
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        Ok(data.log.iter().skip(skip).take(max).cloned().collect())
    }

    async fn find_client_msg(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        user: &UserId,
        client_msg_id: &str,
    ) -> StoreResult<Option<(u64, u64)>> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(None);
        };
        let ws = ws.lock();
        let key = (user.clone(), client_msg_id.to_string());
        Ok(ws
            .channel(channel)
            .and_then(|c| c.idempotency.get(&key).copied()))
    }

    async fn message(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        seq: u64,
    ) -> StoreResult<Option<MessageView>> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(None);
        };
        let ws = ws.lock();
        Ok(ws
            .channel(channel)
            .and_then(|c| c.messages.get(&seq).cloned()))
    }

    async fn messages(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        query: MessageQuery,
    ) -> StoreResult<Vec<MessageView>> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(Vec::new());
        };
        let ws = ws.lock();
        let Some(data) = ws.channel(channel) else {
            return Ok(Vec::new());
        };
        if query.after.saturating_add(1) >= query.before {
            return Ok(Vec::new());
        }
        let range = data.messages.range(query.after + 1..query.before);
        let mut page: Vec<MessageView> = if query.newest_first {
            range
                .rev()
                .take(query.limit)
                .map(|(_, m)| m.clone())
                .collect()
        } else {
            range.take(query.limit).map(|(_, m)| m.clone()).collect()
        };
        if query.newest_first {
            page.reverse();
        }
        Ok(page)
    }

    async fn user_channels(
        &self,
        workspace: &WorkspaceId,
        user: &UserId,
    ) -> StoreResult<Vec<ChannelId>> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(Vec::new());
        };
        let ws = ws.lock();
        Ok(ws
            .user_channels
            .get(user)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn channel_counts(
        &self,
        workspace: &WorkspaceId,
        users: &[UserId],
    ) -> StoreResult<Vec<u64>> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(vec![0; users.len()]);
        };
        let ws = ws.lock();
        Ok(users
            .iter()
            .map(|u| ws.user_channels.get(u).map_or(0, |set| set.len() as u64))
            .collect())
    }

    async fn read_markers_in(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        users: &[UserId],
    ) -> StoreResult<Vec<u64>> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(vec![0; users.len()]);
        };
        let ws = ws.lock();
        Ok(users
            .iter()
            .map(|u| {
                ws.markers
                    .get(u)
                    .and_then(|m| m.get(channel))
                    .copied()
                    .unwrap_or(0)
            })
            .collect())
    }

    async fn read_markers(
        &self,
        workspace: &WorkspaceId,
        user: &UserId,
    ) -> StoreResult<HashMap<ChannelId, u64>> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(HashMap::new());
        };
        let ws = ws.lock();
        Ok(ws.markers.get(user).cloned().unwrap_or_default())
    }

    async fn advance_read_marker(
        &self,
        workspace: &WorkspaceId,
        user: &UserId,
        channel: &ChannelId,
        seq: u64,
    ) -> StoreResult<ReadMarker> {
        let ws = self
            .workspace(workspace)
            .ok_or_else(|| StoreError::NoSuchChannel(channel.clone()))?;
        let mut ws = ws.lock();
        let marker = ws
            .markers
            .entry(user.clone())
            .or_default()
            .entry(channel.clone())
            .or_insert(0);
        let previous = *marker;
        *marker = previous.max(seq);
        Ok(ReadMarker {
            previous,
            current: *marker,
        })
    }

    async fn workspace_ids(&self) -> StoreResult<Vec<WorkspaceId>> {
        let mut ids: Vec<WorkspaceId> = self.workspaces.iter().map(|e| e.key().clone()).collect();
        ids.sort();
        Ok(ids)
    }

    async fn create_webhook(
        &self,
        workspace: &WorkspaceId,
        hook: &WebhookRecord,
        max_per_user: u64,
    ) -> StoreResult<WebhookCreate> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(WebhookCreate::UnknownWorkspace);
        };
        let mut ws = ws.lock();
        if ws.webhooks.contains_key(&hook.id) {
            return Ok(WebhookCreate::IdTaken);
        }
        let owned = ws.webhooks.values().filter(|(h, _)| h.user == hook.user);
        if owned.count() as u64 >= max_per_user {
            return Ok(WebhookCreate::TooMany);
        }
        ws.webhooks
            .insert(hook.id.clone(), (hook.clone(), HashMap::new()));
        Ok(WebhookCreate::Created)
    }

    async fn webhooks(&self, workspace: &WorkspaceId) -> StoreResult<Vec<WebhookRecord>> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(Vec::new());
        };
        let ws = ws.lock();
        Ok(ws.webhooks.values().map(|(h, _)| h.clone()).collect())
    }

    async fn delete_webhook(&self, workspace: &WorkspaceId, id: &str) -> StoreResult<bool> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(false);
        };
        let removed = ws.lock().webhooks.remove(id).is_some();
        Ok(removed)
    }

    async fn set_webhook_state(
        &self,
        workspace: &WorkspaceId,
        id: &str,
        state: &WebhookState,
    ) -> StoreResult<bool> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(false);
        };
        let mut ws = ws.lock();
        let Some((hook, _)) = ws.webhooks.get_mut(id) else {
            return Ok(false);
        };
        hook.state = state.clone();
        Ok(true)
    }

    async fn webhook_cursors(
        &self,
        workspace: &WorkspaceId,
        id: &str,
    ) -> StoreResult<HashMap<ChannelId, u64>> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(HashMap::new());
        };
        let ws = ws.lock();
        Ok(ws
            .webhooks
            .get(id)
            .map(|(_, cursors)| cursors.clone())
            .unwrap_or_default())
    }

    async fn advance_webhook_cursor(
        &self,
        workspace: &WorkspaceId,
        id: &str,
        channel: &ChannelId,
        seq: u64,
    ) -> StoreResult<()> {
        let Some(ws) = self.workspace(workspace) else {
            return Ok(());
        };
        let mut ws = ws.lock();
        if let Some((_, cursors)) = ws.webhooks.get_mut(id) {
            let cursor = cursors.entry(channel.clone()).or_insert(seq);
            *cursor = (*cursor).max(seq);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws() -> WorkspaceId {
        WorkspaceId::new("w").unwrap()
    }
    fn ch() -> ChannelId {
        ChannelId::new("c").unwrap()
    }
    fn alice() -> UserId {
        UserId::new("alice").unwrap()
    }

    async fn store_with_channel() -> MemoryStore {
        let store = MemoryStore::new();
        assert!(store.create_workspace(&ws(), None).await.unwrap());
        let new = NewChannel {
            meta: ChannelMeta {
                id: ch(),
                name: "c".into(),
                kind: ChannelKind::Public,
            },
            dm_pair: None,
            max_channels: None,
        };
        assert_eq!(
            store.create_channel(&ws(), &new).await.unwrap(),
            CreateOutcome::Created
        );
        store
    }

    fn message(seq: u64, cmid: Option<&str>) -> Event {
        Event::Message {
            channel: ch(),
            seq,
            ts: seq * 10,
            user: alice(),
            text: format!("m{seq}"),
            client_msg_id: cmid.map(str::to_string),
            thread: None,
        }
    }

    #[tokio::test]
    async fn append_refuses_a_seq_that_is_not_the_next_one() {
        let store = store_with_channel().await;
        store
            .append(&ws(), &ch(), &message(1, None), 10)
            .await
            .unwrap();
        let err = store.append(&ws(), &ch(), &message(3, None), 10).await;
        assert!(matches!(
            err,
            Err(StoreError::SeqConflict { expected: 2, .. })
        ));
        let err = store.append(&ws(), &ch(), &message(1, None), 10).await;
        assert!(matches!(
            err,
            Err(StoreError::SeqConflict { expected: 2, .. })
        ));
    }

    #[tokio::test]
    async fn trimming_drops_old_events_and_their_idempotency_keys_but_keeps_messages() {
        let store = store_with_channel().await;
        for seq in 1..=5 {
            let cmid = format!("k{seq}");
            store
                .append(&ws(), &ch(), &message(seq, Some(&cmid)), 3)
                .await
                .unwrap();
        }
        let snapshot = store.load_channel(&ws(), &ch()).await.unwrap().unwrap();
        assert_eq!((snapshot.first_seq, snapshot.last_seq), (3, 5));
        let events = store.events_after(&ws(), &ch(), 0, 100).await.unwrap();
        assert_eq!(events.first().and_then(Event::seq), Some(3));
        assert_eq!(
            store
                .find_client_msg(&ws(), &ch(), &alice(), "k1")
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .find_client_msg(&ws(), &ch(), &alice(), "k4")
                .await
                .unwrap(),
            Some((4, 40))
        );
        assert!(store.message(&ws(), &ch(), 1).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn ephemeral_events_are_not_loggable() {
        let store = store_with_channel().await;
        let typing = Event::Typing {
            channel: ch(),
            user: alice(),
        };
        assert_eq!(
            store.append(&ws(), &ch(), &typing, 10).await,
            Err(StoreError::NotLoggable("typing"))
        );
    }

    #[tokio::test]
    async fn public_names_and_dm_pairs_are_claimed_once() {
        let store = store_with_channel().await;
        let same_name = |id: &str, kind| NewChannel {
            meta: ChannelMeta {
                id: ChannelId::new(id).unwrap(),
                name: "c".into(),
                kind,
            },
            dm_pair: None,
            max_channels: None,
        };
        assert_eq!(
            store
                .create_channel(&ws(), &same_name("other", ChannelKind::Public))
                .await
                .unwrap(),
            CreateOutcome::NameTaken
        );
        assert_eq!(
            store
                .create_channel(&ws(), &same_name("secret", ChannelKind::Private))
                .await
                .unwrap(),
            CreateOutcome::Created
        );
        let pair = (alice(), UserId::new("bob").unwrap());
        let dm = |id: &str| NewChannel {
            meta: ChannelMeta {
                id: ChannelId::new(id).unwrap(),
                name: "alice,bob".into(),
                kind: ChannelKind::Dm,
            },
            dm_pair: Some(pair.clone()),
            max_channels: None,
        };
        assert_eq!(
            store.create_channel(&ws(), &dm("d1")).await.unwrap(),
            CreateOutcome::Created
        );
        assert_eq!(
            store.create_channel(&ws(), &dm("d2")).await.unwrap(),
            CreateOutcome::DmExists(ChannelId::new("d1").unwrap())
        );
    }

    #[tokio::test]
    async fn read_marker_never_moves_back() {
        let store = store_with_channel().await;
        let m = store
            .advance_read_marker(&ws(), &alice(), &ch(), 5)
            .await
            .unwrap();
        assert_eq!((m.previous, m.current), (0, 5));
        let m = store
            .advance_read_marker(&ws(), &alice(), &ch(), 2)
            .await
            .unwrap();
        assert_eq!((m.previous, m.current), (5, 5));
    }
}
