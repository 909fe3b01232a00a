//! Wall time per backend op, behind a switch (`fnokern bench-step --profile`): every public op
//! of the backend opens a [`scope`] named after it; while profiling is on, the outermost scope on
//! each thread adds its wall time and a call to the op's row. Ops are called from the thread that
//! drives the step and block until their parallel work is done, so a row's time is the time the
//! step spends in that op. Off, a scope costs one relaxed atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Option<HashMap<&'static str, (u64, Duration)>>> = Mutex::new(None);

thread_local! {
    static DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Turns profiling on or off (the table is kept; see [`take`]).
pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// An open op: its time is added to the table when it is dropped.
pub(crate) struct Scope {
    name: &'static str,
    /// Whether this scope counted itself in the thread's depth (profiling was on when it opened).
    entered: bool,
    start: Option<Instant>,
}

/// Opens the scope of op `name`: timed when profiling is on and no other scope is open on this
/// thread (an op that runs other ops is counted once, under its own name).
pub(crate) fn scope(name: &'static str) -> Scope {
    if !ON.load(Ordering::Relaxed) {
        return Scope { name, entered: false, start: None };
    }
    let outer = DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get() == 1
    });
    Scope { name, entered: true, start: Some(Instant::now()).filter(|_| outer) }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if !self.entered {
            return;
        }
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        if let Some(t) = self.start {
            let dt = t.elapsed();
            let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
            let row = table.get_or_insert_with(HashMap::new).entry(self.name).or_default();
            row.0 += 1;
            row.1 += dt;
        }
    }
}

/// One op's row: its name, calls and total wall time since the last [`take`].
#[derive(Clone, Debug)]
pub struct OpTime {
    pub op: &'static str,
    pub calls: u64,
    pub time: Duration,
}

/// The rows gathered since the last call (slowest first), and a fresh table.
pub fn take() -> Vec<OpTime> {
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<OpTime> = table.take().unwrap_or_default().into_iter().map(|(op, (calls, time))| OpTime { op, calls, time }).collect();
    rows.sort_by(|a, b| b.time.cmp(&a.time).then(a.op.cmp(b.op)));
    rows
}
