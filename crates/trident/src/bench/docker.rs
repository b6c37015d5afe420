//! `--suite docker`: the same command through a raw Docker Engine exec, for comparison: one
//! container of `--docker-image` (never pulled: it must be there), then create + start (to
//! its end) + inspect of an exec of `bash -c true` per sample, over the Engine API on
//! `/var/run/docker.sock` (plain HTTP/1.1, one connection per request, no CLI in between).
//! Skipped, with a line saying why, when there is no socket or no such image.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Report, Row};

const SOCKET: &str = "/var/run/docker.sock";

pub async fn run(report: &mut Report, image: &str, n: usize) -> anyhow::Result<()> {
    if !Path::new(SOCKET).exists() {
        report.say(&format!("docker suite skipped: no {SOCKET} on this host\n"));
        return Ok(());
    }
    let (status, _) = call("GET", &format!("/images/{image}/json"), None).await?;
    if status != 200 {
        report.say(&format!(
            "docker suite skipped: the image {image} is not on this host (--docker-image; \
             the bench never pulls)\n"
        ));
        return Ok(());
    }
    let (status, created) = call(
        "POST",
        "/containers/create",
        Some(json!({"Image": image, "Cmd": ["sleep", "infinity"], "NetworkDisabled": true})),
    )
    .await?;
    if status != 201 {
        bail!("creating a container: {status} {created}");
    }
    let id = created["Id"]
        .as_str()
        .context("no container id")?
        .to_string();
    let result = async {
        let (status, body) = call("POST", &format!("/containers/{id}/start"), None).await?;
        if status != 204 {
            bail!("starting the container: {status} {body}");
        }
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            exec_true(&id).await?;
            samples.push(t.elapsed());
        }
        anyhow::Ok(samples)
    }
    .await;
    let _ = call("DELETE", &format!("/containers/{id}?force=true"), None).await;
    let docker = Row::new("docker exec `bash -c true` (Engine API)", result?);
    let p50 = docker.p50();
    report.figure_ms("docker_exec_p50_ms", p50);
    let trident = report.figures.get("execute_p50_ms").and_then(Value::as_f64);
    report.table(
        &format!("trident bench (docker): {n} iterations, image {image}"),
        &[docker],
        "a raw Docker Engine exec in the same run",
    );
    if let Some(trident) = trident {
        let ratio = p50.as_secs_f64() * 1000.0 / trident;
        report.figure("docker_exec_ratio", ratio);
        report.say(&format!(
            "Docker exec p50 is {ratio:.1}x trident's execute round trip ({trident:.3} ms)\n"
        ));
    }
    Ok(())
}

async fn exec_true(container: &str) -> anyhow::Result<()> {
    let (status, created) = call(
        "POST",
        &format!("/containers/{container}/exec"),
        Some(json!({"Cmd": ["bash", "-c", "true"], "AttachStdout": true, "AttachStderr": true})),
    )
    .await?;
    if status != 201 {
        bail!("creating an exec: {status} {created}");
    }
    let exec = created["Id"].as_str().context("no exec id")?;
    // Attached: the answer streams the output and ends with the process.
    let (status, _) = call(
        "POST",
        &format!("/exec/{exec}/start"),
        Some(json!({"Detach": false, "Tty": false})),
    )
    .await?;
    if status != 200 {
        bail!("starting an exec: {status}");
    }
    let (_, inspected) = call("GET", &format!("/exec/{exec}/json"), None).await?;
    if inspected["ExitCode"] != json!(0) {
        bail!("the exec ended with {}", inspected["ExitCode"]);
    }
    Ok(())
}

/// One request on a fresh connection to the Engine: its status and JSON body (`Null` when
/// the body is not JSON).
async fn call(method: &str, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
    let mut stream = tokio::net::UnixStream::connect(SOCKET).await?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut answer))
        .await
        .context("the Docker Engine did not answer within 60 s")??;
    let text = String::from_utf8_lossy(&answer);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status from the Docker Engine")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let (Some(chunk), Some(after)) = (tail.get(..size), tail.get(size..)) else {
            break;
        };
        if size == 0 {
            break;
        }
        out.push_str(chunk);
        rest = after.trim_start_matches("\r\n");
    }
    out
}
