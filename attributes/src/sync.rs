//! The synchronisation the conversion protocol is built on: std's, or
//! loom's when the crate is model-checked (`RUSTFLAGS="--cfg loom"`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

/// Locks `mutex`. Every change under these locks is made whole before the
/// lock is released or nothing can panic half-way through it, so a poisoned
/// lock still guards consistent data.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How long a waiter may go on waiting, and its pause between tries.
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct Deadline {
    end: Option<std::time::Instant>,
    pause: std::time::Duration,
}

#[cfg(not(loom))]
impl Deadline {
    /// Waiting for up to `wait` (none: do not wait).
    pub(crate) fn new(wait: Option<std::time::Duration>) -> Self {
        let end = wait.and_then(|wait| std::time::Instant::now().checked_add(wait));
        Deadline { end, pause: std::time::Duration::from_micros(10) }
    }

    /// Whether the time is up.
    pub(crate) fn expired(&self) -> bool {
        self.end.is_none_or(|end| std::time::Instant::now() >= end)
    }

    /// Waits a little, longer each time up to a millisecond: in-flight
    /// requests take microseconds, pins are let go of on a human scale.
    pub(crate) fn pause(&mut self) {
        std::thread::sleep(self.pause);
        self.pause = (self.pause * 2).min(std::time::Duration::from_millis(1));
    }
}

/// Under loom, time is a small number of tries: the model explores every
/// interleaving of them instead.
#[cfg(loom)]
#[derive(Debug)]
pub(crate) struct Deadline {
    tries: u32,
}

#[cfg(loom)]
impl Deadline {
    pub(crate) fn new(wait: Option<std::time::Duration>) -> Self {
        Deadline { tries: if wait.is_some() { 2 } else { 0 } }
    }

    pub(crate) fn expired(&self) -> bool {
        self.tries == 0
    }

    pub(crate) fn pause(&mut self) {
        self.tries = self.tries.saturating_sub(1);
        loom::thread::yield_now();
    }
}
