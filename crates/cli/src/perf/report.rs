//! The report: a table printed row by row, JSON, an SVG chart, and a progress bar.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use plotters::prelude::*;
use serde::Serialize;

use super::latency::Percentiles;
use super::units::human;
use super::Mode;

/// One throughput row: a link and mode at a size (or memcpy, with no mode).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub size: u64,
    pub link: String,
    pub mode: Option<Mode>,
    /// Bytes over the time inside send() only (the RFC's figure); none for memcpy.
    pub send_gbps: Option<f64>,
    /// Bytes over first send to last byte read.
    pub e2e_gbps: f64,
    pub e2e_vs_memcpy: f64,
    /// e2e over the AF_UNIX socketpair's at this size (with --baseline).
    pub e2e_vs_unix: Option<f64>,
    /// Share of zerocopy passes whose completion said COPIED.
    pub copied_share: Option<f64>,
}

/// One latency row.
#[derive(Clone, Debug, Serialize)]
pub struct LatencyRow {
    pub size: u64,
    pub link: String,
    pub mode: Mode,
    #[serde(flatten)]
    pub percentiles: Percentiles,
}

/// A link and mode that did not run, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub link: String,
    pub mode: Mode,
    pub reason: String,
}

pub fn print_header(title: &str) {
    println!("{title}");
    println!(
        "Gbit/s (1e9 bits/s); send = time inside send() only (as vsock_perf and the RFC), \
         e2e = first send to last byte read"
    );
    println!("COPIED = share of zerocopy sends that completed with the COPIED flag\n");
    println!(
        "{:>8}  {:<16} {:<9} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "size", "link", "mode", "send", "e2e", "xmemcpy", "xAF_UNIX", "COPIED"
    );
}

pub fn print_row(row: &Row) {
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    println!(
        "{:>8}  {:<16} {:<9} {:>8} {:>8.1} {:>7.2}x {:>8} {:>7}",
        human(row.size),
        row.link,
        row.mode.map_or("-", Mode::name),
        opt(row.send_gbps, &|v| format!("{v:.1}")),
        row.e2e_gbps,
        row.e2e_vs_memcpy,
        opt(row.e2e_vs_unix, &|v| format!("{v:.2}x")),
        opt(row.copied_share, &|v| format!("{:.0}%", v * 100.0)),
    );
}

pub fn print_latency_header(title: &str, rounds: &str) {
    println!("{title}");
    println!("round trips of one message each way ({rounds}); microseconds\n");
    println!(
        "{:>8}  {:<16} {:<9} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "size", "link", "mode", "rounds", "p50", "p99", "p99.9", "max"
    );
}

pub fn print_latency_row(row: &LatencyRow) {
    let p = &row.percentiles;
    println!(
        "{:>8}  {:<16} {:<9} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
        human(row.size),
        row.link,
        row.mode.name(),
        p.rounds,
        p.p50_us,
        p.p99_us,
        p.p999_us,
        p.max_us
    );
}

/// zerocopy over copy send throughput, per link and size, where both ran.
pub fn ratios(rows: &[Row]) -> Vec<(String, u64, f64)> {
    let find = |link: &str, size, mode| {
        rows.iter().find(|r| r.link == link && r.size == size && r.mode == Some(mode))
    };
    let mut out = Vec::new();
    for row in rows.iter().filter(|r| r.mode == Some(Mode::Copy)) {
        if let (Some(copy), Some(zc)) =
            (row.send_gbps, find(&row.link, row.size, Mode::Zerocopy).and_then(|r| r.send_gbps))
        {
            out.push((row.link.clone(), row.size, zc / copy));
        }
    }
    out
}

/// One line per series: `(x = message size, y)` points.
pub struct Series {
    pub name: String,
    pub points: Vec<(u64, f64)>,
}

/// Groups rows into series by link and mode, in first-seen order.
pub fn series<T>(
    rows: &[T],
    name: impl Fn(&T) -> String,
    point: impl Fn(&T) -> (u64, f64),
) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for row in rows {
        let key = name(row);
        match out.iter_mut().find(|s| s.name == key) {
            Some(series) => series.points.push(point(row)),
            None => out.push(Series { name: key, points: vec![point(row)] }),
        }
    }
    out
}

/// Draws the series against message size into an SVG file: both axes logarithmic (sizes
/// double from row to row; figures span memcpy down to a stalled link).
pub fn plot(path: &Path, title: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let points = || series.iter().flat_map(|s| s.points.iter());
    let log2 = |x: u64| (x.max(1) as f64).log2();
    let (x_lo, x_hi) =
        points().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(log2(p.0)), hi.max(log2(p.0))));
    let ys = || points().map(|p| p.1).filter(|y| *y > 0.0);
    let (y_lo, y_hi) = (ys().fold(f64::MAX, f64::min), ys().fold(0.0, f64::max));
    if x_lo > x_hi || y_hi <= 0.0 {
        anyhow::bail!("--plot: nothing was measured to draw");
    }
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d((x_lo - 0.25)..(x_hi + 0.25), ((y_lo / 1.5)..(y_hi * 1.5)).log_scale())
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_labels((x_hi - x_lo) as usize + 2)
        .x_label_formatter(&|x| match x.fract().abs() < 1e-9 {
            true => human(2f64.powf(*x).round() as u64),
            false => String::new(),
        })
        .y_label_formatter(&|y| format!("{y}"))
        .x_desc("message size")
        .y_desc(y_label)
        .draw()
        .map_err(|e| draw(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> =
            s.points.iter().filter(|p| p.1 > 0.0).map(|&(x, y)| (log2(x), y)).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| draw(&e))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| draw(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| draw(&e))?;
    root.present().map_err(|e| draw(&e)).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A progress bar on stderr, drawn only when stdout is a terminal and the run has lasted a
/// second: quick runs and piped output stay clean.
pub struct Progress {
    bar: ProgressBar,
    started: Instant,
    terminal: bool,
    shown: bool,
}

impl Progress {
    pub fn new(steps: u64) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::hidden());
        if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} measurements, {msg}")
        {
            bar.set_style(style);
        }
        Progress {
            bar,
            started: Instant::now(),
            terminal: std::io::stdout().is_terminal(),
            shown: false,
        }
    }

    /// Names the measurement starting now.
    pub fn start(&mut self, what: String) {
        if self.terminal && !self.shown && self.started.elapsed() >= Duration::from_secs(1) {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            self.shown = true;
        }
        self.bar.set_message(what);
    }

    pub fn done(&self) {
        self.bar.inc(1);
    }

    /// Clears the bar, e.g. before a row is printed.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
