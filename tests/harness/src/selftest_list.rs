//! The kernel's own mm selftests (`tools/testing/selftests/mm` of the 6.12
//! tree) that `cargo xtask selftests` runs, with the arguments
//! `run_vmtests.sh` gives them, and the ones left out with the reason.
//!
//! Shared by `xtask` (which builds them and prints the table) and
//! `mm-guest` (which runs them in the guest).

/// One run of one selftest binary.
pub struct Selftest {
    /// Unique name of this run (the binary, plus a suffix for arguments).
    pub name: &'static str,
    /// The binary in `tools/testing/selftests/mm`.
    pub bin: &'static str,
    pub args: &'static [&'static str],
    /// Per-test limit in the guest (TCG), seconds.
    pub timeout_secs: u64,
    /// Run as uid/gid 65534 (as `run_vmtests.sh` runs it with `sudo -u nobody`).
    pub nobody: bool,
    /// Part of `cargo xtask test` (managed mode).
    pub suite: bool,
    /// hugetlb pages the test needs in the pool (`/proc/sys/vm/nr_hugepages`,
    /// set before and emptied after it, as `run_vmtests.sh` does).
    pub hugepages: u32,
}

const fn t(name: &'static str, bin: &'static str, args: &'static [&'static str]) -> Selftest {
    Selftest {
        name,
        bin,
        args,
        timeout_secs: 300,
        nobody: false,
        suite: false,
        hugepages: 0,
    }
}

impl Selftest {
    const fn secs(mut self, s: u64) -> Self {
        self.timeout_secs = s;
        self
    }
    const fn suite(mut self) -> Self {
        self.suite = true;
        self
    }
    const fn nobody(mut self) -> Self {
        self.nobody = true;
        self
    }
    const fn huge(mut self, n: u32) -> Self {
        self.hugepages = n;
        self
    }
}

/// Every test that applies to this kernel's config, in run order.
pub const SELFTESTS: &[Selftest] = &[
    // Anonymous memory: what demotion to a managed node and the write
    // fence touch most.
    // Not in the suite: its swapped-out subtests compare pagemap read(2)
    // with PAGEMAP_SCAN and bail out when the demoter migrates the page in
    // between (a migration entry reads as swap); 2 of 5 runs in each mode
    // (docs/SELFTESTS.md).
    t("cow", "cow", &[]).secs(600),
    // Not in the suite: under the demoter it fails and aborts in control
    // mode too (docs/SELFTESTS.md).
    t("khugepaged", "khugepaged", &[]).secs(600),
    t("khugepaged-s2", "khugepaged", &["-s", "2"]).secs(600),
    t("madv_populate", "madv_populate", &[]).suite(),
    t("mkdirty", "mkdirty", &[]).suite(),
    t("migration", "migration", &[]).secs(400),
    t("soft-dirty", "soft-dirty", &[]),
    t("pagemap_ioctl", "pagemap_ioctl", &[]).secs(900),
    t("gup_test-u", "gup_test", &["-u"]).suite(),
    t("gup_test-a", "gup_test", &["-a"]).suite(),
    t(
        "gup_test-ct",
        "gup_test",
        &["-ct", "-F", "0x1", "0", "19", "0x1000"],
    ),
    t("gup_longterm", "gup_longterm", &[]).suite(),
    t("uffd-unit-tests", "uffd-unit-tests", &[]).secs(600),
    t("uffd-stress-anon", "uffd-stress", &["anon", "20", "16"])
        .secs(400)
        .suite(),
    t("split_huge_page_test", "split_huge_page_test", &[]),
    t("transhuge-stress", "transhuge-stress", &["-d", "20"]).suite(),
    // Not in the suite: test_unmerge_zero_pages expects every page merged
    // after two KSM scans, which a page under the demoter's migration
    // misses; it fails in 3 of 10 control runs (docs/SELFTESTS.md).
    t("ksm_functional_tests", "ksm_functional_tests", &[]),
    t("ksm_tests-M", "ksm_tests", &["-M", "-p", "10"]),
    t("ksm_tests-N-m1", "ksm_tests", &["-N", "-m", "1"]),
    t("ksm_tests-N-m0", "ksm_tests", &["-N", "-m", "0"]),
    // Mappings, locking, remapping.
    t("map_fixed_noreplace", "map_fixed_noreplace", &[]),
    t("map_populate", "map_populate", &[]),
    t("mlock2-tests", "mlock2-tests", &[]).suite(),
    t("mlock-random-test", "mlock-random-test", &[]),
    t("on-fault-limit", "on-fault-limit", &[]).nobody(),
    t("mrelease_test", "mrelease_test", &[]),
    t("mremap_dontunmap", "mremap_dontunmap", &[]),
    t("mremap_test", "mremap_test", &[]).secs(600),
    t("mdwe_test", "mdwe_test", &[]),
    t("droppable", "droppable", &[]),
    t("mseal_test", "mseal_test", &[]),
    t("memfd_secret", "memfd_secret", &[]),
    // hugetlb: the pool is filled for the test; in managed mode none of
    // it may come from the managed node.
    t("hugepage-mmap", "hugepage-mmap", &[]).huge(128),
    t("map_hugetlb", "map_hugetlb", &[]).huge(128),
    t("hugepage-mremap", "hugepage-mremap", &[]).huge(128),
    t("hugetlb-madvise", "hugetlb-madvise", &[])
        .huge(128)
        .suite(),
    t("hugetlb_fault_after_madv", "hugetlb_fault_after_madv", &[]).huge(1),
    t("hugetlb_madv_vs_map", "hugetlb_madv_vs_map", &[]).huge(1),
    t("compaction_test", "compaction_test", &[]).secs(600),
];

