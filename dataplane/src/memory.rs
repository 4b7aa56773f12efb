//! Giving freed heap memory back to the system.
//!
//! glibc's malloc keeps what a burst of allocations freed (a full configuration update, a
//! `/config` document for a thousand services) inside the heap: its trim threshold rises with
//! the largest block it ever handed out, so an idle proxy would keep the peak of its last
//! burst resident. [`trimmer`] returns free heap pages (`malloc_trim`) once a burst is over:
//! after a configuration change, or after [`trim_soon`] (the admin endpoint calls it after a
//! large answer). Never on the request path.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::state::Snapshot;

/// How long a burst has to be quiet before trimming.
const SETTLE: Duration = Duration::from_millis(500);

static SOON: Notify = Notify::const_new();

/// Ask [`trimmer`] to trim shortly (after a large transient allocation was freed).
pub fn trim_soon() {
    SOON.notify_one();
}

/// Return free heap pages to the system now. A no-op where malloc is not glibc's.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim only releases free memory of glibc's heaps; it takes the
        // arenas' locks itself and may be called from any thread at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Trim after every configuration change and every [`trim_soon`], once things settled; runs
/// until `changes`' sender is gone.
pub async fn trimmer(mut changes: watch::Receiver<Arc<Snapshot>>) {
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = SOON.notified() => {}
        }
        // Coalesce a burst (updates come in deltas) into one trim.
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = SOON.notified() => {}
                _ = tokio::time::sleep(SETTLE) => break,
            }
        }
        trim();
    }
}
