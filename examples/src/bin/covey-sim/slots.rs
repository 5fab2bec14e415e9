//! Training slots: K virtual clients share the machine's cores.

use std::sync::{Arc, Condvar, Mutex};

use anyhow::{Context, Result, bail};
use covey_client::trainer::TrainError;

/// The places virtual clients train in, so that K of them share the
/// machine: each slot is a rayon pool with its share of the cores, and a
/// client trains only while it holds one. On the CPU, one step of these
/// small models runs on two cores at only 1.2–1.6× its speed on one, so a
/// client per core finishes rounds sooner (BENCHMARKS.md).
pub struct Slots {
    free: Mutex<Vec<Arc<rayon::ThreadPool>>>,
    returned: Condvar,
}

/// A slot taken from [`Slots`]; it goes back when dropped, even by a panic.
struct Held<'a> {
    slots: &'a Slots,
    pool: Arc<rayon::ThreadPool>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Ok(mut free) = self.slots.free.lock() {
            free.push(self.pool.clone());
            self.slots.returned.notify_one();
        }
    }
}

impl Slots {
    pub fn new(count: usize, threads_each: usize) -> Result<Self> {
        let free = (0..count)
            .map(|i| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads_each)
                    .thread_name(move |t| format!("covey-sim-slot-{i}-{t}"))
                    .build()
                    .map(Arc::new)
                    .context("starting a training thread pool")
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            free: Mutex::new(free),
            returned: Condvar::new(),
        })
    }

    /// Runs `work` on the first free slot's pool.
    pub fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> Result<R, TrainError> {
        let poisoned = |_| TrainError::Panicked("a training slot's lock was poisoned".into());
        let mut free = self.free.lock().map_err(poisoned)?;
        let pool = loop {
            if let Some(pool) = free.pop() {
                break pool;
            }
            free = self.returned.wait(free).map_err(poisoned)?;
        };
        drop(free);
        let held = Held { slots: self, pool };
        Ok(held.pool.install(work))
    }
}

/// How many clients train at once, and on how many threads each.
pub fn slot_plan(parallel: Option<usize>, on_cpu: bool) -> Result<(usize, usize)> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    match (parallel, on_cpu) {
        (Some(0), _) => bail!("--parallel must be at least 1"),
        (Some(n), false) if n > 1 => {
            bail!("--parallel {n}: clients on a GPU train one at a time; leave --parallel out")
        }
        (_, false) => Ok((1, cores)),
        (Some(n), true) => Ok((n, (cores / n).max(1))),
        (None, true) => Ok((cores, 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    #[test]
    fn slots_follow_the_device_and_the_flag() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(slot_plan(None, true).unwrap(), (cores, 1));
        assert_eq!(slot_plan(None, false).unwrap(), (1, cores));
        assert_eq!(slot_plan(Some(1), true).unwrap(), (1, cores));
        assert_eq!(slot_plan(Some(4 * cores), true).unwrap(), (4 * cores, 1));
        assert!(slot_plan(Some(0), true).is_err());
        let gpu = slot_plan(Some(2), false).unwrap_err().to_string();
        assert!(gpu.contains("one at a time"), "{gpu}");
    }

    #[test]
    fn no_more_clients_train_at_once_than_there_are_slots() {
        let slots = Arc::new(Slots::new(2, 1).unwrap());
        let (active, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let workers: Vec<_> = (0..6)
            .map(|_| {
                let (slots, active, most) = (slots.clone(), active.clone(), most.clone());
                std::thread::spawn(move || {
                    slots
                        .run(|| {
                            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(20));
                            active.fetch_sub(1, Ordering::SeqCst);
                            std::thread::current().name().map(str::to_owned)
                        })
                        .unwrap()
                })
            })
            .collect();
        for w in workers {
            let thread = w.join().unwrap().unwrap_or_default();
            assert!(thread.starts_with("covey-sim-slot-"), "ran on {thread}");
        }
        assert!((1..=2).contains(&most.load(Ordering::SeqCst)));
        assert_eq!(slots.free.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_panicking_client_gives_its_slot_back() {
        let slots = Slots::new(1, 1).unwrap();
        let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            slots.run(|| panic!("training blew up"))
        }));
        assert!(crashed.is_err());
        assert_eq!(slots.run(|| 7).unwrap(), 7);
        assert_eq!(slots.free.lock().unwrap().len(), 1);
    }
}
