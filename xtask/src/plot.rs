//! `cargo xtask bench … --plot`: SVG figures of the `dwcp` runs a benchmark makes, drawn with
//! `plotters` (SVG backend only, no font files: the text is SVG `<text>`), one chart per file, to
//! `target/xtask/plots/<bench>-<figure>.svg`:
//!
//! - `throughput`: wire and logical throughput of each pass (`wire_bytes` and `pages` of the JSON
//!   report's `passes` over their `duration_ms`);
//! - `bandwidth`: PBA's link forecast at the end of each pass (`link_forecast_bps`) next to the
//!   wire throughput the pass measured;
//! - `streams`: the data streams taking chunks over time, from the `streams` field of the progress
//!   events of `--events FILE`, with the end of each pass marked.
//!
//! `--plot` is a flag of every `bench`; [`request`] records it once and the benchmarks that run the
//! `dwcp` binary ask [`requested`] whether to log events and draw.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use serde_json::Value;

use crate::Workspace;

/// Guest page size, bytes (the logical throughput counts pages).
const PAGE_BYTES: f64 = 4096.0;
const MB: f64 = 1e6;
/// Pixel size of every figure.
const SIZE: (u32, u32) = (800, 450);
/// The minor grid lines.
const LIGHT: RGBColor = RGBColor(238, 238, 238);
const ORANGE: RGBColor = RGBColor(230, 120, 0);

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Records `--plot` for this process.
pub fn request() {
    REQUESTED.store(true, Ordering::Relaxed);
}

/// Whether `--plot` was given.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

/// Where the figures go (created).
pub fn dir(ws: &Workspace) -> Result<PathBuf> {
    let dir = ws.target.join("xtask").join("plots");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The event log of the run named `name` in `dir` (the figures of that run are drawn from it).
pub fn events_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.events.ndjson"))
}

/// One pass of a report: what the charts show of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pass {
    /// Iteration number.
    pub iteration: u32,
    /// Pages sent.
    pub pages: f64,
    /// Chunk bytes sent.
    pub wire_bytes: f64,
    /// Wall time, milliseconds.
    pub duration_ms: f64,
    /// PBA's forecast of the link at the pass's end, bytes per second (0: none yet).
    pub link_forecast_bps: f64,
}

impl Pass {
    fn secs(&self) -> f64 {
        self.duration_ms / 1e3
    }

    /// Wire throughput, bytes per second (`None` for a pass of no measurable length).
    pub fn wire_bps(&self) -> Option<f64> {
        (self.duration_ms > 0.0).then(|| self.wire_bytes / self.secs())
    }

    /// Logical (guest bytes) throughput, bytes per second.
    pub fn logical_bps(&self) -> Option<f64> {
        (self.duration_ms > 0.0).then(|| self.pages * PAGE_BYTES / self.secs())
    }
}

/// The passes of a `dwcp send`/`demo --json` report (at its top level or under `source`).
pub fn passes(report: &Value) -> Vec<Pass> {
    let list = report
        .get("passes")
        .or_else(|| report.pointer("/source/passes"))
        .and_then(Value::as_array);
    let f = |p: &Value, k: &str| p[k].as_f64().unwrap_or(0.0);
    list.into_iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| Pass {
            iteration: p["iteration"].as_u64().map_or(i as u32, |n| n as u32),
            pages: f(p, "pages"),
            wire_bytes: f(p, "wire_bytes"),
            duration_ms: f(p, "duration_ms"),
            link_forecast_bps: f(p, "link_forecast_bps"),
        })
        .collect()
}

/// What the streams chart reads from an event log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamSeries {
    /// (milliseconds since the command started, streams taking chunks), one per progress event.
    pub samples: Vec<(f64, f64)>,
    /// When each pre-copy pass ended, milliseconds.
    pub pass_ends_ms: Vec<f64>,
}

/// The stream counts of an NDJSON event log (`dwcp … --events FILE`); lines that are not JSON, and
/// progress events without `streams` (a `dwcp` older than the field), are skipped.
pub fn stream_series(ndjson: &str) -> StreamSeries {
    let mut s = StreamSeries::default();
    for v in ndjson
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        let Some(t) = v["t_ms"].as_f64() else {
            continue;
        };
        match v["event"].as_str() {
            Some("progress") => {
                if let Some(n) = v["streams"].as_f64() {
                    s.samples.push((t, n));
                }
            }
            Some("pass") => s.pass_ends_ms.push(t),
            _ => {}
        }
    }
    s
}

/// `0..max` with headroom for the legend, never empty.
fn y_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let max = values.filter(|v| v.is_finite()).fold(0.0, f64::max);
    0.0..if max > 0.0 { max * 1.2 } else { 1.0 }
}

fn plot_err<E: std::fmt::Display>(path: &Path) -> impl FnOnce(E) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {}: {e}", path.display())
}

