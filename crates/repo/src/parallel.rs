//! Small helpers to run independent work items on a bounded number of threads.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The first error of threads working together; later ones are dropped (they are usually
/// the same failure seen again, or others stopping because of it).
pub(crate) struct FirstError<E>(Mutex<Option<E>>);

impl<E> FirstError<E> {
    pub(crate) fn new() -> FirstError<E> {
        FirstError(Mutex::new(None))
    }

    pub(crate) fn record(&self, error: E) {
        self.slot().get_or_insert(error);
    }

    pub(crate) fn is_set(&self) -> bool {
        self.slot().is_some()
    }

    pub(crate) fn take(&self) -> Option<E> {
        self.slot().take()
    }

    fn slot(&self) -> MutexGuard<'_, Option<E>> {
        lock(&self.0)
    }
}

/// Locks `mutex`, also after a thread panicked holding it: what it guards stays usable
/// (the panic itself is reported where the thread is joined).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Applies `f` to every item on up to `jobs` threads; returns results in input order,
/// or the first error (remaining items are skipped once an error occurs).
pub fn map<T, R, E, F>(items: Vec<T>, jobs: usize, f: F) -> Result<Vec<R>, E>
where
    T: Send,
    R: Send,
    E: Send,
    F: Fn(T) -> Result<R, E> + Sync,
{
    let count = items.len();
    let jobs = jobs.clamp(1, count.max(1));
    let items: Vec<Mutex<Option<T>>> = items.into_iter().map(|i| Mutex::new(Some(i))).collect();
    let results: Vec<Mutex<Option<R>>> = (0..count).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let error = FirstError::new();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                if error.is_set() {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let Some(item) = items[i].lock().ok().and_then(|mut g| g.take()) else {
                    return;
                };
                match f(item) {
                    Ok(r) => {
                        if let Ok(mut slot) = results[i].lock() {
                            *slot = Some(r);
                        }
                    }
                    Err(e) => {
                        error.record(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = error.take() {
        return Err(e);
    }
    Ok(results
        .into_iter()
        .filter_map(|r| r.into_inner().ok().flatten())
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeps_order_and_reports_errors() {
        let out: Result<Vec<u32>, String> = super::map((0..100).collect(), 4, |i: u32| Ok(i * 2));
        assert_eq!(
            out.expect("ok"),
            (0..100).map(|i| i * 2).collect::<Vec<_>>()
        );
        let out: Result<Vec<u32>, String> = super::map((0..100).collect(), 4, |i: u32| {
            if i == 50 {
                Err("boom".into())
            } else {
                Ok(i)
            }
        });
        assert_eq!(out, Err("boom".to_string()));
    }
}
