//! Warm pools: idle instances per function, the per-function concurrency limit, keep-alive.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::instance::Instance;

/// Typical duration assumed for a function with no successful invocation yet, used to place
/// injected faults part-way through the work.
const DEFAULT_EXPECTED: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
struct Pool {
    /// Most recently used last (reused first, as Lambda tends to).
    idle: Vec<Instance>,
    /// Invocations holding a slot (cold-starting ones included).
    in_flight: u32,
    /// Exponentially weighted mean of successful durations, µs.
    expected_us: Option<f64>,
}

#[derive(Debug, Default)]
struct State {
    pools: BTreeMap<String, Pool>,
    closed: bool,
}

/// All functions' pools. Shared by the runtime and the slots it hands out.
#[derive(Debug)]
pub(crate) struct Pools {
    state: Mutex<State>,
    concurrency: u32,
}

/// The result of asking for a slot.
#[derive(Debug)]
pub(crate) enum Acquire {
    /// At the concurrency limit.
    Throttled,
    /// The runtime is shutting down.
    Closed,
    /// A slot, with a warm instance if one was idle.
    Slot(Slot),
}

/// A held unit of a function's concurrency. Dropping it frees the unit (cancel-safe).
#[derive(Debug)]
pub(crate) struct Slot {
    pools: Arc<Pools>,
    function: String,
    /// The warm instance, if one was idle; `None` means a cold start is needed.
    pub warm: Option<Instance>,
}

impl Pools {
    pub fn new(concurrency: u32) -> Arc<Pools> {
        Arc::new(Pools { state: Mutex::new(State::default()), concurrency })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a few assignments with no await in between; a poisoned lock still
        // holds a consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a concurrency unit of `function` and, if one is idle, a warm instance.
    pub fn acquire(self: &Arc<Self>, function: &str) -> Acquire {
        let mut dead = Vec::new();
        let res = {
            let mut st = self.lock();
            if st.closed {
                Acquire::Closed
            } else {
                let pool = st.pools.entry(function.to_owned()).or_default();
                if pool.in_flight >= self.concurrency {
                    Acquire::Throttled
                } else {
                    pool.in_flight += 1;
                    let mut warm = None;
                    while let Some(inst) = pool.idle.pop() {
                        if inst.is_alive() {
                            warm = Some(inst);
                            break;
                        }
                        dead.push(inst);
                    }
                    Acquire::Slot(Slot { pools: self.clone(), function: function.to_owned(), warm })
                }
            }
        };
        drop(dead); // killed and reaped by their supervisors, outside the lock
        res
    }

    /// The function's typical duration (for placing injected faults).
    pub fn expected(&self, function: &str) -> Duration {
        let st = self.lock();
        st.pools
            .get(function)
            .and_then(|p| p.expected_us)
            .map(|us| Duration::from_micros(us as u64))
            .unwrap_or(DEFAULT_EXPECTED)
    }

    /// Folds a successful duration into the function's typical duration.
    pub fn observe_ok(&self, function: &str, duration_us: u64) {
        let mut st = self.lock();
        if let Some(p) = st.pools.get_mut(function) {
            let x = duration_us as f64;
            p.expected_us = Some(match p.expected_us {
                Some(e) => 0.8 * e + 0.2 * x,
                None => x,
            });
        }
    }

    /// Removes and returns idle instances unused for longer than `keep_alive` (all idle ones
    /// if `keep_alive` is zero) and the ones that died while idle.
    pub fn take_expired(&self, keep_alive: Duration) -> Vec<Instance> {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut st = self.lock();
        for pool in st.pools.values_mut() {
            let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut pool.idle).into_iter().partition(|i| {
                i.is_alive() && !keep_alive.is_zero() && now.duration_since(i.last_used) <= keep_alive
            });
            pool.idle = keep;
            out.extend(gone);
        }
        out
    }

    /// Closes the pools (later acquires get [`Acquire::Closed`]) and returns every idle instance.
    pub fn close(&self) -> Vec<Instance> {
        let mut st = self.lock();
        st.closed = true;
        st.pools.values_mut().flat_map(|p| std::mem::take(&mut p.idle)).collect()
    }

    /// Idle instances of `function`.
    pub fn idle(&self, function: &str) -> usize {
        self.lock().pools.get(function).map_or(0, |p| p.idle.len())
    }

    /// Invocations of `function` in flight.
    pub fn in_flight(&self, function: &str) -> u32 {
        self.lock().pools.get(function).map_or(0, |p| p.in_flight)
    }
}

impl Slot {
    /// Returns `inst` to the idle pool if it is alive and the pools are open; otherwise it is
    /// dropped (killed and reaped). Frees the concurrency unit either way.
    pub fn release(self, inst: Instance) {
        if !inst.is_alive() {
            return;
        }
        let mut st = self.pools.lock();
        if st.closed {
            return;
        }
        if let Some(p) = st.pools.get_mut(&self.function) {
            p.idle.push(inst);
        }
        // `st` (a local) drops before `self` (a parameter), whose Drop locks again.
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.pools.lock();
        if let Some(p) = st.pools.get_mut(&self.function) {
            p.in_flight = p.in_flight.saturating_sub(1);
        }
    }
}
