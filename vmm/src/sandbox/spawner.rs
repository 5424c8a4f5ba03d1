//! Threads started on another thread's behalf. Seccomp filters stack, so a thread that
//! starts others must allow what they need; the thread that parses a migration peer's
//! stream should allow far less. So where a spawner runs ([`start_spawner`], before the
//! parsing thread narrows its filter), [`spawn`] hands the new thread's work to it and
//! gets back the handle: the new thread inherits the spawner's wider filter (and may
//! narrow it further to its own kind), never the parser's. Without a spawner, [`spawn`]
//! starts the thread itself.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

/// One thread to start, and where to send its handle.
type Job = Box<dyn FnOnce() + Send>;

static SPAWNER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

/// Starts the process's spawner thread (once; later calls do nothing). Its filter is the
/// calling thread's at this moment.
pub fn start_spawner() -> std::io::Result<()> {
    if SPAWNER.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = channel::<Job>();
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || {
            for job in rx {
                job();
            }
        })?;
    let _ = SPAWNER.set(Mutex::new(tx));
    Ok(())
}

/// Starts a thread named `name` running `f`: by the spawner where one runs, else here.
pub fn spawn<T, F>(name: String, f: F) -> std::io::Result<JoinHandle<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    spawn_soon(name, f).handle()
}

/// A thread asked for and perhaps not started yet ([`spawn_soon`]).
#[derive(Debug)]
pub enum Spawning<T> {
    Started(std::io::Result<JoinHandle<T>>),
    Asked(Receiver<std::io::Result<JoinHandle<T>>>),
}

impl<T> Spawning<T> {
    /// The thread's handle, once it has started (or why it could not).
    pub fn handle(self) -> std::io::Result<JoinHandle<T>> {
        match self {
            Spawning::Started(r) => r,
            Spawning::Asked(rx) => rx.recv().map_err(|_| gone())?,
        }
    }
}

fn gone() -> std::io::Error {
    std::io::Error::other("the spawner thread has ended")
}

/// [`spawn`] without waiting for the thread to start: the caller goes on at once (the
/// spawner may need a moment to be scheduled on a busy host) and takes the handle later.
pub fn spawn_soon<T, F>(name: String, f: F) -> Spawning<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let builder = std::thread::Builder::new().name(name);
    let Some(spawner) = SPAWNER.get() else {
        return Spawning::Started(builder.spawn(f));
    };
    let (back, handle) = channel();
    let job: Job = Box::new(move || {
        let _ = back.send(builder.spawn(f));
    });
    match spawner.lock().unwrap_or_else(|e| e.into_inner()).send(job) {
        Ok(()) => Spawning::Asked(handle),
        Err(_) => Spawning::Started(Err(gone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_spawned_through_the_spawner_runs_and_hands_back_its_result() {
        start_spawner().unwrap();
        let h = spawn("spawned".into(), || {
            std::thread::current().name().map(str::to_string)
        })
        .unwrap();
        assert_eq!(h.join().unwrap().as_deref(), Some("spawned"));
    }
}
