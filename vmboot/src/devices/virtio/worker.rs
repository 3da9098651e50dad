//! The one thread that serves every virtio queue of a VM.
//!
//! Each queue has its own eventfd (an ioeventfd KVM signals when the guest writes the
//! queue's index to `QueueNotify`); the worker waits on all of them with one epoll and hands
//! a ready queue to its device. One thread instead of one per device keeps the thread shape
//! out of the devices: a new device only says how to serve a queue.

use crate::devices::{Context, Result};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Something with queues the worker serves.
pub trait QueueServer: Send + Sync {
    /// Queue `queue` was notified: serve what it holds (within the device's limits).
    fn serve(&self, queue: usize);
}

/// What wakes a handler: a queue's notify eventfd (read by the worker, to reset it), or a
/// backend's fd (left for the device to read, e.g. a tap's frames).
enum Source {
    Notify(EventFd),
    /// Only held: closing it would take it out of the epoll.
    Backend(#[allow(dead_code)] std::os::fd::OwnedFd),
}

type Handlers = Arc<Mutex<Vec<(Arc<dyn QueueServer>, usize, Source)>>>;

/// The shared worker thread; dropping it stops the thread (before guest memory goes: the
/// servers hold views of it).
pub struct Worker {
    epoll: Arc<Epoll>,
    stop: EventFd,
    handlers: Handlers,
    thread: Option<JoinHandle<()>>,
}

/// The epoll tag of the stop eventfd; handler `i` has tag `i`.
const STOP: u64 = u64::MAX;

impl Worker {
    pub fn start() -> Result<Worker> {
        let epoll = Arc::new(Epoll::new().context("epoll_create for the virtio worker")?);
        let stop = EventFd::new(libc::EFD_NONBLOCK).context("virtio worker stop eventfd")?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP),
            )
            .context("epoll_ctl for the virtio worker")?;
        let handlers: Handlers = Arc::default();
        let thread = {
            let epoll = epoll.clone();
            let handlers = handlers.clone();
            std::thread::Builder::new()
                .name("virtio".into())
                .spawn(move || run(&epoll, &handlers))
                .context("starting the virtio worker thread")?
        };
        Ok(Worker {
            epoll,
            stop,
            handlers,
            thread: Some(thread),
        })
    }

    /// Serves `queue` of `server` whenever `notify` is signalled.
    pub fn add(&self, notify: &EventFd, server: Arc<dyn QueueServer>, queue: usize) -> Result<()> {
        let fd = notify.try_clone().context("cloning a queue eventfd")?;
        let mut h = crate::devices::bus::lock(&self.handlers);
        let tag = h.len() as u64;
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, tag),
            )
            .context("epoll_ctl for a virtio queue")?;
        h.push((server, queue, Source::Notify(fd)));
        Ok(())
    }

    /// Serves `queue` of `server` whenever `fd` becomes readable. Edge-triggered: the
    /// device reads `fd` until it would block, or stops early only where something else
    /// brings it back (the guest's notify after it adds buffers, the kick of a resume).
    pub fn add_backend(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        server: Arc<dyn QueueServer>,
        queue: usize,
    ) -> Result<()> {
        let fd = fd.try_clone_to_owned().context("cloning a backend fd")?;
        let mut h = crate::devices::bus::lock(&self.handlers);
        let tag = h.len() as u64;
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, tag),
            )
            .context("epoll_ctl for a virtio backend")?;
        h.push((server, queue, Source::Backend(fd)));
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(epoll: &Epoll, handlers: &Handlers) {
    let mut events = vec![EpollEvent::default(); 32];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        for ev in &events[..n] {
            if ev.data() == STOP {
                return;
            }
            let entry = crate::devices::bus::lock(handlers)
                .get(ev.data() as usize)
                .map(|(s, q, src)| {
                    if let Source::Notify(fd) = src {
                        let _ = fd.read();
                    }
                    (s.clone(), *q)
                });
            if let Some((server, queue)) = entry {
                server.serve(queue);
            }
        }
    }
}
