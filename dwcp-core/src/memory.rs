//! Guest memory as DWCP sees it: a layout of page-granular regions, a source to read pages from, a dirty
//! log saying which pages changed, a sink to write pages into, and the hypervisor's pause/resume hooks.
//!
//! Guest memory is foreign memory: the guest (or, in tests, a workload thread) writes it while the
//! migration reads it. Pages are therefore only ever *copied* out of or into a mapping through raw
//! pointers, never borrowed as Rust slices while the guest may run; a page copied while it was being
//! written may be torn, and the dirty log reports it again, exactly as with a hypervisor's dirty log.
//!
//! Over 600 lines because of its unit tests (from `mod tests` on); the code itself is under 550.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::{Mmap, MmapMut, MmapOptions};

use crate::error::Error;
use crate::hash::{xxh3_64, xxh3_128};

/// The only page size of protocol v1.
pub const PAGE_SIZE: usize = 4096;

/// A page of zeros.
pub static ZERO_PAGE: [u8; PAGE_SIZE] = [0u8; PAGE_SIZE];

/// Most pages a layout may describe (2^40 pages = 4 PiB).
pub const MAX_TOTAL_PAGES: u64 = 1 << 40;

/// A contiguous range of guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Guest-physical address of the first byte.
    pub guest_addr: u64,
    /// Length in pages.
    pub pages: u64,
}

/// The memory of one VM: ordered, non-overlapping regions. Pages are numbered globally from zero across
/// the regions in order; that number is what travels on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    page_size: u32,
    regions: Vec<Region>,
    total_pages: u64,
}

impl MemoryLayout {
    /// Validates and builds a layout.
    pub fn new(page_size: u32, regions: Vec<Region>) -> Result<Self, String> {
        if page_size as usize != PAGE_SIZE {
            return Err(format!(
                "page size {page_size} (protocol v1 uses {PAGE_SIZE})"
            ));
        }
        if regions.is_empty() {
            return Err("no regions".into());
        }
        let mut total: u64 = 0;
        let mut end_of_previous: u64 = 0;
        for (i, r) in regions.iter().enumerate() {
            if r.pages == 0 {
                return Err(format!("region {i} is empty"));
            }
            if r.guest_addr % PAGE_SIZE as u64 != 0 {
                return Err(format!("region {i} is not page aligned"));
            }
            let end = r
                .pages
                .checked_mul(PAGE_SIZE as u64)
                .and_then(|len| r.guest_addr.checked_add(len))
                .ok_or_else(|| format!("region {i} overflows the address space"))?;
            if i > 0 && r.guest_addr < end_of_previous {
                return Err(format!("region {i} overlaps or precedes region {}", i - 1));
            }
            end_of_previous = end;
            total = total.checked_add(r.pages).ok_or("too many pages")?;
        }
        if total > MAX_TOTAL_PAGES {
            return Err(format!(
                "{total} pages exceed the limit of {MAX_TOTAL_PAGES}"
            ));
        }
        Ok(Self {
            page_size,
            regions,
            total_pages: total,
        })
    }

    /// One region of `bytes` (rounded up to whole pages) at guest address zero.
    pub fn flat(bytes: u64) -> Result<Self, String> {
        let pages = bytes.div_ceil(PAGE_SIZE as u64);
        Self::new(
            PAGE_SIZE as u32,
            vec![Region {
                guest_addr: 0,
                pages,
            }],
        )
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Pages in all regions.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Bytes in all regions.
    pub fn total_bytes(&self) -> u64 {
        self.total_pages * PAGE_SIZE as u64
    }

    /// A 64-bit fingerprint of the layout, the same in every process and build (wire protocol
    /// version 2 announces it in SessionInit, and an operator may expect it):
    ///
    /// ```text
    /// xxh3-64( "DWCP layout" ‖ page size (u32 LE) ‖ total pages (u64 LE) ‖ region count (u32 LE)
    ///          ‖ for each region in order: guest address (u64 LE) ‖ pages (u64 LE) )
    /// ```
    ///
    /// Equal layouts have equal fingerprints; different ones differ but for a collision of a 64-bit
    /// hash. It tells mistakes apart (another VM, another memory size), not a forgery: anyone can
    /// compute it.
    pub fn fingerprint(&self) -> u64 {
        let mut b = Vec::with_capacity(LAYOUT_LABEL.len() + 16 + 16 * self.regions.len());
        b.extend_from_slice(LAYOUT_LABEL);
        b.extend_from_slice(&self.page_size.to_le_bytes());
        b.extend_from_slice(&self.total_pages.to_le_bytes());
        // A layout from the wire has at most 1024 regions; one built locally with more than 2^32
        // would need 64 GiB for its region list, so saturating never happens in practice.
        let count = u32::try_from(self.regions.len()).unwrap_or(u32::MAX);
        b.extend_from_slice(&count.to_le_bytes());
        for r in &self.regions {
            b.extend_from_slice(&r.guest_addr.to_le_bytes());
            b.extend_from_slice(&r.pages.to_le_bytes());
        }
        xxh3_64(&b)
    }
}

/// Domain separation of [`MemoryLayout::fingerprint`]: no other DWCP hash starts with these bytes.
const LAYOUT_LABEL: &[u8] = b"DWCP layout";

/// Where pages are read from on the source.
pub trait MemorySource: Send + Sync {
    /// The memory layout.
    fn layout(&self) -> &MemoryLayout;

