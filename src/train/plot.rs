//! `out_dir/loss.png`: training and validation loss against the global step, read back from
//! `metrics.jsonl`, each stage on its own shaded band with its name on top. Written (atomically)
//! at every stage end and when a run stops early.
//!
//! Text goes through plotters' `ab_glyph` renderer, which has no font of its own: DejaVuSans is
//! loaded at run time from [`FONT`] (Debian `fonts-dejavu-core`). Without it the plot is drawn
//! without any text (no title, tick labels, legend or stage names), and stderr says so once.
use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
pub const FILE: &str = "loss.png";
const SIZE: (u32, u32) = (960, 540);
const TRAIN: RGBColor = RGBColor(31, 119, 180);
const VAL: RGBColor = RGBColor(214, 39, 40);
const BANDS: [RGBColor; 2] = [RGBColor(232, 240, 252), RGBColor(252, 244, 226)];

/// What the plot shows, from `metrics.jsonl`.
#[derive(Debug, Default, PartialEq)]
pub struct Curve {
    /// (step, training loss), finite values only.
    pub train: Vec<(u64, f64)>,
    /// (step, validation loss).
    pub val: Vec<(u64, f64)>,
    /// (stage name, its last logged step), in run order.
    pub stages: Vec<(String, u64)>,
}

impl Curve {
    pub fn read(metrics: &Path) -> Result<Curve> {
        let text = std::fs::read_to_string(metrics).with_context(|| format!("reading {}", metrics.display()))?;
        let mut c = Curve::default();
        for (i, l) in text.lines().enumerate() {
            let v: serde_json::Value =
                serde_json::from_str(l).with_context(|| format!("{}:{}: not JSON", metrics.display(), i + 1))?;
            let Some(step) = v["step"].as_u64() else { continue };
            let finite = |k: &str| v[k].as_f64().filter(|x| x.is_finite());
            c.train.extend(finite("loss").map(|x| (step, x)));
            c.val.extend(finite("val_loss").map(|x| (step, x)));
            let stage = v["stage"].as_str().unwrap_or("").to_string();
            match c.stages.last_mut() {
                Some((name, last)) if *name == stage => *last = step,
                _ => c.stages.push((stage, step)),
            }
        }
        Ok(c)
    }
}

/// Registers DejaVuSans as plotters' "sans-serif" on first use; false (said once) without it.
fn have_font() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        let loaded = std::fs::read(FONT).map_err(|e| e.to_string()).and_then(|bytes| {
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| "not a font file".to_string())
        });
        if let Err(e) = &loaded {
            eprintln!("{FILE}: cannot load the font {FONT} ({e}; Debian package fonts-dejavu-core): drawing loss plots without text");
        }
        loaded.is_ok()
    })
}

/// Writes `out/loss.png` from `out/metrics.jsonl`; `None` while no finite loss is logged.
pub fn write_loss_png(out: &Path) -> Result<Option<PathBuf>> {
    let curve = Curve::read(&out.join("metrics.jsonl"))?;
    if curve.train.is_empty() && curve.val.is_empty() {
        return Ok(None);
    }
    let title = format!("loss: {}", out.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned()));
    let path = out.join(FILE);
    // The temporary name keeps the .png extension: plotters picks the encoder from it.
    let tmp = out.join(".loss-tmp.png");
    draw(&tmp, &curve, have_font().then_some(title.as_str()))
        .and_then(|()| crate::fsutil::commit(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(path))
}

/// Draws `curve` into a PNG at `path`; `title: None` draws no text at all (no font needed).
pub fn draw(path: &Path, curve: &Curve, title: Option<&str>) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing the plot: {e}");
    let points = || curve.train.iter().chain(&curve.val);
    let x_max = points().map(|p| p.0).max().unwrap_or(1).max(1);
    let (lo, hi) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let pad = ((hi - lo) * 0.05).max(0.05);
    let (y0, y1) = ((lo - pad).max(0.0), hi + pad);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let text = title.is_some();
    let mut builder = ChartBuilder::on(&root);
    builder.margin(16);
    if let Some(t) = title {
        builder.caption(t, ("sans-serif", 24)).x_label_area_size(44).y_label_area_size(60);
    }
    let mut chart = builder.build_cartesian_2d(0f64..x_max as f64, y0..y1).map_err(err)?;
    // Stage bands: stage i spans (end of stage i-1, its last step].
    let mut start = 0u64;
    for (i, (name, end)) in curve.stages.iter().enumerate() {
        let (a, b) = (start as f64, *end as f64);
        chart.draw_series(std::iter::once(Rectangle::new([(a, y0), (b, y1)], BANDS[i % 2].filled()))).map_err(err)?;
        if i > 0 {
            chart
                .draw_series(std::iter::once(PathElement::new(vec![(a, y0), (a, y1)], BLACK.mix(0.5))))
                .map_err(err)?;
        }
        if text {
            let label = Text::new(
                format!("stage {}: {name}", i + 1),
                (a + (b - a) * 0.02, y1 - (y1 - y0) * 0.02),
                ("sans-serif", 15).into_font().color(&BLACK.mix(0.7)),
            );
            chart.draw_series(std::iter::once(label)).map_err(err)?;
        }
        start = *end;
    }
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(WHITE.mix(0.0));
    if text {
        mesh.x_desc("step")
            .y_desc("loss")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(err)?;
    let train = chart
        .draw_series(LineSeries::new(curve.train.iter().map(|&(s, l)| (s as f64, l)), TRAIN.stroke_width(2)))
        .map_err(err)?;
    if text {
        train.label("train loss").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], TRAIN.stroke_width(2)));
    }
    let val_points = || curve.val.iter().map(|&(s, l)| (s as f64, l));
    chart.draw_series(LineSeries::new(val_points(), VAL.stroke_width(2))).map_err(err)?;
    let dots = chart.draw_series(val_points().map(|p| Circle::new(p, 4, VAL.filled()))).map_err(err)?;
    if text && !curve.val.is_empty() {
        dots.label("validation loss").legend(|(x, y)| Circle::new((x + 10, y), 4, VAL.filled()));
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::MiddleRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve() -> Curve {
        let train: Vec<(u64, f64)> = (1..=40).map(|s| (s, 5.0 * (-(s as f64) / 15.0).exp() + 0.5)).collect();
        Curve {
            val: vec![(10, 3.0), (25, 1.5), (40, 1.0)],
            stages: vec![("injection".into(), 25), ("replay".into(), 40)],
            train,
        }
    }

    #[test]
    fn reads_metrics_lines() {
        let dir = std::env::temp_dir().join(format!("lcpt-plot-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lines = [
            r#"{"step":1,"stage":"a","loss":4.0}"#,
            r#"{"step":2,"stage":"a","loss":null}"#,
            r#"{"step":3,"stage":"b","loss":3.0,"val_loss":3.5}"#,
        ];
        std::fs::write(dir.join("m.jsonl"), lines.join("\n")).unwrap();
        let c = Curve::read(&dir.join("m.jsonl")).unwrap();
        assert_eq!(
            c,
            Curve {
                train: vec![(1, 4.0), (3, 3.0)],
                val: vec![(3, 3.5)],
                stages: vec![("a".into(), 2), ("b".into(), 3)]
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Without a font nothing may need one: the plot still draws (lines and bands, no text).
    #[test]
    fn draws_without_text() {
        let dir = std::env::temp_dir().join(format!("lcpt-plot-notext-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("no-text.png");
        draw(&p, &curve(), None).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
