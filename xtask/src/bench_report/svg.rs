//! The report's plots, as SVG written by hand: grouped bars and lines, linear or log axes,
//! a legend, and only the generic `sans-serif` font, so a file renders the same in a
//! browser, on GitHub and offline, with no plotting library and no font to fetch.

use std::fmt::Write;

/// The plot's own width; the legend's column is added to it, as wide as its longest name.
const PLOT_WIDTH: f64 = 640.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 78.0;
const TOP: f64 = 46.0;
const BOTTOM: f64 = 92.0;

/// Colour-blind-safe (Okabe–Ito), in series order.
const PALETTE: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
];

/// One named series: a value per category (bars) or (x, y) points (lines).
#[derive(Debug, Clone)]
pub(crate) struct Series<T> {
    pub name: String,
    /// Index into the palette: a system keeps its colour across plots, and its p50 and
    /// p99 lines share it (p50 dashed).
    pub colour: usize,
    pub values: T,
}

/// Text escaped for XML character data and attribute values.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An axis mapping values to pixels, linear from 0 or logarithmic over whole decades.
#[derive(Debug, Clone, Copy)]
struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
}

impl Axis {
    /// Bounds that hold every positive value in `values`: on a log axis the nearest 1, 2 or
    /// 5 × 10^k outside them (a curve from 250 to 16k spans 200..20k, not 100..100k); 0 to
    /// a round number on a linear one.
    fn fit(values: impl Iterator<Item = f64>, log: bool) -> Self {
        let finite: Vec<f64> = values.filter(|v| v.is_finite() && *v > 0.0).collect();
        let max = finite.iter().copied().fold(0.0, f64::max);
        if log {
            let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
            let (min, max) = if finite.is_empty() {
                (1.0, 10.0)
            } else {
                (min, max)
            };
            let lo = nice_floor(min);
            let mut hi = nice_ceiling(max);
            if hi <= lo {
                hi = nice_ceiling(lo * 1.01);
            }
            Self { log, lo, hi }
        } else {
            let hi = if max > 0.0 {
                nice_ceiling(max * 1.05)
            } else {
                1.0
            };
            Self { log, lo: 0.0, hi }
        }
    }

    /// The position of `v` in [0, 1] along the axis (clamped).
    fn frac(&self, v: f64) -> f64 {
        let f = if self.log {
            let v = v.max(self.lo);
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        f.clamp(0.0, 1.0)
    }

    /// Labelled ticks: 1, 2, 5 × 10^k on a log axis (only 1 × 10^k past four decades);
    /// five or so round steps on a linear one.
    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let decades = (self.hi / self.lo).log10();
            let steps: &[f64] = if decades > 4.0 {
                &[1.0]
            } else {
                &[1.0, 2.0, 5.0]
            };
            let mut t = Vec::new();
            let mut d = 10f64.powf(self.lo.log10().floor());
            while d <= self.hi * 1.0001 {
                for s in steps {
                    let v = d * s;
                    if v >= self.lo * 0.9999 && v <= self.hi * 1.0001 {
                        t.push(v);
                    }
                }
                d *= 10.0;
            }
            t
        } else {
            let step = nice_ceiling(self.hi / 5.0);
            (0..)
                .map(|i| i as f64 * step)
                .take_while(|v| *v <= self.hi * 1.0001)
                .collect()
        }
    }
}

/// The largest of 1, 2, 5 × 10^k that is at most `v`.
fn nice_floor(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [5.0, 2.0, 1.0]
        .into_iter()
        .map(|m| m * p)
        .find(|c| *c <= v * 1.000_001)
        .unwrap_or(p)
}

/// The smallest of 1, 2, 2.5, 5 × 10^k that is at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|c| *c >= v * 0.999_999)
        .unwrap_or(10.0 * p)
}

/// A number as a tick label: 1.5k, 20, 0.5.
pub(crate) fn short_number(v: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if v >= 1_000_000.0 {
        format!("{}M", trim(format!("{:.1}", v / 1e6)))
    } else if v >= 1000.0 {
        format!("{}k", trim(format!("{:.1}", v / 1e3)))
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        trim(format!("{v:.1}"))
    } else {
        trim(format!("{v:.3}"))
    }
}

