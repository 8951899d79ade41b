//! Adapters between rust-vmm's [`vm-memory`](::vm_memory) crate and DWCP's memory traits, so that a
//! VMM built on rust-vmm (Firecracker, Cloud Hypervisor, a custom one) migrates the guest memory it
//! already has, without copying it into a DWCP type first.
//!
//! - [`VmMemorySource`] reads pages out of any [`GuestMemoryBackend`] whose regions are mapped in
//!   this process (a [`GuestMemoryMmap`] in practice), and
//! - [`VmMemorySink`] writes them into one on the destination;
//! - [`VmDirtyLog`] turns the [`AtomicBitmap`]s of a `GuestMemoryMmap<AtomicBitmap>` into DWCP's
//!   dirty log.
//!
//! DWCP numbers pages globally from zero across the guest's regions in address order, skipping the
//! holes between them ([`MemoryLayout`]); [`layout_of`] builds that layout from the regions and
//! refuses regions that do not start and end on a 4 KiB page boundary ([`VmMemoryError`]).
//!
//! Guest memory is foreign memory: the guest writes it while the migration reads it. Every access
//! here therefore goes through vm-memory's volatile accessors
//! ([`VolatileSlice`](::vm_memory::VolatileSlice)), which copy bytes without ever forming a Rust
//! reference (`&[u8]`) to guest memory, and this module needs no `unsafe` of its own.
//!
//! What the dirty log sees: vm-memory sets a region's bitmap bits when memory is written through
//! its own API (`Bytes::write_slice`, `write_obj`, volatile slices: what device emulation and the
//! VMM do). Writes by the guest's vCPUs bypass it; a VMM running a real guest combines this log
//! with the hypervisor's (KVM's dirty log) into its own [`DirtyLog`]. The layout is fixed when an
//! adapter is built: memory hot-plug during a migration is not supported.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ::vm_memory::bitmap::AtomicBitmap;
use ::vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion,
};
use dwcp_core::memory::{
    DirtyLog, MemoryLayout, MemorySink, MemorySource, PAGE_SIZE, Region, ZERO_PAGE, is_zero_page,
};

/// Why guest memory cannot be migrated as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VmMemoryError {
    /// A region does not start or end on a 4 KiB page boundary: DWCP moves whole pages only.
    #[error(
        "guest memory region {index} ({len:#x} bytes at {guest_addr:#x}) is not aligned to {PAGE_SIZE}-byte pages"
    )]
    MisalignedRegion {
        /// Position of the region in address order.
        index: usize,
        /// Its guest-physical start address.
        guest_addr: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// A region is not mapped in this process, so its bytes cannot be read or written from here.
    #[error("guest memory region {index} at {guest_addr:#x} has no host mapping")]
    NotMapped {
        /// Position of the region in address order.
        index: usize,
        /// Its guest-physical start address.
        guest_addr: u64,
    },
    /// A region's dirty bitmap covers fewer bytes than the region (a bitmap left at its default
    /// size tracks nothing), so writes to the rest would never be reported.
    #[error(
        "the dirty bitmap of guest memory region {index} covers {covered:#x} of its {len:#x} bytes"
    )]
    BitmapTooSmall {
        /// Position of the region in address order.
        index: usize,
        /// Bytes the bitmap tracks.
        covered: u64,
        /// Bytes in the region.
        len: u64,
    },
    /// A fresh-memory sink was asked for over a file-backed region, whose pages are whatever the
    /// file holds rather than zeros.
    #[error(
        "guest memory region {index} at {guest_addr:#x} is file-backed; it cannot be assumed to start zeroed"
    )]
    NotAnonymous {
        /// Position of the region in address order.
        index: usize,
        /// Its guest-physical start address.
        guest_addr: u64,
    },
    /// The regions do not form a valid DWCP layout (none at all, too many pages).
    #[error("guest memory layout: {0}")]
    Layout(String),
}

impl From<VmMemoryError> for dwcp_core::Error {
    fn from(e: VmMemoryError) -> Self {
        dwcp_core::Error::Config(e.to_string())
    }
}

