//! Plots drawn with plotters: `OUTPUT_DIR/loss.png` (the training loss, raw
//! and smoothed, and the learning rate over the optimizer steps) and the
//! DREAM report's held-out loss curves.

use super::trainer::StepLog;
use crate::error::{file_err, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

/// DejaVu Sans cut to ASCII (src/train/fonts/README.md): plotters draws
/// text into bitmaps with a font it is given, not the system's.
const FONT: &[u8] = include_bytes!("fonts/DejaVuSans-ascii.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is a fixed, valid file: registering it cannot fail.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Exponential moving average with bias correction (TensorBoard's
/// smoothing): how the loss trends through its step-to-step noise.
pub fn smooth(values: &[f32], weight: f64) -> Vec<f32> {
    let mut avg = 0.0;
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            avg = weight * avg + (1.0 - weight) * v as f64;
            (avg / (1.0 - weight.powi(i as i32 + 1))) as f32
        })
        .collect()
}

/// Draw `log` (one entry per optimizer step) into `path`.
pub fn write_loss_plot(path: &Path, log: &[StepLog]) -> Result<()> {
    register_font();
    let err = |e: String| file_err(path, format!("drawing the loss plot: {e}"));
    // fp16 steps skipped for overflow may have no finite loss to draw.
    let log: Vec<&StepLog> = log.iter().filter(|l| l.loss.is_finite()).collect();
    let steps: Vec<f32> = log.iter().map(|l| l.step as f32).collect();
    let loss: Vec<f32> = log.iter().map(|l| l.loss).collect();
    let smoothed = smooth(&loss, 0.9);
    let lr: Vec<f32> = log.iter().map(|l| l.lr).collect();
    let x_max = steps.last().copied().unwrap_or(1.0).max(1.0);
    let fmax = |v: &[f32]| v.iter().copied().fold(f32::MIN_POSITIVE, f32::max);

    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (top, bottom) = root.split_vertically(400);
    let mut chart = ChartBuilder::on(&top)
        .caption("training loss", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(0f32..x_max, 0f32..fmax(&loss) * 1.05)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let raw = RGBColor(150, 180, 230);
    chart
        .draw_series(LineSeries::new(
            steps.iter().copied().zip(loss.iter().copied()),
            &raw,
        ))
        .map_err(|e| err(e.to_string()))?
        .label("loss")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], raw));
    chart
        .draw_series(LineSeries::new(
            steps.iter().copied().zip(smoothed.iter().copied()),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(e.to_string()))?
        .label("smoothed (EMA 0.9)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(e.to_string()))?;

    let mut chart = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(0f32..x_max, 0f32..fmax(&lr) * 1.1)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("learning rate")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(LineSeries::new(
            steps.iter().copied().zip(lr.iter().copied()),
            RED.stroke_width(2),
        ))
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// One curve of [`write_heldout_plot`]: a label and (step, seconds, loss) points.
pub type Curve = (String, Vec<(f32, f32, f32)>);

/// Held-out loss against step (left) and against training seconds (right),
/// a line per curve.
pub fn write_heldout_plot(path: &Path, curves: &[Curve]) -> Result<()> {
    register_font();
    let err = |e: String| file_err(path, format!("drawing the held-out loss plot: {e}"));
    let all = || curves.iter().flat_map(|(_, p)| p.iter());
    let max = |f: fn(&(f32, f32, f32)) -> f32| all().map(f).fold(f32::MIN_POSITIVE, f32::max);
    let min_loss = all().map(|p| p.2).fold(f32::MAX, f32::min);
    let (max_loss, lo) = (max(|p| p.2) * 1.03, (min_loss * 0.97).max(0.0));
    let colours = [BLUE, RED, RGBColor(0, 140, 70), RGBColor(230, 130, 0)];
    let root = BitMapBackend::new(path, (1100, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (left, right) = root.split_horizontally(550);
    type X = fn(&(f32, f32, f32)) -> f32;
    let (by_step, by_time): (X, X) = (|p| p.0, |p| p.1);
    let axes = [
        (&left, "step", max(by_step), by_step),
        (&right, "training seconds", max(by_time), by_time),
    ];
    for (area, x_desc, x_max, x_of) in axes {
        let mut chart = ChartBuilder::on(area)
            .caption(format!("held-out loss vs {x_desc}"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(64)
            .build_cartesian_2d(0f32..x_max, lo..max_loss)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("held-out loss")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.3}"))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for ((label, points), colour) in curves.iter().zip(colours.iter().cycle()) {
            let style = colour.stroke_width(2);
            chart
                .draw_series(LineSeries::new(
                    points.iter().map(|p| (x_of(p), p.2)),
                    style,
                ))
                .map_err(|e| err(e.to_string()))?
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_debiased_and_plot_is_written() {
        assert_eq!(smooth(&[2.0, 2.0, 2.0], 0.9), [2.0, 2.0, 2.0]);
        let log: Vec<StepLog> = (1..=50)
            .map(|s| StepLog {
                step: s,
                epoch: 0,
                loss: 1.0 / s as f32,
                lr: 1e-4,
                grad_norm: 1.0,
                images_per_s: 1.0,
                elapsed_s: s as f64,
                loss_scale: None,
                skipped_steps: None,
                heldout_loss: None,
            })
            .collect();
        let path = std::env::temp_dir().join(format!("difftrain-plot-{}.png", std::process::id()));
        write_loss_plot(&path, &log).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), (900, 600));
        let _ = std::fs::remove_file(&path);
    }
}
