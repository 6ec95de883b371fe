//! The report's line charts (plotters): one line per architecture against wall time, with
//! faint per-seed lines and fault injections as dashed vertical lines; each chart is written
//! as SVG and as PNG.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// Where the charts' font is looked for, in order (Debian's fonts-dejavu-core first).
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Chart size in pixels (PNG) and user units (SVG).
const SIZE: (u32, u32) = (960, 540);

/// Loads the TrueType font the charts' text is drawn with, once per process.
pub fn load_font() -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let path = FONT_PATHS.iter().find(|p| Path::new(p).exists()).ok_or_else(|| {
                format!(
                    "the charts need the font {} (Debian: apt-get install fonts-dejavu-core)",
                    FONT_PATHS[0]
                )
            })?;
            let bytes = std::fs::read(path).map_err(|e| format!("reading the font {path}: {e}"))?;
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{path} is not a TrueType font plotters can read"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// One architecture's runs on a chart.
#[derive(Debug, Clone)]
pub struct ArchLines {
    /// Legend label, e.g. `P2P`.
    pub label: String,
    /// One `(t s, y)` line per seed, sorted by t.
    pub runs: Vec<Vec<(f64, f64)>>,
    /// Fault injection times over all its runs, s.
    pub faults: Vec<f64>,
}

/// A chart: title, axis labels and lines.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Caption.
    pub title: String,
    /// Y axis label.
    pub y_label: String,
    /// Lines, one colour per architecture.
    pub archs: Vec<ArchLines>,
    /// Logarithmic y axis (losses).
    pub y_log: bool,
}

/// Writes `chart` to `<stem>.svg` and `<stem>.png`; returns both paths.
pub fn write(chart: &Chart, stem: &Path) -> Result<[PathBuf; 2]> {
    load_font()?;
    let svg = stem.with_extension("svg");
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        draw(chart, &root).map_err(|e| anyhow!("drawing {}: {e}", svg.display()))?;
        root.present().map_err(|e| anyhow!("writing {}: {e}", svg.display()))?;
    }
    let png = stem.with_extension("png");
    let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        draw(chart, &root).map_err(|e| anyhow!("drawing {}: {e}", png.display()))?;
        root.present().map_err(|e| anyhow!("drawing {}: {e}", png.display()))?;
    }
    write_png(&png, &pixels).with_context(|| format!("writing {}", png.display()))?;
    Ok([svg, png])
}

fn write_png(path: &Path, rgb: &[u8]) -> Result<()> {
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, SIZE.0, SIZE.1);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(rgb)?;
    w.finish()?;
    Ok(())
}

/// Colour of the `i`-th architecture (tableau palette: P2P blue, PS orange, …).
fn colour(i: usize) -> RGBColor {
    const PALETTE: [RGBColor; 5] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    PALETTE[i % PALETTE.len()]
}

type DrawResult<DB> = std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw<DB: DrawingBackend>(chart: &Chart, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let points = chart.archs.iter().flat_map(|a| a.runs.iter().flatten());
    let x_max = points.clone().map(|p| p.0).fold(0.0f64, f64::max).max(1.0) * 1.02;
    let ys: Vec<f64> = points.map(|p| p.1).filter(|y| !chart.y_log || *y > 0.0).collect();
    let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut builder = ChartBuilder::on(root);
    builder.caption(&chart.title, ("sans-serif", 22)).margin(12).x_label_area_size(44).y_label_area_size(64);
    if chart.y_log {
        let (lo, hi) = if lo.is_finite() && hi > lo { (lo * 0.9, hi * 1.1) } else { (0.01, 10.0) };
        let ctx = builder.build_cartesian_2d(0.0..x_max, (lo..hi).log_scale())?;
        draw_lines(chart, ctx, (lo, hi))
    } else {
        let (lo, hi) = if lo.is_finite() && hi > lo { (lo, hi + 0.05 * (hi - lo)) } else { (0.0, 1.0) };
        let ctx = builder.build_cartesian_2d(0.0..x_max, lo..hi)?;
        draw_lines(chart, ctx, (lo, hi))
    }
}

