//! SPEC §7, the admin API (workspace moves aside): cells, drain, workspaces and tokens, all
//! behind the admin token.

mod common;

use common::{now_s, DevServer, GENERAL};
use serde_json::{json, Value};

async fn the_only_cell(server: &DevServer) -> Value {
    let cells = server
        .admin()
        .get("/admin/v1/cells")
        .await
        .expect_status(200);
    let list = cells["cells"]
        .as_array()
        .unwrap_or_else(|| panic!("no cells array: {cells}"));
    assert_eq!(list.len(), 1, "the test deployment runs one cell: {cells}");
    list[0].clone()
}

#[tokio::test]
async fn the_admin_api_needs_the_admin_token() {
    let server = DevServer::start().await;
    let user_token = server.token("alice");
    let callers = [
        server.anon(),
        server.http("wrong-token"),
        server.http(&user_token),
        server.http_with_authorization("dev-admin"),
    ];
    for caller in &callers {
        caller
            .get("/admin/v1/cells")
            .await
            .expect_error(401, "unauthorized");
        caller
            .post(
                "/admin/v1/workspaces",
                json!({"region": "local", "id": "acme"}),
            )
            .await
            .expect_error(401, "unauthorized");
        caller
            .get("/admin/v1/workspaces/demo")
            .await
            .expect_error(401, "unauthorized");
        caller
            .post(
                "/admin/v1/tokens",
                json!({"workspace": "demo", "user": "alice"}),
            )
            .await
            .expect_error(401, "unauthorized");
        caller
            .post("/admin/v1/cells/any/drain", json!({}))
            .await
            .expect_error(401, "unauthorized");
    }
    // None of those created the workspace.
    server
        .admin()
        .get("/admin/v1/workspaces/acme")
        .await
        .expect_error(404, "not_found");
}

#[tokio::test]
async fn the_admin_token_flag_replaces_the_default() {
    let server = DevServer::builder()
        .arg("--admin-token", "t0p")
        .start()
        .await;
    server
        .http("dev-admin")
        .get("/admin/v1/cells")
        .await
        .expect_error(401, "unauthorized");
    server
        .http("t0p")
        .get("/admin/v1/cells")
        .await
        .expect_status(200);
}

#[tokio::test]
async fn cells_lists_the_dev_cell_healthy_in_region_local() {
    let server = DevServer::start().await;
    let _alice = server.client("alice").await;
    let cell = the_only_cell(&server).await;
    assert!(cell["id"].as_str().is_some_and(|s| !s.is_empty()), "{cell}");
    assert_eq!(cell["region"], "local");
    assert_eq!(cell["status"], "healthy");
    assert!(cell["url"].is_string(), "{cell}");
    // It holds demo.
    assert!(
        cell["workspaces"].as_u64().is_some_and(|n| n >= 1),
        "{cell}"
    );
    assert!(cell["connections"].is_u64(), "{cell}");
}

#[tokio::test]
async fn creating_a_workspace_answers_201_with_its_cell_and_region() {
    let server = DevServer::start().await;
    let cell = the_only_cell(&server).await;
    let created = server
        .admin()
        .post(
            "/admin/v1/workspaces",
            json!({"id": "acme", "name": "Acme Inc", "region": "local"}),
        )
        .await
        .expect_status(201);
    assert_eq!(
        created,
        json!({"id": "acme", "cell": cell["id"], "region": "local"})
    );
    let fetched = server
        .admin()
        .get("/admin/v1/workspaces/acme")
        .await
        .expect_status(200);
    assert_eq!(fetched, created);
    let demo = server
        .admin()
        .get("/admin/v1/workspaces/demo")
        .await
        .expect_status(200);
    assert_eq!(
        demo,
        json!({"id": "demo", "cell": cell["id"], "region": "local"})
    );

    // The cell now counts one more workspace.
    let after = the_only_cell(&server).await;
    assert_eq!(
        after["workspaces"].as_u64(),
        cell["workspaces"].as_u64().map(|n| n + 1),
        "{after}"
    );

    // The new workspace serves its users: empty, and usable.
    let mut alice = server.client_in("acme", "alice").await;
    assert_eq!(alice.ready["workspace"], "acme");
    assert_eq!(alice.ready["channels"], json!([]));
    alice.assert_alive().await;
}

#[tokio::test]
async fn a_workspace_without_an_id_gets_a_generated_one() {
    let server = DevServer::start().await;
    let created = server
        .admin()
        .post("/admin/v1/workspaces", json!({"region": "local"}))
        .await
        .expect_status(201);
    let id = created["id"].as_str().expect("generated id").to_string();
    assert!(
        !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
        "generated id {id:?} is not a valid id"
    );
    assert_eq!(created["region"], "local");
    server
        .admin()
        .get(&format!("/admin/v1/workspaces/{id}"))
        .await
        .expect_status(200);
}

#[tokio::test]
async fn creating_a_workspace_that_exists_is_409() {
    let server = DevServer::start().await;
    server
        .admin()
        .post(
            "/admin/v1/workspaces",
            json!({"id": "demo", "region": "local"}),
        )
        .await
        .expect_error(409, "conflict");
    server.create_workspace("acme").await;
    server
        .admin()
        .post(
            "/admin/v1/workspaces",
            json!({"id": "acme", "region": "local"}),
        )
        .await
        .expect_error(409, "conflict");
}

