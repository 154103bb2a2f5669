//! The link itself: overflow, dropping, detaching, and store failures.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use common::*;
use confab_cells::store::{
    ChannelSnapshot, ChannelSummary, CreateOutcome, MessageQuery, NewChannel, ReadMarker,
    StoreResult, WebhookCreate, WebhookRecord, WebhookState,
};
use confab_cells::{CellStore, MemoryStore, StoreError};
use confab_shared::link::{CellOp, ChannelOp, ToCell};
use confab_shared::server::{Event, MessageView};
use confab_shared::{ChannelId, ErrorCode, UserId, WorkspaceId};

#[actix_rt::test]
async fn a_full_link_queue_gives_the_link_up_instead_of_blocking() {
    let (cell, mut gw) = start().await;
    // A gateway that never reads, with room for 4 messages.
    let mut slow = Gw::connect(&cell, "slow", 4);
    // Read only the attach outcome, so that the session is in the channel before the sends
    // (its user actor may run on another thread than the channel's).
    slow.attach("bob", "slow-b").await;
    gw.attach("alice", "a1").await;
    let lost = slow.link.lost();
    for i in 0..10 {
        gw.op("alice", None, send_op("general", &format!("m{i}")))
            .await
            .unwrap();
    }
    tokio::time::timeout(WAIT, lost).await.expect("lost fires");
    assert!(slow.link.is_lost());
    gw.settle().await;
    // The slow link's session is detached; the healthy one got every event.
    assert_eq!(cell.stats().connections, 1);
    assert_eq!(gw.drain("a1").await.len(), 10);
    // Further requests on the lost link are ignored, not queued.
    slow.send(ToCell::Detach {
        session: sid("slow-b"),
    });
    assert_eq!(
        ack_seq(&gw.op("alice", None, send_op("general", "still")).await),
        13
    );
}

#[actix_rt::test]
async fn dropping_the_link_handle_detaches_its_sessions() {
    let (cell, mut gw) = start().await;
    let mut other = Gw::connect(&cell, "g2", 100);
    other.attach("bob", "b2").await;
    gw.attach("alice", "a1").await;
    assert_eq!(cell.stats().connections, 2);
    drop(other);
    gw.settle().await;
    assert_eq!(cell.stats().connections, 1);
    gw.op("alice", None, send_op("general", "x")).await.unwrap();
    assert_eq!(gw.drain("a1").await.len(), 1);
}

#[actix_rt::test]
async fn a_detached_session_receives_nothing_more() {
    let (_cell, mut gw) = start().await;
    gw.attach("bob", "b1").await;
    gw.attach("bob", "b2").await;
    gw.send(ToCell::Detach { session: sid("b1") });
    gw.op("alice", None, send_op("general", "x")).await.unwrap();
    gw.settle().await;
    let last = gw.delivers.last().unwrap();
    assert_eq!(last.0, vec!["b2".to_string()]);
}

#[actix_rt::test]
async fn a_gateway_cannot_detach_another_gateways_session() {
    let (cell, mut gw) = start().await;
    let other = Gw::connect(&cell, "g2", 100);
    gw.attach("bob", "b1").await;
    other.send(ToCell::Detach { session: sid("b1") });
    gw.op("alice", None, send_op("general", "x")).await.unwrap();
    assert_eq!(gw.event("b1").await["type"], "message");
}

/// A MemoryStore whose appends fail while `fail` is set: the store going away mid-traffic.
struct FlakyStore {
    inner: MemoryStore,
    fail: AtomicBool,
    /// Appends land in the store but report failure (a timeout after the write).
    land_then_fail: AtomicBool,
}

