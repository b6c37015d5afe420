//! `/runners/{id}/websocket`: runs a prepared execution and streams it.
//!
//! Server → client: `start`, any number of `stdout`/`stderr`, exactly one of `exit`,
//! `timeout` or `error`, then a close with code 1000. Client → server: text frames are the
//! process's standard input, verbatim. A client that goes away cancels the execution.

use std::collections::HashMap;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use trident_core::execution::{ExecMessage, GENERIC_ERROR_MESSAGE};

use crate::error::{ApiError, ApiResult};
use crate::AppState;

pub async fn connect(
    State(state): State<AppState>,
    Path(runner_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    state.manager.runner(&runner_id)?;
    let execution_id = query.get("executionID").cloned().unwrap_or_default();
    state
        .manager
        .has_pending_execution(&runner_id, &execution_id)?;
    let upgrade =
        upgrade.map_err(|e| ApiError::bad_request(format!("not a WebSocket upgrade: {e}")))?;
    Ok(upgrade.on_upgrade(move |socket| run(state, runner_id, execution_id, socket)))
}

fn frame(message: &ExecMessage) -> String {
    match message {
        ExecMessage::Stdout(data) => json!({"type": "stdout", "data": data}),
        ExecMessage::Stderr(data) => json!({"type": "stderr", "data": data}),
        ExecMessage::Exit(code) => json!({"type": "exit", "data": code}),
        ExecMessage::Timeout => json!({"type": "timeout"}),
        ExecMessage::Error(data) => json!({"type": "error", "data": data}),
    }
    .to_string()
}

async fn run(state: AppState, runner_id: String, execution_id: String, socket: WebSocket) {
    let (mut sink, mut incoming) = socket.split();
    let execution = state
        .manager
        .start_execution(&runner_id, &execution_id)
        .await;
    let mut execution = match execution {
        Ok(execution) => execution,
        Err(e) => {
            tracing::warn!(runner = %runner_id, error = %e, "execution could not start");
            let message = match e {
                trident_core::Error::RunnerNotFound(_) => {
                    trident_core::execution::RUNNER_DELETED_MESSAGE.to_string()
                }
                _ => GENERIC_ERROR_MESSAGE.to_string(),
            };
            let _ = sink
                .send(Message::Text(json!({"type": "start"}).to_string().into()))
                .await;
            let _ = sink
                .send(Message::Text(frame(&ExecMessage::Error(message)).into()))
                .await;
            let _ = sink.send(close()).await;
            return;
        }
    };
    if sink
        .send(Message::Text(json!({"type": "start"}).to_string().into()))
        .await
        .is_err()
    {
        return;
    }

    // Client input runs on its own task, so that a process that does not read its input
    // can never stall the output.
    let stdin = execution.stdin.clone();
    let (gone_tx, mut gone_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        while let Some(message) = incoming.next().await {
            let bytes = match message {
                Ok(Message::Text(text)) => text.as_bytes().to_vec(),
                Ok(Message::Binary(bytes)) => bytes.to_vec(),
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
                Ok(Message::Close(_)) | Err(_) => break,
            };
            if stdin.send(bytes).await.is_err() {
                break;
            }
        }
        let _ = gone_tx.send(());
    });

    loop {
        tokio::select! {
            message = execution.messages.recv() => {
                let Some(message) = message else { break };
                let terminal = message.is_terminal();
                // A client that stops reading stalls the process (backpressure), but not
                // forever: past the timeout it counts as gone and the execution is killed.
                let sent = tokio::time::timeout(
                    SEND_TIMEOUT,
                    sink.send(Message::Text(frame(&message).into())),
                )
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    if sent.is_err() {
                        tracing::info!(runner = %runner_id, "client stopped reading: execution cancelled");
                    }
                    break;
                }
                if terminal {
                    let _ = sink.send(close()).await;
                    break;
                }
            }
            _ = &mut gone_rx => {
                // The client left: dropping the execution kills it; the runner stays usable.
                break;
            }
        }
    }
    reader.abort();
}

/// How long one message may wait for a client that does not read.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn close() -> Message {
    Message::Close(Some(CloseFrame {
        code: 1000,
        reason: "".into(),
    }))
}
