//! A [`CellStore`] that measures its engine: every operation's latency goes to the
//! `confab_store_op_duration_seconds{op}` histogram, and every event appended to a channel log
//! to `confab_events_appended_total`. The cell process wraps its store in it once at start-up,
//! so both engines are measured the same way and the engines stay free of metrics code.
//!
//! A method added to [`CellStore`] needs one delegating method here.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use confab_shared::moves::{KeyDump, KeyPage};
use confab_shared::server::{Event, MessageView};
use confab_shared::{ChannelId, UserId, WorkspaceId};

use super::{
    CellStore, ChannelSnapshot, ChannelSummary, CreateOutcome, MessageQuery, MoveMark, NewChannel,
    ReadMarker, StoreResult, WebhookCreate, WebhookRecord, WebhookState,
};
use crate::metrics::{EVENTS_APPENDED, STORE_OP_DURATION};

/// The latency histogram of one store operation.
fn op_latency(op: &'static str) -> metrics::Histogram {
    metrics::histogram!(STORE_OP_DURATION, "op" => op)
}

async fn timed<T>(histogram: &metrics::Histogram, operation: impl Future<Output = T>) -> T {
    let start = Instant::now();
    let outcome = operation.await;
    histogram.record(start.elapsed().as_secs_f64());
    outcome
}

/// Measures every operation of the store it wraps (module docs).
pub struct TimedStore {
    inner: Arc<dyn CellStore>,
    // Hot path: `append` runs once per message, so its handles are looked up once here
    // rather than in the recorder's registry on every call.
    append_latency: metrics::Histogram,
    events_appended: metrics::Counter,
}

impl std::fmt::Debug for TimedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimedStore").finish_non_exhaustive()
    }
}

impl TimedStore {
    pub fn new(inner: Arc<dyn CellStore>) -> TimedStore {
        TimedStore {
            inner,
            append_latency: op_latency("append"),
            events_appended: metrics::counter!(EVENTS_APPENDED),
        }
    }
}

#[async_trait]
impl CellStore for TimedStore {
    async fn create_workspace(
        &self,
        workspace: &WorkspaceId,
        name: Option<&str>,
    ) -> StoreResult<bool> {
        timed(
            &op_latency("create_workspace"),
            self.inner.create_workspace(workspace, name),
        )
        .await
    }

    async fn workspace_exists(&self, workspace: &WorkspaceId) -> StoreResult<bool> {
        timed(
            &op_latency("workspace_exists"),
            self.inner.workspace_exists(workspace),
        )
        .await
    }

    async fn workspace_count(&self) -> StoreResult<u64> {
        timed(&op_latency("workspace_count"), self.inner.workspace_count()).await
    }

    async fn create_channel(
        &self,
        workspace: &WorkspaceId,
        channel: &NewChannel,
    ) -> StoreResult<CreateOutcome> {
        timed(
            &op_latency("create_channel"),
            self.inner.create_channel(workspace, channel),
        )
        .await
    }

    async fn load_channel(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
    ) -> StoreResult<Option<ChannelSnapshot>> {
        timed(
            &op_latency("load_channel"),
            self.inner.load_channel(workspace, channel),
        )
        .await
    }

    async fn channel_summaries(
        &self,
        workspace: &WorkspaceId,
        channels: &[ChannelId],
    ) -> StoreResult<Vec<ChannelSummary>> {
        timed(
            &op_latency("channel_summaries"),
            self.inner.channel_summaries(workspace, channels),
        )
        .await
    }

    async fn public_channels(&self, workspace: &WorkspaceId) -> StoreResult<Vec<ChannelSummary>> {
        timed(
            &op_latency("public_channels"),
            self.inner.public_channels(workspace),
        )
        .await
    }

    async fn dm_channel(
        &self,
        workspace: &WorkspaceId,
        pair: (&UserId, &UserId),
    ) -> StoreResult<Option<ChannelId>> {
        timed(
            &op_latency("dm_channel"),
            self.inner.dm_channel(workspace, pair),
        )
        .await
    }

    async fn append(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        event: &Event,
        retention: u64,
    ) -> StoreResult<()> {
        let outcome = timed(
            &self.append_latency,
            self.inner.append(workspace, channel, event, retention),
        )
        .await;
        if outcome.is_ok() {
            self.events_appended.increment(1);
        }
        outcome
    }

    async fn append_joins(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        events: &[Event],
        retention: u64,
        max_user_channels: u64,
    ) -> StoreResult<usize> {
        let outcome = timed(
            &op_latency("append_joins"),
            self.inner
                .append_joins(workspace, channel, events, retention, max_user_channels),
        )
        .await;
        if let Ok(appended) = &outcome {
            self.events_appended.increment(*appended as u64);
        }
        outcome
    }

    async fn raise_last_seq(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        expected: u64,
        to: u64,
    ) -> StoreResult<()> {
        timed(
            &op_latency("raise_last_seq"),
            self.inner.raise_last_seq(workspace, channel, expected, to),
        )
        .await
    }

    async fn events_after(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        after: u64,
        max: usize,
    ) -> StoreResult<Vec<Event>> {
        timed(
            &op_latency("events_after"),
            self.inner.events_after(workspace, channel, after, max),
        )
        .await
    }

    async fn find_client_msg(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        user: &UserId,
        client_msg_id: &str,
    ) -> StoreResult<Option<(u64, u64)>> {
        timed(
            &op_latency("find_client_msg"),
            self.inner
                .find_client_msg(workspace, channel, user, client_msg_id),
        )
        .await
    }

    async fn message(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        seq: u64,
    ) -> StoreResult<Option<MessageView>> {
        timed(
            &op_latency("message"),
            self.inner.message(workspace, channel, seq),
        )
        .await
    }

