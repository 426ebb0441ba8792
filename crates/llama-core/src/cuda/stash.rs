//! Device buffers parked in pinned host memory between a forward and its backward, as
//! Unsloth offloads its gradient checkpoints: the copies run on a stream of their own, so they
//! overlap the device's work, and events order them against the device's stream both ways.
//!
//! The ordering, for a buffer put into slot i: the copy starts once the device's stream has
//! reached the put (the buffer is written); the buffer stays allocated until its
//! [`Transfer`] is dropped or waited on, which makes the device's stream wait for the copy
//! first (the memory pool reuses freed memory in the device stream's order). For a get: the
//! new buffer is allocated on the device's stream, the copy waits for that, and
//! [`Transfer::wait`] makes the device's stream wait for the copy before anything reads it.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};

use super::CudaDevice;
use crate::{Element, Error, Result};

/// Slots of pinned host memory, each holding one device buffer's copy.
pub struct HostStash<T> {
    device: Arc<CudaDevice>,
    /// The stream the copies run on.
    copies: Arc<CudaStream>,
    slots: Vec<Option<PinnedHostSlice<T>>>,
}

/// A device buffer with a copy in flight: [`Transfer::wait`] hands the buffer back once the
/// device's stream is ordered after the copy; dropping the transfer orders it the same way
/// before the buffer is freed.
pub struct Transfer<T> {
    /// Always Some until `wait` takes it.
    buffer: Option<CudaSlice<T>>,
    done: CudaEvent,
    device_stream: Arc<CudaStream>,
}

fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::cuda(what, e)
}

impl<T: Element> HostStash<T> {
    /// An empty stash with its own copy stream on `device`.
    pub fn new(device: &Arc<CudaDevice>) -> Result<HostStash<T>> {
        let copies = device
            .context
            .new_stream()
            .map_err(driver("cuStreamCreate"))?;
        Ok(HostStash {
            device: device.clone(),
            copies,
            slots: Vec::new(),
        })
    }

    /// Bytes of pinned host memory the slots hold.
    pub fn host_bytes(&self) -> usize {
        self.slots.iter().flatten().map(|s| s.num_bytes()).sum()
    }

    /// Starts copying `buffer` (as the work queued so far leaves it) into slot `i`, replacing
    /// what the slot held. The transfer lends the buffer to readers while the copy runs.
    pub fn put(&mut self, i: usize, buffer: CudaSlice<T>) -> Result<Transfer<T>> {
        let copies = self.copies.clone();
        copies
            .join(self.device.stream())
            .map_err(driver("cuStreamWaitEvent"))?;
        copies
            .memcpy_dtoh(&buffer, self.slot(i, buffer.len())?)
            .map_err(driver("cuMemcpyDtoHAsync"))?;
        self.transfer(buffer)
    }

    /// Starts copying slot `i` back into a new device buffer.
    pub fn get(&mut self, i: usize) -> Result<Transfer<T>> {
        let host = match self.slots.get(i) {
            Some(Some(host)) => host,
            _ => return Err(Error::EmptyStashSlot(i)),
        };
        let mut buffer = self.device.uninit::<T>(host.len())?;
        self.copies
            .join(self.device.stream())
            .map_err(driver("cuStreamWaitEvent"))?;
        self.copies
            .memcpy_htod(host, &mut buffer)
            .map_err(driver("cuMemcpyHtoDAsync"))?;
        self.transfer(buffer)
    }

    /// Slot i sized for `len` elements (allocated anew when its size differs; the old one
    /// waits for its last copy as it is dropped).
    fn slot(&mut self, i: usize, len: usize) -> Result<&mut PinnedHostSlice<T>> {
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        let host = match self.slots[i].take() {
            Some(host) if host.len() == len => host,
            // SAFETY: T is Pod (Element), so whatever bytes the fresh allocation holds are
            // valid values; every copy into it goes through cudarc's stream-ordered calls.
            _ => unsafe { self.device.context.alloc_pinned_with_flags::<T>(len, 0) }
                .map_err(driver("cuMemHostAlloc"))?,
        };
        Ok(self.slots[i].insert(host))
    }

    /// The transfer of `buffer` whose copy is the last work on the copy stream.
    fn transfer(&self, buffer: CudaSlice<T>) -> Result<Transfer<T>> {
        let done = self
            .copies
            .record_event(None)
            .map_err(driver("cuEventRecord"))?;
        Ok(Transfer {
            buffer: Some(buffer),
            done,
            device_stream: self.device.stream().clone(),
        })
    }
}

impl<T> Transfer<T> {
    /// The buffer, for work queued on the device's stream that only reads it while a put's
    /// copy runs (a get's buffer must be waited on before it is read).
    pub fn buffer(&self) -> &CudaSlice<T> {
        self.buffer
            .as_ref()
            .expect("a transfer holds its buffer until waited on")
    }

    /// The buffer, with the device's stream ordered after the copy.
    pub fn wait(mut self) -> Result<CudaSlice<T>> {
        self.device_stream
            .wait(&self.done)
            .map_err(driver("cuStreamWaitEvent"))?;
        Ok(self
            .buffer
            .take()
            .expect("a transfer holds its buffer until waited on"))
    }
}

impl<T> Drop for Transfer<T> {
    fn drop(&mut self) {
        if self.buffer.is_some() {
            // The buffer is freed on the device's stream: after the copy that reads or writes it.
            let ctx = self.device_stream.context();
            ctx.record_err(self.device_stream.wait(&self.done));
        }
    }
}
