//! The compressed-node allocator's capacity model.
//!
//! One [`NodeAccount`] per managed node tracks, in a dense array indexed by
//! `pfn - start_pfn` (4 bytes per page), what every page of the node costs
//! in physical (compressed) space, plus the credit granted to the kernel
//! but not yet used.
//!
//! Accounting rules:
//! - a resident page costs its measured compressed size rounded up to the
//!   device granule; all-zero pages cost nothing;
//! - a resident page not measured yet costs the worst case
//!   ([`Geometry::worst_case`]: the LZ4 bound of a page, rounded up);
//! - every page of credit granted and not yet placed is reserved at the
//!   worst case, so a placement can never push use past what was reserved;
//! - a page the server allowed to be written in place costs a full worst
//!   case until it is fenced again (its content may change at any time).
//!
//! Invariant (property-tested against a plain model): as long as pages only
//! arrive through granted credit, `used + reserved <= capacity`.
//!
//! Credit is sized by the node's measured compression (so a node of
//! compressible pages takes many more pages than its capacity in 4 KiB
//! units) but never beyond what fits at the worst case; see
//! [`NodeAccount::grant`].

use thiserror::Error;

/// Why a configuration is not usable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("granule must be a power of two between 8 and 4096 bytes, got {0}")]
    Granule(u32),
    #[error(
        "watermarks must satisfy 0 < low < high < critical <= 100 (percent), got {low}/{high}/{critical}"
    )]
    Watermarks { low: u8, high: u8, critical: u8 },
    #[error("capacity must be at least one page ({page} bytes), got {capacity}")]
    Capacity { capacity: u64, page: u64 },
}

/// Device geometry and policy thresholds of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Physical bytes the device can store.
    pub capacity: u64,
    /// Allocation granule of the device, bytes (power of two).
    pub granule: u32,
    /// Watermarks in percent of capacity.
    pub low: u8,
    pub high: u8,
    pub critical: u8,
}

/// Base page size.
pub const PAGE_SIZE: u32 = 4096;

impl Geometry {
    /// Check the thresholds.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the field to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.granule.is_power_of_two() || !(8..=PAGE_SIZE).contains(&self.granule) {
            return Err(ConfigError::Granule(self.granule));
        }
        if !(0 < self.low
            && self.low < self.high
            && self.high < self.critical
            && self.critical <= 100)
        {
            return Err(ConfigError::Watermarks {
                low: self.low,
                high: self.high,
                critical: self.critical,
            });
        }
        if self.capacity < u64::from(PAGE_SIZE) {
            return Err(ConfigError::Capacity {
                capacity: self.capacity,
                page: u64::from(PAGE_SIZE),
            });
        }
        Ok(())
    }

    /// Round a compressed size up to the granule.
    pub fn round(&self, bytes: u32) -> u32 {
        bytes.div_ceil(self.granule) * self.granule
    }

    /// What an unmeasured page may cost: LZ4's bound for a page, rounded.
    pub fn worst_case(&self) -> u32 {
        self.round(lz4_flex::block::get_maximum_output_size(PAGE_SIZE as usize) as u32)
    }

    fn mark(&self, percent: u8) -> u64 {
        self.capacity / 100 * u64::from(percent) + self.capacity % 100 * u64::from(percent) / 100
    }
}

/// A resident page and what it costs: [`NodeAccount::costed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Costed {
    pub pfn: u64,
    /// Device bytes: measured, or the worst case before measurement.
    pub bytes: u32,
    /// Seconds since it arrived (up to [`MAX_AGE_S`]).
    pub age_s: u32,
    /// Its eviction is queued or in flight (set by the core, which knows).
    pub pending: bool,
}

/// The compressed size of a page as the device would store it: 0 for an
/// all-zero page, else the LZ4 block size rounded up to the granule.
pub fn measure(geometry: &Geometry, page: &[u8]) -> u32 {
    if page.iter().all(|&b| b == 0) {
        return 0;
    }
    let compressed = lz4_flex::block::compress(page);
    geometry.round(compressed.len() as u32)
}

/// A pfn's share of an order-independent set hash (summed, so a page
/// added and removed cancels out): splitmix64's finaliser.
pub fn pfn_hash(pfn: u64) -> u64 {
    let mut z = pfn.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Per-page state, packed in 32 bits:
/// `state:2 | granules:10 | heat:8 | stamp:12`, `stamp` being when the page
/// arrived, in seconds modulo 4096 (see [`MAX_AGE_S`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct PageMeta(u32);

/// What a page of the node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Not resident (free on the node, or not ours).
    Empty = 0,
    /// Resident, not measured yet: costs the worst case.
    Unmeasured = 1,
    /// Resident, measured.
    Measured = 2,
    /// Resident and writable in place: costs the worst case.
    Writable = 3,
}