/// The DWCP layout of `memory`: one DWCP region per vm-memory region, in address order, each a
/// whole number of 4 KiB pages. Both sides of a migration build it from their own guest memory; the
/// destination refuses a source whose layout differs.
pub fn layout_of<M: GuestMemoryBackend>(memory: &M) -> Result<MemoryLayout, VmMemoryError> {
    let page = PAGE_SIZE as u64;
    let mut regions = Vec::with_capacity(memory.num_regions());
    for (index, r) in memory.iter().enumerate() {
        let guest_addr = r.start_addr().raw_value();
        let len = r.len();
        if guest_addr % page != 0 || len % page != 0 {
            return Err(VmMemoryError::MisalignedRegion {
                index,
                guest_addr,
                len,
            });
        }
        if r.as_volatile_slice().is_err() {
            return Err(VmMemoryError::NotMapped { index, guest_addr });
        }
        regions.push(Region {
            guest_addr,
            pages: len / page,
        });
    }
    MemoryLayout::new(PAGE_SIZE as u32, regions).map_err(VmMemoryError::Layout)
}

/// Global DWCP page numbers to guest-physical addresses.
#[derive(Debug, Clone)]
struct PageMap {
    /// For each region in order: its first global page number and its guest address.
    starts: Vec<(u64, u64)>,
    total_pages: u64,
}

impl PageMap {
    fn new(layout: &MemoryLayout) -> Self {
        let mut first = 0;
        let starts = layout
            .regions()
            .iter()
            .map(|r| {
                let start = (first, r.guest_addr);
                first += r.pages;
                start
            })
            .collect();
        Self {
            starts,
            total_pages: layout.total_pages(),
        }
    }

    /// The guest address of global page `page`.
    fn addr(&self, page: u64) -> GuestAddress {
        assert!(
            page < self.total_pages,
            "page {page} outside guest memory of {} pages",
            self.total_pages
        );
        // The last region starting at or before `page`; region 0 starts at page 0.
        let i = self.starts.partition_point(|&(first, _)| first <= page) - 1;
        let (first, guest_addr) = self.starts[i];
        GuestAddress(guest_addr + (page - first) * PAGE_SIZE as u64)
    }
}

/// Copies page `page` of `memory` into `out` through a volatile slice.
fn copy_out<M: GuestMemoryBackend>(memory: &M, map: &PageMap, page: u64, out: &mut [u8]) {
    let out = &mut out[..PAGE_SIZE];
    let slice = memory
        .get_slice(map.addr(page), PAGE_SIZE)
        .expect("every page of the layout was checked to be mapped");
    slice.copy_to(out);
}

/// A migration source over rust-vmm guest memory: pages are copied out with vm-memory's volatile
/// accessors while the guest runs (a copy racing a write may be torn; the dirty log reports the
/// page again, as with any hypervisor's dirty log).
///
/// `M` is usually a `GuestMemoryMmap<AtomicBitmap>` (cheap to clone: it shares the mappings), the
/// same one whose bitmaps feed the [`VmDirtyLog`].
#[derive(Debug)]
pub struct VmMemorySource<M> {
    memory: M,
    layout: MemoryLayout,
    map: PageMap,
}

impl<M: GuestMemoryBackend> VmMemorySource<M> {
    /// A source over `memory`, whose regions must be page aligned and mapped in this process.
    pub fn new(memory: M) -> Result<Self, VmMemoryError> {
        let layout = layout_of(&memory)?;
        let map = PageMap::new(&layout);
        Ok(Self {
            memory,
            layout,
            map,
        })
    }

    /// The guest memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// The guest address of global page `page` (below `layout().total_pages()`).
    pub fn page_addr(&self, page: u64) -> GuestAddress {
        self.map.addr(page)
    }
}

impl<M: GuestMemoryBackend + Send + Sync> MemorySource for VmMemorySource<M> {
    fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    fn read_page(&self, page: u64, out: &mut [u8]) {
        copy_out(&self.memory, &self.map, page, out);
    }
}

/// One region as the dirty log sees it.
#[derive(Debug)]
struct LoggedRegion {
    mapping: Arc<MmapRegion<AtomicBitmap>>,
    /// Global number of the region's first DWCP page.
    first_page: u64,
    /// DWCP pages in the region.
    pages: u64,
    /// Bytes one bitmap bit stands for.
    bit_bytes: u64,
}

