//! The destination's guest memory for post-copy: an anonymous mapping that pre-copy writes like
//! any sink, and that post-copy arms with userfaultfd so a touch of a missing page waits for it.

use std::sync::atomic::{AtomicBool, Ordering};

use dwcp_core::error::Error;
use dwcp_core::memory::{MemoryLayout, MemorySink, PAGE_SIZE};
use dwcp_proto::postcopy::PageSet;
use memmap2::MmapMut;
use userfaultfd::{Uffd, UffdBuilder};

/// Guest memory on the destination that post-copy can fault in page by page.
///
/// Pages are numbered as in the layout, `PAGE_SIZE` bytes each, one after the other in the mapping.
/// As a [`MemorySink`] it takes pre-copy's pages; the destination's VM (or, in tests, a workload
/// thread) then reads and writes it through [`read_page`](MemorySink::read_page) and
/// [`write_page`](MemorySink::write_page), or through [`as_ptr`](Self::as_ptr). While post-copy
/// runs, such an access to a page that is not there yet blocks until it arrives.
pub struct PostcopyMemory {
    map: MmapMut,
    base: *mut u8,
    layout: MemoryLayout,
    written: AtomicBool,
    /// The userfaultfd of a post-copy that failed, kept open so that missing pages keep
    /// blocking whoever touches them instead of reading as zeros.
    failed: parking_lot::Mutex<Option<Uffd>>,
}

impl std::fmt::Debug for PostcopyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyMemory")
            .field("layout", &self.layout)
            .finish()
    }
}

// SAFETY: the mapping lives as long as the value; every access copies whole pages through raw
// pointers (foreign memory, as in `dwcp_core::memory::GuestRam`), and the kernel's userfaultfd
// placement is atomic per page, so sharing between threads cannot create a Rust reference to
// memory another thread writes.
unsafe impl Send for PostcopyMemory {}
// SAFETY: see `Send`.
unsafe impl Sync for PostcopyMemory {}

impl PostcopyMemory {
    /// Fresh, zero, lazily allocated memory for `layout`.
    pub fn new(layout: MemoryLayout) -> Result<Self, Error> {
        let len = usize::try_from(layout.total_bytes())
            .map_err(|_| Error::Config("the memory does not fit in this address space".into()))?;
        let mut map = MmapMut::map_anon(len)
            .map_err(|e| Error::io(format!("mapping {len} bytes of guest memory"), e))?;
        let base = map.as_mut_ptr();
        Ok(Self {
            map,
            base,
            layout,
            written: AtomicBool::new(false),
            failed: parking_lot::Mutex::new(None),
        })
    }

    /// The start of the mapping, for a VMM that maps it into its guest. Touching a missing page
    /// while post-copy runs blocks the touching thread until the page is placed.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the mapping is empty (never: a layout has at least one page).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn page_ptr(&self, page: u64) -> *mut u8 {
        assert!(
            page < self.layout.total_pages(),
            "page {page} outside a memory of {} pages",
            self.layout.total_pages()
        );
        // SAFETY: page < total_pages, so the offset lies inside the mapping.
        unsafe { self.base.add(page as usize * PAGE_SIZE) }
    }

    /// The page a faulting address lies in.
    pub(crate) fn page_at(&self, addr: usize) -> Option<u64> {
        let start = self.base as usize;
        (addr >= start && addr < start + self.map.len())
            .then(|| ((addr - start) / PAGE_SIZE) as u64)
    }

    /// Starts post-copy of `set`: registers the mapping with a new userfaultfd and drops the pages
    /// of the set, whose contents pre-copy left stale, so that the next touch of each faults.
    pub(crate) fn arm(&self, set: &PageSet) -> Result<Uffd, Error> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(true)
            .create()
            .map_err(|e| uffd_error("opening a userfaultfd", e))?;
        uffd.register(self.base.cast(), self.map.len())
            .map_err(|e| uffd_error("registering guest memory with userfaultfd", e))?;
        let ranges: Vec<libc::iovec> = set
            .ranges()
            .into_iter()
            .map(|r| libc::iovec {
                iov_base: self.page_ptr(r.start).cast(),
                iov_len: (r.end - r.start) as usize * PAGE_SIZE,
            })
            .collect();
        drop_pages(&ranges)?;
        Ok(uffd)
    }

    /// Places a page that arrived, waking every thread faulting on it.
    pub(crate) fn place(&self, uffd: &Uffd, page: u64, bytes: &[u8]) -> Result<(), Error> {
        assert_eq!(bytes.len(), PAGE_SIZE);
        // SAFETY: the source is a live PAGE_SIZE buffer and the destination one page inside the
        // registered mapping; UFFDIO_COPY fills the missing page atomically.
        unsafe {
            uffd.copy(
                bytes.as_ptr().cast(),
                self.page_ptr(page).cast(),
                PAGE_SIZE,
                true,
            )
        }
        .map(|_| ())
        .map_err(|e| uffd_error(&format!("placing page {page}"), e))
    }

    /// Fills a missing page outside the post-copy set with zeros (it was never written).
    pub(crate) fn zero_fill(&self, uffd: &Uffd, page: u64) -> Result<(), Error> {
        // SAFETY: one page inside the registered mapping.
        match unsafe { uffd.zeropage(self.page_ptr(page).cast(), PAGE_SIZE, true) } {
            Ok(_) => Ok(()),
            // Two threads faulted on the page and the other fault's fill came first.
            Err(userfaultfd::Error::ZeropageFailed(errno)) if errno as i32 == libc::EEXIST => {
                self.wake(uffd, page);
                Ok(())
            }
            Err(e) => Err(uffd_error(&format!("zero-filling page {page}"), e)),
        }
    }

    /// Wakes threads waiting on a page that is there already.
    pub(crate) fn wake(&self, uffd: &Uffd, page: u64) {
        let _ = uffd.wake(self.page_ptr(page).cast(), PAGE_SIZE);
    }

    /// Ends post-copy: every page is present, faults stop.
    pub(crate) fn disarm(&self, uffd: &Uffd) -> Result<(), Error> {
        uffd.unregister(self.base.cast(), self.map.len())
            .map_err(|e| uffd_error("unregistering guest memory", e))
    }
}

