//! The SVG plot: throughput and latency by concurrency, one line per system
//! (means over rounds).

use crate::report::{Row, mean_latency, mean_throughput};
use crate::scenario::{LatencyResult, ThroughputResult};
use crate::system::{ConsumerMode, ProducerStyle};
use anyhow::{Result, anyhow};
use plotters::prelude::*;
use std::path::Path;

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn systems(names: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in names {
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

/// Left: end-to-end msgs/s by producers = consumers (Subscribe style, `size` bytes).
/// Right: p50 and p99 latency at the fixed offered rate by producers = consumers.
pub fn write_svg(
    path: &Path,
    tput: &[ThroughputResult],
    lat: &[LatencyResult],
    size: usize,
) -> Result<()> {
    let e = |e: DrawingAreaErrorKind<_>| anyhow!("plotting: {e:?}");
    let root = SVGBackend::new(path, (1100, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let (left, right) = root.split_horizontally(550);

    // The first producer style run (one message in flight, by default).
    let style = tput.first().map_or(ProducerStyle::One, |r| r.style);
    let rows: Vec<_> = tput
        .iter()
        .filter(|r| r.size == size && r.mode == ConsumerMode::Subscribe && r.style == style)
        .collect();
    let names = systems(rows.iter().map(|r| r.system.clone()));
    let conc = {
        let mut c: Vec<usize> = rows.iter().map(|r| r.concurrency).collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    let ymax = rows.iter().map(|r| r.acked_per_sec).fold(1.0, f64::max) * 1.15;
    let xmax = conc.last().copied().unwrap_or(1).max(2) as f64;
    let mut chart = ChartBuilder::on(&left)
        .caption(
            format!("Durable throughput, {size} B messages"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d((0.8f64..xmax * 1.25).log_scale(), 0f64..ymax)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("producers = consumers")
        .y_desc("end-to-end msgs/s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(e)?;
    for (i, name) in names.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> = conc
            .iter()
            .filter_map(|&n| {
                let row = Row {
                    mode: ConsumerMode::Subscribe,
                    style,
                    size,
                    concurrency: n,
                };
                mean_throughput(tput, name, row).map(|m| (n as f64, m.acked_per_sec))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(e)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;

    let lnames = systems(lat.iter().map(|r| r.system.clone()));
    let clients = {
        let mut c: Vec<usize> = lat.iter().map(|r| r.clients).collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    let rate = lat.first().map(|r| r.rate).unwrap_or(0.0);
    let lmax = lat
        .iter()
        .map(|r| r.p99 as f64 / 1000.0)
        .fold(0.1, f64::max)
        * 1.5;
    let lmin = lat
        .iter()
        .map(|r| r.p50 as f64 / 1000.0)
        .fold(f64::MAX, f64::min)
        .clamp(0.01, 1.0)
        * 0.7;
    let cmax = clients.last().copied().unwrap_or(1).max(2) as f64;
    let mut chart = ChartBuilder::on(&right)
        .caption(
            format!("Latency at {rate:.0} msgs/s offered (solid p99, dashed p50)"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d((0.8f64..cmax * 1.25).log_scale(), (lmin..lmax).log_scale())
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("producers = consumers")
        .y_desc("enqueue → delivery, ms")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .draw()
        .map_err(e)?;
    for (i, name) in lnames.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let means: Vec<(f64, f64, f64)> = clients
            .iter()
            .filter_map(|&c| {
                mean_latency(lat, name, c).map(|m| (c as f64, m.p50 / 1000.0, m.p99 / 1000.0))
            })
            .collect();
        let p99: Vec<(f64, f64)> = means.iter().map(|&(c, _, p)| (c, p)).collect();
        let p50: Vec<(f64, f64)> = means.iter().map(|&(c, p, _)| (c, p)).collect();
        chart
            .draw_series(LineSeries::new(p99.clone(), color.stroke_width(2)))
            .map_err(e)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart
            .draw_series(DashedLineSeries::new(p50, 4, 4, color.stroke_width(1)))
            .map_err(e)?;
        chart
            .draw_series(p99.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
