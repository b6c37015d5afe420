//! `/runners/{id}/websocket`: runs a prepared execution and streams it.
//!
//! Server → client: `start`, any number of `stdout`/`stderr`, exactly one of `exit`,
//! `timeout` or `error`, then a close with code 1000. Client → server: text frames are the
//! process's standard input, verbatim. A client that goes away cancels the execution.

use std::collections::{HashMap, VecDeque};

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
    let sessions = state.config.sessions.clone();
    // The read buffer is allocated zeroed for every connection: at the default of 128 KiB
    // that memset was half of the server's instructions per execution (callgrind), for
    // clients that send a few bytes of input, if any. Larger frames still arrive whole.
    let upgrade = upgrade.read_buffer_size(READ_BUFFER_BYTES);
    Ok(upgrade.on_upgrade(move |socket| {
        sessions
            .tracker
            .track_future(run(state, runner_id, execution_id, socket))
    }))
}

/// The WebSocket sessions of running executions. They outlive their HTTP connections, so a
/// graceful shutdown of the HTTP server does not wait for them: `drain` does.
#[derive(Clone, Default)]
pub struct Sessions {
    tracker: tokio_util::task::TaskTracker,
    cut: tokio_util::sync::CancellationToken,
}

impl Sessions {
    /// Lets running executions finish until `deadline`, then cuts the rest: their
    /// executions are killed and their clients get an `error` and a close frame.
    pub async fn drain(&self, deadline: tokio::time::Instant) {
        self.tracker.close();
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                count = self.tracker.len(),
                "cutting executions still running"
            );
            self.cut.cancel();
            let _ = tokio::time::timeout(CUT_SEND_TIMEOUT + CLOSE_WAIT, self.tracker.wait()).await;
        }
    }
}

/// How long the last words of a cut session may wait for a client that does not read.
const CUT_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

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
            let drain = async { while let Some(Ok(_)) = incoming.next().await {} };
            let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
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
    let (gone_tx, mut gone_rx) = tokio::sync::oneshot::channel::<ClientGone>();
    let cut = state.config.sessions.cut.clone();
    // Only the client leaving counts as gone, so its socket is read whatever the process
    // does: input the process has not taken yet waits here, up to a bound past which it is
    // dropped (a process that leaves that much input unread has stopped reading), and so
    // is input that arrives after the process stopped taking any.
    let mut reader = tokio::spawn(async move {
        let mut pending: VecDeque<Vec<u8>> = VecDeque::new();
        let mut pending_bytes = 0;
        let mut stdin_open = true;
        let gone = loop {
            tokio::select! {
                message = incoming.next() => {
                    let bytes = match message {
                        Some(Ok(Message::Text(text))) => text.as_bytes().to_vec(),
                        Some(Ok(Message::Binary(bytes))) => bytes.to_vec(),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Close(_))) => break ClientGone::Closed,
                        Some(Err(e)) => break ClientGone::Violation(e.to_string()),
                        None => break ClientGone::Vanished,
                    };
                    if !stdin_open {
                        continue;
                    }
                    if pending_bytes + bytes.len() > MAX_PENDING_INPUT {
                        tracing::debug!("the process does not read its input: input dropped");
                        continue;
                    }
                    pending_bytes += bytes.len();
                    pending.push_back(bytes);
                }
                permit = stdin.reserve(), if !pending.is_empty() => match permit {
                    Ok(permit) => {
                        let bytes = pending.pop_front().expect("not empty");
                        pending_bytes -= bytes.len();
                        permit.send(bytes);
                    }
                    Err(_) => {
                        stdin_open = false;
                        pending.clear();
                        pending_bytes = 0;
                    }
                },
            }
        };
        let _ = gone_tx.send(gone);
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
            gone = &mut gone_rx => {
                // The client left: dropping the execution kills it; the runner stays usable.
                drop(execution);
                let farewell = async {
                    match gone {
                        // Its Close frame is answered with ours (RFC 6455 §5.5.1); the
                        // WebSocket layer queued the answer, closing sends it.
                        Ok(ClientGone::Closed) => sink.close().await,
                        // A frame that breaks the protocol ends the session with 1002.
                        Ok(ClientGone::Violation(reason)) => {
                            tracing::info!(runner = %runner_id, %reason, "WebSocket protocol violation");
                            sink.send(close_with(1002, &reason)).await
                        }
                        Ok(ClientGone::Vanished) | Err(_) => Ok(()),
                    }
                };
                let _ = tokio::time::timeout(CLOSE_WAIT, farewell).await;
                return;
            }
            () = cut.cancelled() => {
                // The server stops and the grace period is over: the execution is killed
                // (dropped), the runner stays.
                let last = async {
                    let error = ExecMessage::Error(GENERIC_ERROR_MESSAGE.into());
                    sink.send(Message::Text(frame(&error).into())).await?;
                    sink.send(close()).await
                };
                let _ = tokio::time::timeout(CUT_SEND_TIMEOUT, last).await;
                break;
            }
        }
    }
    drop(execution);
    // Closing the connection with the client's frames still unread would reset it, and the
    // client could lose the last messages: wait (briefly) for its close frame first.
    let _ = tokio::time::timeout(CLOSE_WAIT, &mut reader).await;
    reader.abort();
}

/// How the client left.
enum ClientGone {
    /// It sent a Close frame.
    Closed,
    /// It sent something that is not WebSocket.
    Violation(String),
    /// The connection ended without a Close frame.
    Vanished,
}

/// The read buffer of each WebSocket connection (tungstenite's own advice for many
/// connections that read little).
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// Input bytes held for a process that does not read them.
const MAX_PENDING_INPUT: usize = 1024 * 1024;

/// How long a session waits for the client's answer to its close frame.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long one message may wait for a client that does not read.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn close() -> Message {
    close_with(1000, "")
}

fn close_with(code: u16, reason: &str) -> Message {
    // A close frame's reason is at most 123 bytes; cut on a character boundary.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: reason[..end].into(),
    }))
}