#[async_trait]
impl CellStore for FlakyStore {
    async fn create_workspace(&self, w: &WorkspaceId, n: Option<&str>) -> StoreResult<bool> {
        self.inner.create_workspace(w, n).await
    }
    async fn workspace_exists(&self, w: &WorkspaceId) -> StoreResult<bool> {
        self.inner.workspace_exists(w).await
    }
    async fn workspace_count(&self) -> StoreResult<u64> {
        self.inner.workspace_count().await
    }
    async fn create_channel(&self, w: &WorkspaceId, c: &NewChannel) -> StoreResult<CreateOutcome> {
        self.inner.create_channel(w, c).await
    }
    async fn load_channel(
        &self,
        w: &WorkspaceId,
        c: &ChannelId,
    ) -> StoreResult<Option<ChannelSnapshot>> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("down".into()));
        }
        self.inner.load_channel(w, c).await
    }
    async fn channel_summaries(
        &self,
        w: &WorkspaceId,
        c: &[ChannelId],
    ) -> StoreResult<Vec<ChannelSummary>> {
        self.inner.channel_summaries(w, c).await
    }
    async fn public_channels(&self, w: &WorkspaceId) -> StoreResult<Vec<ChannelSummary>> {
        self.inner.public_channels(w).await
    }
    async fn dm_channel(
        &self,
        w: &WorkspaceId,
        p: (&UserId, &UserId),
    ) -> StoreResult<Option<ChannelId>> {
        self.inner.dm_channel(w, p).await
    }
    async fn append(&self, w: &WorkspaceId, c: &ChannelId, e: &Event, r: u64) -> StoreResult<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("down".into()));
        }
        self.inner.append(w, c, e, r).await?;
        if self.land_then_fail.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Unavailable("timed out".into()));
        }
        Ok(())
    }
    async fn append_joins(
        &self,
        w: &WorkspaceId,
        c: &ChannelId,
        e: &[Event],
        r: u64,
        max: u64,
    ) -> StoreResult<usize> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("down".into()));
        }
        let appended = self.inner.append_joins(w, c, e, r, max).await?;
        if self.land_then_fail.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Unavailable("timed out".into()));
        }
        Ok(appended)
    }
    async fn raise_last_seq(
        &self,
        w: &WorkspaceId,
        c: &ChannelId,
        expected: u64,
        to: u64,
    ) -> StoreResult<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("down".into()));
        }
        self.inner.raise_last_seq(w, c, expected, to).await
    }
    async fn events_after(
        &self,
        w: &WorkspaceId,
        c: &ChannelId,
        a: u64,
        m: usize,
    ) -> StoreResult<Vec<Event>> {
        self.inner.events_after(w, c, a, m).await
    }
    async fn find_client_msg(
        &self,
        w: &WorkspaceId,
        c: &ChannelId,
        u: &UserId,
        k: &str,
    ) -> StoreResult<Option<(u64, u64)>> {
        self.inner.find_client_msg(w, c, u, k).await
    }
    async fn message(
        &self,
        w: &WorkspaceId,
        c: &ChannelId,
        s: u64,
    ) -> StoreResult<Option<MessageView>> {
        self.inner.message(w, c, s).await
    }
    async fn messages(
        &self,
        w: &WorkspaceId,
        c: &ChannelId,
        q: MessageQuery,
    ) -> StoreResult<Vec<MessageView>> {
        self.inner.messages(w, c, q).await
    }
    async fn user_channels(&self, w: &WorkspaceId, u: &UserId) -> StoreResult<Vec<ChannelId>> {
        self.inner.user_channels(w, u).await
    }
    async fn channel_counts(&self, w: &WorkspaceId, u: &[UserId]) -> StoreResult<Vec<u64>> {
        self.inner.channel_counts(w, u).await
    }
    async fn read_markers_in(
        &self,
        w: &WorkspaceId,
        c: &ChannelId,
        u: &[UserId],
    ) -> StoreResult<Vec<u64>> {
        self.inner.read_markers_in(w, c, u).await
    }
    async fn read_markers(
        &self,
        w: &WorkspaceId,
        u: &UserId,
    ) -> StoreResult<HashMap<ChannelId, u64>> {
        self.inner.read_markers(w, u).await
    }
    async fn advance_read_marker(
        &self,
        w: &WorkspaceId,
        u: &UserId,
        c: &ChannelId,
        s: u64,
    ) -> StoreResult<ReadMarker> {
        self.inner.advance_read_marker(w, u, c, s).await
    }
    async fn workspace_ids(&self) -> StoreResult<Vec<WorkspaceId>> {
        self.inner.workspace_ids().await
    }
    async fn create_webhook(
        &self,
        w: &WorkspaceId,
        h: &WebhookRecord,
        max: u64,
    ) -> StoreResult<WebhookCreate> {
        self.inner.create_webhook(w, h, max).await
    }
    async fn webhooks(&self, w: &WorkspaceId) -> StoreResult<Vec<WebhookRecord>> {
        self.inner.webhooks(w).await
    }
    async fn delete_webhook(&self, w: &WorkspaceId, id: &str) -> StoreResult<bool> {
        self.inner.delete_webhook(w, id).await
    }
    async fn set_webhook_state(
        &self,
        w: &WorkspaceId,
        id: &str,
        s: &WebhookState,
    ) -> StoreResult<bool> {
        self.inner.set_webhook_state(w, id, s).await
    }
    async fn webhook_cursors(
        &self,
        w: &WorkspaceId,
        id: &str,
    ) -> StoreResult<HashMap<ChannelId, u64>> {
        self.inner.webhook_cursors(w, id).await
    }
    async fn advance_webhook_cursor(
        &self,
        w: &WorkspaceId,
        id: &str,
        c: &ChannelId,
        s: u64,
    ) -> StoreResult<()> {
        self.inner.advance_webhook_cursor(w, id, c, s).await
    }
}