    /// Copies page `page` (a global page number below `layout().total_pages()`) into `out`
    /// (`PAGE_SIZE` bytes). While the guest runs the copy may be torn; the dirty log covers that.
    fn read_page(&self, page: u64, out: &mut [u8]);

    /// Appends page `page` to `out` (`PAGE_SIZE` more bytes). The default zero-fills the new bytes
    /// and then [`read_page`](Self::read_page)s into them; sources that can copy straight into the
    /// vector's spare capacity override it (the encoder appends every page it sends, and the zero
    /// fill cost as much CPU as the copy).
    fn append_page(&self, page: u64, out: &mut Vec<u8>) {
        let at = out.len();
        out.resize(at + PAGE_SIZE, 0);
        self.read_page(page, &mut out[at..]);
    }

    /// Hash of page `page`, for the whole-memory digest. Called only while the guest is paused.
    fn page_digest(&self, page: u64) -> u128 {
        let mut buf = [0u8; PAGE_SIZE];
        self.read_page(page, &mut buf);
        xxh3_128(&buf)
    }
}

/// The hypervisor's dirty log.
pub trait DirtyLog: Send {
    /// Clears the log; pages written from now on will be reported.
    fn start(&mut self);

    /// Appends the pages written since the previous call (or [`start`](Self::start)) to `out`, each once,
    /// and clears them from the log.
    fn take_dirty(&mut self, out: &mut Vec<u64>);
}

/// Where pages are written on the destination. Pages are written by several threads at once, never the
/// same page by two threads at once.
pub trait MemorySink: Send + Sync {
    /// The memory layout; the destination refuses a source whose layout differs.
    fn layout(&self) -> &MemoryLayout;

    /// Writes page `page` (`data` is `PAGE_SIZE` bytes).
    fn write_page(&self, page: u64, data: &[u8]);

    /// Makes page `page` all zeros.
    fn write_zero_page(&self, page: u64) {
        self.write_page(page, &ZERO_PAGE);
    }

    /// Copies page `page` into `out`.
    fn read_page(&self, page: u64, out: &mut [u8]);

    /// Hash of page `page`, for the whole-memory digest. Called right after the page was written, while
    /// no other write to that page is in progress (other pages may be written meanwhile).
    fn page_digest(&self, page: u64) -> u128 {
        let mut buf = [0u8; PAGE_SIZE];
        self.read_page(page, &mut buf);
        xxh3_128(&buf)
    }

    /// Whether every page of the sink is zero right now because nothing was ever written to it (fresh
    /// anonymous memory, a new file). Asked once, when a migration into the sink starts; zero pages
    /// that were never written during that migration are then not touched at all, which keeps sparse
    /// memory sparse and avoids faulting in pages only to clear them. Must be `false` when in doubt.
    fn starts_zeroed(&self) -> bool {
        false
    }

