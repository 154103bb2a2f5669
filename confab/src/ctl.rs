//! `confab ctl`: operator commands over a gateway's admin API, printed as tables or, with
//! `--json`, as the API's JSON.

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::cli::{CellCommand, CtlArgs, CtlCommand, WorkspaceCommand};

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
        CtlCommand::Cell {
            command: CellCommand::Drain { id },
        } => {
            let body = api
                .call(
                    reqwest::Method::POST,
                    &format!("/admin/v1/cells/{id}/drain"),
                    None,
                )
                .await?;
            if json_out {
                return print_json(&body);
            }
            println!("cell {id} is draining: no new workspace will be placed on it");
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
            api.call(
                reqwest::Method::POST,
                &format!("/admin/v1/workspaces/{id}/move"),
                Some(json!({ "cell": to })),
            )
            .await?;
            api.call(
                reqwest::Method::GET,
                &format!("/admin/v1/workspaces/{id}"),
                None,
            )
            .await?
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
        let url = format!("{}{path}", self.base);
        let mut request = self.client.request(method, &url).bearer_auth(&self.token);
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
