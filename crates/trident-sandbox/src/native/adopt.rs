//! Taking over a runner an earlier life of the server left running: its spec says which id
//! range and host ports it holds; a handshake on its socket proves it is alive and is the
//! runner it claims to be.

use std::time::Duration;

use trident_core::backend::{BackendError, BackendResult, RunnerSpec};

use super::leases::{KnownGuard, Leases, PortLease, SlotLease};
use super::{NativeBackend, NativeSandbox};
use crate::protocol::{Request, Response};
use crate::spec::{InitSpec, IDS_PER_RUNNER};

impl NativeBackend {
    pub(super) async fn adopt_runner(&self, spec: RunnerSpec) -> BackendResult<NativeSandbox> {
        let dir = self.runners_dir.join(&spec.runner_id);
        let init: Option<InitSpec> = std::fs::read(dir.join("spec.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let network = init.as_ref().and_then(|init| init.network.clone());
        let writable_bytes = init.as_ref().map(|init| init.writable_bytes);
        // What it holds stays taken while it lives (and is given back if it is gone).
        let ports = network.as_ref().map(|n| {
            PortLease::hold(
                &self.host_ports,
                n.ports.iter().map(|(_, host)| *host).collect(),
            )
        });
        let slot = init
            .as_ref()
            .and_then(|init| init.uid_base.checked_sub(self.config.first_runner_id))
            .map(|offset| SlotLease::hold(&self.id_slots, offset / IDS_PER_RUNNER));
        let leases = Leases {
            known: KnownGuard::new(&self.known, &spec.runner_id),
            slot,
            ports,
        };
        // Its runner-init is no child of ours any more: the cgroup is how we end it.
        let sandbox =
            NativeSandbox::new(self, &spec.runner_id, network, writable_bytes, None, leases);
        // A live runner-init answers on its socket with its own id; a dead one's socket
        // refuses the connection (pids may be reused, sockets are not).
        let answer =
            tokio::time::timeout(Duration::from_secs(5), sandbox.call(Request::Ping)).await;
        match answer {
            Ok(Ok((Response::Pong { runner_id }, _))) if runner_id == spec.runner_id => Ok(sandbox),
            Ok(Ok((other, _))) => Err(BackendError::Failed(format!(
                "runner {} answered as {other:?}",
                spec.runner_id
            ))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BackendError::Failed(format!(
                "runner {} did not answer",
                spec.runner_id
            ))),
        }
    }
}
