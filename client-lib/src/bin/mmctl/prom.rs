//! A reader of the Prometheus text format, enough for mm-server's metrics.

use std::collections::HashMap;

/// Samples by metric name: label set (as written) and value.
pub struct Metrics(HashMap<String, Vec<(String, f64)>>);

/// Parse the text; lines that are not samples are skipped.
pub fn parse(text: &str) -> Metrics {
    let mut m: HashMap<String, Vec<(String, f64)>> = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match key.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (key, ""),
        };
        m.entry(name.to_string())
            .or_default()
            .push((labels.to_string(), v));
    }
    Metrics(m)
}

impl Metrics {
    /// The value of `name` whose label `label` is `value` (0 if none).
    pub fn get(&self, name: &str, label: &str, value: &str) -> f64 {
        let want = format!("{label}=\"{value}\"");
        self.0
            .get(name)
            .and_then(|v| v.iter().find(|(l, _)| l.split(',').any(|p| p == want)))
            .map_or(0.0, |&(_, v)| v)
    }

    /// The values label `label` takes in `name`'s samples.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let prefix = format!("{label}=\"");
        self.0
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|(l, _)| {
                l.split(',')
                    .find_map(|p| p.strip_prefix(&prefix)?.strip_suffix('"'))
                    .map(str::to_string)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn samples_with_labels_are_found() {
        let m =
            super::parse("# HELP x y\nmm_a{nid=\"1\"} 5\nmm_a{nid=\"2\"} 7.5\nmm_b 3\nbroken\n");
        assert_eq!(m.get("mm_a", "nid", "2"), 7.5);
        assert_eq!(m.label_values("mm_a", "nid"), vec!["1", "2"]);
        assert_eq!(m.get("mm_a", "nid", "3"), 0.0);
    }
}