    /// Makes written pages durable (for file-backed sinks).
    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// The hypervisor's control of the VM during the final phase.
pub trait VmControl: Send {
    /// Stops the guest's vCPUs; after this returns the guest writes no memory.
    fn pause(&mut self) -> Result<(), Error>;
    /// Restarts the guest on the source (the migration failed or was cancelled).
    fn resume(&mut self);
    /// The destination owns the VM now; the source may discard it.
    fn handed_over(&mut self) {}
    /// Lets the guest's vCPUs run only `100 - percent` % of the time (QEMU's
    /// `cpu-throttle-percentage`), so that it dirties memory more slowly and pre-copy converges;
    /// 0 lifts the throttle. Returns `Ok(false)` if this hypervisor cannot throttle (the default):
    /// the migration then turns to its next aid.
    fn throttle(&mut self, percent: u8) -> Result<bool, Error> {
        let _ = percent;
        Ok(false)
    }
    /// Records the change of owner wherever the cluster keeps it (a consensus registry), with the
    /// guest paused and both memory digests equal, before the source tells the destination to
    /// take over. The default records nothing and lets the handover go on.
    fn record_handover(&mut self) -> HandoverDecision {
        HandoverDecision::Recorded
    }
}

/// What [`VmControl::record_handover`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoverDecision {
    /// The new owner is recorded: the source commits and the destination may run the VM.
    Recorded,
    /// The record was refused for certain (a stale fence, another owner): the source resumes.
    Refused(String),
    /// Whether the record was made is not known (the registry did not answer): neither side may
    /// run the VM until the registry says who owns it, so the source stays paused.
    Unknown(String),
}

/// VM control for memory that no guest runs on (an image being copied).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoVmControl;

impl VmControl for NoVmControl {
    fn pause(&mut self) -> Result<(), Error> {
        Ok(())
    }
    fn resume(&mut self) {}
}

/// A dirty log for memory that never changes.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoDirtyLog;

impl DirtyLog for NoDirtyLog {
    fn start(&mut self) {}
    fn take_dirty(&mut self, _out: &mut Vec<u64>) {}
}

/// Whether a page is all zeros, at memory speed.
pub fn is_zero_page(page: &[u8]) -> bool {
    // Compare eight u64 lanes at a time; the compiler turns this into vector ORs.
    let (prefix, words, suffix) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only yields correctly aligned middle words.
        unsafe { page.align_to::<u64>() }
    };
    if prefix.iter().chain(suffix).any(|&b| b != 0) {
        return false;
    }
    words
        .chunks(8)
        .all(|lane| lane.iter().fold(0u64, |acc, &w| acc | w) == 0)
}

// The mappings are held only to keep them alive; access goes through `GuestRam::base`.
#[allow(dead_code)]
enum Backing {
    Anonymous(MmapMut),
    FileRw(MmapMut),
    FileRo(Mmap),
}

/// Page-granular memory in a mapping (anonymous, or a file), shared between threads.
///
/// This is the memory type of the simulated guest, of the destination's in-memory copy and of file
/// images. All access copies whole pages through raw pointers (see the module docs).
pub struct GuestRam {
    _backing: Backing,
    base: *mut u8,
    writable: bool,
    /// No page was written since the mapping was created zero-filled.
    pristine: AtomicBool,
    layout: MemoryLayout,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("layout", &self.layout)
            .field("writable", &self.writable)
            .finish()
    }
}

