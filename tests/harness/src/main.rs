//! `cargo xtask`: the mm-upcall harness.
mod kernel;
mod util;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("kernel") => kernel::ensure().map(|_| ()),
        _ => Err(anyhow::anyhow!("usage")),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
