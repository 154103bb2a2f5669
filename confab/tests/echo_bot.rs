//! docs/examples/echo-bot against a live `confab dev`: a user says "ping", the bot (a Python
//! process, standard library only) hears it through its webhook and answers through the HTTP
//! API, and the user's WebSocket sees the answer. Also checks that the signature snippets of
//! docs/bots.md are the code that runs.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{now_s, DevServer, GENERAL, WAIT};
use serde_json::json;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository root")
        .to_path_buf()
}

/// The bot process, killed when dropped.
struct Bot(Child);

impl Drop for Bot {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the echo bot and waits (bounded) for its listening line.
fn start_bot(api: &str, token: &str) -> Bot {
    let script = repo_root().join("docs/examples/echo-bot/echo_bot.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .args(["--port", "0"])
        .env("CONFAB_URL", api)
        .env("BOT_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python3 echo_bot.py");
    let stdout = child.stdout.take().expect("bot stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("echo bot listening on") {
                let _ = tx.send(line);
            }
        }
    });
    let bot = Bot(child);
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the echo bot never said it was listening");
    bot
}

#[tokio::test]
async fn the_echo_bot_answers_ping_with_pong_on_the_users_websocket() {
    let server = DevServer::start().await;
    let token = server.mint(&json!({
        "sub": "echo", "wsp": common::DEMO, "bot": true, "exp": now_s() + 3600
    }));
    server
        .http(&token)
        .post(
            &format!("/v1/channels/{GENERAL}/members"),
            json!({"user": "echo"}),
        )
        .await
        .expect_status(200);
    let _bot = start_bot(server.base_url(), &token);

    let mut alice = server.client("alice").await;
    alice.send_message(GENERAL, "ping").await;
    let answer = alice
        .next_event_where("message", |e| e["user"] == "echo", WAIT)
        .await;
    assert_eq!(answer["text"], "pong");
    alice.send_message(GENERAL, "hello").await;
    let answer = alice
        .next_event_where("message", |e| e["user"] == "echo", WAIT)
        .await;
    assert_eq!(answer["text"], "echo: hello");
}

#[test]
fn the_signature_snippets_of_docs_bots_md_are_the_code_that_runs() {
    let root = repo_root();
    let doc = std::fs::read_to_string(root.join("docs/bots.md")).expect("read docs/bots.md");
    let mut checked = 0;
    let mut rest = doc.as_str();
    while let Some(at) = rest.find("<!-- tested: ") {
        let after = &rest[at + "<!-- tested: ".len()..];
        let (path, after) = after.split_once(" -->").expect("a closed tested marker");
        let fence = after.find("```").expect("a code block after the marker");
        let body_start = after[fence..].find('\n').expect("fence line") + fence + 1;
        let body_end = after[body_start..]
            .find("\n```")
            .expect("the code block's end")
            + body_start;
        let snippet = &after[body_start..body_end];
        let source =
            std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"));
        assert!(
            source.contains(snippet),
            "docs/bots.md's snippet is not in {path} verbatim:\n{snippet}"
        );
        checked += 1;
        rest = &after[body_end..];
    }
    assert_eq!(checked, 2, "the Python and the Rust snippet");
}
