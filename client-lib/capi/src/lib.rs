//! The C ABI of the hint API: `libmmclient.so`, declared by
//! `include/mm_client.h`.  Every function returns 0 or `-errno`; the
//! last failure's text is kept in the client for [`mm_client_error`].
//!
//! This is the only crate of the client with unsafe code: pointers from C
//! are checked for NULL and trusted for the lengths the header states.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::os::fd::BorrowedFd;
use std::path::Path;

use mm_upcall_client::{Advice, Advised, Client, Error, Page, probe};

/// `struct mm_client`: opaque to C.
pub struct MmClient {
    client: Client,
    error: CString,
}

/// `struct mm_advised`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct MmAdvised {
    pub pages: u64,
    pub moved: u64,
    pub already: u64,
    pub skipped: u64,
}

/// `struct mm_page`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct MmPage {
    pub node: i32,
    pub compressed_bytes: u32,
}

/// `struct mm_probe`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct MmProbe {
    pub kernel: c_int,
    pub server: c_int,
    pub version: u16,
}

fn advice(v: c_int) -> Option<Advice> {
    Advice::from_code(u32::try_from(v).ok()?).ok()
}

impl MmClient {
    /// Keep `e`'s text and return its `-errno`.
    fn fail(&mut self, e: &Error) -> c_int {
        self.error = CString::new(e.to_string().replace('\0', " ")).unwrap_or_default();
        -e.errno()
    }

    fn done(&mut self, r: Result<Advised, Error>, out: *mut MmAdvised) -> c_int {
        match r {
            Ok(a) => {
                if !out.is_null() {
                    // SAFETY: the caller passes NULL or a pointer to a
                    // writable struct mm_advised (header contract).
                    unsafe {
                        out.write(MmAdvised {
                            pages: a.pages,
                            moved: a.moved,
                            already: a.already,
                            skipped: a.skipped,
                        });
                    }
                }
                self.error = CString::default();
                0
            }
            Err(e) => self.fail(&e),
        }
    }
}

/// `mm_client_open()`.
///
/// # Safety
///
/// `path` is NULL or a NUL-terminated string; `out` points to writable
/// storage for a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mm_client_open(path: *const c_char, out: *mut *mut MmClient) -> c_int {
    if out.is_null() {
        return -libc::EINVAL;
    }
    let r = if path.is_null() {
        Client::connect()
    } else {
        // SAFETY: non-NULL and NUL-terminated (caller's contract).
        let p = unsafe { CStr::from_ptr(path) };
        let Ok(p) = p.to_str() else {
            return -libc::EINVAL;
        };
        Client::connect_to(Path::new(p))
    };
    match r {
        Ok(client) => {
            let c = Box::new(MmClient {
                client,
                error: CString::default(),
            });
            // SAFETY: `out` is non-NULL and writable (caller's contract).
            unsafe { out.write(Box::into_raw(c)) };
            0
        }
        Err(e) => -e.errno(),
    }
}

/// `mm_client_close()`.
///
/// # Safety
///
/// `c` is NULL or a client from [`mm_client_open`] not closed before.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mm_client_close(c: *mut MmClient) {
    if !c.is_null() {
        // SAFETY: made by Box::into_raw in mm_client_open, closed once.
        drop(unsafe { Box::from_raw(c) });
    }
}

/// `mm_client_advise()`.
///
/// # Safety
///
/// `c` is a live client; `out` is NULL or writable.  `addr` is not
/// dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mm_client_advise(
    c: *mut MmClient,
    addr: *mut c_void,
    len: usize,
    adv: c_int,
    out: *mut MmAdvised,
) -> c_int {
    // SAFETY: as this function's.
    unsafe { advise_with(c, adv, out, |cl, a| cl.advise(addr as usize, len, a)) }
}

