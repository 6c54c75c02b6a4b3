//! The demo's report: `target/demo/report.html`, one self-contained page
//! with SVG charts drawn from the `report:` lines the guest prints.
//!
//! The charts are a few lines and bars, drawn here as SVG text (about 150
//! lines).  A plotting crate (plotters) would bring a font stack to lay out
//! its labels, for four charts whose text the browser lays out anyway.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

const W: f64 = 720.0;
const H: f64 = 300.0;
/// Plot area margins: left, right, top, bottom.
const M: (f64, f64, f64, f64) = (70.0, 20.0, 36.0, 46.0);
const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// What the guest reported.
#[derive(Default)]
struct Data {
    /// (ms, node-1 pages, device bytes, fenced faults, standing, asked)
    samples: Vec<[f64; 6]>,
    phases: Vec<(f64, String)>,
    /// half -> bytes -> pages
    sizes: BTreeMap<String, BTreeMap<u64, u64>>,
    /// (lower bound ns, count)
    ping: Vec<(u64, u64)>,
    lines: Vec<String>,
    /// `report:` lines that could not be read.
    skipped: usize,
}

fn parse(console: &str) -> Result<Data> {
    let mut d = Data::default();
    for line in console.lines() {
        if let Some(l) = line.strip_prefix("demo: ") {
            d.lines.push(l.to_string());
        }
        let Some(rest) = line.strip_prefix("report: ") else {
            continue;
        };
        let w: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| -> Result<f64> {
            w.get(i)
                .with_context(|| format!("short report line {line:?}"))?
                .parse::<f64>()
                .with_context(|| format!("report line {line:?}"))
        };
        // A line the console garbled (a kernel message in the middle) is
        // skipped and counted, not fatal: the report is for reading.
        let mut read_line = || -> Result<()> {
            match w.first().copied() {
                Some("sample") => {
                    d.samples
                        .push([num(1)?, num(2)?, num(3)?, num(4)?, num(5)?, num(6)?]);
                }
                Some("phase") => d.phases.push((num(1)?, w[2..].join(" "))),
                Some("size") => {
                    let half = w.get(1).context("size line")?.to_string();
                    *d.sizes
                        .entry(half)
                        .or_default()
                        .entry(num(2)? as u64)
                        .or_default() += num(3)? as u64;
                }
                Some("ping") => d.ping.push((num(1)? as u64, num(2)? as u64)),
                _ => bail!("unknown report line"),
            }
            Ok(())
        };
        if read_line().is_err() {
            d.skipped += 1;
        }
    }
    ensure!(!d.samples.is_empty(), "the demo reported no samples");
    Ok(d)
}

/// Ticks at 1, 2 or 5 times a power of ten, about five over `0..=max`.
fn ticks(max: f64) -> Vec<f64> {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let p = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p);
    // Up to the first tick at or above max.
    let n = (max / step - 1e-9).ceil().max(1.0) as u32;
    (0..=n).map(|i| f64::from(i) * step).collect()
}

