//! `trident ws <url>`: a tiny WebSocket client for the execute route, so that the README's
//! tour needs nothing but curl and trident. Lines on standard input become text frames;
//! every server message is printed as one JSON line.

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;

#[derive(Args, Debug)]
pub struct WsArgs {
    /// The websocketUrl returned by POST /runners/{id}/execute
    url: String,
    /// Poseidon-Token, if the server requires one
    #[arg(long, env = "TRIDENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

pub async fn run(args: WsArgs) -> anyhow::Result<()> {
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            args.url.as_str(),
        )?;
    if let Some(token) = &args.token {
        request
            .headers_mut()
            .insert("Poseidon-Token", token.parse()?);
    }
    let (ws, _) = tokio_tungstenite::connect_async(request).await?;
    let (mut sink, mut stream) = ws.split();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if sink
                .send(Message::Text(format!("{line}\n").into()))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    while let Some(message) = stream.next().await {
        match message? {
            Message::Text(text) => println!("{text}"),
            Message::Close(frame) => {
                if let Some(frame) = frame {
                    eprintln!("closed: {}", u16::from(frame.code));
                }
                break;
            }
            _ => {}
        }
    }
    Ok(())
}
