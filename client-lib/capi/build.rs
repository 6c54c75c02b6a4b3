//! libmmclient's SONAME: programs link against `libmmclient.so.0`, the name
//! that stays while the ABI does (the package installs the file under it,
//! with `libmmclient.so` as the development link).

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libmmclient.so.0");
}
