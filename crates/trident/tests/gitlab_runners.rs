//! GitLab Runner API v4, runner side of the house: registration, verification, token reset
//! and deletion, over real HTTP as agents send them (JSON or form bodies).

mod common;

use common::gitlab::v4;
use common::{Options, Server};
use serde_json::{json, Value};

async fn post_json(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = server
        .http
        .post(v4(server, path))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn registering() -> Options {
    Options {
        config_yaml: Some("registration_token: reg-secret\n".into()),
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_register_verify_reset_and_unregister() {
    let mut server = Server::start_with(registering());

    let (status, body) = post_json(
        &server,
        "/runners",
        json!({"token": "reg-secret", "description": "ci-1", "tag_list": ["docker", "linux"],
               "run_untagged": false, "maximum_timeout": 3600, "access_level": "ref_protected",
               "info": {"name": "gitlab-runner", "version": "17.0.0"}}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_i64().unwrap();
    let token = body["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("glrt-"), "{token}");
    assert_eq!(body["token_expires_at"], Value::Null);

    // Form bodies with a comma-separated tag list and nested info work too.
    let r = server
        .http
        .post(v4(&server, "/runners"))
        .form(&[
            ("token", "reg-secret"),
            ("tag_list", "a, b"),
            ("info[name]", "custom"),
            ("paused", "true"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let second: Value = r.json().await.unwrap();
    assert_ne!(second["id"].as_i64().unwrap(), id);

    // Bad registrations.
    for (body, expected) in [
        (json!({"token": "wrong"}), 403),
        (json!({}), 400),
        (
            json!({"token": "reg-secret", "active": true, "paused": false}),
            400,
        ),
        (
            json!({"token": "reg-secret", "maintainer_note": "a", "maintenance_note": "b"}),
            400,
        ),
        (
            json!({"token": "reg-secret", "access_level": "everyone"}),
            400,
        ),
        (
            json!({"token": "reg-secret", "maintenance_note": "x".repeat(1025)}),
            400,
        ),
        (json!({"token": "reg-secret", "maximum_timeout": 60}), 400),
        (json!({"token": "reg-secret", "tag_list": 5}), 400),
    ] {
        let (status, answer) = post_json(&server, "/runners", body.clone()).await;
        assert_eq!(status, expected, "{body}: {answer}");
    }
    let (_, missing) = post_json(&server, "/runners", json!({})).await;
    assert_eq!(missing, json!({"error": "token is missing"}));

    // Verify.
    let (status, body) = post_json(
        &server,
        "/runners/verify",
        json!({"token": token, "system_id": "s_1"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"id": id, "token": token, "token_expires_at": null})
    );
    let (status, _) = post_json(&server, "/runners/verify", json!({"token": "glrt-nope"})).await;
    assert_eq!(status, 403);

    // Registrations are durable, and only hashes of tokens are stored.
    server.restart();
    let (status, _) = post_json(&server, "/runners/verify", json!({"token": token})).await;
    assert_eq!(status, 200);
    let database = std::fs::read(server.data_dir.join("trident.db")).unwrap();
    let wal = std::fs::read(server.data_dir.join("trident.db-wal")).unwrap_or_default();
    for bytes in [&database, &wal] {
        assert!(
            !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
            "a runner token is stored in plain text"
        );
    }

    // Reset: the old token stops working, the new one works.
    let (status, body) = post_json(
        &server,
        "/runners/reset_authentication_token",
        json!({"token": token}),
    )
    .await;
    assert_eq!(status, 201);
    let new_token = body["token"].as_str().unwrap().to_string();
    assert_ne!(new_token, token);
    assert_eq!(body["token_expires_at"], Value::Null);
    assert_eq!(
        post_json(&server, "/runners/verify", json!({"token": token}))
            .await
            .0,
        403
    );
    assert_eq!(
        post_json(&server, "/runners/verify", json!({"token": new_token}))
            .await
            .0,
        200
    );

    // Unregister (the token may come in the query string, as Grape allows).
    let r = server
        .http
        .delete(format!("{}?token={new_token}", v4(&server, "/runners")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        post_json(&server, "/runners/verify", json!({"token": new_token}))
            .await
            .0,
        403
    );
    let r = server
        .http
        .delete(v4(&server, "/runners"))
        .json(&json!({"token": new_token}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_registration_token_nobody_registers() {
    let server = Server::start();
    let (status, _) = post_json(&server, "/runners", json!({"token": ""})).await;
    assert_eq!(status, 403);
    let (status, _) = post_json(&server, "/runners", json!({"token": "anything"})).await;
    assert_eq!(status, 403);
}
