//! `confab ctl`: operator commands over a gateway's admin API, printed as tables or, with
//! `--json`, as the API's JSON.

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::cli::{CellCommand, CtlArgs, CtlCommand, WorkspaceCommand};

/// Longest `ctl` waits for one long admin call (a workspace move).
const LONG_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(execute(args))
}

async fn execute(args: CtlArgs) -> anyhow::Result<()> {
    let api = Api {
        client: reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()?,
        base: args.gateway.trim_end_matches('/').to_string(),
        token: args.admin_token,
    };
    let json_out = args.json;
    match args.command {
        CtlCommand::Cells => {
            let body = api
                .call(reqwest::Method::GET, "/admin/v1/cells", None)
                .await?;
            if json_out {
                return print_json(&body);
            }
            print_table(
                &[
                    "ID",
                    "REGION",
                    "STATUS",
                    "WORKSPACES",
                    "CONNECTIONS",
                    "URL",
                    "MAX WORKSPACES",
                    "MAX CONNECTIONS",
                ],
                body["cells"].as_array().map(Vec::as_slice).unwrap_or(&[]),
                &[
                    "id",
                    "region",
                    "status",
                    "workspaces",
                    "connections",
                    "url",
                    "max_workspaces",
                    "max_connections",
                ],
            );
        }
        CtlCommand::Cell { command } => cell(&api, command, json_out).await?,
        CtlCommand::Workspaces { cell } => {
            let path = match cell {
                Some(cell) => format!("/admin/v1/workspaces?cell={cell}"),
                None => "/admin/v1/workspaces".to_string(),
            };
            let body = api.call(reqwest::Method::GET, &path, None).await?;
            if json_out {
                return print_json(&body);
            }
            print_table(
                &["ID", "CELL", "REGION"],
                body["workspaces"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or(&[]),
                &["id", "cell", "region"],
            );
        }
        CtlCommand::Workspace { command } => workspace(&api, command, json_out).await?,
        CtlCommand::Token {
            workspace,
            user,
            bot,
            ttl,
        } => {
            let mut request = json!({"workspace": workspace, "user": user, "bot": bot});
            if let Some(ttl) = ttl {
                request["ttl_s"] = json!(ttl);
            }
            let body = api
                .call(reqwest::Method::POST, "/admin/v1/tokens", Some(request))
                .await?;
            if json_out {
                return print_json(&body);
            }
            println!("{}", body["token"].as_str().unwrap_or_default());
        }
    }
    Ok(())
}

async fn workspace(api: &Api, command: WorkspaceCommand, json_out: bool) -> anyhow::Result<()> {
    let body = match command {
        WorkspaceCommand::Create { region, id, name } => {
            let mut request = json!({ "region": region });
            if let Some(id) = id {
                request["id"] = json!(id);
            }
            if let Some(name) = name {
                request["name"] = json!(name);
            }
            api.call(reqwest::Method::POST, "/admin/v1/workspaces", Some(request))
                .await?
        }
        WorkspaceCommand::Show { id } => {
            api.call(
                reqwest::Method::GET,
                &format!("/admin/v1/workspaces/{id}"),
                None,
            )
            .await?
        }
        WorkspaceCommand::Move { id, to } => {
            let spinner = progress::spinner(format!("moving workspace {id} to cell {to}"));
            let moved = api
                .call_long(
                    reqwest::Method::POST,
                    &format!("/admin/v1/workspaces/{id}/move"),
                    Some(json!({ "cell": to })),
                )
                .await;
            spinner.finish_and_clear();
            let moved = moved?;
            if !json_out {
                if moved["moved"].as_bool() == Some(false) {
                    eprintln!("workspace {id} is on cell {to} already");
                } else {
                    eprintln!(
                        "workspace {id} moved from cell {} to cell {to}: {} keys, writes waited {} ms, {} ms in all",
                        moved["from"].as_str().unwrap_or("?"),
                        moved["keys"],
                        moved["freeze_ms"],
                        moved["duration_ms"],
                    );
                }
            }
            moved
        }
    };
    if json_out {
        return print_json(&body);
    }
    print_table(
        &["ID", "CELL", "REGION"],
        &[body],
        &["id", "cell", "region"],
    );
    Ok(())
}

/// `cell drain [--move]` and `cell undrain`.
async fn cell(api: &Api, command: CellCommand, json_out: bool) -> anyhow::Result<()> {
    match command {
        CellCommand::Drain {
            id,
            move_workspaces,
        } => {
            let request = move_workspaces.then(|| json!({ "move": true }));
            let body = api
                .call(
                    reqwest::Method::POST,
                    &format!("/admin/v1/cells/{id}/drain"),
                    request,
                )
                .await?;
            if move_workspaces {
                let total = body["workspaces"].as_u64().unwrap_or(0);
                wait_until_empty(api, &id, total).await?;
            }
            if json_out {
                return print_json(&body);
            }
            if move_workspaces {
                println!("cell {id} is drained: it holds no workspace");
            } else {
                println!("cell {id} is draining: no new workspace will be placed on it");
            }
        }
        CellCommand::Undrain { id } => {
            let body = api
                .call(
                    reqwest::Method::POST,
                    &format!("/admin/v1/cells/{id}/undrain"),
                    None,
                )
                .await?;
            if json_out {
                return print_json(&body);
            }
            println!("cell {id} takes new workspaces again");
        }
    }
    Ok(())
}

/// Follows a drain with move in `GET /admin/v1/cells` until the cell holds no workspace,
/// with a progress bar on a terminal.
async fn wait_until_empty(api: &Api, id: &str, total: u64) -> anyhow::Result<()> {
    let bar = progress::bar(total, format!("draining cell {id}"));
    loop {
        let cells = api
            .call(reqwest::Method::GET, "/admin/v1/cells", None)
            .await?;
        let left = cells["cells"]
            .as_array()
            .and_then(|cells| cells.iter().find(|c| c["id"] == id))
            .and_then(|c| c["workspaces"].as_u64())
            .with_context(|| format!("cell {id} is no longer listed"))?;
        if left > bar.length().unwrap_or(0) {
            bar.set_length(left);
        }
        bar.set_position(bar.length().unwrap_or(0).saturating_sub(left));
        if left == 0 {
            bar.finish_and_clear();
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Progress display for long operations: drawn on stderr, and only when it is a terminal.
mod progress {
    use indicatif::{ProgressBar, ProgressStyle};

    pub fn spinner(message: String) -> ProgressBar {
        let spinner = ProgressBar::new_spinner().with_message(message);
        spinner.enable_steady_tick(std::time::Duration::from_millis(120));
        spinner
    }

    pub fn bar(total: u64, message: String) -> ProgressBar {
        let bar = ProgressBar::new(total).with_message(message);
        if let Ok(style) = ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} workspaces moved ({elapsed})",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    }
}

struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        self.send(method, path, body, None).await
    }

    /// A call that may take long (a move copies a whole workspace): no client timeout beyond
    /// [`LONG_CALL_TIMEOUT`].
    async fn call_long(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        self.send(method, path, body, Some(LONG_CALL_TIMEOUT)).await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        timeout: Option<std::time::Duration>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.request(method, &url).bearer_auth(&self.token);
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("calling {url}"))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let code = body["error"]["code"].as_str().unwrap_or("error");
            let message = body["error"]["message"].as_str().unwrap_or("");
            bail!("{status}: {code}: {message}");
        }
        Ok(body)
    }
}

fn print_json(body: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(body)?);
    Ok(())
}

/// Prints rows of JSON objects as an aligned table.
fn print_table(headers: &[&str], rows: &[Value], fields: &[&str]) {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            fields
                .iter()
                .map(|f| match &row[f] {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".into(),
                    other => other.to_string(),
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            cells
                .iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<&str>| {
        let padded: Vec<String> = values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in &cells {
        line(row.iter().map(String::as_str).collect());
    }
}
