//! What a runner holds of the backend's shared resources, as values that give it back when
//! they are dropped: no error path (a creation that fails halfway, a runner dropped without
//! being destroyed) can forget to free one.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The user id range (and network address) of one runner: slot n.
#[derive(Debug)]
pub struct SlotLease {
    pub slot: u32,
    slots: Arc<Mutex<BTreeSet<u32>>>,
}

impl SlotLease {
    /// The lowest free slot below `max`.
    pub fn take(slots: &Arc<Mutex<BTreeSet<u32>>>, max: u32) -> Option<SlotLease> {
        let mut taken = lock(slots);
        let slot = (0..max).find(|s| !taken.contains(s))?;
        taken.insert(slot);
        Some(SlotLease {
            slot,
            slots: slots.clone(),
        })
    }

    /// The slot an adopted runner already has.
    pub fn hold(slots: &Arc<Mutex<BTreeSet<u32>>>, slot: u32) -> SlotLease {
        lock(slots).insert(slot);
        SlotLease {
            slot,
            slots: slots.clone(),
        }
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        lock(&self.slots).remove(&self.slot);
    }
}

/// Host ports mapped to a runner's exposed ports.
#[derive(Debug)]
pub struct PortLease {
    ports: Vec<u16>,
    taken: Arc<Mutex<BTreeSet<u16>>>,
}

impl PortLease {
    /// One free port from `range` per exposed port, each passing `free` (nothing else on the
    /// host listens on it); `None` if there are not enough.
    pub fn take(
        taken: &Arc<Mutex<BTreeSet<u16>>>,
        range: std::ops::RangeInclusive<u16>,
        count: usize,
        free: impl Fn(u16) -> bool,
    ) -> Option<PortLease> {
        let mut held = lock(taken);
        let mut ports = Vec::with_capacity(count);
        let mut candidates = range;
        for _ in 0..count {
            let port = candidates
                .by_ref()
                .find(|p| !held.contains(p) && free(*p))?;
            ports.push(port);
        }
        held.extend(&ports);
        Some(PortLease {
            ports,
            taken: taken.clone(),
        })
    }

    /// The ports an adopted runner already has.
    pub fn hold(taken: &Arc<Mutex<BTreeSet<u16>>>, ports: Vec<u16>) -> PortLease {
        lock(taken).extend(&ports);
        PortLease {
            ports,
            taken: taken.clone(),
        }
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        let mut held = lock(&self.taken);
        for port in &self.ports {
            held.remove(port);
        }
    }
}

/// A runner id in the set of runners this server is making or holds: the janitor removes
/// everything of this instance that is not in it.
#[derive(Debug)]
pub struct KnownGuard {
    id: String,
    known: Arc<Mutex<HashSet<String>>>,
}

impl KnownGuard {
    pub fn new(known: &Arc<Mutex<HashSet<String>>>, id: &str) -> KnownGuard {
        lock(known).insert(id.to_string());
        KnownGuard {
            id: id.to_string(),
            known: known.clone(),
        }
    }
}

impl Drop for KnownGuard {
    fn drop(&mut self) {
        lock(&self.known).remove(&self.id);
    }
}

/// Everything one runner holds; held only to be dropped (which gives it all back).
#[derive(Debug)]
#[allow(dead_code)]
pub struct Leases {
    pub known: KnownGuard,
    pub slot: Option<SlotLease>,
    pub ports: Option<PortLease>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_give_back_what_they_hold_when_dropped() {
        let slots = Arc::default();
        let a = SlotLease::take(&slots, 3).unwrap();
        let b = SlotLease::take(&slots, 3).unwrap();
        assert_eq!((a.slot, b.slot), (0, 1));
        drop(a);
        assert_eq!(
            SlotLease::take(&slots, 3).unwrap().slot,
            0,
            "freed slots are reused"
        );
        let _c = SlotLease::take(&slots, 3).unwrap();
        assert!(SlotLease::take(&slots, 3).is_none() || lock(&slots).len() <= 3);

        let taken = Arc::default();
        let ports = PortLease::take(&taken, 100..=103, 3, |p| p != 101).unwrap();
        assert_eq!(ports.ports(), &[100, 102, 103]);
        assert!(PortLease::take(&taken, 100..=103, 1, |_| true).is_some_and(|l| l.ports() == [101]));
        assert!(
            PortLease::take(&taken, 100..=103, 2, |_| true).is_none(),
            "not enough ports"
        );
        assert_eq!(lock(&taken).len(), 3, "a failed take holds nothing");
        drop(ports);
        assert!(lock(&taken).is_empty());

        let known = Arc::default();
        let guard = KnownGuard::new(&known, "r1");
        assert!(lock(&known).contains("r1"));
        drop(guard);
        assert!(lock(&known).is_empty());
    }
}
