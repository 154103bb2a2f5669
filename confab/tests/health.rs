//! SPEC §1, the processes: what `confab dev` prints on start (against a cluster: the listen
//! lines of the gateway and the cell), the web client at `/`, `/healthz`, `/readyz`,
//! `/metrics`, and flags read from the environment.

mod common;

use std::time::Duration;

use common::{DevServer, GENERAL, WAIT};
use serde_json::json;

/// The sum of a metric's samples (over all label sets); `None` when the metric is absent.
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // Only the metric itself, not one whose name merely starts the same.
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("unparsable sample: {line}"));
        *found.get_or_insert(0.0) += value;
    }
    found
}

async fn metrics_text(server: &DevServer) -> String {
    metrics_text_of(server.anon()).await
}

/// The `/metrics` text served to `http` (the gateway's or the cell's).
async fn metrics_text_of(http: common::Http) -> String {
    let response = http.get("/metrics").await;
    assert_eq!(response.status, 200, "{:?}", response.body);
    match response.body {
        serde_json::Value::String(text) => text,
        other => panic!("/metrics is not Prometheus text: {other}"),
    }
}

#[tokio::test]
async fn healthz_and_readyz_answer_200() {
    let server = DevServer::start().await;
    assert_eq!(server.anon().get("/healthz").await.status, 200);
    assert_eq!(server.anon().get("/readyz").await.status, 200);
    // Against a cluster the cell serves them too (with `confab dev` this is the same process).
    assert_eq!(server.cell_anon().get("/healthz").await.status, 200);
    assert_eq!(server.cell_anon().get("/readyz").await.status, 200);
}

#[tokio::test]
async fn metrics_expose_connections_published_events_and_delivery_latency() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    alice.send_message(GENERAL, "measure me").await;
    bob.next_event("message", WAIT).await;

    let response = server.anon().get("/metrics").await;
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain"),
        "content type {content_type:?}"
    );
    let text = metrics_text(&server).await;
    let connections = metric(&text, "confab_connections")
        .unwrap_or_else(|| panic!("no confab_connections in:\n{text}"));
    assert_eq!(connections, 2.0, "two client WebSockets are open");
    // Events are published by the cell: against a cluster its own process counts them.
    let cell_text = metrics_text_of(server.cell_anon()).await;
    let published = metric(&cell_text, "confab_events_published_total")
        .unwrap_or_else(|| panic!("no confab_events_published_total in:\n{cell_text}"));
    assert!(published >= 1.0, "a message was published: {published}");
    assert!(
        text.lines()
            .any(|l| !l.starts_with('#') && l.starts_with("confab_delivery_latency_seconds")),
        "no confab_delivery_latency_seconds samples in:\n{text}"
    );
    for text in [&text, &cell_text] {
        assert!(
            text.lines()
                .all(|l| l.starts_with('#') || l.is_empty() || l.starts_with("confab_")),
            "every metric name starts with confab_:\n{text}"
        );
    }

    // The gauge follows connections as they close.
    drop(alice);
    bob.send_close(1000).await;
    bob.expect_close(1000).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = metrics_text(&server).await;
        if metric(&text, "confab_connections") == Some(0.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "confab_connections did not return to 0:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn startup_prints_the_url_the_demo_tokens_and_the_admin_token() {
    let server = DevServer::start().await;
    if common::target() == common::Target::Cluster {
        // A gateway and a cell each print only their listen line; the web client line, the
        // demo tokens and the admin token are printed by `confab dev` alone.
        let gateway = server.stdout_line("confab gateway ").await;
        assert!(
            gateway.ends_with(&format!(" listening on {}", server.base_url())),
            "{gateway:?}"
        );
        let cell_lines = server.cell_stdout_lines();
        assert_eq!(
            cell_lines,
            vec![format!(
                "confab cell local-1 (region local, epoch 1) listening on {}",
                server.cell_base_url()
            )],
            "the cell's stdout"
        );
        eprintln!("not checked against a cluster: the web client line and the tokens printed by confab dev");
        return;
    }
    let web = server.stdout_line("web client: ").await;
    assert_eq!(web, format!("{}/", server.base_url()));
    let alice_token = server.stdout_line("token alice: ").await;
    let bob_token = server.stdout_line("token bob: ").await;
    let admin_token = server.stdout_line("admin token: ").await;
    assert_eq!(admin_token, "dev-admin");

    let alice = server.client_with_token(&alice_token).await;
    assert_eq!(alice.ready["user"], "alice");
    assert_eq!(alice.ready["workspace"], "demo");
    let mut bob = server.client_with_token(&bob_token).await;
    assert_eq!(bob.ready["user"], "bob");
    bob.send_message(GENERAL, "printed tokens work").await;
    server
        .http(&admin_token)
        .get("/admin/v1/cells")
        .await
        .expect_status(200);

    let lines = server.stdout_lines();
    let prefixes = [
        "confab dev listening on http://",
        "web client: ",
        "token alice: ",
        "token bob: ",
        "admin token: ",
    ];
    let order: Vec<usize> = prefixes
        .iter()
        .map(|p| {
            lines
                .iter()
                .position(|l| l.starts_with(p))
                .unwrap_or_else(|| panic!("no line {p:?} in {lines:#?}"))
        })
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "startup lines out of order: {lines:#?}"
    );
}