/// A series of a per-pass chart: its legend, its colour, and its value for a pass (bytes per second;
/// `None`: no point for that pass).
type PassSeries<'a> = (&'a str, RGBColor, &'a dyn Fn(&Pass) -> Option<f64>);

/// A chart of one or more series per pass, in MB/s, written to `path`.
fn per_pass_chart(
    path: &Path,
    title: &str,
    passes: &[Pass],
    series: &[PassSeries<'_>],
) -> Result<()> {
    let err = plot_err(path);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let points: Vec<Vec<(f64, f64)>> = series
            .iter()
            .map(|(_, _, f)| {
                passes
                    .iter()
                    .filter_map(|p| f(p).map(|v| (f64::from(p.iteration), v / MB)))
                    .collect()
            })
            .collect();
        let last = passes.iter().map(|p| p.iteration).max().unwrap_or(0);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(
                -0.5..f64::from(last) + 0.5,
                y_range(points.iter().flatten().map(|p| p.1)),
            )?;
        let x_fmt = |x: &f64| {
            if (x - x.round()).abs() < 1e-6 && *x >= 0.0 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .x_desc(format!("pass (0: every page; {last}: stop-and-copy)"))
            .y_desc("MB/s (10^6 bytes per second)")
            .light_line_style(LIGHT)
            .x_labels(last as usize + 2)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        for ((name, color, _), pts) in series.iter().zip(points) {
            let color = *color;
            let label = if pts.is_empty() {
                format!("{name}: none in this run")
            } else {
                (*name).to_string()
            };
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(err)
}

/// Throughput of each pass: wire bytes and guest bytes over the pass's wall time.
pub fn throughput_per_pass(path: &Path, title: &str, passes: &[Pass]) -> Result<()> {
    per_pass_chart(
        path,
        title,
        passes,
        &[
            ("wire (chunk bytes)", BLUE, &Pass::wire_bps),
            ("logical (guest pages)", ORANGE, &Pass::logical_bps),
        ],
    )
}

/// PBA's link forecast at the end of each pass next to the wire throughput the pass measured.
pub fn predicted_vs_measured(path: &Path, title: &str, passes: &[Pass]) -> Result<()> {
    per_pass_chart(
        path,
        title,
        passes,
        &[
            ("measured (pass wire throughput)", BLUE, &Pass::wire_bps),
            ("predicted (PBA link forecast)", RED, &|p: &Pass| {
                (p.link_forecast_bps > 0.0).then_some(p.link_forecast_bps)
            }),
        ],
    )
}

/// The data streams taking chunks over time, as steps, with the end of each pre-copy pass marked.
pub fn streams_over_time(path: &Path, title: &str, series: &StreamSeries) -> Result<()> {
    let err = plot_err(path);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        // Steps, thinned to the changes (a progress event comes after every batch).
        let mut steps: Vec<(f64, f64)> = Vec::new();
        for &(t, n) in &series.samples {
            let t = t / 1e3;
            match steps.last() {
                Some(&(_, prev)) if prev == n => {}
                Some(&(_, prev)) => {
                    steps.push((t, prev));
                    steps.push((t, n));
                }
                None => steps.push((t, n)),
            }
        }
        if let (Some(&(t, n)), Some(_)) = (series.samples.last(), steps.last()) {
            steps.push((t / 1e3, n));
        }
        let t0 = series.samples.first().map_or(0.0, |s| s.0 / 1e3);
        let t1 = series
            .samples
            .last()
            .map_or(1.0, |s| s.0 / 1e3)
            .max(t0 + 1e-3);
        let top = series.samples.iter().map(|s| s.1).fold(0.0, f64::max) + 1.0;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(t0..t1, 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc("time since the command started, s")
            .y_desc("data streams taking chunks")
            .light_line_style(LIGHT)
            .y_labels(top as usize + 1)
            .y_label_formatter(&|y| {
                if (y - y.round()).abs() < 1e-6 {
                    format!("{y:.0}")
                } else {
                    String::new()
                }
            })
            .x_label_formatter(&|x| format!("{x:.2}"))
            .draw()?;
        let mut first = true;
        for &end in &series.pass_ends_ms {
            let s = chart.draw_series(DashedLineSeries::new(
                [(end / 1e3, 0.0), (end / 1e3, top)],
                6,
                4,
                ORANGE.stroke_width(2),
            ))?;
            if first {
                s.label("end of a pre-copy pass").legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], ORANGE.stroke_width(2))
                });
                first = false;
            }
        }
        chart
            .draw_series(LineSeries::new(steps, BLUE.stroke_width(2)))?
            .label("streams")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(err)
}