/// What is left out, and why.
pub const LEFT_OUT: &[(&str, &str)] = &[
    (
        "hmm-tests, test_hmm.sh, test_vmalloc.sh",
        "need the test_hmm and test_vmalloc modules loaded; the guest runs the host's \
         root file system, which has no modules for the test kernel",
    ),
    (
        "hugetlb-read-hwpoison, hugetlb-soft-offline",
        "need MEMORY_FAILURE (hwpoison), which needs X86_MCE; tinyconfig's base has neither",
    ),
    (
        "hugepage-vmemmap",
        "checks the hugetlb vmemmap optimisation (HUGETLB_PAGE_OPTIMIZE_VMEMMAP, not \
         configured); hugetlb pages never reach a managed node",
    ),
    (
        "hugetlb_dio, split_huge_page_test's file part",
        "need a block device (O_DIRECT, XFS); the test bed's kernel has no BLOCK",
    ),
    (
        "charge_reserved_hugetlb.sh, hugetlb_reparenting_test.sh",
        "need the hugetlb cgroup controller (CGROUP_HUGETLB); hugetlb pages never reach \
         a managed node, so these say nothing about the series",
    ),
    (
        "uffd-stress hugetlb/shmem variants",
        "shmem and hugetlb pages are never demoted to a managed node (only anonymous \
         pages are); the anonymous variant runs",
    ),
    (
        "ksm_tests -H -s 100, -P, -U, -Z",
        "timing and THP-merge variants of the KSM test; the functional test and the \
         merge-across-nodes runs (-M, -N) cover what a managed node changes",
    ),
    (
        "protection_keys, pkey_sighandler_tests, va_high_addr_switch, virtual_address_range",
        "protection keys and the virtual address space layout do not depend on where \
         a page sits; virtual_address_range maps 128 TiB of address space, slow under TCG",
    ),
    (
        "hugepage-shm, thuge-gen",
        "use System V shared memory; the test bed's kernel has no SYSVIPC, and shm \
         segments are shmem, which never reaches a managed node",
    ),
    (
        "seal_elf",
        "reads the test's own ELF through /proc; no page placement involved",
    ),
];
