//! Drives one execution: pumps its streams, enforces its time limit, and reports exactly one
//! terminal message whatever happens (exit, time limit, runner gone, client gone).

use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use crate::backend::{BackendExecution, ExitOutcome, Output, OutputStream};
use crate::utf8::Utf8Chunker;

/// The message a client reads; the WebSocket layer adds the leading `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecMessage {
    Stdout(String),
    Stderr(String),
    Exit(u8),
    Timeout,
    Error(String),
}

impl ExecMessage {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            ExecMessage::Exit(_) | ExecMessage::Timeout | ExecMessage::Error(_)
        )
    }
}

/// Why a runner ended while executions may still run on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerEnd {
    /// Deleted by a client, or its environment was removed.
    Deleted,
    InactivityTimeout,
}

/// Exact texts clients match on (CodeOcean maps the OOM one to "out of memory").
pub const OOM_MESSAGE: &str = "the allocation was OOM Killed";
pub const RUNNER_DELETED_MESSAGE: &str = "the allocation stopped as expected";
pub const GENERIC_ERROR_MESSAGE: &str = "Error executing the request";

/// A running execution as a front door sees it. Dropping it kills the execution.
pub struct RunningExecution {
    /// Output chunks, then exactly one terminal message, then the channel closes.
    pub messages: mpsc::Receiver<ExecMessage>,
    /// Bytes for the process's standard input.
    pub stdin: mpsc::Sender<Vec<u8>>,
}

/// Output chunks in flight per execution; a slow client stalls the process instead of
/// growing server memory.
const MESSAGE_BUFFER: usize = 16;

pub(crate) fn spawn(
    execution: BackendExecution,
    time_limit: Option<Duration>,
    runner_end: watch::Receiver<Option<RunnerEnd>>,
) -> RunningExecution {
    let (out_tx, out_rx) = mpsc::channel(MESSAGE_BUFFER);
    let (in_tx, in_rx) = mpsc::channel(MESSAGE_BUFFER);
    tokio::spawn(drive(execution, time_limit, runner_end, out_tx, in_rx));
    RunningExecution {
        messages: out_rx,
        stdin: in_tx,
    }
}

async fn drive(
    execution: BackendExecution,
    time_limit: Option<Duration>,
    mut runner_end: watch::Receiver<Option<RunnerEnd>>,
    out: mpsc::Sender<ExecMessage>,
    mut stdin_rx: mpsc::Receiver<Vec<u8>>,
) {
    let BackendExecution {
        mut stdin,
        output,
        exit,
        control,
    } = execution;
    let kill = || async {
        if let Err(e) = control.kill().await {
            tracing::warn!(error = %e, "killing an execution failed");
        }
    };

    // Output and the exit status are awaited together and all dropped at once when another
    // branch wins, so nothing can be sent after the terminal message.
    let finished = async {
        let (outcome, ()) = tokio::join!(exit, pump(output, &out));
        outcome
    };
    let feed_stdin = async {
        while let Some(bytes) = stdin_rx.recv().await {
            if stdin.write_all(&bytes).await.is_err() {
                break; // the process closed its input; keep running
            }
        }
        std::future::pending::<()>().await
    };
    let limit = async {
        match time_limit {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    let ended = async {
        match runner_end.wait_for(|end| end.is_some()).await {
            Ok(end) => *end,
            // The runner was dropped without an end reason: treat as deleted.
            Err(_) => Some(RunnerEnd::Deleted),
        }
    };

    // The runner's end comes first: its destruction kills the process at once, so the
    // process's end (a broken connection) is often ready at the same moment, and the client
    // must hear why (deleted, timed out), not a generic failure.
    let terminal = tokio::select! {
        biased;
        end = ended => {
            kill().await;
            Some(match end {
                Some(RunnerEnd::InactivityTimeout) => ExecMessage::Timeout,
                _ => ExecMessage::Error(RUNNER_DELETED_MESSAGE.into()),
            })
        }
        outcome = finished => Some(match outcome {
            ExitOutcome::Exited(code) => ExecMessage::Exit(code),
            ExitOutcome::OomKilled => ExecMessage::Error(OOM_MESSAGE.into()),
            ExitOutcome::Failed(reason) => {
                tracing::warn!(%reason, "execution failed in the backend");
                ExecMessage::Error(GENERIC_ERROR_MESSAGE.into())
            }
        }),
        () = limit => {
            kill().await;
            Some(ExecMessage::Timeout)
        }
        () = out.closed() => {
            // The client went away: cancel, the runner stays usable.
            kill().await;
            None
        }
        () = feed_stdin => None,
    };
    if let Some(message) = terminal {
        let _ = out.send(message).await;
    }
}

/// Turns the output into messages, each stream cut into valid UTF-8 on its own.
async fn pump(mut output: OutputStream, out: &mpsc::Sender<ExecMessage>) {
    let mut stdout = Utf8Chunker::default();
    let mut stderr = Utf8Chunker::default();
    while let Some(Ok(piece)) = output.next().await {
        let message = match piece {
            Output::Stdout(bytes) => ExecMessage::Stdout(stdout.push(&bytes)),
            Output::Stderr(bytes) => ExecMessage::Stderr(stderr.push(&bytes)),
        };
        let empty =
            matches!(&message, ExecMessage::Stdout(t) | ExecMessage::Stderr(t) if t.is_empty());
        if !empty && out.send(message).await.is_err() {
            return;
        }
    }
    for message in [
        ExecMessage::Stdout(stdout.finish()),
        ExecMessage::Stderr(stderr.finish()),
    ] {
        let empty =
            matches!(&message, ExecMessage::Stdout(t) | ExecMessage::Stderr(t) if t.is_empty());
        if !empty {
            let _ = out.send(message).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendResult, ExecutionControl};

    struct NoKill;

    #[async_trait::async_trait]
    impl ExecutionControl for NoKill {
        async fn kill(&self) -> BackendResult<()> {
            Ok(())
        }
    }

    /// A runner's destruction kills its processes at once, so their end (here: a failure,
    /// as a cut connection looks) is ready by the time the execution is driven: the client
    /// still hears that the runner was deleted, every time.
    #[tokio::test]
    async fn a_deleted_runner_is_reported_even_when_its_process_ended_first() {
        for _ in 0..50 {
            let execution = BackendExecution {
                stdin: Box::new(tokio::io::sink()),
                output: Box::pin(futures_util::stream::empty()),
                exit: Box::pin(async { ExitOutcome::Failed("connection cut".into()) }),
                control: Box::new(NoKill),
            };
            let (end_tx, end_rx) = watch::channel(None);
            end_tx.send_replace(Some(RunnerEnd::Deleted));
            let mut running = spawn(execution, None, end_rx);
            assert_eq!(
                running.messages.recv().await,
                Some(ExecMessage::Error(RUNNER_DELETED_MESSAGE.into()))
            );
            assert_eq!(running.messages.recv().await, None);
        }
    }
}