const GRANULE_BITS: u32 = 10;

impl PageMeta {
    pub fn state(self) -> PageState {
        match self.0 & 3 {
            0 => PageState::Empty,
            1 => PageState::Unmeasured,
            2 => PageState::Measured,
            _ => PageState::Writable,
        }
    }

    /// Measured size in granules (meaningful when `Measured`).
    pub fn granules(self) -> u32 {
        (self.0 >> 2) & ((1 << GRANULE_BITS) - 1)
    }

    /// Access count in the current window (saturating).
    pub fn heat(self) -> u8 {
        (self.0 >> 12) as u8
    }

    fn with_state(self, s: PageState) -> Self {
        Self((self.0 & !3) | s as u32)
    }

    fn with_granules(self, g: u32) -> Self {
        let mask = ((1 << GRANULE_BITS) - 1) << 2;
        Self((self.0 & !mask) | ((g.min((1 << GRANULE_BITS) - 1)) << 2))
    }

    fn with_heat(self, h: u8) -> Self {
        Self((self.0 & !(0xff << 12)) | (u32::from(h) << 12))
    }

    /// When the page arrived, in seconds modulo 4096.
    pub fn stamp(self) -> u32 {
        self.0 >> 20
    }

    fn with_stamp(self, s: u32) -> Self {
        Self((self.0 & 0x000f_ffff) | ((s & STAMP_MASK) << 20))
    }
}

const STAMP_MASK: u32 = (1 << 12) - 1;
/// Page ages are counted up to this many seconds; older pages all count
/// as this old (a sweep keeps their 12-bit stamps from wrapping).
pub const MAX_AGE_S: u32 = 2048;

const _: () = assert!(size_of::<PageMeta>() == 4);

/// Pressure on a node, from its watermarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Below high: grant credit.
    Normal,
    /// At or above high: stop granting, evict down to low.
    High,
    /// At or above critical: deny everything, evict.
    Critical,
}

/// Why an event did not fit the model (the kernel's report disagrees with
/// our bookkeeping: the caller should RESYNC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AccountError {
    #[error("pfn {pfn:#x} is outside the node")]
    OutOfNode { pfn: u64 },
    #[error("pfn {pfn:#x} is already resident")]
    AlreadyResident { pfn: u64 },
    #[error("pfn {pfn:#x} is not resident")]
    NotResident { pfn: u64 },
}

/// Pages per block summary.
pub const BLOCK_PAGES: usize = 4096;
/// Cost bands (of the worst case) that eviction planning picks from, the
/// costliest first.
pub const BANDS: usize = 16;

/// A summary of [`BLOCK_PAGES`] pages.
#[derive(Debug, Clone, Copy, Default)]
struct Block {
    resident: u32,
    unmeasured: u32,
    /// Some page of the block has heat (cooling skips the others).
    heated: bool,
    bands: [u32; BANDS],
}

/// The accounting of one managed node.
#[derive(Debug, Clone)]
pub struct NodeAccount {
    geometry: Geometry,
    worst: u32,
    start_pfn: u64,
    pages: Vec<PageMeta>,
    /// Physical bytes charged for resident pages.
    used: u64,
    /// Pages of credit granted and not yet placed (each reserves `worst`).
    credit: u64,
    /// Credit taken back with an absolute SET_CREDIT that may still be in
    /// flight in the kernel (demotions that allocated their target before
    /// the command ran): still reserved at the worst case, consumed first
    /// by credited placements, released after a grace period.
    retiring: u64,
    /// Pages reserved for the server's own moves onto the node (`Cold`
    /// advice) in flight (each reserves `worst`).
    moving: u64,
    resident: u64,
    /// Sum of [`pfn_hash`] over the resident pfns: the set, comparable
    /// with one computed from `/proc/kpageflags`.
    set_hash: u64,
    zero_pages: u64,
    writable: u64,
    /// Summaries of [`BLOCK_PAGES`] pages each: what eviction planning,
    /// measuring and draining scan instead of the page array.
    blocks: Vec<Block>,
    /// Resident pages per cost band, over the node.
    band_pages: [u64; BANDS],
    /// Pages in state `Unmeasured`.
    unmeasured: u64,
    /// Where the search for the next page to measure resumes.
    measure_cursor: usize,
    /// Pfns that were writable in place when the books were last cleared
    /// (see [`Self::clear`]).
    was_writable: Vec<u64>,
    /// Pages in state `Measured`, and what they cost: the node's measured
    /// compression, which sizes credit grants.
    measured_pages: u64,
    measured_bytes: u64,
    /// The clock arriving pages are stamped with (seconds).
    clock_s: u32,
    /// Where the age sweep resumes (a block index).
    sweep_cursor: usize,
}

