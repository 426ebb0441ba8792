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

use cudarc::driver::{result, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::driver::{DriverError, PinnedHostSlice};

use super::CudaDevice;
use crate::{Element, Error, Result};

/// Slots of pinned host memory, each holding one device buffer's copy.
pub struct HostStash<T> {
    device: Arc<CudaDevice>,
    /// The stream the copies run on.
    copies: Arc<CudaStream>,
    slots: Vec<Option<Slot<T>>>,
}

/// Pinned memory for the longest buffer put so far, the first `len` values in use: a slot
/// grows only, so inputs whose length varies from step to step (batches padded to their
/// longest row) do not reallocate pinned memory every step.
struct Slot<T> {
    host: PinnedHostSlice<T>,
    len: usize,
}

/// A device buffer with a copy in flight: [`Transfer::wait`] hands the buffer back once the
/// device's stream is ordered after the copy; dropping the transfer orders it the same way
/// before the buffer is freed.
pub struct Transfer<T> {
    /// Declared before the buffer, so dropped first: the device's stream waits for the copy
    /// before the buffer is freed on it.
    after_copy: AfterCopy,
    buffer: CudaSlice<T>,
}

/// Orders the device's stream after a copy (once), at the latest when dropped.
struct AfterCopy {
    /// The copy's completion, until the device's stream has been made to wait for it.
    done: Option<CudaEvent>,
    device_stream: Arc<CudaStream>,
}

fn driver(what: &'static str) -> impl Fn(DriverError) -> Error {
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
        self.slots
            .iter()
            .flatten()
            .map(|s| s.host.num_bytes())
            .sum()
    }

    /// Starts copying `buffer` (as the work queued so far leaves it) into slot `i`, replacing
    /// what the slot held. The transfer lends the buffer to readers while the copy runs.
    pub fn put(&mut self, i: usize, buffer: CudaSlice<T>) -> Result<Transfer<T>> {
        let n = buffer.len();
        let copies = self.copies.clone();
        self.after_device_work()?;
        let slot = self.slot(i, n)?;
        let host = slot
            .host
            .as_mut_slice()
            .map_err(driver("cuEventSynchronize"))?;
        {
            let (src, _record) = buffer.device_ptr(&copies);
            // SAFETY: the destination is n values of pinned memory this stash owns, which
            // only copies on its one stream touch: later copies into or out of the slot queue
            // after this one, and a slot's memory is freed only once that stream is idle
            // (`slot`, `Drop`). The source is the buffer's n values, which the transfer keeps
            // allocated until the device's stream is ordered after this copy.
            unsafe { result::memcpy_dtoh_async(&mut host[..n], src, copies.cu_stream()) }
                .map_err(driver("cuMemcpyDtoHAsync"))?;
        }
        self.transfer(buffer)
    }

    /// Starts copying slot `i` back into a new device buffer.
    pub fn get(&self, i: usize) -> Result<Transfer<T>> {
        let slot = self.slots.get(i).and_then(Option::as_ref);
        let slot = slot.ok_or(Error::EmptyStashSlot(i))?;
        let n = slot.len;
        let mut buffer = self.device.uninit::<T>(n)?;
        let copies = &*self.copies;
        self.after_device_work()?;
        let host = slot.host.as_slice().map_err(driver("cuEventSynchronize"))?;
        {
            let (dst, _record) = buffer.device_ptr_mut(copies);
            // SAFETY: the source is the slot's first n values, written by an earlier copy on
            // this stream (so done before this one starts) and freed only once the stream is
            // idle; the destination is the new buffer's n values, allocated on the device's
            // stream before the event this stream waits on, and kept allocated by the
            // transfer.
            unsafe { result::memcpy_htod_async(dst, &host[..n], copies.cu_stream()) }
                .map_err(driver("cuMemcpyHtoDAsync"))?;
        }
        self.transfer(buffer)
    }

    /// Orders the copy stream after the work queued on the device's stream so far.
    fn after_device_work(&self) -> Result<()> {
        self.copies
            .join(self.device.stream())
            .map_err(driver("cuStreamWaitEvent"))
    }

    /// Slot i holding `len` values: its pinned memory grown (allocated anew, once the copy
    /// stream is idle) when shorter.
    fn slot(&mut self, i: usize, len: usize) -> Result<&mut Slot<T>> {
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        let host = match self.slots[i].take() {
            Some(slot) if slot.host.len() >= len => slot.host,
            old => {
                if old.is_some() {
                    self.copies
                        .synchronize()
                        .map_err(driver("cuStreamSynchronize"))?;
                }
                drop(old);
                // SAFETY: T is Pod (Element), so whatever bytes the fresh allocation holds
                // are valid values; only this stash's stream-ordered copies touch it.
                unsafe { self.device.context.alloc_pinned_with_flags::<T>(len, 0) }
                    .map_err(driver("cuMemHostAlloc"))?
            }
        };
        Ok(self.slots[i].insert(Slot { host, len }))
    }

    /// The transfer of `buffer` whose copy is the last work on the copy stream.
    fn transfer(&self, buffer: CudaSlice<T>) -> Result<Transfer<T>> {
        let done = self
            .copies
            .record_event(None)
            .map_err(driver("cuEventRecord"))?;
        Ok(Transfer {
            after_copy: AfterCopy {
                done: Some(done),
                device_stream: self.device.stream().clone(),
            },
            buffer,
        })
    }
}

impl<T> Drop for HostStash<T> {
    fn drop(&mut self) {
        // The slots' pinned memory is freed after this: no copy may still be using it.
        let ctx = self.copies.context();
        ctx.record_err(self.copies.synchronize());
    }
}

impl<T> Transfer<T> {
    /// The buffer, for work queued on the device's stream that only reads it while a put's
    /// copy runs (a get's buffer must be waited for before it is read: [`Self::wait`]).
    pub fn buffer(&self) -> &CudaSlice<T> {
        &self.buffer
    }

    /// The buffer, with the device's stream ordered after the copy.
    pub fn wait(self) -> Result<CudaSlice<T>> {
        // The buffer is bound first, so on an error it is dropped after the ordering is
        // tried again (locals drop in reverse order).
        let Transfer {
            buffer,
            mut after_copy,
        } = self;
        after_copy.order().map_err(driver("cuStreamWaitEvent"))?;
        Ok(buffer)
    }
}

impl AfterCopy {
    /// Makes the device's stream wait for the copy, unless it already does.
    fn order(&mut self) -> std::result::Result<(), DriverError> {
        if let Some(done) = &self.done {
            self.device_stream.wait(done)?;
        }
        self.done = None;
        Ok(())
    }
}

impl Drop for AfterCopy {
    fn drop(&mut self) {
        // Drop cannot return an error: the context keeps it for its next checked call.
        let result = self.order();
        self.device_stream.context().record_err(result);
    }
}