/// DWCP's dirty log over the [`AtomicBitmap`]s of a `GuestMemoryMmap<AtomicBitmap>` (vm-memory sets
/// a bit when the memory under it is written through vm-memory; see the module docs for what that
/// leaves out).
///
/// A bitmap's bit may cover another size than a DWCP page (`AtomicBitmap` uses the host's page
/// size, 16 or 64 KiB on some Arm hosts, or whatever its creator chose): a set bit reports every
/// DWCP page it overlaps, each page once per [`take_dirty`](DirtyLog::take_dirty).
#[derive(Debug)]
pub struct VmDirtyLog {
    regions: Vec<LoggedRegion>,
}

impl VmDirtyLog {
    /// A dirty log over the bitmaps of `memory`'s regions, which must cover the regions whole. The
    /// log shares the bitmaps: nothing else should reset them while a migration runs.
    pub fn new(memory: &GuestMemoryMmap<AtomicBitmap>) -> Result<Self, VmMemoryError> {
        let layout = layout_of(memory)?;
        let map = PageMap::new(&layout);
        let mut regions = Vec::with_capacity(memory.num_regions());
        for (index, (r, &(first_page, _))) in memory.iter().zip(&map.starts).enumerate() {
            let mapping = r.get_mmap();
            let bitmap = mapping.bitmap();
            let len = r.len();
            if (bitmap.byte_size() as u64) < len {
                return Err(VmMemoryError::BitmapTooSmall {
                    index,
                    covered: bitmap.byte_size() as u64,
                    len,
                });
            }
            regions.push(LoggedRegion {
                bit_bytes: bitmap_granule(bitmap) as u64,
                mapping,
                first_page,
                pages: len / PAGE_SIZE as u64,
            });
        }
        Ok(Self { regions })
    }
}

/// Bytes one bit of `bitmap` stands for. `AtomicBitmap` keeps its page size to itself, so this asks
/// a copy: with only bit 0 set, exactly the offsets below one bitmap page read as dirty.
fn bitmap_granule(bitmap: &AtomicBitmap) -> usize {
    if bitmap.len() <= 1 {
        // One bit (or none) for the whole region: whatever its page size, it covers everything.
        return bitmap.byte_size().max(1);
    }
    let probe = bitmap.clone();
    probe.reset();
    probe.set_bit(0);
    // Offset `lo - 1` reads dirty, offset `hi` does not (it lies in bit 1 or beyond, as there are
    // at least two bits); the granule is the first offset that does not.
    let (mut lo, mut hi) = (1usize, bitmap.byte_size());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if probe.is_addr_set(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

impl DirtyLog for VmDirtyLog {
    fn start(&mut self) {
        for r in &self.regions {
            r.mapping.bitmap().reset();
        }
    }

    fn take_dirty(&mut self, out: &mut Vec<u64>) {
        let page = PAGE_SIZE as u64;
        for r in &self.regions {
            // vm-memory sets a bit after the write it stands for; clearing it before the page is
            // copied means a later write is either in that copy or sets the bit again.
            let words = r.mapping.bitmap().get_and_reset();
            // DWCP pages below this one were reported already (several bits may share a page).
            let mut next_unreported = 0u64;
            for (wi, &word) in words.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let bit = wi as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let start = (bit * r.bit_bytes / page).max(next_unreported);
                    let end = ((bit + 1) * r.bit_bytes).div_ceil(page).min(r.pages);
                    for p in start..end {
                        out.push(r.first_page + p);
                    }
                    next_unreported = next_unreported.max(end);
                }
            }
        }
    }
}

/// A migration destination over rust-vmm guest memory: pages are written with vm-memory's volatile
/// accessors (which also mark the destination's dirty bitmap, if it has one).
#[derive(Debug)]
pub struct VmMemorySink<M> {
    memory: M,
    layout: MemoryLayout,
    map: PageMap,
    /// Every page is zero because the memory was created fresh and nothing was written since.
    pristine: AtomicBool,
}

