//! End-to-end test of the web client served at `/`: a real `confab dev` process, chromedriver,
//! and two headless Chromium sessions acting as two users who chat and see each other online.
//!
//! Chromium and chromedriver come from Debian's `chromium` and `chromium-driver` packages
//! (`/usr/bin/chromium`, `/usr/bin/chromedriver`; `CONFAB_CHROMIUM` and `CONFAB_CHROMEDRIVER`
//! override the paths). When they are missing the test fails and says so: a browser test that
//! passes without a browser would prove nothing.

mod cluster;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fantoccini::key::Key;
use fantoccini::wd::Capabilities;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// How long any one condition may take to become true before the test fails.
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// Chromium's flags for a sandbox with no network: the background-networking ones stop it from
/// dialling Google's hosts, which this machine refuses.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,800",
];

/// A child process that is killed when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `confab dev` on a free port and returns it with its base URL, read from its stdout.
fn start_confab() -> (Reaped, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(["dev", "--listen", "127.0.0.1:0"])
        .env("CONFAB_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn confab dev");
    let stdout = child.stdout.take().expect("confab stdout is piped");
    let server = Reaped(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Keep draining stdout after the first line so the server never blocks on a full pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("confab dev listening on ") {
                let _ = tx.send(url.trim_end_matches('/').to_string());
            }
        }
    });
    let base = rx
        .recv_timeout(WAIT)
        .expect("confab dev did not print `confab dev listening on http://...` within 30 s");
    (server, base)
}

