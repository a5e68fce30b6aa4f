//! When calls are sent: closed loop (as fast as the server answers) or open loop at a fixed
//! rate, paced by a thread of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use tokio::sync::Semaphore;

/// The pacer never sleeps for less, to bound its wake-ups: above 20,000 calls/s it releases
/// several calls per wake-up, up to this much late.
pub const MIN_PACER_SLEEP: Duration = Duration::from_micros(50);

/// Hands calls out to the workers: when each is due, and when the run is over.
pub enum Schedule {
    /// Each worker calls again as soon as its previous call returns, so the server sets the
    /// pace, and latency counts from the actual send.
    Closed {
        end: Option<Instant>,
        limit: Option<u64>,
        taken: AtomicU64,
    },
    /// Calls fall due at a fixed rate, whatever the server does (`--rate`).
    Open(Arc<OpenLoop>),
}

/// A call handed out by a [`Schedule`]: its number in the run and, in an open loop, when it
/// was due.
pub struct Ticket {
    pub index: u64,
    pub due: Option<Instant>,
}

/// An open-loop schedule. A call is sent once it is due and a worker is free; its latency
/// counts from when it was due, so a server stall shows up as latency instead of as calls that
/// were silently never sent (coordinated omission).
pub struct OpenLoop {
    pub start: Instant,
    pub rate: f64,
    /// One permit per call that has fallen due and not yet been taken.
    pub due: Semaphore,
    pub taken: AtomicU64,
    pub limit: Option<u64>,
}

/// The thread that releases an open loop's calls.
pub struct Pacer {
    pub thread: thread::JoinHandle<u64>,
    pub open: Arc<OpenLoop>,
}

impl Pacer {
    /// Once the workers are done: how many calls fell due but were never sent.
    pub fn behind_schedule(self) -> anyhow::Result<u64> {
        let released = self
            .thread
            .join()
            .map_err(|_| anyhow!("the pacer thread panicked"))?;
        Ok(released - self.open.taken.load(Ordering::Relaxed))
    }
}

impl Schedule {
    pub fn closed(end: Option<Instant>, limit: Option<u64>) -> Arc<Self> {
        Arc::new(Self::Closed {
            end,
            limit,
            taken: AtomicU64::new(0),
        })
    }

    pub fn open(rate: f64, end: Option<Instant>, limit: Option<u64>) -> (Arc<Self>, Pacer) {
        let open = Arc::new(OpenLoop {
            start: Instant::now(),
            rate,
            due: Semaphore::new(0),
            taken: AtomicU64::new(0),
            limit,
        });
        let thread = {
            let open = open.clone();
            // A plain thread, not a tokio timer: tokio's timer ticks in whole milliseconds, so
            // calls would go out up to a millisecond late and that would count as latency.
            thread::spawn(move || {
                // Linux lets a sleep end up to 50 µs late by default (timer slack); this
                // thread's sleeps are the schedule, so it asks for none. Without it, pacing is
                // only later, not wrong, so a failure is ignored.
                #[cfg(target_os = "linux")]
                nix::sys::prctl::set_timerslack(1).ok();
                open.pace(end)
            })
        };
        (Arc::new(Self::Open(open.clone())), Pacer { thread, open })
    }

    /// The next call to make, or `None` once the run is over.
    pub async fn next(&self) -> Option<Ticket> {
        match self {
            Self::Closed { end, limit, taken } => {
                if end.is_some_and(|end| Instant::now() >= end) {
                    return None;
                }
                let index = taken.fetch_add(1, Ordering::Relaxed);
                if limit.is_some_and(|limit| index >= limit) {
                    return None;
                }
                Some(Ticket { index, due: None })
            }
            Self::Open(open) => {
                open.due.acquire().await.ok()?.forget();
                let index = open.taken.fetch_add(1, Ordering::Relaxed);
                if open.limit.is_some_and(|limit| index + 1 >= limit) {
                    // The last call: wake the idle workers so they finish.
                    open.due.close();
                }
                Some(Ticket {
                    index,
                    due: Some(open.due_at(index)),
                })
            }
        }
    }
}

impl OpenLoop {
    pub fn due_at(&self, index: u64) -> Instant {
        self.start + Duration::from_secs_f64(index as f64 / self.rate)
    }

    /// Releases each call when it falls due, until `end` or the limit; returns how many fell
    /// due. Calls due while every worker is busy wait as permits, and are sent late.
    pub fn pace(&self, end: Option<Instant>) -> u64 {
        let mut released = 0;
        loop {
            let now = Instant::now();
            if end.is_some_and(|end| now >= end) {
                self.due.close();
                return released;
            }
            // Call i is due at i / rate.
            let elapsed = now.duration_since(self.start).as_secs_f64();
            let mut due = (elapsed * self.rate) as u64 + 1;
            if let Some(limit) = self.limit {
                due = due.min(limit);
            }
            if due > released {
                self.due.add_permits((due - released) as usize);
                released = due;
            }
            if self.limit == Some(released) {
                return released;
            }
            let mut wake = self.due_at(released);
            if let Some(end) = end {
                wake = wake.min(end);
            }
            thread::sleep(
                wake.saturating_duration_since(Instant::now())
                    .max(MIN_PACER_SLEEP),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_loop_calls_fall_due_at_the_rate() {
        let (schedule, pacer) = Schedule::open(1000.0, None, Some(3));
        let Schedule::Open(open) = &*schedule else {
            unreachable!("Schedule::open is open")
        };
        assert_eq!(open.due_at(500) - open.start, Duration::from_millis(500));
        assert_eq!(pacer.thread.join().unwrap(), 3);
    }
}