// SAFETY: the mapping lives as long as `GuestRam`; all access goes through page copies whose
// concurrency rules are those of guest memory (module docs), never through shared Rust references.
unsafe impl Send for GuestRam {}
// SAFETY: as above.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Zero-filled anonymous memory for `layout`, faulted in lazily on first write.
    pub fn anonymous(layout: MemoryLayout) -> Result<Self, Error> {
        Self::anonymous_with(layout, false)
    }

    /// Zero-filled anonymous memory for `layout`, faulted in now (like a VMM's preallocated guest RAM),
    /// so that first-touch costs are paid before a migration rather than during it.
    pub fn anonymous_preallocated(layout: MemoryLayout) -> Result<Self, Error> {
        Self::anonymous_with(layout, true)
    }

    fn anonymous_with(layout: MemoryLayout, populate: bool) -> Result<Self, Error> {
        let len = usize::try_from(layout.total_bytes())
            .map_err(|_| Error::Config("memory too large".into()))?;
        let mut opts = MmapOptions::new();
        opts.len(len);
        if populate {
            opts.populate();
        }
        let mut map = opts
            .map_anon()
            .map_err(|e| Error::io(format!("mapping {len} bytes of anonymous memory"), e))?;
        if populate {
            // Preallocated guest RAM is touched whole anyway: huge pages cut fault and TLB costs, as in
            // QEMU. (Lazily faulted memory stays on small pages so one written page costs 4 KiB, not 2 MiB.)
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        let base = map.as_mut_ptr();
        Ok(Self {
            _backing: Backing::Anonymous(map),
            base,
            writable: true,
            pristine: AtomicBool::new(true),
            layout,
        })
    }

    /// A new file of exactly `layout`'s size (created or truncated), mapped read-write.
    pub fn create_file(path: &Path, layout: MemoryLayout) -> Result<Self, Error> {
        let ctx = || format!("creating image file {}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(ctx(), e))?;
        file.set_len(layout.total_bytes())
            .map_err(|e| Error::io(ctx(), e))?;
        // SAFETY: the file was just created and truncated by us; other processes modifying it while mapped
        // would only change page contents, which this type treats as foreign memory anyway.
        let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| Error::io(ctx(), e))?;
        let base = map.as_mut_ptr();
        Ok(Self {
            _backing: Backing::FileRw(map),
            base,
            writable: true,
            pristine: AtomicBool::new(true),
            layout,
        })
    }

    /// An existing image file mapped read-only; its size must be a whole number of pages.
    pub fn open_image(path: &Path) -> Result<Self, Error> {
        let ctx = || format!("opening image file {}", path.display());
        let file = std::fs::File::open(path).map_err(|e| Error::io(ctx(), e))?;
        let len = file.metadata().map_err(|e| Error::io(ctx(), e))?.len();
        if len == 0 || len % PAGE_SIZE as u64 != 0 {
            return Err(Error::Config(format!(
                "image {} is {len} bytes; it must be a non-empty multiple of {PAGE_SIZE}",
                path.display()
            )));
        }
        let layout = MemoryLayout::flat(len).map_err(Error::Config)?;
        // SAFETY: mapped read-only; concurrent changes by other processes are tolerated as for guest memory.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(ctx(), e))?;
        let _ = map.advise(memmap2::Advice::Sequential);
        let base = map.as_ptr() as *mut u8;
        Ok(Self {
            _backing: Backing::FileRo(map),
            base,
            writable: false,
            pristine: AtomicBool::new(false),
            layout,
        })
    }

    /// The layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    fn page_ptr(&self, page: u64) -> *mut u8 {
        assert!(
            page < self.layout.total_pages,
            "page {page} outside memory of {} pages",
            self.layout.total_pages
        );
        // SAFETY: page < total_pages, so the offset lies inside the mapping of total_pages * PAGE_SIZE bytes.
        unsafe { self.base.add(page as usize * PAGE_SIZE) }
    }

    /// Copies a page out.
    pub fn copy_out(&self, page: u64, out: &mut [u8]) {
        let src = self.page_ptr(page);
        let out = &mut out[..PAGE_SIZE];
        // SAFETY: `src` points at PAGE_SIZE mapped bytes; `out` is a distinct Rust buffer of that size.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), PAGE_SIZE) }
    }

    /// Appends a page to `out` without zero-filling the new bytes first.
    pub fn append_to(&self, page: u64, out: &mut Vec<u8>) {
        let src = self.page_ptr(page);
        out.reserve(PAGE_SIZE);
        let at = out.len();
        // SAFETY: `reserve` made room for PAGE_SIZE more bytes after `at`; `src` points at PAGE_SIZE
        // mapped bytes that are not part of `out`; once they are copied, all of `..at + PAGE_SIZE` is
        // initialised, so the new length is valid.
        unsafe {
            std::ptr::copy_nonoverlapping(src, out.as_mut_ptr().add(at), PAGE_SIZE);
            out.set_len(at + PAGE_SIZE);
        }
    }

    /// Copies `data` into bytes `offset..offset + data.len()` of a page.
    pub fn copy_in(&self, page: u64, offset: usize, data: &[u8]) {
        assert!(self.writable, "write to a read-only image");
        assert!(offset + data.len() <= PAGE_SIZE, "write beyond the page");
        // Load first: after the first write the flag is only read, so writers do not contend on it.
        if self.pristine.load(Ordering::Relaxed) {
            self.pristine.store(false, Ordering::Relaxed);
        }
        let dst = self.page_ptr(page);
        // SAFETY: offset + len <= PAGE_SIZE inside a mapped, writable page; `data` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst.add(offset), data.len()) }
    }

    /// Hash of a page, read in place. Callers guarantee nobody writes the page meanwhile.
    pub fn digest_in_place(&self, page: u64) -> u128 {
        let p = self.page_ptr(page);
        // SAFETY: PAGE_SIZE mapped bytes; the digest is only taken while the memory is quiescent (guest paused,
        // or all writes applied), so no write overlaps this shared borrow.
        crate::digest::page_hash(unsafe { std::slice::from_raw_parts(p, PAGE_SIZE) })
    }

    /// Whether a page is all zeros, read in place (same rule as [`digest_in_place`](Self::digest_in_place)
    /// for concurrent writers: a racing write makes the answer stale, never unsound to act on, because the
    /// page is then written again).
    fn is_zero_in_place(&self, page: u64) -> bool {
        let mut buf = [0u8; PAGE_SIZE];
        self.copy_out(page, &mut buf);
        is_zero_page(&buf)
    }
}