/// The checks both advise calls make, then `call`.
///
/// # Safety
///
/// `c` is null or a live client used by one thread; `out` is null or
/// writable.
unsafe fn advise_with(
    c: *mut MmClient,
    adv: c_int,
    out: *mut MmAdvised,
    call: impl FnOnce(&mut Client, Advice) -> Result<Advised, Error>,
) -> c_int {
    // SAFETY: a live client (caller's contract), used by one thread.
    let Some(c) = (unsafe { c.as_mut() }) else {
        return -libc::EINVAL;
    };
    let Some(a) = advice(adv) else {
        return c.fail(&Error::Invalid(format!("{adv} is not an enum mm_advice")));
    };
    let r = call(&mut c.client, a);
    c.done(r, out)
}

/// `mm_client_advise_pidfd()`.
///
/// # Safety
///
/// As [`mm_client_advise`]; `pidfd` is an open descriptor.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mm_client_advise_pidfd(
    c: *mut MmClient,
    pidfd: c_int,
    addr: u64,
    len: usize,
    adv: c_int,
    out: *mut MmAdvised,
) -> c_int {
    // SAFETY: as this function's.
    unsafe {
        advise_with(c, adv, out, |cl, a| {
            if pidfd < 0 {
                return Err(Error::Invalid(format!("{pidfd} is not a descriptor")));
            }
            // SAFETY: the caller keeps `pidfd` open for the call; it is
            // only borrowed (its fdinfo is read).
            let fd = BorrowedFd::borrow_raw(pidfd);
            cl.advise_process(fd, addr as usize, len, a)
        })
    }
}

/// `mm_client_residency()`.
///
/// # Safety
///
/// `c` is a live client; `pages` points to `npages` writable records.
/// `addr` is not dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mm_client_residency(
    c: *mut MmClient,
    addr: *const c_void,
    len: usize,
    pages: *mut MmPage,
    npages: usize,
) -> c_int {
    // SAFETY: a live client (caller's contract), used by one thread.
    let Some(c) = (unsafe { c.as_mut() }) else {
        return -libc::EINVAL;
    };
    if len.div_ceil(4096) > npages {
        c.fail(&Error::Invalid(format!(
            "{len} bytes are {} pages; the array holds {npages}",
            len.div_ceil(4096)
        )));
        return -libc::ERANGE;
    }
    if pages.is_null() && len > 0 {
        return -libc::EINVAL;
    }
    match c.client.residency(addr as usize, len) {
        Ok(v) => {
            for (i, p) in v.iter().enumerate() {
                let rec = match *p {
                    Page::Resident { node, compressed } => MmPage {
                        node: i32::from(node),
                        compressed_bytes: compressed.unwrap_or(u32::MAX),
                    },
                    Page::NotPresent => MmPage {
                        node: -libc::ENOENT,
                        compressed_bytes: u32::MAX,
                    },
                    Page::NotMapped => MmPage {
                        node: -libc::EFAULT,
                        compressed_bytes: u32::MAX,
                    },
                    Page::Error { errno } => MmPage {
                        node: -errno,
                        compressed_bytes: u32::MAX,
                    },
                };
                // SAFETY: i < v.len() = len / 4096 rounded up <= npages,
                // and `pages` holds npages records (caller's contract).
                unsafe { pages.add(i).write(rec) };
            }
            c.error = CString::default();
            0
        }
        Err(e) => c.fail(&e),
    }
}

/// `mm_client_error()`.
///
/// # Safety
///
/// `c` is NULL or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mm_client_error(c: *const MmClient) -> *const c_char {
    // SAFETY: NULL or a live client (caller's contract).
    match unsafe { c.as_ref() } {
        Some(c) => c.error.as_ptr(),
        None => c"no client".as_ptr(),
    }
}

/// `mm_probe()`.
///
/// # Safety
///
/// `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mm_probe(out: *mut MmProbe) -> c_int {
    if out.is_null() {
        return -libc::EINVAL;
    }
    let p = probe();
    // SAFETY: non-NULL and writable (caller's contract).
    unsafe {
        out.write(MmProbe {
            kernel: c_int::from(p.kernel),
            server: c_int::from(p.server),
            version: p.version.unwrap_or(0),
        });
    }
    0
}