/// Every figure of the run `name` (`<bench>-<run>`) into `dir`: throughput and predicted vs
/// measured bandwidth from its JSON `report`, and the streams over time from its event log when
/// there is one with stream counts. `what` describes the run in the titles. Returns the files written.
pub fn run_figures(
    dir: &Path,
    name: &str,
    what: &str,
    report: &Value,
    events: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let passes = passes(report);
    if !passes.is_empty() {
        let p = dir.join(format!("{name}-throughput.svg"));
        throughput_per_pass(&p, &format!("Throughput per pass: {what}"), &passes)?;
        written.push(p);
        let p = dir.join(format!("{name}-bandwidth.svg"));
        predicted_vs_measured(
            &p,
            &format!("Predicted vs measured bandwidth: {what}"),
            &passes,
        )?;
        written.push(p);
    }
    if let Some(events) = events {
        let text = std::fs::read_to_string(events)
            .with_context(|| format!("reading {}", events.display()))?;
        let series = stream_series(&text);
        if !series.samples.is_empty() {
            let p = dir.join(format!("{name}-streams.svg"));
            streams_over_time(&p, &format!("Streams over time: {what}"), &series)?;
            written.push(p);
        }
    }
    for p in &written {
        eprintln!("  plot: {}", p.display());
    }
    Ok(written)
}

/// [`run_figures`], reporting a failure instead of failing: a figure is never worth a benchmark.
pub fn run_figures_or_warn(
    dir: &Path,
    name: &str,
    what: &str,
    report: &Value,
    events: Option<&Path>,
) {
    if let Err(e) = run_figures(dir, name, what, report, events) {
        eprintln!("  plot: {name}: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report() -> Value {
        let pass = |i: u32, pages: u64, ms: f64, forecast: f64| {
            json!({ "iteration": i, "pages": pages, "wire_bytes": pages * 4000, "duration_ms": ms,
                    "dirtied_pages": 10, "predicted_downtime_ms": 3.0, "predicted_duration_ms": ms,
                    "link_forecast_bps": forecast, "downtime_limit_ms": 50.0, "throttle_percent": 0 })
        };
        json!({ "source": { "passes": [
            pass(0, 65536, 120.0, 0.0),
            pass(1, 4000, 9.0, 2.1e9),
            pass(2, 300, 1.5, 2.3e9),
        ] } })
    }

    const EVENTS: &str = r#"{"event":"phase","phase":"precopy","t_ms":1.0}
{"event":"progress","iteration":0,"streams":1,"t_ms":2.0}
{"event":"progress","iteration":0,"streams":1,"t_ms":5.0}
{"event":"progress","iteration":0,"streams":3,"t_ms":40.0}
{"event":"progress","iteration":0,"t_ms":41.0}
not json
{"event":"pass","iteration":0,"t_ms":120.0}
{"event":"progress","iteration":1,"streams":2,"t_ms":125.0}
"#;

    #[test]
    fn the_report_and_the_events_are_read() {
        let p = passes(&report());
        assert_eq!(p.len(), 3);
        assert_eq!(p[1].iteration, 1);
        assert_eq!(p[0].wire_bps(), Some(65536.0 * 4000.0 / 0.12));
        assert_eq!(p[0].logical_bps(), Some(65536.0 * 4096.0 / 0.12));
        let s = stream_series(EVENTS);
        assert_eq!(
            s.samples,
            vec![(2.0, 1.0), (5.0, 1.0), (40.0, 3.0), (125.0, 2.0)]
        );
        assert_eq!(s.pass_ends_ms, vec![120.0]);
        assert!(passes(&json!({})).is_empty());
    }

    #[test]
    fn plot_every_chart_of_a_synthetic_run() {
        let dir = std::env::temp_dir().join(format!("xtask-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let events = dir.join("run.events.ndjson");
        std::fs::write(&events, EVENTS).unwrap();
        let written =
            run_figures(&dir, "unit-run", "synthetic 256M", &report(), Some(&events)).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "unit-run-throughput.svg",
                "unit-run-bandwidth.svg",
                "unit-run-streams.svg"
            ]
        );
        for (path, title, axis) in [
            (&written[0], "Throughput per pass: synthetic 256M", "MB/s"),
            (
                &written[1],
                "Predicted vs measured bandwidth: synthetic 256M",
                "PBA link forecast",
            ),
            (
                &written[2],
                "Streams over time: synthetic 256M",
                "time since the command started, s",
            ),
        ] {
            let svg = std::fs::read_to_string(path).unwrap();
            assert!(svg.starts_with("<svg"), "{}", path.display());
            assert!(svg.contains(title), "{}: no title", path.display());
            assert!(svg.contains(axis), "{}: no {axis}", path.display());
            assert!(svg.contains("<polyline"), "{}: no line", path.display());
        }
        // A report without passes and no events: nothing to draw, no error.
        assert!(
            run_figures(&dir, "empty", "x", &json!({}), None)
                .unwrap()
                .is_empty()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