impl PostcopyMemory {
    /// Keeps a failed post-copy's userfaultfd for as long as the memory lives.
    pub(crate) fn keep_armed(&self, uffd: Uffd) {
        *self.failed.lock() = Some(uffd);
    }

    /// Whether a post-copy into this memory failed: some pages are missing and never will arrive.
    pub fn failed(&self) -> bool {
        self.failed.lock().is_some()
    }
}

/// Ranges per `process_madvise` call (the kernel's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Drops the pages of `ranges` (inside our private anonymous mapping), so that they read as missing.
/// One `process_madvise` call per 1024 ranges where the kernel has it (it batches the TLB
/// flushes: a dirty set is thousands of scattered ranges, and one `madvise` each cost about 1 µs
/// a page here, all of it guest downtime), else one `madvise` per range.
fn drop_pages(ranges: &[libc::iovec]) -> Result<(), Error> {
    let failed = |e| Error::io("dropping stale pages before post-copy", e);
    // SAFETY: pidfd_open on our own pid has no memory effects; the fd is closed below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) } as libc::c_int;
    let mut done = 0;
    if pidfd >= 0 {
        while done < ranges.len() {
            let part = &ranges[done..ranges.len().min(done + IOV_MAX)];
            // SAFETY: every iovec names whole pages inside our private anonymous mapping, where
            // MADV_DONTNEED only drops pages (no Rust reference into the mapping exists); the
            // kernel only reads the iovec array, which lives across the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    pidfd,
                    part.as_ptr(),
                    part.len(),
                    libc::MADV_DONTNEED,
                    0u32,
                )
            };
            let expected: usize = part.iter().map(|v| v.iov_len).sum();
            if rc < 0 || rc as usize != expected {
                // Not supported for this advice by this kernel, or stopped short: the rest one by one.
                break;
            }
            done += part.len();
        }
        // SAFETY: closing the pidfd we opened.
        unsafe { libc::close(pidfd) };
    }
    for v in &ranges[done..] {
        // SAFETY: as above, one range of whole pages inside our private anonymous mapping.
        if unsafe { libc::madvise(v.iov_base, v.iov_len, libc::MADV_DONTNEED) } != 0 {
            return Err(failed(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn uffd_error(what: &str, e: userfaultfd::Error) -> Error {
    Error::io(what, std::io::Error::other(e.to_string()))
}

impl MemorySink for PostcopyMemory {
    fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    fn write_page(&self, page: u64, data: &[u8]) {
        assert_eq!(data.len(), PAGE_SIZE);
        self.written.store(true, Ordering::Relaxed);
        // SAFETY: one page inside the mapping; `data` is a separate buffer of PAGE_SIZE bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.page_ptr(page), PAGE_SIZE) };
    }

    fn read_page(&self, page: u64, out: &mut [u8]) {
        assert_eq!(out.len(), PAGE_SIZE);
        // SAFETY: one page inside the mapping; `out` is a separate buffer of PAGE_SIZE bytes.
        unsafe { std::ptr::copy_nonoverlapping(self.page_ptr(page), out.as_mut_ptr(), PAGE_SIZE) };
    }

    fn starts_zeroed(&self) -> bool {
        !self.written.load(Ordering::Relaxed)
    }
}