struct Frame {
    out: String,
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
}

impl Frame {
    /// A frame for `series`, whose names fill the legend column (about 7 px per character
    /// at 12 px sans-serif).
    fn new<T>(title: &str, series: &[Series<T>]) -> Self {
        let longest = series
            .iter()
            .map(|s| s.name.chars().count())
            .max()
            .unwrap_or(0);
        let right = 60.0 + 7.0 * longest as f64;
        let width = LEFT + PLOT_WIDTH + right;
        let mut out = String::new();
        let _ = write!(
            out,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT}" viewBox="0 0 {width} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{width}" height="{HEIGHT}" fill="#ffffff"/>
<text x="{}" y="24" font-size="15" font-weight="bold" text-anchor="middle">{}</text>
"##,
            (LEFT + PLOT_WIDTH) / 2.0 + 20.0,
            escape(title)
        );
        Self {
            out,
            x0: LEFT,
            y0: HEIGHT - BOTTOM,
            w: PLOT_WIDTH,
            h: HEIGHT - TOP - BOTTOM,
        }
    }

    /// The y axis: grid lines, tick labels and the axis title.
    fn y_axis(&mut self, axis: &Axis, label: &str) {
        for t in axis.ticks() {
            let y = self.y0 - axis.frac(t) * self.h;
            let _ = writeln!(
                self.out,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#dddddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                self.x0,
                self.x0 + self.w,
                self.x0 - 6.0,
                y + 4.0,
                escape(&short_number(t))
            );
        }
        let (cx, cy) = (18.0, self.y0 - self.h / 2.0);
        let _ = writeln!(
            self.out,
            r#"<text x="{cx}" y="{cy:.1}" text-anchor="middle" transform="rotate(-90 {cx} {cy:.1})">{}</text>"#,
            escape(label)
        );
        let _ = writeln!(
            self.out,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#333333"/><line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#333333"/>"##,
            self.y0 - self.h,
            self.y0,
            self.x0 + self.w,
            x = self.x0,
            y = self.y0,
        );
    }

    fn x_title(&mut self, label: &str) {
        let _ = writeln!(
            self.out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            self.x0 + self.w / 2.0,
            self.y0 + 40.0,
            escape(label)
        );
    }

    /// The legend, right of the plot: one swatch (square or line) per series.
    fn legend<T>(&mut self, series: &[Series<T>], line: bool) {
        let x = self.x0 + self.w + 16.0;
        for (i, s) in series.iter().enumerate() {
            let name = &s.name;
            let y = TOP + 8.0 + i as f64 * 20.0;
            let colour = PALETTE[s.colour % PALETTE.len()];
            let swatch = if line {
                format!(
                    r#"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="2.5"{}/>"#,
                    x + 18.0,
                    dash(name)
                )
            } else {
                format!(
                    r#"<rect x="{x:.1}" y="{:.1}" width="14" height="12" fill="{colour}"/>"#,
                    y - 6.0
                )
            };
            let _ = writeln!(
                self.out,
                r#"<g class="legend">{swatch}<text x="{:.1}" y="{:.1}">{}</text></g>"#,
                x + 24.0,
                y + 4.0,
                escape(name)
            );
        }
    }

    fn finish(mut self) -> String {
        self.out.push_str("</svg>\n");
        self.out
    }
}

