//! Compile `abi.c` against the uapi header (the source of truth).

fn main() {
    let include = "../../kernel-upcall/linux/include/uapi";
    println!("cargo::rerun-if-changed=abi.c");
    println!("cargo::rerun-if-changed={include}/linux/mm_upcall.h");
    cc::Build::new()
        .file("abi.c")
        // Our header first, then the system's <linux/types.h>.
        .include(include)
        .flag("-Wall")
        .flag("-Werror")
        .compile("mm_upcall_abi");
}