impl<M: GuestMemoryBackend> VmMemorySink<M> {
    /// A sink over `memory` with unknown content: every zero page the source sends is written.
    pub fn new(memory: M) -> Result<Self, VmMemoryError> {
        Self::build(memory, false)
    }

    /// A sink over memory the caller has just created as anonymous mappings (as
    /// `GuestMemoryMmap::from_ranges` does) and not written since: it starts all zeros, so zero
    /// pages the source sends are not written at all, which keeps untouched guest memory
    /// unallocated. The caller vouches for the "not written"; file-backed regions are refused.
    pub fn fresh_anonymous(memory: M) -> Result<Self, VmMemoryError> {
        for (index, r) in memory.iter().enumerate() {
            if r.file_offset().is_some() {
                return Err(VmMemoryError::NotAnonymous {
                    index,
                    guest_addr: r.start_addr().raw_value(),
                });
            }
        }
        Self::build(memory, true)
    }

    fn build(memory: M, zeroed: bool) -> Result<Self, VmMemoryError> {
        let layout = layout_of(&memory)?;
        let map = PageMap::new(&layout);
        Ok(Self {
            memory,
            layout,
            map,
            pristine: AtomicBool::new(zeroed),
        })
    }

    /// The guest memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// The guest memory, for the VMM to run the guest on once the migration has completed.
    pub fn into_memory(self) -> M {
        self.memory
    }
}

impl<M: GuestMemoryBackend + Send + Sync> MemorySink for VmMemorySink<M> {
    fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    fn write_page(&self, page: u64, data: &[u8]) {
        // Load first: after the first write the flag is only read, so writers do not contend on it.
        if self.pristine.load(Ordering::Relaxed) {
            self.pristine.store(false, Ordering::Relaxed);
        }
        let slice = self
            .memory
            .get_slice(self.map.addr(page), PAGE_SIZE)
            .expect("every page of the layout was checked to be mapped");
        slice.copy_from(&data[..PAGE_SIZE]);
    }

    fn write_zero_page(&self, page: u64) {
        // Reading a never-touched page of an anonymous mapping allocates nothing.
        let mut buf = [0u8; PAGE_SIZE];
        self.read_page(page, &mut buf);
        if !is_zero_page(&buf) {
            self.write_page(page, &ZERO_PAGE);
        }
    }

    fn read_page(&self, page: u64, out: &mut [u8]) {
        copy_out(&self.memory, &self.map, page, out);
    }

