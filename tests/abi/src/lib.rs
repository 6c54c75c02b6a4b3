//! The C side of the ABI test: what `abi.c`, compiled against
//! `include/uapi/linux/mm_upcall.h`, says about every record and constant.
//!
//! `tests/abi.rs` compares this with the Rust mirror in `mm-upcall-proto`.

use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_ulong};

#[repr(C)]
struct Entry {
    name: *const c_char,
    value: u64,
}

// SAFETY: both symbols are defined in abi.c (linked by build.rs) with exactly
// these types: `const struct mm_abi_entry mm_abi_entries[]` whose element is
// `{ const char *; unsigned long long; }` and `const unsigned long mm_abi_count`.
unsafe extern "C" {
    static mm_abi_entries: [Entry; 0];
    static mm_abi_count: c_ulong;
}

/// Every name exported by `abi.c` and its value, as the C compiler sees it.
pub fn c_side() -> BTreeMap<String, u64> {
    // SAFETY: mm_abi_count is an initialized constant in abi.c.
    let count = unsafe { mm_abi_count } as usize;
    // SAFETY: mm_abi_entries has exactly mm_abi_count initialized, immutable
    // elements for the life of the program (a const array in abi.c).
    let entries = unsafe { std::slice::from_raw_parts(mm_abi_entries.as_ptr(), count) };
    entries
        .iter()
        .map(|e| {
            // SAFETY: every name is a string literal in abi.c: non-null,
            // NUL-terminated, static.
            let name = unsafe { CStr::from_ptr(e.name) };
            (name.to_string_lossy().into_owned(), e.value)
        })
        .collect()
}