/// Grouped bars: one group per category, one bar per series, each labelled with its value.
pub(crate) fn bar_chart(
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[Series<Vec<f64>>],
    log: bool,
) -> String {
    let mut f = Frame::new(title, series);
    let axis = Axis::fit(series.iter().flat_map(|s| s.values.iter().copied()), log);
    f.y_axis(&axis, y_label);
    let group = f.w / categories.len().max(1) as f64;
    let bar = (group * 0.8 / series.len().max(1) as f64).min(48.0);
    for (c, cat) in categories.iter().enumerate() {
        let gx = f.x0 + group * c as f64 + (group - bar * series.len() as f64) / 2.0;
        for (i, s) in series.iter().enumerate() {
            let Some(&v) = s.values.get(c) else { continue };
            if !(v.is_finite() && v > 0.0) {
                continue;
            }
            let top = f.y0 - axis.frac(v) * f.h;
            let x = gx + bar * i as f64;
            let _ = writeln!(
                f.out,
                r#"<rect class="bar" x="{x:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                (bar - 2.0).max(1.0),
                f.y0 - top,
                PALETTE[s.colour % PALETTE.len()],
                escape(&format!("{cat}, {}", s.name)),
                escape(&short_number(v))
            );
            let _ = writeln!(
                f.out,
                r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
                x + bar / 2.0 - 1.0,
                top - 3.0,
                escape(&short_number(v))
            );
        }
        // Category labels, wrapped on " / " or at the first space past the middle, so
        // long system names stay under their group.
        let cx = f.x0 + group * (c as f64 + 0.5);
        for (k, line) in wrap(cat).iter().enumerate() {
            let _ = writeln!(
                f.out,
                r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                f.y0 + 16.0 + 14.0 * k as f64,
                escape(line)
            );
        }
    }
    f.legend(series, false);
    f.finish()
}

/// p50 lines dashed, so that a system's two lines share a colour and stay apart.
fn dash(name: &str) -> &'static str {
    if name.contains("p50") {
        r#" stroke-dasharray="6 4""#
    } else {
        ""
    }
}