#[tokio::test]
async fn creating_a_workspace_in_a_region_without_a_cell_is_503() {
    let server = DevServer::start().await;
    server
        .admin()
        .post(
            "/admin/v1/workspaces",
            json!({"id": "mars1", "region": "mars"}),
        )
        .await
        .expect_error(503, "unavailable");
    server
        .admin()
        .get("/admin/v1/workspaces/mars1")
        .await
        .expect_error(404, "not_found");
}

#[tokio::test]
async fn creating_a_workspace_with_an_invalid_body_is_400() {
    let server = DevServer::start().await;
    let admin = server.admin();
    admin
        .post("/admin/v1/workspaces", json!({"id": "acme"}))
        .await
        .expect_error(400, "bad_request");
    admin
        .post(
            "/admin/v1/workspaces",
            json!({"id": "not valid", "region": "local"}),
        )
        .await
        .expect_error(400, "bad_request");
    admin
        .post_raw("/admin/v1/workspaces", "{")
        .await
        .expect_error(400, "bad_request");
}

#[tokio::test]
async fn an_unknown_workspace_is_404() {
    let server = DevServer::start().await;
    server
        .admin()
        .get("/admin/v1/workspaces/nowhere")
        .await
        .expect_error(404, "not_found");
}

#[tokio::test]
async fn minted_tokens_are_201_signed_jwts_that_open_their_workspace() {
    let server = DevServer::start().await;
    let before = now_s();
    let minted = server
        .admin()
        .post(
            "/admin/v1/tokens",
            json!({"workspace": "demo", "user": "robot", "bot": true, "ttl_s": 600}),
        )
        .await
        .expect_status(201);
    let token = minted["token"].as_str().expect("token").to_string();

    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.leeway = 0;
    let claims = jsonwebtoken::decode::<Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(b"dev-secret"),
        &validation,
    )
    .expect("the token is an HS256 JWT signed with the JWT secret")
    .claims;
    assert_eq!(claims["sub"], "robot");
    assert_eq!(claims["wsp"], "demo");
    assert_eq!(claims["bot"], true);
    let exp = claims["exp"].as_u64().expect("exp");
    assert!(
        exp + 5 >= before + 600 && exp <= now_s() + 605,
        "exp {exp} is not ttl_s after now ({before})"
    );

    // It works on the WebSocket and over HTTP.
    let mut robot = server.client_with_token(&token).await;
    assert_eq!(robot.ready["user"], "robot");
    robot
        .request_op("ack", json!({"op": "join", "channel": GENERAL}))
        .await;
    server
        .http(&token)
        .post("/v1/channels/general/messages", json!({"text": "beep"}))
        .await
        .expect_status(201);

    // Without ttl_s a token still has an expiry in the future.
    let plain = server
        .admin()
        .post(
            "/admin/v1/tokens",
            json!({"workspace": "demo", "user": "carol"}),
        )
        .await
        .expect_status(201);
    let claims = jsonwebtoken::decode::<Value>(
        plain["token"].as_str().expect("token"),
        &jsonwebtoken::DecodingKey::from_secret(b"dev-secret"),
        &validation,
    )
    .expect("valid token")
    .claims;
    assert!(claims["exp"].as_u64().is_some_and(|exp| exp > now_s()));
    assert_eq!(claims["sub"], "carol");
}

#[tokio::test]
async fn minting_a_token_with_an_invalid_body_is_400() {
    let server = DevServer::start().await;
    let admin = server.admin();
    for body in [
        json!({"workspace": "demo"}),
        json!({"user": "alice"}),
        json!({"workspace": "demo", "user": "not valid"}),
        json!({"workspace": "demo", "user": "alice", "ttl_s": "long"}),
    ] {
        admin
            .post("/admin/v1/tokens", body)
            .await
            .expect_error(400, "bad_request");
    }
}

#[tokio::test]
async fn a_drained_cell_takes_no_new_workspace() {
    let server = DevServer::start().await;
    let cell = the_only_cell(&server).await;
    let id = cell["id"].as_str().expect("cell id");
    let drained = server
        .admin()
        .post(&format!("/admin/v1/cells/{id}/drain"), json!({}))
        .await;
    assert_eq!(drained.status, 200, "{:?}", drained.body);
    assert_eq!(the_only_cell(&server).await["status"], "draining");
    server
        .admin()
        .post(
            "/admin/v1/workspaces",
            json!({"id": "late", "region": "local"}),
        )
        .await
        .expect_error(503, "unavailable");
    // Its existing workspaces are still served.
    let mut alice = server.client("alice").await;
    alice.send_message(GENERAL, "still served").await;
}

#[tokio::test]
async fn draining_an_unknown_cell_is_404() {
    let server = DevServer::start().await;
    server
        .admin()
        .post("/admin/v1/cells/no-such-cell/drain", json!({}))
        .await
        .expect_error(404, "not_found");
    assert_eq!(the_only_cell(&server).await["status"], "healthy");
}
