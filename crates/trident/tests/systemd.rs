//! The systemd integration: readiness and watchdog notifications on NOTIFY_SOCKET, and
//! socket activation (a listening socket passed as fd 3 with LISTEN_FDS).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn notifies_readiness_pets_the_watchdog_and_serves_a_passed_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let notify_path = tmp.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();

    // The "service manager" owns the listening socket; trident only gets it as fd 3.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let listener_fd = listener.as_raw_fd();

    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        // LISTEN_PID must be trident's own pid: exec keeps the shell's.
        .arg("LISTEN_PID=$$ WATCHDOG_PID=$$ exec \"$0\" serve --data-dir \"$1\" --destroy-runners-on-exit")
        .arg(env!("CARGO_BIN_EXE_trident"))
        .arg(tmp.path().join("data"))
        .env("LISTEN_FDS", "1")
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("TRIDENT_LISTEN")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: only dup2, async-signal-safe, runs between fork and exec.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::dup2(listener_fd, 3)?;
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();

    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().any(|m| m.contains("WATCHDOG=1")))
    {
        let n = notify.recv(&mut buf).expect("a notification from trident");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }

    // The passed socket serves the API (the flags' default address was not bound).
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 204"), "{response}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let n = notify.recv(&mut buf).expect("STOPPING");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    drop(listener);
}
