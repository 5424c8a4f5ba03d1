//! The thread that serves virtio devices: an `event-manager` epoll loop over every queue's
//! notifier (a KVM ioeventfd: a guest's QueueNotify write wakes this thread, not a vCPU
//! exit to ferry) and every backend's io fd (a tap, edge-triggered). Never a vCPU thread.

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::Transport;

/// The token of a backend's io fd (queue notifiers use their queue index).
const IO: u32 = u32::MAX;

/// One device's events.
#[derive(Debug)]
pub struct Handler {
    device: Arc<Mutex<Transport>>,
    notifiers: Vec<EventFd>,
    io: Option<RawFd>,
}

impl Handler {
    /// `notifiers[i]` is queue i's ioeventfd.
    pub fn new(device: Arc<Mutex<Transport>>, notifiers: Vec<EventFd>) -> Self {
        let io = device.lock().unwrap_or_else(|e| e.into_inner()).io_fd();
        Handler {
            device,
            notifiers,
            io,
        }
    }
}

impl MutEventSubscriber for Handler {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, n) in self.notifiers.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(n, i as u32, EventSet::IN)) {
                log::error!("virtio: watching queue {i}'s notifier: {e:?}");
            }
        }
        if let Some(fd) = self.io {
            let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::with_data_raw(fd, IO, set)) {
                log::error!("virtio: watching a device's io fd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut device = self.device.lock().unwrap_or_else(|e| e.into_inner());
        match events.data() {
            IO => device.io_ready(),
            i => {
                if let Some(n) = self.notifiers.get(i as usize) {
                    let _ = n.read();
                }
                device.notify(i as usize);
            }
        }
    }
}

/// The running loop; stopped and joined when dropped.
pub struct EventLoop {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventLoop")
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

impl EventLoop {
    /// Starts the loop over `handlers`.
    pub fn start(handlers: Vec<Handler>) -> std::io::Result<EventLoop> {
        let mut manager = EventManager::<Subscriber>::new()
            .map_err(|e| std::io::Error::other(format!("epoll: {e:?}")))?;
        for h in handlers {
            manager.add_subscriber(Arc::new(Mutex::new(h)));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("virtio".into())
            .spawn(move || {
                crate::sandbox::enter_or_exit(crate::sandbox::Kind::Virtio);
                while !stopping.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run_with_timeout(100) {
                        log::error!("virtio event loop: {e:?}");
                        return;
                    }
                }
            })?;
        Ok(EventLoop {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
