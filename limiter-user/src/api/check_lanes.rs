//! Large batches of checks off the async runtime. A check runs BPF_PROG_TEST_RUN (about a
//! microsecond per check, a millisecond for a batch of a thousand) and blocks its thread
//! meanwhile; on the runtime's two worker threads a caller of large batches would stall every
//! other call, the Unix socket's and the metrics endpoint's included. So a batch larger than
//! [`super::INLINE_CHECKS`] (124) runs on tokio's blocking pool, in two lanes with their
//! own permits: TCP callers share one, the Unix socket has the other, so a flood of large
//! batches over TCP never makes a local `limiter check` wait for a thread. Single checks and
//! smaller batches are decided on the worker (the hop would cost more than they do).
//!
//! Each lane runs at most `threads` checks at once; up to `queue` more calls wait for a thread,
//! and a call beyond that is answered RESOURCE_EXHAUSTED at once rather than queued without
//! bound.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::Semaphore;
use tonic::Status;

use super::callers::Caller;

/// Default `--api-check-queue`: calls a lane lets wait for a thread.
pub const DEFAULT_CHECK_QUEUE: usize = 64;

/// The default `--api-check-threads`: one per CPU.
pub fn default_check_threads() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// The two lanes (see the module docs).
pub struct CheckLanes {
    tcp: Lane,
    unix: Lane,
}

struct Lane {
    name: &'static str,
    permits: Arc<Semaphore>,
    threads: usize,
    queue: usize,
    /// Calls running or waiting in this lane.
    inside: Arc<AtomicUsize>,
}

/// A place in a lane, given back when dropped (the call finished, or its caller went away).
struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl CheckLanes {
    /// `threads` (at least 1) per lane, `queue` waiting calls per lane.
    pub fn new(threads: usize, queue: usize) -> CheckLanes {
        let lane = |name| Lane {
            name,
            permits: Arc::new(Semaphore::new(threads.max(1))),
            threads: threads.max(1),
            queue,
            inside: Arc::new(AtomicUsize::new(0)),
        };
        CheckLanes {
            tcp: lane("TCP"),
            unix: lane("Unix socket"),
        }
    }

    /// Runs `work` on a blocking thread of `caller`'s lane (see the module docs).
    pub async fn run<T: Send + 'static>(
        &self,
        caller: &Caller,
        work: impl FnOnce() -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let lane = match caller {
            Caller::Unix => &self.unix,
            Caller::Tcp(_) => &self.tcp,
        };
        lane.run(work).await
    }
}

impl Lane {
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let capacity = self.threads + self.queue;
        let before = self.inside.fetch_add(1, Ordering::AcqRel);
        let place = Place(Arc::clone(&self.inside));
        if before >= capacity {
            return Err(Status::resource_exhausted(format!(
                "the agent's checks are saturated: {} calls of the {} lane are running or \
                 waiting for its {} check threads (--api-check-threads, --api-check-queue); \
                 retry shortly",
                before, self.name, self.threads
            )));
        }
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the agent is stopping"))?;
        tokio::task::spawn_blocking(move || {
            // Held until the work is done, even if the caller went away meanwhile.
            let _held = (permit, place);
            work()
        })
        .await
        .map_err(|e| Status::internal(format!("a check thread failed: {e}")))?
    }

    #[cfg(test)]
    fn inside(&self) -> usize {
        self.inside.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr},
        sync::mpsc,
        time::Duration,
    };

    use tonic::Code;

    use super::*;
    use crate::api::{
        auth::Role,
        callers::{CallerKey, Who},
    };

    fn tcp() -> Caller {
        Caller::Tcp(CallerKey {
            role: Role::Check,
            who: Who::Addr(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_tcp_lane_refuses_at_once_and_leaves_the_unix_lane_free() {
        let lanes = Arc::new(CheckLanes::new(1, 2));
        // Occupy the TCP lane's thread and its queue with work that waits for a release.
        let (release, wait) = mpsc::channel::<()>();
        let wait = Arc::new(std::sync::Mutex::new(wait));
        let mut held = Vec::new();
        for _ in 0..3 {
            let lanes = Arc::clone(&lanes);
            let wait = Arc::clone(&wait);
            held.push(tokio::spawn(async move {
                lanes
                    .run(&tcp(), move || {
                        let _ = wait.lock().unwrap().recv();
                        Ok(())
                    })
                    .await
            }));
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while lanes.tcp.inside() < 3 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .unwrap();
        let e = lanes.run(&tcp(), || Ok(())).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(
            e.message().contains("3 calls of the TCP lane"),
            "{}",
            e.message()
        );
        // The refused call gave its place back.
        assert_eq!(lanes.tcp.inside(), 3);
        // The Unix socket's lane answers meanwhile.
        let answer =
            tokio::time::timeout(Duration::from_secs(5), lanes.run(&Caller::Unix, || Ok(42)))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(answer, 42);
        for _ in 0..3 {
            release.send(()).unwrap();
        }
        for h in held {
            h.await.unwrap().unwrap();
        }
        assert_eq!(lanes.tcp.inside(), 0);
        lanes.run(&tcp(), || Ok(())).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_check_is_its_status_and_frees_its_place() {
        let lanes = CheckLanes::new(1, 0);
        let e = lanes
            .run::<()>(&tcp(), || Err(Status::invalid_argument("bad")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(lanes.tcp.inside(), 0);
        assert_eq!(lanes.run(&tcp(), || Ok(1)).await.unwrap(), 1);
    }
}