impl MemorySource for GuestRam {
    fn layout(&self) -> &MemoryLayout {
        &self.layout
    }
    fn read_page(&self, page: u64, out: &mut [u8]) {
        self.copy_out(page, out);
    }
    fn append_page(&self, page: u64, out: &mut Vec<u8>) {
        self.append_to(page, out);
    }
    fn page_digest(&self, page: u64) -> u128 {
        self.digest_in_place(page)
    }
}

impl MemorySink for GuestRam {
    fn layout(&self) -> &MemoryLayout {
        &self.layout
    }
    fn write_page(&self, page: u64, data: &[u8]) {
        self.copy_in(page, 0, &data[..PAGE_SIZE]);
    }
    fn write_zero_page(&self, page: u64) {
        // Reading a never-touched page of a fresh mapping allocates nothing, so sparse memory stays sparse.
        if !self.is_zero_in_place(page) {
            self.copy_in(page, 0, &ZERO_PAGE);
        }
    }
    fn starts_zeroed(&self) -> bool {
        // Writable constructors map fresh zero-filled memory (anonymous, or a file just truncated to
        // its size); any write since then makes that unknowable without reading everything.
        self.pristine.load(Ordering::Relaxed)
    }
    fn read_page(&self, page: u64, out: &mut [u8]) {
        self.copy_out(page, out);
    }
    fn page_digest(&self, page: u64) -> u128 {
        self.digest_in_place(page)
    }
    fn flush(&self) -> Result<(), Error> {
        match &self._backing {
            Backing::FileRw(m) => m
                .flush()
                .map_err(|e| Error::io("flushing the image file", e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_validation() {
        assert!(MemoryLayout::new(4096, vec![]).is_err());
        assert!(
            MemoryLayout::new(
                512,
                vec![Region {
                    guest_addr: 0,
                    pages: 1
                }]
            )
            .is_err()
        );
        assert!(
            MemoryLayout::new(
                4096,
                vec![Region {
                    guest_addr: 1,
                    pages: 1
                }]
            )
            .is_err()
        );
        let overlapping = vec![
            Region {
                guest_addr: 0,
                pages: 2,
            },
            Region {
                guest_addr: 4096,
                pages: 1,
            },
        ];
        assert!(MemoryLayout::new(4096, overlapping).is_err());
        let ok = MemoryLayout::new(
            4096,
            vec![
                Region {
                    guest_addr: 0,
                    pages: 2,
                },
                Region {
                    guest_addr: 1 << 20,
                    pages: 3,
                },
            ],
        )
        .unwrap();
        assert_eq!(ok.total_pages(), 5);
        assert_eq!(MemoryLayout::flat(4097).unwrap().total_pages(), 2);
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero_page(&p));
        for i in [0, 7, 8, 63, 64, 4095] {
            p[i] = 1;
            assert!(!is_zero_page(&p), "byte {i}");
            p[i] = 0;
        }
        assert!(is_zero_page(&p[1..4001]));
    }

    #[test]
    fn only_never_written_memory_claims_to_start_zeroed() {
        let layout = MemoryLayout::flat(2 * PAGE_SIZE as u64).unwrap();
        let ram = GuestRam::anonymous(layout.clone()).unwrap();
        assert!(ram.starts_zeroed());
        ram.write_page(1, &[3u8; PAGE_SIZE]);
        assert!(
            !ram.starts_zeroed(),
            "a reused sink must not skip zero pages"
        );
        ram.write_zero_page(1);
        assert!(!ram.starts_zeroed());
        assert!(
            GuestRam::anonymous_preallocated(layout)
                .unwrap()
                .starts_zeroed()
        );
    }

    #[test]
    fn appending_pages_matches_reading_them() {
        let layout = MemoryLayout::flat(3 * PAGE_SIZE as u64).unwrap();
        let ram = GuestRam::anonymous(layout).unwrap();
        for page in 0..3u64 {
            let content: Vec<u8> = (0..PAGE_SIZE)
                .map(|i| (i as u64 * 7 + page) as u8)
                .collect();
            ram.write_page(page, &content);
        }
        // Appending keeps what the vector held and adds exactly the page, in place of a zero fill.
        let mut out = vec![0xEEu8; 5];
        out.reserve(10 * PAGE_SIZE);
        out.truncate(3);
        for page in [2u64, 0, 1] {
            MemorySource::append_page(&ram, page, &mut out);
        }
        assert_eq!(out.len(), 3 + 3 * PAGE_SIZE);
        assert_eq!(&out[..3], &[0xEE; 3]);
        let mut page_buf = [0u8; PAGE_SIZE];
        for (slot, page) in [2u64, 0, 1].into_iter().enumerate() {
            ram.copy_out(page, &mut page_buf);
            let at = 3 + slot * PAGE_SIZE;
            assert_eq!(&out[at..at + PAGE_SIZE], &page_buf[..], "page {page}");
        }
        // The trait's default (used by sources without their own) gives the same bytes.
        struct Plain<'a>(&'a GuestRam);
        impl MemorySource for Plain<'_> {
            fn layout(&self) -> &MemoryLayout {
                MemorySource::layout(self.0)
            }
            fn read_page(&self, page: u64, out: &mut [u8]) {
                self.0.copy_out(page, out);
            }
        }
        let mut default = out[..3].to_vec();
        for page in [2u64, 0, 1] {
            Plain(&ram).append_page(page, &mut default);
        }
        assert_eq!(default, out);
    }

    /// The fingerprint is a wire value (protocol v2's SessionInit) and an operator's expectation:
    /// pinned here against an independent XXH3 of the documented bytes, and against a constant, so
    /// that a change of the definition cannot go unnoticed.
    #[test]
    fn layout_fingerprint_is_pinned_and_tells_layouts_apart() {
        let two = MemoryLayout::new(
            4096,
            vec![
                Region {
                    guest_addr: 0,
                    pages: 10,
                },
                Region {
                    guest_addr: 1 << 32,
                    pages: 5,
                },
            ],
        )
        .unwrap();
        let mut bytes = b"DWCP layout".to_vec();
        bytes.extend_from_slice(&4096u32.to_le_bytes());
        bytes.extend_from_slice(&15u64.to_le_bytes());
        bytes.extend_from_slice(&2u32.to_le_bytes());
        for (addr, pages) in [(0u64, 10u64), (1 << 32, 5)] {
            bytes.extend_from_slice(&addr.to_le_bytes());
            bytes.extend_from_slice(&pages.to_le_bytes());
        }
        assert_eq!(two.fingerprint(), xxhash_rust::xxh3::xxh3_64(&bytes));
        assert_eq!(
            MemoryLayout::flat(1 << 20).unwrap().fingerprint(),
            FLAT_1_MIB_FINGERPRINT
        );
        // Same size, another place, another split, one page more: all different.
        let moved = MemoryLayout::new(
            4096,
            vec![
                Region {
                    guest_addr: 4096,
                    pages: 10,
                },
                Region {
                    guest_addr: 1 << 32,
                    pages: 5,
                },
            ],
        )
        .unwrap();
        let flat15 = MemoryLayout::flat(15 * PAGE_SIZE as u64).unwrap();
        let flat16 = MemoryLayout::flat(16 * PAGE_SIZE as u64).unwrap();
        let prints = [&two, &moved, &flat15, &flat16].map(MemoryLayout::fingerprint);
        for i in 0..prints.len() {
            for j in i + 1..prints.len() {
                assert_ne!(prints[i], prints[j], "layouts {i} and {j}");
            }
        }
        assert_eq!(two.clone().fingerprint(), two.fingerprint());
    }

    const FLAT_1_MIB_FINGERPRINT: u64 = 0x8c0e_5304_9dd1_882e;

    #[test]
    fn file_image_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let layout = MemoryLayout::flat(3 * PAGE_SIZE as u64).unwrap();
        let ram = GuestRam::create_file(&path, layout).unwrap();
        ram.write_page(1, &[7u8; PAGE_SIZE]);
        ram.write_zero_page(1);
        ram.write_page(2, &[9u8; PAGE_SIZE]);
        MemorySink::flush(&ram).unwrap();
        drop(ram);
        let img = GuestRam::open_image(&path).unwrap();
        let mut buf = [0u8; PAGE_SIZE];
        img.copy_out(1, &mut buf);
        assert!(is_zero_page(&buf));
        img.copy_out(2, &mut buf);
        assert_eq!(buf, [9u8; PAGE_SIZE]);
        std::fs::write(dir.path().join("odd"), [1u8; 100]).unwrap();
        assert!(matches!(
            GuestRam::open_image(&dir.path().join("odd")),
            Err(Error::Config(_))
        ));
    }
}