/// A category label in at most three short lines.
fn wrap(label: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for word in label.split(' ') {
        if !current.is_empty() && current.len() + 1 + word.len() > 16 {
            lines.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(word);
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines.truncate(3);
    lines
}

/// Lines through (x, y) points with a marker on each, on log or linear axes.
pub(crate) fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<Vec<(f64, f64)>>],
    log_x: bool,
    log_y: bool,
) -> String {
    let mut f = Frame::new(title, series);
    let xa = Axis::fit(
        series.iter().flat_map(|s| s.values.iter().map(|p| p.0)),
        log_x,
    );
    let ya = Axis::fit(
        series.iter().flat_map(|s| s.values.iter().map(|p| p.1)),
        log_y,
    );
    f.y_axis(&ya, y_label);
    for t in xa.ticks() {
        let x = f.x0 + xa.frac(t) * f.w;
        let _ = writeln!(
            f.out,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#eeeeee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            f.y0 - f.h,
            f.y0,
            f.y0 + 16.0,
            escape(&short_number(t))
        );
    }
    f.x_title(x_label);
    for s in series {
        let colour = PALETTE[s.colour % PALETTE.len()];
        let dash = dash(&s.name);
        let points: Vec<(f64, f64)> = s
            .values
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && *x > 0.0 && *y > 0.0)
            .map(|&(x, y)| (f.x0 + xa.frac(x) * f.w, f.y0 - ya.frac(y) * f.h))
            .collect();
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let _ = writeln!(
            f.out,
            r#"<polyline class="series" fill="none" stroke="{colour}" stroke-width="2"{dash} points="{}"><title>{}</title></polyline>"#,
            path.join(" "),
            escape(&s.name)
        );
        for (x, y) in points {
            let _ = writeln!(
                f.out,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{colour}"/>"#
            );
        }
    }
    f.legend(series, true);
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that `svg` is well-formed XML as far as these plots go: balanced, properly
    /// nested tags, quoted attributes, no bare `&` or `<` in text. Returns the element names
    /// in document order.
    fn well_formed(svg: &str) -> Vec<String> {
        let mut stack: Vec<String> = Vec::new();
        let mut seen = Vec::new();
        let mut rest = svg;
        while let Some(open) = rest.find('<') {
            let text = &rest[..open];
            assert!(!text.contains('>'), "bare > in text {text:?}");
            for (i, _) in text.match_indices('&') {
                let entity = &text[i..];
                assert!(
                    ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"]
                        .iter()
                        .any(|e| entity.starts_with(e)),
                    "bare & in {text:?}"
                );
            }
            let close = rest[open..].find('>').expect("unclosed tag") + open;
            let tag = &rest[open + 1..close];
            assert!(!tag.contains('<'), "< inside tag {tag:?}");
            assert_eq!(
                tag.matches('"').count() % 2,
                0,
                "unbalanced quotes in {tag:?}"
            );
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched </{name}>"
                );
            } else {
                let name: String = tag
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect();
                assert!(!name.is_empty(), "empty tag name in {tag:?}");
                seen.push(name.clone());
                if !tag.ends_with('/') {
                    stack.push(name);
                }
            }
            rest = &rest[close + 1..];
        }
        assert!(rest.trim().is_empty(), "text after the root: {rest:?}");
        assert!(stack.is_empty(), "unclosed elements {stack:?}");
        assert_eq!(seen.first().map(String::as_str), Some("svg"));
        seen
    }

    #[test]
    fn bar_chart_is_well_formed_with_a_bar_per_value_and_a_legend_per_series() {
        let svg = bar_chart(
            "req/s <by> system & workload",
            "requests per second",
            &[
                "Flask monolith".into(),
                "Flask \"after\" (3 services)".into(),
            ],
            &[
                Series {
                    name: "uniform".into(),
                    colour: 0,
                    values: vec![5000.0, 600.0],
                },
                Series {
                    name: "skewed".into(),
                    colour: 1,
                    values: vec![5200.0, 0.0],
                },
            ],
            false,
        );
        well_formed(&svg);
        // A zero value has no bar.
        assert_eq!(svg.matches(r#"class="bar""#).count(), 3);
        assert_eq!(svg.matches(r#"class="legend""#).count(), 2);
        assert!(svg.contains("&lt;by&gt; system &amp; workload"));
        assert!(svg.contains(">uniform</text>") && svg.contains(">skewed</text>"));
        assert!(svg.contains("5.2k"));
        assert!(!svg.contains("font-face") && !svg.contains("http://fonts"));
    }

    #[test]
    fn line_chart_is_well_formed_with_a_polyline_per_series_on_log_axes() {
        let series = vec![
            Series {
                name: "monolith p99".into(),
                colour: 0,
                values: vec![(250.0, 2.0), (500.0, 3.0), (1000.0, 900.0)],
            },
            Series {
                name: "monolith p50".into(),
                colour: 0,
                values: vec![(250.0, 1.0), (500.0, 1.2), (1000.0, 0.0)],
            },
        ];
        let svg = line_chart("latency", "offered req/s", "ms", &series, true, true);
        let elements = well_formed(&svg);
        assert_eq!(elements.iter().filter(|e| *e == "polyline").count(), 2);
        // The zero latency is not plotted (no log of 0): 3 + 2 markers.
        assert_eq!(elements.iter().filter(|e| *e == "circle").count(), 5);
        assert!(svg.contains("stroke-dasharray"), "p50 lines are dashed");
        // Log axes from the 1-2-5 value below the data to the one above: 200..1k on x,
        // 1..1k on y.
        assert!(svg.contains(">200</text>") && svg.contains(">1k</text>"));
        assert!(svg.contains(">1</text>"));
    }

    #[test]
    fn axes_round_outwards() {
        let a = Axis::fit([1.5, 9000.0].into_iter(), true);
        assert_eq!((a.lo, a.hi), (1.0, 10_000.0));
        assert_eq!(a.frac(100.0), 0.5);
        let c = Axis::fit([250.0, 16_000.0].into_iter(), true);
        assert_eq!((c.lo, c.hi), (200.0, 20_000.0));
        assert_eq!(c.ticks().first(), Some(&200.0));
        assert_eq!(c.ticks().last(), Some(&20_000.0));
        let l = Axis::fit([0.0, 4200.0].into_iter(), false);
        assert_eq!((l.lo, l.hi), (0.0, 5000.0));
        assert_eq!(l.ticks(), vec![0.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0]);
        assert_eq!(nice_ceiling(0.3), 0.5);
        assert_eq!(nice_ceiling(2.2), 2.5);
        assert_eq!(short_number(1500.0), "1.5k");
        assert_eq!(short_number(0.25), "0.25");
        assert_eq!(short_number(20.0), "20");
        assert_eq!(short_number(348.6), "349");
        assert_eq!(short_number(2.5), "2.5");
    }

    #[test]
    fn long_labels_wrap() {
        assert_eq!(
            wrap("passerelle, no cache or limits"),
            vec!["passerelle, no", "cache or limits"]
        );
    }
}