/// The path of a required executable, or a failure that says how to install it.
fn required_binary(env_var: &str, default: &str, package: &str) -> String {
    let path = std::env::var(env_var).unwrap_or_else(|_| default.to_string());
    assert!(
        Path::new(&path).is_file(),
        "{path} is missing: the browser test needs Debian's `chromium` and `chromium-driver` \
         packages (`apt-get install -y chromium chromium-driver`; this one is from `{package}`), \
         or set {env_var} to another path"
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

/// Starts chromedriver on a free port and waits until it answers `/status` as ready.
async fn start_chromedriver(driver: &str) -> (Reaped, String) {
    let port = free_port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {driver}: {e}"));
    let reaped = Reaped(child);
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let ready = match http.get(format!("{url}/status")).send().await {
            Ok(res) => res
                .json::<Value>()
                .await
                .is_ok_and(|v| v["value"]["ready"] == json!(true)),
            Err(_) => false,
        };
        if ready {
            return (reaped, url);
        }
        assert!(
            Instant::now() < deadline,
            "chromedriver did not become ready on {url} within 30 s"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// One headless Chromium session and its profile directory.
struct Browser {
    page: Client,
    profile: PathBuf,
}

impl Browser {
    /// Ends the session (chromedriver then stops that Chromium) and removes its profile.
    async fn close(self) {
        let _ = self.page.close().await;
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Opens one headless Chromium session with its own fresh profile directory.
async fn open_browser(driver_url: &str, chromium: &str, name: &str) -> Result<Browser, String> {
    let profile = std::env::temp_dir().join(format!(
        "confab-browser-{}-{name}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    std::fs::create_dir_all(&profile).map_err(|e| format!("create {}: {e}", profile.display()))?;
    let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    let mut caps = Capabilities::new();
    caps.insert("browserName".into(), json!("chrome"));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({ "binary": chromium, "args": args }),
    );
    match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(driver_url)
        .await
    {
        Ok(page) => Ok(Browser { page, profile }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&profile);
            Err(format!("start a chromium session for {name}: {e}"))
        }
    }
}

/// Polls `script` (a function body returning a value) until it returns something truthy and
/// returns that; on timeout, an error naming `what` and showing the page's status lines.
async fn wait_js(
    page: &Client,
    what: &str,
    script: &str,
    args: Vec<Value>,
) -> Result<Value, String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match page.execute(script, args.clone()).await {
            Ok(v) if truthy(&v) => return Ok(v),
            Ok(v) => v,
            Err(e) => json!(format!("script failed: {e}")),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "timed out after 30 s waiting for {what}; last result {last}; page: {}",
                page_state(page).await
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        _ => true,
    }
}

/// The page's status, error and members lines, for failure messages.
async fn page_state(page: &Client) -> String {
    let script = r##"
        const t = (s) => (document.querySelector(s) || {}).textContent || "";
        return `status=${JSON.stringify(t("#status"))} error=${JSON.stringify(t("#error"))} ` +
               `members=${JSON.stringify([...document.querySelectorAll("#members [data-user]")]
                   .map((n) => n.dataset.user + ":" + n.dataset.status))}`;
    "##;
    match page.execute(script, vec![]).await {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(e) => format!("unreadable ({e})"),
    }
}

/// Whether the element matched by `selector` exists.
const EXISTS: &str = "return !!document.querySelector(arguments[0]);";
/// The seq of the first delivered message (one with a seq) whose text contains `arguments[0]`.
const MESSAGE_SEQ: &str = r##"
    const n = [...document.querySelectorAll("#messages [data-seq]")]
        .find((m) => m.textContent.includes(arguments[0]));
    return n ? Number(n.dataset.seq) : null;
"##;

/// How a page logs in: with a user id and the admin token (development), or with a client
/// token in the `#token=` fragment (what a production gateway's page does).
enum Login<'a> {
    AdminToken,
    ClientToken(&'a str),
}

/// Loads the page as `user`, connects and opens `general`.
async fn log_in(page: &Client, base: &str, user: &str, how: Login<'_>) -> Result<(), String> {
    match how {
        Login::AdminToken => {
            page.goto(&format!("{base}/?user={user}"))
                .await
                .map_err(|e| format!("open {base}/ for {user}: {e}"))?;
            let prefilled = wait_js(
                page,
                "the #user input",
                "const n = document.querySelector('#user'); return n && n.value;",
                vec![],
            )
            .await?;
            if prefilled != json!(user) {
                return Err(format!("?user={user} prefilled #user with {prefilled}"));
            }
            click(page, "#connect").await?;
        }
        Login::ClientToken(token) => {
            // The page connects by itself and takes the token off the address bar.
            page.goto(&format!("{base}/#token={token}"))
                .await
                .map_err(|e| format!("open {base}/#token= for {user}: {e}"))?;
        }
    }
    wait_js(
        page,
        &format!("{user} to be connected"),
        "const s = document.querySelector('#status').textContent; \
         return s.includes('connected as ' + arguments[0]);",
        vec![json!(user)],
    )
    .await?;
    wait_js(
        page,
        "the general channel in #channels",
        EXISTS,
        vec![json!("#channels [data-channel=general]")],
    )
    .await?;
    click(page, "#channels [data-channel=general]").await?;
    wait_js(
        page,
        "general to be selected",
        EXISTS,
        vec![json!("#channels [data-channel=general].selected")],
    )
    .await?;
    Ok(())
}

async fn click(page: &Client, selector: &str) -> Result<(), String> {
    page.find(Locator::Css(selector))
        .await
        .map_err(|e| format!("find {selector}: {e}"))?
        .click()
        .await
        .map_err(|e| format!("click {selector}: {e}"))
}

async fn type_into_composer(page: &Client, text: &str) -> Result<(), String> {
    page.find(Locator::Css("#composer"))
        .await
        .map_err(|e| format!("find #composer: {e}"))?
        .send_keys(text)
        .await
        .map_err(|e| format!("type into #composer: {e}"))
}

/// Waits until `page` shows a delivered message containing `text`; returns its seq.
async fn wait_message(page: &Client, who: &str, text: &str) -> Result<u64, String> {
    let seq = wait_js(
        page,
        &format!("{who} to see the message {text:?}"),
        MESSAGE_SEQ,
        vec![json!(text)],
    )
    .await?;
    seq.as_u64()
        .ok_or_else(|| format!("message {text:?} has a non-numeric seq {seq}"))
}

/// A client token for `user` of `demo`, minted by the admin API (as an app backend would).
async fn mint_token(base: &str, user: &str) -> Result<String, String> {
    let body: Value = reqwest::Client::new()
        .post(format!("{base}/admin/v1/tokens"))
        .bearer_auth("dev-admin")
        .json(&json!({"workspace": "demo", "user": user}))
        .send()
        .await
        .map_err(|e| format!("mint a token for {user}: {e}"))?
        .json()
        .await
        .map_err(|e| format!("mint a token for {user}: {e}"))?;
    body["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("no token in {body}"))
}

/// The conversation itself; errors instead of panics so the browsers are always closed.
async fn scenario(alice: &Client, bob: &Client, base: &str) -> Result<(), String> {
    log_in(alice, base, "alice", Login::AdminToken).await?;
    let bob_token = mint_token(base, "bob").await?;
    log_in(bob, base, "bob", Login::ClientToken(&bob_token)).await?;
    let address = bob
        .current_url()
        .await
        .map_err(|e| format!("read bob's address: {e}"))?;
    if address.as_str().contains("token") {
        return Err(format!("the token stayed in the address bar: {address}"));
    }

    // Each sees the other online in the members panel, fed by GET members + presence_sub.
    wait_js(
        alice,
        "alice to see bob online",
        EXISTS,
        vec![json!("#members [data-user=bob][data-status=online]")],
    )
    .await?;
    wait_js(
        bob,
        "bob to see alice online",
        EXISTS,
        vec![json!("#members [data-user=alice][data-status=online]")],
    )
    .await?;

    // Alice types: bob sees the typing indicator before the message exists.
    let hello = "hello from alice <b>not bold</b>";
    type_into_composer(alice, hello).await?;
    wait_js(
        bob,
        "bob to see that alice is typing",
        "return document.querySelector('#typing').textContent.includes('alice is typing');",
        vec![],
    )
    .await?;
    type_into_composer(alice, &Key::Enter.to_string()).await?;

    let seq_on_bob = wait_message(bob, "bob", hello).await?;
    let seq_on_alice = wait_message(alice, "alice", hello).await?;
    if seq_on_alice != seq_on_bob {
        return Err(format!(
            "the same message has seq {seq_on_alice} for alice and {seq_on_bob} for bob"
        ));
    }
    // The markup in the text must be shown as text, never parsed into elements.
    let bold = bob
        .execute(
            "return document.querySelectorAll('#messages b').length;",
            vec![],
        )
        .await
        .map_err(|e| format!("count <b> elements: {e}"))?;
    if bold != json!(0) {
        return Err(format!("user text was parsed as HTML: {bold} <b> elements"));
    }
    // Seqs 1 and 2 are the seeded member_joined events, so the first message is 3 or later.
    if seq_on_bob < 3 {
        return Err(format!(
            "message seq {seq_on_bob} collides with the seeded events"
        ));
    }
    let composer_value = alice
        .execute("return document.querySelector('#composer').value;", vec![])
        .await
        .map_err(|e| format!("read #composer value: {e}"))?;
    if composer_value != json!("") {
        return Err(format!("composer not cleared after send: {composer_value}"));
    }

    // Bob replies with the Send button; alice sees it after her own message.
    let reply = "hi alice, bob here";
    type_into_composer(bob, reply).await?;
    click(bob, "#send").await?;
    let reply_seq = wait_message(alice, "alice", reply).await?;
    wait_message(bob, "bob", reply).await?;
    if reply_seq <= seq_on_bob {
        return Err(format!("reply seq {reply_seq} is not after {seq_on_bob}"));
    }
    // Nothing is left pending once the acks are in.
    wait_js(
        alice,
        "alice's pending line to clear",
        "return document.querySelectorAll('#messages .pending').length === 0;",
        vec![],
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browser_users_exchange_messages_and_see_each_other_online() {
    let chromium = required_binary("CONFAB_CHROMIUM", "/usr/bin/chromium", "chromium");
    let chromedriver = required_binary(
        "CONFAB_CHROMEDRIVER",
        "/usr/bin/chromedriver",
        "chromium-driver",
    );
    let (_server, base) = start_confab();
    let (_driver, driver_url) = start_chromedriver(&chromedriver).await;
    let alice = match open_browser(&driver_url, &chromium, "alice").await {
        Ok(browser) => browser,
        Err(e) => panic!("{e}"),
    };
    let bob = match open_browser(&driver_url, &chromium, "bob").await {
        Ok(browser) => browser,
        Err(e) => {
            alice.close().await;
            panic!("{e}");
        }
    };

    let outcome = scenario(&alice.page, &bob.page, &base).await;

    // A picture of alice's page for humans, taken whether or not the scenario passed.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let shot = target.join("browser-screenshot.png");
    match alice.page.screenshot().await {
        Ok(png) => {
            if let Err(e) = std::fs::write(&shot, png) {
                eprintln!("could not write {}: {e}", shot.display());
            } else {
                eprintln!("screenshot: {}", shot.display());
            }
        }
        Err(e) => eprintln!("could not take a screenshot: {e}"),
    }
    alice.close().await;
    bob.close().await;

    if let Err(e) = outcome {
        panic!("{e}");
    }
}

/// Records every frame the page sends, in `window.confabSent` (an observer around the real
/// socket's `send`; the frames still go out unchanged).
const RECORD_SENDS: &str = r##"
    window.confabSent = [];
    const send = WebSocket.prototype.send;
    WebSocket.prototype.send = function (data) {
        try { window.confabSent.push(JSON.parse(data)); } catch (e) {}
        return send.call(this, data);
    };
    return true;
"##;

/// The `send` frames recorded for `arguments[0]` (a message text).
const SENDS_OF: &str = r##"
    return (window.confabSent || []).filter((f) => f.op === "send" && f.text === arguments[0]);
"##;

/// Alice sends while the cell's store is down: the send answers `unavailable`, and the page
/// sends again with the same client_msg_id until the store is back. The message is stored once.
async fn resend_scenario(
    page: &Client,
    cluster: &mut cluster::Running,
    room: &str,
) -> Result<(), String> {
    let base = cluster.gateway(0).url();
    page.goto(&format!("{base}/?user=alice&workspace=acme"))
        .await
        .map_err(|e| format!("open {base}/: {e}"))?;
    wait_js(page, "the #user input", EXISTS, vec![json!("#user")]).await?;
    click(page, "#connect").await?;
    wait_js(
        page,
        "alice to be connected",
        "return document.querySelector('#status').textContent.includes('connected as alice');",
        vec![],
    )
    .await?;
    let entry = format!("#channels [data-channel={room}]");
    wait_js(page, "the room in #channels", EXISTS, vec![json!(entry)]).await?;
    click(page, &entry).await?;
    wait_js(
        page,
        "the room to be selected",
        EXISTS,
        vec![json!(format!("{entry}.selected"))],
    )
    .await?;
    page.execute(RECORD_SENDS, vec![])
        .await
        .map_err(|e| format!("install the frame recorder: {e}"))?;

    cluster.cells[0].store.kill();
    let text = "sent while the store was down";
    type_into_composer(page, text).await?;
    type_into_composer(page, &Key::Enter.to_string()).await?;
    wait_js(
        page,
        "the page to send the message again after unavailable",
        "return (window.confabSent || []).filter((f) => f.op === 'send' && f.text === arguments[0]).length >= 2;",
        vec![json!(text)],
    )
    .await?;
    cluster.cells[0].store.restart();
    wait_message(page, "alice", text).await?;

    let sends = page
        .execute(SENDS_OF, vec![json!(text)])
        .await
        .map_err(|e| format!("read the recorded frames: {e}"))?;
    let ids: std::collections::HashSet<String> = sends
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| f["client_msg_id"].as_str().unwrap_or("").to_string())
        .collect();
    if ids.len() != 1 || ids.contains("") {
        return Err(format!(
            "the attempts did not share one client_msg_id: {sends}"
        ));
    }
    let shown = page
        .execute(
            "return [...document.querySelectorAll('#messages [data-seq]')]\
             .filter((m) => m.textContent.includes(arguments[0])).length;",
            vec![json!(text)],
        )
        .await
        .map_err(|e| format!("count the shown messages: {e}"))?;
    if shown != json!(1) {
        return Err(format!("the message is shown {shown} times"));
    }
    let token = cluster.token("acme", "alice").await;
    let (status, history) = cluster
        .api(
            0,
            &token,
            reqwest::Method::GET,
            &format!("/v1/channels/{room}/messages?limit=50"),
            None,
        )
        .await;
    let stored = history["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["text"] == text)
        .count();
    if status != 200 || stored != 1 {
        return Err(format!("stored {stored} times ({status}): {history}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_client_resends_with_the_same_client_msg_id_after_unavailable() {
    let chromium = required_binary("CONFAB_CHROMIUM", "/usr/bin/chromium", "chromium");
    let chromedriver = required_binary(
        "CONFAB_CHROMEDRIVER",
        "/usr/bin/chromedriver",
        "chromium-driver",
    );
    let mut cluster = cluster::Cluster::new().cell("c1", "us-east").start().await;
    cluster.create_workspace("acme", "us-east").await;
    let token = cluster.token("acme", "alice").await;
    let (status, body) = cluster
        .api(
            0,
            &token,
            reqwest::Method::POST,
            "/v1/channels",
            Some(json!({"name": "room", "kind": "public"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let room = body["id"].as_str().unwrap_or_default().to_string();
    let (_driver, driver_url) = start_chromedriver(&chromedriver).await;
    let alice = match open_browser(&driver_url, &chromium, "alice-resend").await {
        Ok(browser) => browser,
        Err(e) => panic!("{e}"),
    };
    let outcome = resend_scenario(&alice.page, &mut cluster, &room).await;
    alice.close().await;
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
