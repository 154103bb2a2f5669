//! The webhook half of the `CellStore` contract, against both engines (`MemoryStore` and a
//! real `redis-server` per test): records, the per-user bound, state updates that never
//! recreate a deleted webhook, and cursors that only move forward.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use confab_cells::store::{WebhookCreate, WebhookRecord, WebhookState};
use confab_cells::{CellStore, MemoryStore, RedisStore};
use confab_shared::{ChannelId, UserId, WorkspaceId};
use confab_testkit::RedisServer;

struct Engine {
    store: Arc<dyn CellStore>,
    _redis: Option<RedisServer>,
}

fn memory_engine() -> Engine {
    Engine {
        store: Arc::new(MemoryStore::new()),
        _redis: None,
    }
}

fn redis_engine() -> Engine {
    let server = RedisServer::start();
    Engine {
        store: Arc::new(RedisStore::connect(&server.url()).unwrap()),
        _redis: Some(server),
    }
}

macro_rules! conformance {
    ($($check:ident),+ $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $check() {
                    let engine = super::memory_engine();
                    super::$check(&*engine.store).await;
                }
            )+
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $check() {
                    let engine = super::redis_engine();
                    super::$check(&*engine.store).await;
                }
            )+
        }
    };
}

conformance!(
    webhooks_are_stored_as_given_and_listed_by_id,
    a_user_has_at_most_the_bound_of_webhooks_and_deleting_frees_a_place,
    a_webhook_of_an_unknown_workspace_is_not_stored,
    state_updates_never_recreate_a_deleted_webhook,
    cursors_only_move_forward_and_go_with_their_webhook,
);

fn ws() -> WorkspaceId {
    WorkspaceId::new("w").unwrap()
}

fn ch(s: &str) -> ChannelId {
    ChannelId::new(s).unwrap()
}

fn hook(id: &str, user: &str) -> WebhookRecord {
    WebhookRecord {
        id: id.into(),
        user: UserId::new(user).unwrap(),
        url: "http://127.0.0.1:9/hook?a=1,b=2".into(),
        secret: "ab".repeat(32),
        events: vec!["message".into(), "member_joined".into()],
        channels: None,
        state: WebhookState::default(),
    }
}

async fn with_workspace(store: &dyn CellStore) {
    assert!(store.create_workspace(&ws(), None).await.unwrap());
}

async fn webhooks_are_stored_as_given_and_listed_by_id(store: &dyn CellStore) {
    with_workspace(store).await;
    let mut filtered = hook("Wb", "bot");
    filtered.channels = Some(vec![ch("general"), ch("ops")]);
    filtered.state = WebhookState {
        disabled: true,
        last_error: Some("status 500".into()),
        failing_since_ms: Some(1_700_000_000_000),
    };
    let plain = hook("Wa", "bot");
    for h in [&filtered, &plain] {
        assert_eq!(
            store.create_webhook(&ws(), h, 20).await.unwrap(),
            WebhookCreate::Created
        );
    }
    assert_eq!(store.webhooks(&ws()).await.unwrap(), vec![plain, filtered]);
    assert_eq!(store.workspace_ids().await.unwrap(), vec![ws()]);
}

async fn a_user_has_at_most_the_bound_of_webhooks_and_deleting_frees_a_place(
    store: &dyn CellStore,
) {
    with_workspace(store).await;
    for id in ["W1", "W2"] {
        assert_eq!(
            store
                .create_webhook(&ws(), &hook(id, "bot"), 2)
                .await
                .unwrap(),
            WebhookCreate::Created
        );
    }
    assert_eq!(
        store
            .create_webhook(&ws(), &hook("W3", "bot"), 2)
            .await
            .unwrap(),
        WebhookCreate::TooMany
    );
    assert_eq!(
        store
            .create_webhook(&ws(), &hook("W1", "other"), 2)
            .await
            .unwrap(),
        WebhookCreate::IdTaken
    );
    assert_eq!(
        store
            .create_webhook(&ws(), &hook("W4", "other"), 2)
            .await
            .unwrap(),
        WebhookCreate::Created,
        "the bound is per user"
    );
    assert!(store.delete_webhook(&ws(), "W1").await.unwrap());
    assert!(!store.delete_webhook(&ws(), "W1").await.unwrap());
    assert_eq!(
        store
            .create_webhook(&ws(), &hook("W3", "bot"), 2)
            .await
            .unwrap(),
        WebhookCreate::Created
    );
    let ids: Vec<String> = store
        .webhooks(&ws())
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.id)
        .collect();
    assert_eq!(ids, ["W2", "W3", "W4"]);
}

async fn a_webhook_of_an_unknown_workspace_is_not_stored(store: &dyn CellStore) {
    assert_eq!(
        store
            .create_webhook(&ws(), &hook("W1", "bot"), 20)
            .await
            .unwrap(),
        WebhookCreate::UnknownWorkspace
    );
    assert!(store.webhooks(&ws()).await.unwrap().is_empty());
}

async fn state_updates_never_recreate_a_deleted_webhook(store: &dyn CellStore) {
    with_workspace(store).await;
    store
        .create_webhook(&ws(), &hook("W1", "bot"), 20)
        .await
        .unwrap();
    let failing = WebhookState {
        disabled: false,
        last_error: Some("timeout after 5000 ms".into()),
        failing_since_ms: Some(42),
    };
    assert!(store
        .set_webhook_state(&ws(), "W1", &failing)
        .await
        .unwrap());
    assert_eq!(store.webhooks(&ws()).await.unwrap()[0].state, failing);
    assert!(store
        .set_webhook_state(&ws(), "W1", &WebhookState::default())
        .await
        .unwrap());
    assert_eq!(
        store.webhooks(&ws()).await.unwrap()[0].state,
        WebhookState::default()
    );
    store.delete_webhook(&ws(), "W1").await.unwrap();
    assert!(!store
        .set_webhook_state(&ws(), "W1", &failing)
        .await
        .unwrap());
    assert!(store.webhooks(&ws()).await.unwrap().is_empty());
}

async fn cursors_only_move_forward_and_go_with_their_webhook(store: &dyn CellStore) {
    with_workspace(store).await;
    store
        .create_webhook(&ws(), &hook("W1", "bot"), 20)
        .await
        .unwrap();
    store
        .advance_webhook_cursor(&ws(), "W1", &ch("general"), 9)
        .await
        .unwrap();
    store
        .advance_webhook_cursor(&ws(), "W1", &ch("general"), 10)
        .await
        .unwrap();
    store
        .advance_webhook_cursor(&ws(), "W1", &ch("general"), 3)
        .await
        .unwrap();
    store
        .advance_webhook_cursor(&ws(), "W1", &ch("ops"), 0)
        .await
        .unwrap();
    let cursors = store.webhook_cursors(&ws(), "W1").await.unwrap();
    assert_eq!(cursors.get(&ch("general")), Some(&10));
    assert_eq!(cursors.get(&ch("ops")), Some(&0));
    assert_eq!(cursors.len(), 2);
    store.delete_webhook(&ws(), "W1").await.unwrap();
    assert!(store.webhook_cursors(&ws(), "W1").await.unwrap().is_empty());
    // A cursor write racing the deletion does not bring its webhook's data back.
    store
        .advance_webhook_cursor(&ws(), "W1", &ch("general"), 11)
        .await
        .unwrap();
    assert!(store.webhook_cursors(&ws(), "W1").await.unwrap().is_empty());
}
