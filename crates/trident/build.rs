//! Links the `trident` binary as a position-dependent executable (`-no-pie`).
//!
//! Every runner is two processes of this binary (`trident runner-init`). A PIE binary is
//! relocated at each start: the dynamic loader writes ~600 kB of absolute pointers into its
//! `.data.rel.ro` and GOT, so each runner would carry that as private, anonymous memory.
//! Linked at a fixed address, those pages need no relocation and stay clean page cache that
//! all runners share. The cost: the binary's own code and data sit at a fixed address
//! (libraries, heap and stacks stay randomized), as for Go's default builds; see
//! docs/SECURITY.md. The objects stay position-independent: only the final link changes.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