fn label(v: f64) -> String {
    if v >= 1e6 && v % 1e5 == 0.0 {
        format!("{}M", v / 1e6)
    } else if v >= 1e4 && v % 1e3 == 0.0 {
        format!("{}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The frame of a chart: title, axes with ticks up to `ymax`, x from 0 to
/// `xmax`; returns the SVG so far and the scale functions' parameters.
fn frame(title: &str, xlabel: &str, ylabel: &str, xmax: f64, ymax: f64) -> (String, f64, f64) {
    let (pw, ph) = (W - M.0 - M.1, H - M.2 - M.3);
    let yt = ticks(ymax);
    let ytop = *yt.last().expect("ticks");
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" \
         height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"{}\" y=\"20\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        M.0,
        esc(title)
    );
    for t in &yt {
        let y = M.2 + ph - t / ytop * ph;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            M.0,
            M.0 + pw,
            M.0 - 6.0,
            y + 4.0,
            label(*t)
        );
    }
    if xmax > 0.0 {
        for t in ticks(xmax).into_iter().filter(|t| *t <= xmax) {
            let x = M.0 + t / xmax * pw;
            let _ = writeln!(
                s,
                "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                M.2 + ph + 16.0,
                label(t)
            );
        }
    }
    let _ = writeln!(
        s,
        "<line x1=\"{0}\" x2=\"{0}\" y1=\"{1}\" y2=\"{2}\" stroke=\"#333\"/>\
         <line x1=\"{0}\" x2=\"{3}\" y1=\"{2}\" y2=\"{2}\" stroke=\"#333\"/>\
         <text x=\"{4}\" y=\"{5}\" text-anchor=\"middle\">{6}</text>\
         <text transform=\"translate(16 {7}) rotate(-90)\" text-anchor=\"middle\">{8}</text>",
        M.0,
        M.2,
        M.2 + ph,
        M.0 + pw,
        M.0 + pw / 2.0,
        H - 8.0,
        esc(xlabel),
        M.2 + ph / 2.0,
        esc(ylabel)
    );
    (s, ytop, pw)
}

/// Lines over time (x in seconds), with the phases marked.
fn lines(
    title: &str,
    ylabel: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    phases: &[(f64, String)],
) -> String {
    let xmax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .chain(phases.iter().map(|p| p.0))
        .fold(0.0, f64::max);
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let (mut s, ytop, pw) = frame(
        title,
        "seconds since the demo's server started serving",
        ylabel,
        xmax,
        ymax,
    );
    let ph = H - M.2 - M.3;
    let x = |t: f64| M.0 + if xmax > 0.0 { t / xmax * pw } else { 0.0 };
    let y = |v: f64| M.2 + ph - v / ytop * ph;
    for (i, (t, name)) in phases.iter().enumerate() {
        // Labels step down so that close phases stay readable; near the
        // right edge they end at their line.
        let right = x(*t) > M.0 + pw * 0.8;
        let _ = writeln!(
            s,
            "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1}\" y2=\"{2}\" stroke=\"#999\" \
             stroke-dasharray=\"4 3\"/><text x=\"{3:.1}\" y=\"{4}\" fill=\"#666\" \
             font-size=\"11\" text-anchor=\"{5}\">{6}</text>",
            x(*t),
            M.2,
            M.2 + ph,
            x(*t) + if right { -3.0 } else { 3.0 },
            M.2 + 11.0 + 13.0 * (i % 3) as f64,
            if right { "end" } else { "start" },
            esc(name)
        );
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(t, v)| format!("{:.1},{:.1}", x(t), y(v)))
            .collect();
        // Wider first: a series another one covers stays visible.
        let width = 5.0 / (i as f64 + 1.0) + 1.0;
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"{width:.1}\" points=\"{}\"/>\
             <rect x=\"{}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"{color}\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            path.join(" "),
            M.0 + 12.0,
            M.2 + 52.0 + 16.0 * i as f64,
            M.0 + 28.0,
            M.2 + 57.0 + 16.0 * i as f64,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Bars over categories, one group of bars per category, one color per
/// series.
fn bars(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    cats: &[String],
    series: &[(&str, Vec<f64>)],
) -> String {
    let ymax = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0, f64::max);
    let (mut s, ytop, pw) = frame(title, xlabel, ylabel, 0.0, ymax);
    let ph = H - M.2 - M.3;
    let slot = pw / cats.len().max(1) as f64;
    let bw = (slot * 0.8 / series.len().max(1) as f64).max(1.0);
    for (c, cat) in cats.iter().enumerate() {
        let x0 = M.0 + slot * c as f64 + slot * 0.1;
        for (i, (_, vals)) in series.iter().enumerate() {
            let v = vals.get(c).copied().unwrap_or(0.0);
            let h = v / ytop * ph;
            let _ = writeln!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{h:.1}\" fill=\"{}\">\
                 <title>{}: {}</title></rect>",
                x0 + bw * i as f64,
                M.2 + ph - h,
                COLORS[i % COLORS.len()],
                esc(cat),
                label(v)
            );
        }
        if cats.len() <= 16 || c % (cats.len() / 12).max(1) == 0 {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{}</text>",
                x0 + slot * 0.4,
                M.2 + ph + 16.0,
                esc(cat)
            );
        }
    }
    for (i, (name, _)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"10\" fill=\"{color}\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            W - M.1 - 200.0,
            M.2 + 14.0 + 16.0 * i as f64,
            W - M.1 - 184.0,
            M.2 + 23.0 + 16.0 * i as f64,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Write `report.html` beside `console`, from the demo's console log;
/// returns its path.
pub fn write(console: &Path, out_dir: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(console)
        .with_context(|| format!("cannot read {}", console.display()))?;
    let d = parse(&text)?;
    let secs = |s: &[f64; 6]| s[0] / 1e3;
    let phases: Vec<(f64, String)> = d.phases.iter().map(|(t, n)| (t / 1e3, n.clone())).collect();
    let series = |i: usize, scale: f64| -> Vec<(f64, f64)> {
        d.samples.iter().map(|s| (secs(s), s[i] * scale)).collect()
    };
    // Cumulative counters from the first sample.
    let since = |i: usize| -> Vec<(f64, f64)> {
        let base = d.samples[0][i];
        d.samples.iter().map(|s| (secs(s), s[i] - base)).collect()
    };
    let mut charts = vec![
        lines(
            "Pages on the compressed node (mm-server's books)",
            "pages",
            &[("pages on node 1", series(1, 1.0))],
            &phases,
        ),
        lines(
            "Device space those pages cost, measured with LZ4",
            "MiB",
            &[("device MiB used", series(2, 1.0 / f64::from(1 << 20)))],
            &phases,
        ),
        lines(
            "Writes to the compressed node: fenced, and who decided",
            "write faults",
            &[
                ("fenced by the kernel", since(3)),
                ("decided by the standing verdict", since(4)),
                ("asked of mm-server", since(5)),
            ],
            &phases,
        ),
    ];
    let sizes: std::collections::BTreeSet<u64> =
        d.sizes.values().flat_map(|m| m.keys().copied()).collect();
    if !sizes.is_empty() {
        let cats: Vec<String> = sizes.iter().map(|b| format!("{b} B")).collect();
        let halves: Vec<(&str, Vec<f64>)> = d
            .sizes
            .iter()
            .map(|(half, m)| {
                (
                    half.as_str(),
                    sizes
                        .iter()
                        .map(|b| m.get(b).copied().unwrap_or(0) as f64)
                        .collect(),
                )
            })
            .collect();
        charts.push(bars(
            "What each 4 KiB page costs on the device (text-like vs random pages)",
            "measured size, bytes (whole 64-byte device granules)",
            "pages",
            &cats,
            &halves,
        ));
    }
    if !d.ping.is_empty() {
        let cats: Vec<String> = d
            .ping
            .iter()
            .map(|&(ns, _)| {
                if ns < 10_000 {
                    format!("{:.1}", ns as f64 / 1e3)
                } else {
                    format!("{}", ns / 1000)
                }
            })
            .collect();
        let counts: Vec<f64> = d.ping.iter().map(|&(_, c)| c as f64).collect();
        let total: u64 = d.ping.iter().map(|&(_, c)| c).sum();
        charts.push(bars(
            &format!("Upcall round trip: {total} PINGs from kernel threads (TCG)"),
            "round trip, µs (bucket's lower bound)",
            "upcalls",
            &cats,
            &[("PING upcalls", counts)],
        ));
    }
    let mut html = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>mm-upcall demo report</title>\
         <style>body{font-family:sans-serif;max-width:760px;margin:2em auto;color:#222}\
         li{margin:.2em 0} svg{margin:1em 0;border:1px solid #eee}</style></head><body>\n\
         <h1>mm-upcall demo</h1>\n<p>The patched kernel in QEMU (TCG) on a two-tier NUMA \
         topology; mm-server manages node 1 as a compressed device.  Generated by \
         <code>cargo xtask demo</code> from the guest's console \
         (<code>target/vm/demo/console.log</code>).</p>\n",
    );
    html.push_str("<h2>Charts</h2>\n");
    for c in &charts {
        html.push_str(c);
    }
    if d.skipped > 0 {
        let _ = writeln!(
            html,
            "<p>{} report line(s) of the console could not be read and were left out.</p>",
            d.skipped
        );
    }
    html.push_str("<h2>What the demo printed</h2>\n<ul>\n");
    for l in &d.lines {
        let _ = writeln!(html, "<li>{}</li>", esc(l));
    }
    html.push_str("</ul>\n</body></html>\n");
    std::fs::create_dir_all(out_dir)?;
    let path = out_dir.join("report.html");
    std::fs::write(&path, html)?;
    for (i, c) in charts.iter().enumerate() {
        std::fs::write(out_dir.join(format!("chart-{}.svg", i + 1)), c)?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_cover_the_range_in_round_steps() {
        assert_eq!(ticks(10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(*ticks(16384.0).last().unwrap(), 20000.0);
        let small = ticks(0.0);
        assert_eq!(small.len(), 6);
        assert!((small[5] - 1.0).abs() < 1e-9);
    }

    #[test]
    fn the_report_parses_and_draws_every_chart() {
        let console = "demo: rewrote all 16384 pages\n\
                       report: ping 65536 10\nreport: ping 131072 5\n\
                       report: phase 0 reclaim\n\
                       report: sample 0 0 0 10 0 0\nreport: sample 100 16384 34603008 20 5 0\n\
                       report: size text 64 8192\nreport: size random 4096 8192\n";
        let dir = std::env::temp_dir().join(format!("mm-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        std::fs::write(&log, console).unwrap();
        let html = std::fs::read_to_string(write(&log, &dir).unwrap()).unwrap();
        assert_eq!(html.matches("<svg").count(), 5);
        assert!(html.contains("<li>rewrote all 16384 pages</li>"));
        // The fenced-fault series starts at 0 (cumulative from the first sample).
        assert!(html.contains("fenced by the kernel"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_garbled_report_line_is_skipped() {
        let d = parse("report: sample 0 1 2 3 4 5\nreport: sample 10 [  5.1] x\n").unwrap();
        assert_eq!((d.samples.len(), d.skipped), (1, 1));
    }

    #[test]
    fn a_console_without_samples_is_an_error() {
        assert!(parse("demo: nothing\n").is_err());
    }
}