impl NodeAccount {
    /// A node of `nr_pages` pages starting at `start_pfn`.
    ///
    /// # Errors
    ///
    /// The geometry's [`ConfigError`].
    pub fn new(geometry: Geometry, start_pfn: u64, nr_pages: usize) -> Result<Self, ConfigError> {
        geometry.validate()?;
        Ok(Self {
            worst: geometry.worst_case(),
            geometry,
            start_pfn,
            pages: vec![PageMeta::default(); nr_pages],
            blocks: vec![Block::default(); nr_pages.div_ceil(BLOCK_PAGES)],
            band_pages: [0; BANDS],
            unmeasured: 0,
            measure_cursor: 0,
            used: 0,
            credit: 0,
            retiring: 0,
            moving: 0,
            resident: 0,
            set_hash: 0,
            zero_pages: 0,
            writable: 0,
            was_writable: Vec::new(),
            measured_pages: 0,
            measured_bytes: 0,
            clock_s: 0,
            sweep_cursor: 0,
        })
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Change the watermarks (percent of capacity) at run time.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Watermarks`] unless `0 < low < high < critical <=
    /// 100`; nothing is changed then.
    pub fn set_watermarks(&mut self, low: u8, high: u8, critical: u8) -> Result<(), ConfigError> {
        let g = Geometry {
            low,
            high,
            critical,
            ..self.geometry
        };
        g.validate()?;
        self.geometry = g;
        Ok(())
    }

    /// Physical bytes charged for resident pages.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Physical bytes reserved for credit not yet used (live and
    /// retiring) and for the server's moves in flight.
    pub fn reserved(&self) -> u64 {
        (self.credit + self.retiring + self.moving) * u64::from(self.worst)
    }

    /// Credit being retired (see [`Self::retire`]).
    pub fn retiring(&self) -> u64 {
        self.retiring
    }

    /// Move all live credit to retiring, before telling the kernel an
    /// absolute credit with SET_CREDIT: demotions already past their
    /// allocation still arrive, and must find their reservation.  Returns
    /// the credit retired.
    pub fn retire(&mut self) -> u64 {
        let c = self.credit;
        self.retiring += c;
        self.credit = 0;
        c
    }

    /// Release retiring credit, a grace period after the SET_CREDIT that
    /// replaced it completed.
    pub fn release_retired(&mut self) {
        self.retiring = 0;
    }

    /// `used + reserved`: what the invariant bounds by capacity.
    pub fn committed(&self) -> u64 {
        self.used + self.reserved()
    }

    pub fn credit(&self) -> u64 {
        self.credit
    }

    pub fn resident_pages(&self) -> u64 {
        self.resident
    }

    /// The resident set's hash (see [`pfn_hash`]), 52 bits so that it
    /// survives a Prometheus sample (a double) exactly.
    pub fn set_hash(&self) -> u64 {
        self.set_hash & ((1 << 52) - 1)
    }

    pub fn zero_pages(&self) -> u64 {
        self.zero_pages
    }

    /// Bytes of metadata per page of the node.
    pub fn metadata_bytes_per_page(&self) -> usize {
        size_of::<PageMeta>()
    }

    /// `used` plus credit at the expected cost: what the node will hold
    /// if the credit is spent on pages like those it holds.  Pressure and
    /// eviction are judged on this.
    pub fn projected(&self) -> u64 {
        self.used + (self.credit + self.retiring + self.moving) * self.expected_cost()
    }

    /// Pressure from [`Self::projected`] against the watermarks.
    pub fn level(&self) -> Level {
        let c = self.projected();
        if c >= self.geometry.mark(self.geometry.critical) {
            Level::Critical
        } else if c >= self.geometry.mark(self.geometry.high) {
            Level::High
        } else {
            Level::Normal
        }
    }

    /// What a page of credit is expected to cost once measured: the mean
    /// measured cost of the node's resident pages (at least one granule),
    /// or the worst case before anything was measured.
    pub fn expected_cost(&self) -> u64 {
        if self.measured_pages == 0 {
            return u64::from(self.worst);
        }
        (self.measured_bytes / self.measured_pages)
            .max(u64::from(self.geometry.granule))
            .min(u64::from(self.worst))
    }

    /// Grant up to `want` pages of demotion credit.  Returns the grant.
    ///
    /// Two bounds, the smaller wins:
    /// - safety: every page of credit is reserved at the worst case, and
    ///   `used + reserved` stays within capacity, so no placement can ever
    ///   overflow the device, whatever the pages hold;
    /// - policy: at the measured compression ([`Self::expected_cost`]),
    ///   credit stays below the high watermark.  Pages that compress worse
    ///   than the node's history push use above high, which the eviction
    ///   plan corrects.
    ///
    /// Nothing is granted at or above the high watermark.
    pub fn grant(&mut self, want: u64) -> u64 {
        let n = self.room(want);
        self.credit += n;
        n
    }

    /// Up to `want` pages within both bounds of [`Self::grant`].
    fn room(&self, want: u64) -> u64 {
        let high = self.geometry.mark(self.geometry.high);
        if self.projected() >= high {
            return 0;
        }
        let worst = u64::from(self.worst);
        let expected = self.expected_cost();
        let safe = self.geometry.capacity.saturating_sub(self.committed()) / worst;
        let planned = high.saturating_sub(self.projected()) / expected;
        want.min(safe).min(planned)
    }

    /// Reserve room for up to `want` pages the server is about to move
    /// onto the node itself (`move_pages(2)` for `Cold` advice), within
    /// the bounds of [`Self::grant`].  Returns the pages reserved: move no
    /// more.  The reservation stands until [`Self::release_moves`], after
    /// the move and after its `PLACED` events were applied: the pages that
    /// arrived are then charged by [`Self::placed`] (for a moment they are
    /// counted twice, which only errs on the safe side).
    pub fn reserve_moves(&mut self, want: u64) -> u64 {
        let n = self.room(want);
        self.moving += n;
        n
    }

    /// Release `pages` reserved by [`Self::reserve_moves`].
    pub fn release_moves(&mut self, pages: u64) {
        self.moving = self.moving.saturating_sub(pages);
    }

    /// Pages reserved for moves in flight.
    pub fn moving(&self) -> u64 {
        self.moving
    }

    /// The measured compressed size of resident page `pfn` in bytes
    /// (rounded to the device's granule; 0 for an all-zero page), or
    /// `None` when it is not resident, not measured yet, or writable in
    /// place.
    pub fn size_of(&self, pfn: u64) -> Option<u32> {
        let i = usize::try_from(pfn.checked_sub(self.start_pfn)?).ok()?;
        let m = *self.pages.get(i)?;
        (m.state() == PageState::Measured).then(|| m.granules() * self.geometry.granule)
    }

    /// Take back credit the kernel will not use (a DENY, a SET_CREDIT to a
    /// lower value).
    pub fn revoke(&mut self, pages: u64) {
        self.credit = self.credit.saturating_sub(pages);
    }

    /// The cost band of a resident page.
    fn band(&self, m: PageMeta) -> usize {
        let b = self.cost(m) * BANDS as u64 / (u64::from(self.worst) + 1);
        (b as usize).min(BANDS - 1)
    }

    /// Set page `i` to `new`, keeping the summaries (heat aside).
    fn store(&mut self, i: usize, new: PageMeta) {
        let old = self.pages[i];
        let k = i / BLOCK_PAGES;
        if old.state() != PageState::Empty {
            let band = self.band(old);
            let b = &mut self.blocks[k];
            b.resident -= 1;
            b.bands[band] -= 1;
            self.band_pages[band] -= 1;
            if old.state() == PageState::Unmeasured {
                b.unmeasured -= 1;
                self.unmeasured -= 1;
            }
        }
        if new.state() != PageState::Empty {
            let band = self.band(new);
            let b = &mut self.blocks[k];
            b.resident += 1;
            b.bands[band] += 1;
            self.band_pages[band] += 1;
            if new.state() == PageState::Unmeasured {
                b.unmeasured += 1;
                self.unmeasured += 1;
            }
        }
        self.pages[i] = new;
    }

    /// Pages waiting to be measured.
    pub fn unmeasured(&self) -> u64 {
        self.unmeasured
    }

    /// The next page to measure, in pfn order from where the last search
    /// stopped (wrapping); the block summaries skip what has none.
    pub fn next_unmeasured(&mut self) -> Option<u64> {
        if self.unmeasured == 0 {
            return None;
        }
        let n = self.pages.len();
        let mut i = self.measure_cursor.min(n);
        for _ in 0..=self.blocks.len() {
            if i >= n {
                i = 0;
            }
            let k = i / BLOCK_PAGES;
            let end = ((k + 1) * BLOCK_PAGES).min(n);
            if self.blocks[k].unmeasured > 0
                && let Some(j) = (i..end).find(|&j| self.pages[j].state() == PageState::Unmeasured)
            {
                self.measure_cursor = j + 1;
                return Some(self.start_pfn + j as u64);
            }
            i = end;
        }
        None
    }

    /// Up to `max` resident pfns for which `skip` is false, in pfn order
    /// (draining uses it); empty blocks are skipped by their summaries.
    pub fn resident_sample(&self, max: usize, skip: impl Fn(u64) -> bool) -> Vec<u64> {
        let mut out = Vec::new();
        for (k, b) in self.blocks.iter().enumerate() {
            if b.resident == 0 {
                continue;
            }
            let r = k * BLOCK_PAGES..((k + 1) * BLOCK_PAGES).min(self.pages.len());
            for j in r {
                let pfn = self.start_pfn + j as u64;
                if self.pages[j].state() != PageState::Empty && !skip(pfn) {
                    out.push(pfn);
                    if out.len() >= max {
                        return out;
                    }
                }
            }
        }
        out
    }

    fn index(&self, pfn: u64) -> Result<usize, AccountError> {
        pfn.checked_sub(self.start_pfn)
            .map(|i| i as usize)
            .filter(|&i| i < self.pages.len())
            .ok_or(AccountError::OutOfNode { pfn })
    }

    fn range(&self, pfn: u64, order: u32) -> Result<std::ops::Range<usize>, AccountError> {
        let first = self.index(pfn)?;
        let n = 1usize << order.min(20);
        let last = pfn + n as u64 - 1;
        self.index(last)?;
        Ok(first..first + n)
    }

    fn cost(&self, m: PageMeta) -> u64 {
        match m.state() {
            PageState::Empty => 0,
            PageState::Unmeasured | PageState::Writable => u64::from(self.worst),
            PageState::Measured => u64::from(m.granules()) * u64::from(self.geometry.granule),
        }
    }

    /// A folio arrived (PLACED).  With `credited`, it uses credit granted
    /// earlier (reclaim-time demotion); otherwise it is charged on top (the
    /// server's own migrations, or RESYNC of pages from before a restart).
    ///
    /// # Errors
    ///
    /// [`AccountError`] if the pfns are outside the node or already
    /// resident; nothing is changed then.
    pub fn placed(&mut self, pfn: u64, order: u32, credited: bool) -> Result<(), AccountError> {
        let r = self.range(pfn, order)?;
        if let Some(i) = r
            .clone()
            .find(|&i| self.pages[i].state() != PageState::Empty)
        {
            return Err(AccountError::AlreadyResident {
                pfn: self.start_pfn + i as u64,
            });
        }
        for i in r {
            let p = self.start_pfn + i as u64;
            // A page the kernel may still have mapped writable: it stays
            // charged at the worst case (its contents can change).
            let state = match self.was_writable.iter().position(|&w| w == p) {
                Some(k) => {
                    self.was_writable.swap_remove(k);
                    self.writable += 1;
                    PageState::Writable
                }
                None => PageState::Unmeasured,
            };
            self.store(
                i,
                PageMeta::default()
                    .with_state(state)
                    .with_stamp(self.clock_s),
            );
            self.used += u64::from(self.worst);
            self.resident += 1;
            self.set_hash = self
                .set_hash
                .wrapping_add(pfn_hash(self.start_pfn + i as u64));
            if credited {
                // Retiring credit first: those demotions started before the
                // last SET_CREDIT.
                if self.retiring > 0 {
                    self.retiring -= 1;
                } else {
                    self.credit = self.credit.saturating_sub(1);
                }
            }
        }
        Ok(())
    }

    /// The measured compressed size of the resident page `pfn` (bytes,
    /// before rounding); 0 for an all-zero page.
    ///
    /// # Errors
    ///
    /// [`AccountError`] if `pfn` is not resident.
    pub fn measured(&mut self, pfn: u64, bytes: u32) -> Result<(), AccountError> {
        let i = self.index(pfn)?;
        let m = self.pages[i];
        if m.state() == PageState::Empty {
            return Err(AccountError::NotResident { pfn });
        }
        if m.state() == PageState::Writable {
            // Its content is not stable: keep charging the worst case.
            return Ok(());
        }
        if m.state() == PageState::Measured {
            // Resident pages are fenced: their contents, and so their size,
            // cannot change until they leave.  The first measurement
            // stands (a page reused after a free arrives with a new PLACED).
            return Ok(());
        }
        let rounded = self.geometry.round(bytes);
        let granules = rounded / self.geometry.granule;
        let old = self.cost(m);
        let new_meta = m.with_state(PageState::Measured).with_granules(granules);
        let new = self.cost(new_meta);
        self.used = self.used - old + new;
        if m.state() == PageState::Measured {
            self.measured_bytes -= old;
        } else {
            self.measured_pages += 1;
        }
        self.measured_bytes += new;
        if m.state() == PageState::Measured && m.granules() == 0 {
            self.zero_pages -= 1;
        }
        if granules == 0 {
            self.zero_pages += 1;
        }
        self.store(i, new_meta);
        Ok(())
    }

    /// A folio left the node (FREED or PROMOTED).
    ///
    /// # Errors
    ///
    /// [`AccountError`] if a page of it is not resident; nothing changes.
    pub fn left(&mut self, pfn: u64, order: u32) -> Result<(), AccountError> {
        let r = self.range(pfn, order)?;
        if !self.was_writable.is_empty() {
            let end = pfn + r.len() as u64;
            self.was_writable.retain(|p| !(pfn..end).contains(p));
        }
        if let Some(i) = r
            .clone()
            .find(|&i| self.pages[i].state() == PageState::Empty)
        {
            return Err(AccountError::NotResident {
                pfn: self.start_pfn + i as u64,
            });
        }
        for i in r {
            let m = self.pages[i];
            self.used -= self.cost(m);
            self.resident -= 1;
            self.set_hash = self
                .set_hash
                .wrapping_sub(pfn_hash(self.start_pfn + i as u64));
            if m.state() == PageState::Measured {
                self.measured_pages -= 1;
                self.measured_bytes -= self.cost(m);
            }
            if m.state() == PageState::Measured && m.granules() == 0 {
                self.zero_pages -= 1;
            }
            if m.state() == PageState::Writable {
                self.writable -= 1;
            }
            self.store(i, PageMeta::default());
        }
        Ok(())
    }

    /// Make a resident page writable in place if the node has room for it
    /// at the worst case and fewer than `budget` pages are writable.
    ///
    /// # Errors
    ///
    /// [`AccountError`] if `pfn` is not resident.
    pub fn allow_in_place(&mut self, pfn: u64, budget: u64) -> Result<bool, AccountError> {
        let i = self.index(pfn)?;
        let m = self.pages[i];
        match m.state() {
            PageState::Empty => return Err(AccountError::NotResident { pfn }),
            PageState::Writable => return Ok(true),
            _ => {}
        }
        let extra = u64::from(self.worst) - self.cost(m);
        if self.writable >= budget
            || self.committed() + extra > self.geometry.capacity
            || self.projected() + extra > self.geometry.mark(self.geometry.high)
        {
            return Ok(false);
        }
        if m.state() == PageState::Measured {
            self.measured_pages -= 1;
            self.measured_bytes -= self.cost(m);
            if m.granules() == 0 {
                self.zero_pages -= 1;
            }
        }
        self.used += extra;
        self.writable += 1;
        self.store(i, m.with_state(PageState::Writable));
        Ok(true)
    }

    /// Count an access (hint fault) to `pfn`.
    pub fn touch(&mut self, pfn: u64) {
        if let Ok(i) = self.index(pfn) {
            let m = self.pages[i];
            self.pages[i] = m.with_heat(m.heat().saturating_add(1));
            self.blocks[i / BLOCK_PAGES].heated = true;
        }
    }

    /// Halve every page's heat (end of a hotness window).
    pub fn cool(&mut self) {
        for (k, b) in self.blocks.iter_mut().enumerate() {
            if !b.heated {
                continue;
            }
            let end = ((k + 1) * BLOCK_PAGES).min(self.pages.len());
            let mut any = false;
            for m in &mut self.pages[k * BLOCK_PAGES..end] {
                *m = m.with_heat(m.heat() / 2);
                any |= m.heat() > 0;
            }
            b.heated = any;
        }
    }

    /// Set the clock arriving pages are stamped with, in seconds from any
    /// origin, and sweep `blocks` blocks' stamps so that none wraps: a
    /// page older than [`MAX_AGE_S`] is restamped that old.  Sweeping
    /// every block within [`MAX_AGE_S`] seconds keeps ages exact up to it.
    pub fn set_clock(&mut self, now_s: u64, blocks: usize) {
        self.clock_s = (now_s & u64::from(STAMP_MASK)) as u32;
        let nblocks = self.blocks.len();
        for _ in 0..blocks.min(nblocks) {
            let k = self.sweep_cursor;
            self.sweep_cursor = (k + 1) % nblocks;
            if self.blocks[k].resident == 0 {
                continue;
            }
            let end = ((k + 1) * BLOCK_PAGES).min(self.pages.len());
            for j in k * BLOCK_PAGES..end {
                let m = self.pages[j];
                if m.state() != PageState::Empty && self.age_of(m) >= MAX_AGE_S {
                    self.pages[j] = m.with_stamp(self.clock_s.wrapping_sub(MAX_AGE_S));
                }
            }
        }
    }

    fn age_of(&self, m: PageMeta) -> u32 {
        self.clock_s.wrapping_sub(m.stamp()) & STAMP_MASK
    }

    /// Resident pfns that arrived at least `min_age_s` seconds ago (ages
    /// count up to [`MAX_AGE_S`]), at most `max`, the oldest first.
    pub fn aged(&self, min_age_s: u32, max: usize) -> Vec<u64> {
        let min = min_age_s.min(MAX_AGE_S);
        let resident = |k: usize| {
            let end = ((k + 1) * BLOCK_PAGES).min(self.pages.len());
            (k * BLOCK_PAGES..end).filter(|&j| self.pages[j].state() != PageState::Empty)
        };
        let blocks = || (0..self.blocks.len()).filter(|&k| self.blocks[k].resident > 0);
        // One pass counts pages by age (ages stop at MAX_AGE_S), so that
        // the second collects at most `max`, the oldest first, with no
        // allocation for the rest.
        let mut by_age = vec![0usize; MAX_AGE_S as usize + 1];
        for k in blocks() {
            for j in resident(k) {
                by_age[self.age_of(self.pages[j]).min(MAX_AGE_S) as usize] += 1;
            }
        }
        let (mut cut, mut n) = (MAX_AGE_S, 0);
        while cut > min && n + by_age[cut as usize] < max {
            n += by_age[cut as usize];
            cut -= 1;
        }
        let mut v: Vec<(u32, u64)> = Vec::with_capacity(max.min(n + by_age[cut as usize]));
        for k in blocks() {
            for j in resident(k) {
                let age = self.age_of(self.pages[j]).min(MAX_AGE_S);
                if age >= cut.max(min) {
                    v.push((age, self.start_pfn + j as u64));
                }
            }
        }
        v.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        v.truncate(max);
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// Resident pages from `from_pfn` on, whole blocks at a time, until
    /// at least `max` are collected: each page's pfn, what it costs on the
    /// device (its measured size, or the worst case before it is measured)
    /// and its age in seconds (up to [`MAX_AGE_S`]), in pfn order; and the
    /// pfn to go on from (`None`: the node's end).  Bounded work per call,
    /// so a caller can walk a large node without pausing the loop long.
    pub fn costed(&self, from_pfn: u64, max: usize) -> (Vec<Costed>, Option<u64>) {
        let worst = self.geometry.worst_case();
        let first = from_pfn.saturating_sub(self.start_pfn) as usize;
        let mut v = Vec::new();
        let mut k = first / BLOCK_PAGES;
        while k < self.blocks.len() {
            if self.blocks[k].resident > 0 {
                let end = ((k + 1) * BLOCK_PAGES).min(self.pages.len());
                for j in (k * BLOCK_PAGES).max(first)..end {
                    let m = self.pages[j];
                    if m.state() == PageState::Empty {
                        continue;
                    }
                    v.push(Costed {
                        pfn: self.start_pfn + j as u64,
                        bytes: if m.state() == PageState::Measured {
                            m.granules() * self.geometry.granule
                        } else {
                            worst
                        },
                        age_s: self.age_of(m).min(MAX_AGE_S),
                        pending: false,
                    });
                }
            }
            k += 1;
            if v.len() >= max {
                break;
            }
        }
        let next = (k < self.blocks.len()).then(|| self.start_pfn + (k * BLOCK_PAGES) as u64);
        (v, next)
    }

    /// Heat of `pfn` (0 outside the node).
    pub fn heat(&self, pfn: u64) -> u8 {
        self.index(pfn).map_or(0, |i| self.pages[i].heat())
    }

    /// The pages to evict (PROMOTE_PFN) to bring [`Self::projected`] below
    /// the low watermark: the costliest (least compressible) first, the
    /// hottest last among equals.  Empty when below high.
    pub fn eviction_plan(&self) -> Vec<u64> {
        if self.level() == Level::Normal {
            return Vec::new();
        }
        self.plan_to_low()
    }

    /// Whether [`Self::projected`] is above the low watermark (an eviction
    /// that started above high goes on until it is not).
    pub fn above_low(&self) -> bool {
        self.projected() > self.geometry.mark(self.geometry.low)
    }

    /// The pages to evict to bring [`Self::projected`] below the low
    /// watermark, whatever the level (empty when already below).
    pub fn plan_to_low(&self) -> Vec<u64> {
        self.plan_to_low_limited(usize::MAX, |_| false)
    }

    /// [`Self::plan_to_low`], at most `limit` pages, leaving out those for
    /// which `skip` is true: the costliest band first, and within a band in
    /// pfn order, the coldest first.  The cost does not depend on how many
    /// pages are resident: the band totals say which bands to look in, the
    /// block summaries which blocks, and only those blocks' pages are read.
    pub fn plan_to_low_limited(&self, limit: usize, skip: impl Fn(u64) -> bool) -> Vec<u64> {
        let low = self.geometry.mark(self.geometry.low);
        let mut need = self.projected().saturating_sub(low);
        let mut plan = Vec::new();
        for band in (0..BANDS).rev() {
            if need == 0 || plan.len() >= limit {
                break;
            }
            if self.band_pages[band] == 0 {
                continue;
            }
            // Two passes: cold pages, then the rest.
            for hot in [false, true] {
                for (k, b) in self.blocks.iter().enumerate() {
                    if need == 0 || plan.len() >= limit {
                        break;
                    }
                    if b.bands[band] == 0 || (hot && !b.heated) {
                        continue;
                    }
                    let end = ((k + 1) * BLOCK_PAGES).min(self.pages.len());
                    for j in k * BLOCK_PAGES..end {
                        let m = self.pages[j];
                        if m.state() == PageState::Empty
                            || self.band(m) != band
                            || (m.heat() > 0) != hot
                        {
                            continue;
                        }
                        let pfn = self.start_pfn + j as u64;
                        if skip(pfn) {
                            continue;
                        }
                        let cost = self.cost(m);
                        if cost == 0 {
                            continue;
                        }
                        plan.push(pfn);
                        need = need.saturating_sub(cost);
                        if need == 0 || plan.len() >= limit {
                            break;
                        }
                    }
                }
            }
        }
        plan
    }

    /// Recount `used`, `resident` and `zero_pages` from the page array (for
    /// checks: must equal the running totals).
    pub fn recount(&self) -> (u64, u64, u64) {
        let used = self.pages.iter().map(|&m| self.cost(m)).sum();
        let resident = self
            .pages
            .iter()
            .filter(|m| m.state() != PageState::Empty)
            .count() as u64;
        let zero = self
            .pages
            .iter()
            .filter(|m| m.state() == PageState::Measured && m.granules() == 0)
            .count() as u64;
        (used, resident, zero)
    }

    /// Whether every page of the folio at `pfn` is resident.
    pub fn all_resident(&self, pfn: u64, order: u32) -> bool {
        self.range(pfn, order).is_ok_and(|r| {
            r.into_iter()
                .all(|i| self.pages[i].state() != PageState::Empty)
        })
    }

    /// The state of page `pfn` (`None` outside the node).
    pub fn state(&self, pfn: u64) -> Option<PageState> {
        self.index(pfn).ok().map(|i| self.pages[i].state())
    }

    /// First pfn of the node.
    pub fn start_pfn(&self) -> u64 {
        self.start_pfn
    }

    /// Pages of the node (spanned).
    pub fn nr_pages(&self) -> usize {
        self.pages.len()
    }

    /// Forget every page (before a RESYNC rebuilds the books); credit is
    /// kept.  Pages writable in place are remembered: RESYNC reports them
    /// as placed without saying that the kernel still maps them writable,
    /// so when a RESYNC reports one of those pfns again it is charged at
    /// the worst case, not measured.  A pfn freed and reused meanwhile is
    /// over-charged until it leaves: the safe side, and bounded by the
    /// writable budget.
    pub fn clear(&mut self) {
        let start = self.start_pfn;
        let writable = self
            .pages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.state() == PageState::Writable)
            .map(|(i, _)| start + i as u64);
        let mut keep: Vec<u64> = self.was_writable.drain(..).chain(writable).collect();
        keep.sort_unstable();
        keep.dedup();
        self.was_writable = keep;
        self.pages.fill(PageMeta::default());
        self.blocks.fill(Block::default());
        self.band_pages = [0; BANDS];
        self.unmeasured = 0;
        self.measure_cursor = 0;
        self.used = 0;
        self.resident = 0;
        self.set_hash = 0;
        self.zero_pages = 0;
        self.writable = 0;
        self.measured_pages = 0;
        self.measured_bytes = 0;
    }

    /// Resident pfns (for comparing with the kernel's truth).
    pub fn resident_pfns(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.state() != PageState::Empty)
            .map(|(i, _)| self.start_pfn + i as u64)
    }
}