fn draw_lines<'a, DB, Y>(
    chart: &Chart,
    mut ctx: ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>,
    (y_lo, y_hi): (f64, f64),
) -> DrawResult<DB>
where
    DB: DrawingBackend + 'a,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    ctx.configure_mesh()
        .x_desc("wall time since the run's start (s)")
        .y_desc(chart.y_label.as_str())
        .label_style(("sans-serif", 14))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (i, arch) in chart.archs.iter().enumerate() {
        let c = colour(i);
        for &t in &arch.faults {
            ctx.draw_series(DashedLineSeries::new([(t, y_lo), (t, y_hi)], 6, 4, c.mix(0.8).stroke_width(1)))?;
        }
        if !arch.faults.is_empty() {
            ctx.draw_series(std::iter::empty::<PathElement<(f64, f64)>>())?
                .label(format!("fault, {} (dashed)", arch.label))
                .legend(move |(x, y)| {
                    PathElement::new([(x + 10, y - 6), (x + 10, y + 6)], c.stroke_width(1))
                });
        }
        if arch.runs.len() > 1 {
            for run in &arch.runs {
                ctx.draw_series(LineSeries::new(run.iter().copied(), c.mix(0.3).stroke_width(1)))?;
            }
        }
        let label = match arch.runs.len() {
            0 => continue,
            1 => arch.label.clone(),
            n => format!("{} (mean of {n} seeds; faint: each seed)", arch.label),
        };
        ctx.draw_series(LineSeries::new(mean_line(&arch.runs), c.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()?;
    Ok(())
}

/// Points on the mean line: the runs averaged on a common time grid (linear interpolation)
/// over the span every run covers; a single run is its own mean.
pub fn mean_line(runs: &[Vec<(f64, f64)>]) -> Vec<(f64, f64)> {
    const POINTS: usize = 200;
    let runs: Vec<&Vec<(f64, f64)>> = runs.iter().filter(|r| !r.is_empty()).collect();
    match runs.as_slice() {
        [] => return Vec::new(),
        [one] => return (*one).clone(),
        _ => {}
    }
    let lo = runs.iter().map(|r| r[0].0).fold(f64::NEG_INFINITY, f64::max);
    let hi = runs.iter().map(|r| r[r.len() - 1].0).fold(f64::INFINITY, f64::min);
    if hi <= lo {
        return Vec::new();
    }
    (0..POINTS)
        .map(|k| {
            let x = lo + (hi - lo) * k as f64 / (POINTS - 1) as f64;
            let y = runs.iter().map(|r| interpolate(r, x)).sum::<f64>() / runs.len() as f64;
            (x, y)
        })
        .collect()
}

/// `series` (sorted by x) at `x`, linearly interpolated, clamped at the ends.
fn interpolate(series: &[(f64, f64)], x: f64) -> f64 {
    let i = series.partition_point(|p| p.0 < x);
    if i == 0 {
        return series[0].1;
    }
    if i == series.len() {
        return series[i - 1].1;
    }
    let (a, b) = (series[i - 1], series[i]);
    if b.0 == a.0 { b.1 } else { a.1 + (b.1 - a.1) * (x - a.0) / (b.0 - a.0) }
}

/// Trailing moving average over about `points` windows of the series (per-round training loss
/// is one mini-batch each, too noisy to read raw).
pub fn smooth(series: &[(f64, f64)], points: usize) -> Vec<(f64, f64)> {
    let w = (series.len() / points.max(1)).max(1);
    let mut sum = 0.0;
    series
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= w {
                sum -= series[i - w].1;
            }
            (x, sum / (i + 1).min(w) as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_line_averages_runs_on_their_common_span() {
        let a = vec![(0.0, 0.0), (10.0, 10.0)];
        let b = vec![(2.0, 2.0), (8.0, 4.0)];
        let m = mean_line(&[a.clone(), b]);
        assert_eq!(m.first().unwrap().0, 2.0);
        assert_eq!(m.last().unwrap().0, 8.0);
        assert!((m.first().unwrap().1 - 2.0).abs() < 1e-9);
        assert!((m.last().unwrap().1 - 6.0).abs() < 1e-9);
        assert_eq!(mean_line(std::slice::from_ref(&a)), a);
        assert!(mean_line(&[]).is_empty());
    }

    #[test]
    fn smoothing_keeps_a_constant_and_the_length() {
        let s: Vec<(f64, f64)> = (0..100).map(|i| (f64::from(i), 2.0)).collect();
        let m = smooth(&s, 10);
        assert_eq!(m.len(), 100);
        assert!(m.iter().all(|p| (p.1 - 2.0).abs() < 1e-12));
    }
}