    fn starts_zeroed(&self) -> bool {
        self.pristine.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::vm_memory::mmap::MmapRegionBuilder;
    use ::vm_memory::{Bytes, FileOffset, GuestRegionMmap};
    use dwcp_core::digest::memory_digest;
    use std::num::NonZeroUsize;

    const P: u64 = PAGE_SIZE as u64;
    /// Two regions with a hole: 16 pages at 0, 8 pages at 1 MiB.
    const RANGES: [(GuestAddress, usize); 2] = [
        (GuestAddress(0), 16 * PAGE_SIZE),
        (GuestAddress(1 << 20), 8 * PAGE_SIZE),
    ];

    fn guest() -> GuestMemoryMmap<AtomicBitmap> {
        GuestMemoryMmap::from_ranges(&RANGES).unwrap()
    }

    fn taken(log: &mut VmDirtyLog) -> Vec<u64> {
        let mut out = Vec::new();
        log.take_dirty(&mut out);
        out
    }

    /// An anonymous region of `len` bytes at `addr` whose bitmap has `granule`-byte bits.
    fn region_with_granule(addr: u64, len: usize, granule: usize) -> GuestRegionMmap<AtomicBitmap> {
        let bitmap = AtomicBitmap::new(len, NonZeroUsize::new(granule).unwrap());
        let mapping = MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .build()
            .unwrap();
        GuestRegionMmap::new(mapping, GuestAddress(addr)).unwrap()
    }

    #[test]
    fn layout_numbers_pages_across_regions_and_skips_the_hole() {
        let source = VmMemorySource::new(guest()).unwrap();
        let layout = source.layout();
        assert_eq!(
            layout.regions(),
            &[
                Region {
                    guest_addr: 0,
                    pages: 16
                },
                Region {
                    guest_addr: 1 << 20,
                    pages: 8
                }
            ]
        );
        assert_eq!(layout.total_pages(), 24);
        assert_eq!(source.page_addr(0), GuestAddress(0));
        assert_eq!(source.page_addr(15), GuestAddress(15 * P));
        assert_eq!(source.page_addr(16), GuestAddress(1 << 20));
        assert_eq!(source.page_addr(23), GuestAddress((1 << 20) + 7 * P));
        // Both sides of a migration derive the same layout from equal memory.
        assert_eq!(&layout_of(&guest()).unwrap(), layout);

        // A page read through the source is the guest's page at that address.
        source
            .memory()
            .write_slice(&[0xAB; 100], GuestAddress((1 << 20) + 2 * P + 7))
            .unwrap();
        let mut page = [0u8; PAGE_SIZE];
        source.read_page(18, &mut page);
        assert!(page[..7].iter().all(|&b| b == 0));
        assert!(page[7..107].iter().all(|&b| b == 0xAB));
        assert!(page[107..].iter().all(|&b| b == 0));
    }

    #[test]
    fn misaligned_regions_are_refused() {
        let short = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
            (GuestAddress(0), PAGE_SIZE),
            (GuestAddress(1 << 20), PAGE_SIZE + 512),
        ])
        .unwrap();
        assert_eq!(
            VmMemorySource::new(short).unwrap_err(),
            VmMemoryError::MisalignedRegion {
                index: 1,
                guest_addr: 1 << 20,
                len: P + 512
            }
        );
        let shifted =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x800), PAGE_SIZE)]).unwrap();
        let err = VmMemorySink::new(shifted).unwrap_err();
        assert!(matches!(
            err,
            VmMemoryError::MisalignedRegion {
                index: 0,
                guest_addr: 0x800,
                ..
            }
        ));
        // Through `?` in engine code it becomes a configuration error with the same message.
        let msg = err.to_string();
        assert!(matches!(dwcp_core::Error::from(err), dwcp_core::Error::Config(m) if m == msg));
        let unaligned_log =
            GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 100)]).unwrap();
        assert!(matches!(
            VmDirtyLog::new(&unaligned_log),
            Err(VmMemoryError::MisalignedRegion { .. })
        ));
    }

    #[test]
    fn pages_written_through_vm_memory_are_reported_once_then_cleared() {
        let memory = guest();
        let mut log = VmDirtyLog::new(&memory).unwrap();
        memory.write_obj(1u64, GuestAddress(0)).unwrap();
        log.start();
        assert_eq!(
            taken(&mut log),
            Vec::<u64>::new(),
            "start clears earlier writes"
        );

        // An object in region 1, a slice across two pages of region 0, the same page twice.
        memory
            .write_obj(0xdead_beef_u64, GuestAddress((1 << 20) + 3 * P + 8))
            .unwrap();
        memory
            .write_slice(&[7u8; 64], GuestAddress(5 * P - 32))
            .unwrap();
        memory.write_obj(2u32, GuestAddress(4 * P)).unwrap();
        let mut dirty = taken(&mut log);
        dirty.sort_unstable();
        assert_eq!(dirty, vec![4, 5, 16 + 3]);
        assert_eq!(
            taken(&mut log),
            Vec::<u64>::new(),
            "taken pages are cleared"
        );

        // The last page of the last region maps to the last global page.
        memory
            .write_obj(9u8, GuestAddress((1 << 20) + 8 * P - 1))
            .unwrap();
        assert_eq!(taken(&mut log), vec![23]);
        // Reading does not dirty.
        let _: u64 = memory.read_obj(GuestAddress(0)).unwrap();
        assert_eq!(taken(&mut log), Vec::<u64>::new());
    }

    #[test]
    fn bitmap_bits_of_other_sizes_map_to_whole_dwcp_pages_once() {
        // 16 KiB bits (a 16K-page Arm host): one bit stands for four DWCP pages.
        let coarse = GuestMemoryMmap::from_regions(vec![
            region_with_granule(0, 16 * PAGE_SIZE, 16 << 10),
            region_with_granule(1 << 30, 6 * PAGE_SIZE, 16 << 10),
        ])
        .unwrap();
        let mut log = VmDirtyLog::new(&coarse).unwrap();
        assert_eq!(log.regions[0].bit_bytes, 16 << 10);
        log.start();
        coarse.write_obj(1u8, GuestAddress(5 * P + 1)).unwrap();
        coarse.write_obj(1u8, GuestAddress(6 * P)).unwrap();
        // Region 1 is 6 pages: its second bit covers only pages 4 and 5.
        coarse
            .write_obj(1u8, GuestAddress((1 << 30) + 5 * P))
            .unwrap();
        assert_eq!(taken(&mut log), vec![4, 5, 6, 7, 16 + 4, 16 + 5]);
        assert_eq!(taken(&mut log), Vec::<u64>::new());

        // 1 KiB bits: four bits share a DWCP page, which is still reported once.
        let fine = GuestMemoryMmap::from_regions(vec![region_with_granule(0, 4 * PAGE_SIZE, 1024)])
            .unwrap();
        let mut log = VmDirtyLog::new(&fine).unwrap();
        assert_eq!(log.regions[0].bit_bytes, 1024);
        log.start();
        for offset in [0, 1500, 3000, 2 * P + 4000] {
            fine.write_obj(1u8, GuestAddress(offset)).unwrap();
        }
        assert_eq!(taken(&mut log), vec![0, 2]);

        // A bitmap left at its default size tracks nothing: refused rather than silently blind.
        let blind = MmapRegionBuilder::<AtomicBitmap>::new(PAGE_SIZE)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .build()
            .unwrap();
        let blind = GuestMemoryMmap::from_regions(vec![
            GuestRegionMmap::new(blind, GuestAddress(0)).unwrap(),
        ])
        .unwrap();
        assert_eq!(
            VmDirtyLog::new(&blind).unwrap_err(),
            VmMemoryError::BitmapTooSmall {
                index: 0,
                covered: 0,
                len: P
            }
        );
    }

    #[test]
    fn pages_copied_from_source_to_sink_arrive_intact() {
        let src = guest();
        for page in 0..24u64 {
            // Every third page stays zero; the others get page-specific bytes.
            if page % 3 == 0 {
                continue;
            }
            let bytes: Vec<u8> = (0..PAGE_SIZE)
                .map(|i| (i as u64 ^ (page * 31)) as u8)
                .collect();
            let addr = if page < 16 {
                GuestAddress(page * P)
            } else {
                GuestAddress((1 << 20) + (page - 16) * P)
            };
            src.write_slice(&bytes, addr).unwrap();
        }
        let source = VmMemorySource::new(src).unwrap();
        let sink =
            VmMemorySink::fresh_anonymous(GuestMemoryMmap::<()>::from_ranges(&RANGES).unwrap())
                .unwrap();
        assert_eq!(MemorySink::layout(&sink), source.layout());
        assert!(sink.starts_zeroed());
        let mut page = [0u8; PAGE_SIZE];
        for p in 0..24 {
            source.read_page(p, &mut page);
            if is_zero_page(&page) {
                sink.write_zero_page(p);
            } else {
                sink.write_page(p, &page);
            }
        }
        assert!(
            !sink.starts_zeroed(),
            "a written sink no longer claims zeros"
        );
        let digest_of = |f: &(dyn Fn(u64) -> u128 + Sync)| memory_digest(24, 2, f);
        assert_eq!(
            digest_of(&|p| MemorySource::page_digest(&source, p)),
            digest_of(&|p| MemorySink::page_digest(&sink, p)),
        );
        let mut back = [0u8; PAGE_SIZE];
        for p in [1u64, 16, 17, 23] {
            source.read_page(p, &mut page);
            sink.read_page(p, &mut back);
            assert_eq!(page, back, "page {p}");
        }
        // Zeroing a written page clears it; the sink's memory is the VMM's to run the guest on.
        sink.write_zero_page(1);
        let memory = sink.into_memory();
        let first: u64 = memory.read_obj(GuestAddress(P + 8)).unwrap();
        assert_eq!(first, 0);
        let second: u8 = memory.read_obj(GuestAddress(2 * P + 1)).unwrap();
        assert_eq!(second, (1 ^ (2 * 31)) as u8);
    }

    #[test]
    fn only_a_fresh_anonymous_sink_starts_zeroed() {
        let sink = VmMemorySink::new(GuestMemoryMmap::<()>::from_ranges(&RANGES).unwrap()).unwrap();
        assert!(!sink.starts_zeroed(), "memory of unknown content");
        let file = tempfile::tempfile().unwrap();
        file.set_len(P).unwrap();
        let backed = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            PAGE_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        assert_eq!(
            VmMemorySink::fresh_anonymous(backed).unwrap_err(),
            VmMemoryError::NotAnonymous {
                index: 0,
                guest_addr: 0
            }
        );
    }

    /// A stand-in for a VMM's vCPU control: `pause` returns only once no write is in progress
    /// (the writer writes while holding `writing`) and none follows.
    struct Writer {
        paused: Arc<AtomicBool>,
        writing: Arc<std::sync::Mutex<()>>,
    }

    impl dwcp_core::memory::VmControl for Writer {
        fn pause(&mut self) -> Result<(), dwcp_core::Error> {
            self.paused.store(true, Ordering::SeqCst);
            drop(self.writing.lock().unwrap());
            Ok(())
        }
        fn resume(&mut self) {
            self.paused.store(false, Ordering::SeqCst);
        }
    }

    /// The three adapters in a real migration (in this process, over loopback) while a thread
    /// keeps writing through vm-memory: the destination ends bit-exact.
    #[test]
    fn a_guest_written_during_migration_arrives_bit_exact() {
        use std::time::{Duration, Instant};
        let ranges = [(GuestAddress(0), 8 << 20), (GuestAddress(1 << 32), 8 << 20)];
        let memory = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&ranges).unwrap();
        let mut dirty = VmDirtyLog::new(&memory).unwrap();
        let source = Arc::new(VmMemorySource::new(memory).unwrap());
        for p in (0..source.layout().total_pages()).step_by(3) {
            let page = [p as u8 | 1; PAGE_SIZE];
            source
                .memory()
                .write_slice(&page, source.page_addr(p))
                .unwrap();
        }
        let key = dwcp_core::handshake::Psk::new(vec![7u8; 32]).unwrap();
        let listener = crate::Listener::bind(
            "127.0.0.1:0".parse().unwrap(),
            key.clone(),
            crate::ReceiverConfig::default(),
        )
        .unwrap();
        let addr = listener.local_addr().unwrap();
        let dest = std::thread::spawn(move || {
            let memory = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
            let sink = VmMemorySink::fresh_anonymous(memory).unwrap();
            let report = listener.accept()?.receive_into(&sink)?;
            Ok::<_, dwcp_core::Error>((report, sink))
        });

        let paused = Arc::new(AtomicBool::new(false));
        let writing = Arc::new(std::sync::Mutex::new(()));
        let writer = {
            let (paused, writing, source) = (paused.clone(), writing.clone(), source.clone());
            std::thread::spawn(move || {
                let pages = source.layout().total_pages();
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    {
                        let _writing = writing.lock().unwrap();
                        if paused.load(Ordering::SeqCst) {
                            break;
                        }
                        for _ in 0..16 {
                            n += 1;
                            let at = source.page_addr((n * 7919) % pages).0 + (n % 512) * 8;
                            source.memory().write_obj(n, GuestAddress(at)).unwrap();
                        }
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                n
            })
        };
        let mut vm = Writer {
            paused: paused.clone(),
            writing,
        };
        let report = crate::Migration::new(addr, key)
            .run(&*source, &mut dirty, &mut vm)
            .unwrap();
        paused.store(true, Ordering::SeqCst);
        let writes = writer.join().unwrap();
        let (received, sink) = dest.join().unwrap().unwrap();
        assert!(report.digest_match && received.digest_match);
        assert!(writes > 0, "the guest wrote meanwhile");
        let (mut a, mut b) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        for p in 0..source.layout().total_pages() {
            source.read_page(p, &mut a);
            sink.read_page(p, &mut b);
            assert!(a == b, "page {p} differs");
        }
    }
}