#[tokio::test]
async fn the_web_client_is_served_at_the_root() {
    let server = DevServer::start().await;
    let response = server.anon().get("/").await;
    assert_eq!(response.status, 200);
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(content_type.starts_with("text/html"), "{content_type:?}");
}

#[tokio::test]
async fn flags_are_read_from_the_environment() {
    let server = DevServer::builder()
        .env("CONFAB_JWT_SECRET", "from-env")
        .env("CONFAB_ADMIN_TOKEN", "env-admin")
        .env("CONFAB_HEARTBEAT_MS", "7777")
        .env("CONFAB_MAX_TEXT_BYTES", "50")
        .start()
        .await;
    // The harness mints with the secret it passed.
    let mut alice = server.client("alice").await;
    assert_eq!(alice.ready["heartbeat_ms"], 7777);
    alice
        .request_error(
            "too_large",
            json!({"op": "send", "channel": GENERAL, "text": "t".repeat(51)}),
        )
        .await;
    let dev_secret_token = common::mint_with_secret(
        "dev-secret",
        &json!({"sub": "alice", "wsp": "demo", "exp": common::now_s() + 600}),
    );
    server
        .http(&dev_secret_token)
        .get("/v1/channels")
        .await
        .expect_error(401, "unauthorized");
    server
        .http("env-admin")
        .get("/admin/v1/cells")
        .await
        .expect_status(200);
    server
        .http("dev-admin")
        .get("/admin/v1/cells")
        .await
        .expect_error(401, "unauthorized");
}

/// Polls `/metrics` until `name` reads `want`; panics with the last text after [`WAIT`].
async fn wait_for_metric(server: &DevServer, name: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = metrics_text(server).await;
        if metric(&text, name) == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} did not return to {want}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn presence_subscriptions_of_sessions_closed_right_after_presence_sub_are_all_forgotten() {
    let server = DevServer::start().await;
    let users: Vec<String> = (0..500).map(|i| format!("user{i}")).collect();
    let request = json!({"op": "presence_sub", "id": "p", "users": users});
    // Many sessions, in parallel, each closing in the same write as its presence_sub: the
    // gateway handles the close before it could answer the subscription.
    let cycles = (0..8).map(|_| {
        let token = server.token("bob");
        let request = request.clone();
        let server = &server;
        async move {
            for _ in 0..25 {
                let mut bob = server.client_with_token(&token).await;
                bob.send_json_and_close(&request).await;
                // Until the server closes too (its reply may or may not come first).
                while let common::Incoming::Json(_) = bob.read(WAIT).await {}
            }
        }
    });
    futures_util::future::join_all(cycles).await;

    wait_for_metric(&server, "confab_connections", 0.0).await;
    wait_for_metric(&server, "confab_presence_watchers", 0.0).await;
    wait_for_metric(&server, "confab_presence_watched_users", 0.0).await;
}

/// Histogram samples are folded into their buckets by an upkeep thread, not only by scrapes:
/// without it, a process nobody scrapes keeps every socket write's latency sample forever.
#[tokio::test]
async fn the_process_runs_the_metrics_upkeep_that_keeps_unscraped_histograms_bounded() {
    let server = DevServer::start().await;
    let tasks = format!("/proc/{}/task", server.pid());
    let names: Vec<String> = std::fs::read_dir(&tasks)
        .unwrap_or_else(|e| panic!("reading {tasks}: {e}"))
        .filter_map(|task| task.ok())
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect();
    assert!(
        names.iter().any(|n| n == "metrics-upkeep"),
        "no metrics-upkeep thread among {names:?}"
    );
}