#[actix_rt::test]
async fn a_failed_write_answers_unavailable_and_neither_reuses_nor_skips_a_seq() {
    let store = Arc::new(FlakyStore {
        inner: MemoryStore::new(),
        fail: AtomicBool::new(false),
        land_then_fail: AtomicBool::new(false),
    });
    let (_cell, mut gw) = start_with(store.clone(), 10_000).await;
    gw.attach("bob", "b1").await;
    assert_eq!(
        ack_seq(&gw.op("alice", None, send_op("general", "one")).await),
        3
    );
    store.fail.store(true, Ordering::SeqCst);
    let reply = gw.op("alice", None, send_op("general", "lost")).await;
    assert_eq!(code(&reply), ErrorCode::Unavailable);
    // While the store is down the reload fails too: still unavailable, never a guess.
    assert_eq!(
        code(&gw.op("alice", None, send_op("general", "lost")).await),
        ErrorCode::Unavailable
    );
    store.fail.store(false, Ordering::SeqCst);
    assert_eq!(
        ack_seq(&gw.op("alice", None, send_op("general", "two")).await),
        4
    );
    let events = gw.drain("b1").await;
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![3, 4]);
}

#[actix_rt::test]
async fn a_flood_of_requests_is_answered_not_blocked() {
    let (_cell, mut gw) = start().await;
    let reqs: Vec<u64> = (0..2000)
        .map(|i| {
            gw.send_request(
                "w",
                "alice",
                None,
                CellOp::channel(
                    ch(if i % 2 == 0 { "general" } else { "nope" }),
                    ChannelOp::Typing,
                ),
            )
        })
        .collect();
    for (i, req) in reqs.into_iter().enumerate() {
        let reply = gw.reply(req).await;
        if i % 2 == 1 {
            assert_eq!(code(&reply), ErrorCode::NotFound);
        }
    }
}

#[actix_rt::test]
async fn a_write_reported_failed_that_landed_is_delivered_before_the_next_event() {
    let store = Arc::new(FlakyStore {
        inner: MemoryStore::new(),
        fail: AtomicBool::new(false),
        land_then_fail: AtomicBool::new(false),
    });
    let (_cell, mut gw) = start_with(store.clone(), 10_000).await;
    gw.attach("bob", "b1").await;
    store.land_then_fail.store(true, Ordering::SeqCst);
    let reply = gw.op("alice", None, send_op("general", "maybe")).await;
    assert_eq!(code(&reply), ErrorCode::Unavailable);
    assert_eq!(
        ack_seq(&gw.op("alice", None, send_op("general", "next")).await),
        4
    );
    let events = gw.drain("b1").await;
    let texts: Vec<&str> = events.iter().map(|e| e["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["maybe", "next"]);
}
