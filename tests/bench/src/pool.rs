//! Concurrent clients: one task per client, each with its own connection,
//! taking the next job until none is left.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::daemon::Client;
use crate::BenchResult;

/// One job's result and how long it took.
pub struct Outcome<T> {
    pub index: usize,
    pub latency: Duration,
    pub result: T,
}

/// Runs `op(client, index)` for every index in `0..jobs`, `clients.len()`
/// at a time; returns the outcomes in index order and the wall time.
pub async fn run<T, F, Fut>(
    clients: &[Client],
    jobs: usize,
    op: F,
) -> BenchResult<(Vec<Outcome<T>>, Duration)>
where
    F: Fn(Client, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let clients: Arc<Vec<Client>> = Arc::new(clients.to_vec());
    each(clients.len(), jobs, move |worker, index| {
        op(clients[worker].clone(), index)
    })
    .await
}

/// Runs `op(worker, index)` for every index in `0..jobs` on `workers`
/// tasks (worker `0..workers`), each taking the next index when it is done
/// with one; returns the outcomes in index order and the wall time.
pub async fn each<T, F, Fut>(
    workers: usize,
    jobs: usize,
    op: F,
) -> BenchResult<(Vec<Outcome<T>>, Duration)>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(workers);
    for worker in 0..workers {
        let (op, next) = (op.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= jobs {
                    break done;
                }
                let t0 = Instant::now();
                let result = op(worker, index).await;
                done.push(Outcome {
                    index,
                    latency: t0.elapsed(),
                    result,
                });
            }
        }));
    }
    let mut outcomes = Vec::with_capacity(jobs);
    for task in tasks {
        outcomes.extend(task.await.map_err(|e| format!("worker task failed: {e}"))?);
    }
    let wall = start.elapsed();
    outcomes.sort_by_key(|o| o.index);
    Ok((outcomes, wall))
}

/// Opens `n` clients, each on its own connection.
pub async fn clients(port: u16, n: usize) -> BenchResult<Vec<Client>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(crate::daemon::connect(port).await?);
    }
    Ok(clients)
}