    async fn messages(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        query: MessageQuery,
    ) -> StoreResult<Vec<MessageView>> {
        timed(
            &op_latency("messages"),
            self.inner.messages(workspace, channel, query),
        )
        .await
    }

    async fn user_channels(
        &self,
        workspace: &WorkspaceId,
        user: &UserId,
    ) -> StoreResult<Vec<ChannelId>> {
        timed(
            &op_latency("user_channels"),
            self.inner.user_channels(workspace, user),
        )
        .await
    }

    async fn channel_counts(
        &self,
        workspace: &WorkspaceId,
        users: &[UserId],
    ) -> StoreResult<Vec<u64>> {
        timed(
            &op_latency("channel_counts"),
            self.inner.channel_counts(workspace, users),
        )
        .await
    }

    async fn read_markers_in(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        users: &[UserId],
    ) -> StoreResult<Vec<u64>> {
        timed(
            &op_latency("read_markers_in"),
            self.inner.read_markers_in(workspace, channel, users),
        )
        .await
    }

    async fn read_markers(
        &self,
        workspace: &WorkspaceId,
        user: &UserId,
    ) -> StoreResult<HashMap<ChannelId, u64>> {
        timed(
            &op_latency("read_markers"),
            self.inner.read_markers(workspace, user),
        )
        .await
    }

    async fn advance_read_marker(
        &self,
        workspace: &WorkspaceId,
        user: &UserId,
        channel: &ChannelId,
        seq: u64,
    ) -> StoreResult<ReadMarker> {
        timed(
            &op_latency("advance_read_marker"),
            self.inner
                .advance_read_marker(workspace, user, channel, seq),
        )
        .await
    }

    async fn workspace_ids(&self) -> StoreResult<Vec<WorkspaceId>> {
        timed(&op_latency("workspace_ids"), self.inner.workspace_ids()).await
    }

    async fn create_webhook(
        &self,
        workspace: &WorkspaceId,
        hook: &WebhookRecord,
        max_per_user: u64,
    ) -> StoreResult<WebhookCreate> {
        timed(
            &op_latency("create_webhook"),
            self.inner.create_webhook(workspace, hook, max_per_user),
        )
        .await
    }

    async fn webhooks(&self, workspace: &WorkspaceId) -> StoreResult<Vec<WebhookRecord>> {
        timed(&op_latency("webhooks"), self.inner.webhooks(workspace)).await
    }

    async fn delete_webhook(&self, workspace: &WorkspaceId, id: &str) -> StoreResult<bool> {
        timed(
            &op_latency("delete_webhook"),
            self.inner.delete_webhook(workspace, id),
        )
        .await
    }

    async fn set_webhook_state(
        &self,
        workspace: &WorkspaceId,
        id: &str,
        state: &WebhookState,
    ) -> StoreResult<bool> {
        timed(
            &op_latency("set_webhook_state"),
            self.inner.set_webhook_state(workspace, id, state),
        )
        .await
    }

    async fn webhook_cursors(
        &self,
        workspace: &WorkspaceId,
        id: &str,
    ) -> StoreResult<HashMap<ChannelId, u64>> {
        timed(
            &op_latency("webhook_cursors"),
            self.inner.webhook_cursors(workspace, id),
        )
        .await
    }

    async fn advance_webhook_cursor(
        &self,
        workspace: &WorkspaceId,
        id: &str,
        channel: &ChannelId,
        seq: u64,
    ) -> StoreResult<()> {
        timed(
            &op_latency("advance_webhook_cursor"),
            self.inner
                .advance_webhook_cursor(workspace, id, channel, seq),
        )
        .await
    }

    async fn move_marks(&self) -> StoreResult<Vec<(WorkspaceId, MoveMark)>> {
        timed(&op_latency("move_marks"), self.inner.move_marks()).await
    }

    async fn begin_export(&self, workspace: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        timed(
            &op_latency("begin_export"),
            self.inner.begin_export(workspace, epoch),
        )
        .await
    }

    async fn freeze(&self, workspace: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        timed(&op_latency("freeze"), self.inner.freeze(workspace, epoch)).await
    }

    async fn release(&self, workspace: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        timed(&op_latency("release"), self.inner.release(workspace, epoch)).await
    }

    async fn abort_export(&self, workspace: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        timed(
            &op_latency("abort_export"),
            self.inner.abort_export(workspace, epoch),
        )
        .await
    }

    async fn begin_import(&self, workspace: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        timed(
            &op_latency("begin_import"),
            self.inner.begin_import(workspace, epoch),
        )
        .await
    }

    async fn commit_import(&self, workspace: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        timed(
            &op_latency("commit_import"),
            self.inner.commit_import(workspace, epoch),
        )
        .await
    }

    async fn abort_import(&self, workspace: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        timed(
            &op_latency("abort_import"),
            self.inner.abort_import(workspace, epoch),
        )
        .await
    }

    async fn export_keys(&self, workspace: &WorkspaceId, start: u64) -> StoreResult<KeyPage> {
        timed(
            &op_latency("export_keys"),
            self.inner.export_keys(workspace, start),
        )
        .await
    }

    async fn purge_workspace(&self, workspace: &WorkspaceId) -> StoreResult<()> {
        timed(
            &op_latency("purge_workspace"),
            self.inner.purge_workspace(workspace),
        )
        .await
    }

    async fn import_keys(
        &self,
        workspace: &WorkspaceId,
        epoch: u64,
        keys: &[KeyDump],
    ) -> StoreResult<()> {
        timed(
            &op_latency("import_keys"),
            self.inner.import_keys(workspace, epoch, keys),
        )
        .await
    }
}
