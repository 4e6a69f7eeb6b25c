//! A small hand-written SVG chart: stacked panels sharing a time axis, a legend beside each.
//!
//! Why not the `plotters` crate (issue 11 asked to consider it): a one-panel prototype with
//! plotters 0.3 (`svg_backend` + `line_series`, no font loading), rendered to PNG next to these
//! charts, was less readable out of the box: its series labels sit inside the plotting area,
//! over the data (`SeriesLabelPosition` only places them within the plot); its log axis was
//! labelled ×1…×5 only, without the ×0.25 and ×0.5 below; step series, the bands and markers
//! spanning every stacked panel, area swatches and notes in the legend all have to be drawn by
//! hand. Matching these charts would keep most of this file's layout code and add a dependency,
//! so the toolkit stays. What it must keep if ported later:
//! - a legend column beside each panel, with line, dash and area swatches and free-text notes;
//! - background bands (overloaded / steady periods) and markers spanning every stacked panel
//!   of one figure, over one shared time axis with its labels only under the last panel;
//! - log₂ and log₁₀ axes labelled ×0.25…×4, 250 ms…4 s, step series drawn as steps, and bar
//!   and tick series over client indices in the same figure;
//! - byte-identical output run after run (docs/*.svg diffs show behaviour changes only).

use std::fmt::Write as _;

use super::BLACK;

/// A number without trailing zeros: 0.25, 1, 12.5.
pub(super) fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

pub(super) fn trim_int(v: f64) -> String {
    format!("{v:.0}")
}

/// An SVG coordinate, to 0.1 px.
pub(super) fn px(v: f64) -> String {
    let s = format!("{v:.1}");
    match s.strip_suffix(".0") {
        Some(whole) => whole.to_string(),
        None => s,
    }
}

pub(super) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[derive(Clone)]
pub(super) struct Axis {
    pub(super) min: f64,
    pub(super) max: f64,
    pub(super) log: bool,
    pub(super) ticks: Vec<(f64, String)>,
}

impl Axis {
    pub(super) fn linear(min: f64, max: f64, step: f64, label: fn(f64) -> String) -> Self {
        let count = ((max - min) / step).round() as usize;
        let ticks = (0..=count)
            .map(|i| min + step * i as f64)
            .map(|v| (v, label(v)))
            .collect();
        Axis {
            min,
            max,
            log: false,
            ticks,
        }
    }

    pub(super) fn percent() -> Self {
        Axis::linear(0.0, 1.0, 0.25, |v| format!("{:.0}%", v * 100.0))
    }

    /// Log scale with a tick at every doubling from `min`.
    pub(super) fn log2(min: f64, max: f64, label: fn(f64) -> String) -> Self {
        let count = (max / min).log2().round() as i32;
        let ticks = (0..=count)
            .map(|k| min * 2f64.powi(k))
            .map(|v| (v, label(v)))
            .collect();
        Axis {
            min,
            max,
            log: true,
            ticks,
        }
    }

    /// Log scale with ticks at every power of 10 from `min`, and at 2 and 5 of each decade if
    /// `minor`.
    pub(super) fn log10(min: f64, max: f64, minor: bool) -> Self {
        let multiples: &[f64] = if minor { &[1.0, 2.0, 5.0] } else { &[1.0] };
        let decades = (max / min).log10().round() as i32;
        let ticks = (0..=decades)
            .flat_map(|k| multiples.iter().map(move |m| min * 10f64.powi(k) * m))
            .filter(|&v| v <= max * (1.0 + 1e-9))
            .map(|v| (v, trim(v)))
            .collect();
        Axis {
            min,
            max,
            log: true,
            ticks,
        }
    }

    /// Where `v` falls, 0 at `min` to 1 at `max` (log axes clamp non-positive values to `min`).
    pub(super) fn fraction(&self, v: f64) -> f64 {
        if self.log {
            (v.max(self.min) / self.min).ln() / (self.max / self.min).ln()
        } else {
            (v - self.min) / (self.max - self.min)
        }
    }
}

#[derive(Clone, Copy)]
pub(super) struct Stroke {
    pub(super) colour: &'static str,
    pub(super) width: f64,
    pub(super) dashed: bool,
}

impl Stroke {
    pub(super) fn solid(colour: &'static str, width: f64) -> Self {
        Stroke {
            colour,
            width,
            dashed: false,
        }
    }

    pub(super) fn dashed(colour: &'static str, width: f64) -> Self {
        Stroke {
            colour,
            width,
            dashed: true,
        }
    }

    pub(super) fn attributes(&self) -> String {
        let dash = if self.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        format!(
            r#"stroke="{}" stroke-width="{}"{dash}"#,
            self.colour,
            px(self.width)
        )
    }
}

/// Opacity of filled areas, and of their legend swatches.
pub(super) const AREA_OPACITY: &str = "0.35";

/// A background strip over the periods `from..to`, in every panel sharing the time axis.
pub(super) struct Shade {
    pub(super) from: f64,
    pub(super) to: f64,
    pub(super) fill: &'static str,
}

/// Where a marker's label goes: at the top or the bottom of the plot.
#[derive(Clone, Copy)]
pub(super) enum Corner {
    Top,
    Bottom,
}

pub(super) enum Item {
    /// Value `values[t]` held over period `[t, t + 1)`.
    Step(Vec<f64>, Stroke),
    /// The same, filled down to the axis, translucent.
    Area(Vec<f64>, &'static str),
    /// A horizontal reference line.
    Rule(f64, Stroke),
    /// Bars centred on `x`, `width` wide in axis units, from the axis floor up to the value.
    Bars(Vec<(f64, f64)>, f64, &'static str),
    /// A short horizontal mark at each value, `width` wide in axis units.
    Ticks(Vec<(f64, f64)>, f64, Stroke),
    /// A labelled vertical line at `x`.
    Marker(f64, String, Corner),
}

pub(super) enum Key {
    Line(Stroke),
    Swatch(&'static str),
    Area(&'static str),
    Text,
}

pub(super) struct Panel {
    pub(super) title: String,
    pub(super) height: f64,
    pub(super) y: Axis,
    /// Its own x axis (drawn under it) instead of the figure's shared one.
    pub(super) x: Option<Axis>,
    pub(super) x_label: String,
    pub(super) items: Vec<Item>,
    pub(super) legend: Vec<(Key, String)>,
}

impl Panel {
    pub(super) fn new(title: &str, height: f64, y: Axis) -> Self {
        Panel {
            title: title.into(),
            height,
            y,
            x: None,
            x_label: String::new(),
            items: Vec::new(),
            legend: Vec::new(),
        }
    }

    pub(super) fn step(&mut self, name: &str, values: &[f64], stroke: Stroke) {
        self.items.push(Item::Step(values.to_vec(), stroke));
        self.legend.push((Key::Line(stroke), name.into()));
    }

    pub(super) fn area(&mut self, name: &str, values: &[f64], fill: &'static str) {
        self.items.push(Item::Area(values.to_vec(), fill));
        self.legend.push((Key::Area(fill), name.into()));
    }

    pub(super) fn rule(&mut self, name: &str, y: f64, stroke: Stroke) {
        self.items.push(Item::Rule(y, stroke));
        self.legend.push((Key::Line(stroke), name.into()));
    }

    pub(super) fn bars(
        &mut self,
        name: &str,
        bars: Vec<(f64, f64)>,
        width: f64,
        fill: &'static str,
    ) {
        self.items.push(Item::Bars(bars, width, fill));
        self.legend.push((Key::Swatch(fill), name.into()));
    }

    pub(super) fn ticks(&mut self, name: &str, marks: Vec<(f64, f64)>, width: f64, stroke: Stroke) {
        self.items.push(Item::Ticks(marks, width, stroke));
        self.legend.push((Key::Line(stroke), name.into()));
    }

    pub(super) fn marker(&mut self, x: f64, label: &str, corner: Corner) {
        self.items.push(Item::Marker(x, label.into(), corner));
    }

    pub(super) fn swatch(&mut self, name: &str, fill: &'static str) {
        self.legend.push((Key::Swatch(fill), name.into()));
    }

    pub(super) fn note(&mut self, text: &str) {
        self.legend.push((Key::Text, text.into()));
    }
}

pub(super) struct Figure {
    pub(super) width: f64,
    pub(super) title: String,
    /// One entry per line.
    pub(super) subtitle: Vec<String>,
    pub(super) x: Axis,
    pub(super) x_label: String,
    pub(super) shading: Vec<Shade>,
    pub(super) panels: Vec<Panel>,
}

/// Left edge of the plots (room for the y tick labels).
pub(super) const PLOT_LEFT: f64 = 62.0;
/// Left edge of the title.
pub(super) const MARGIN: f64 = 18.0;
/// Width of the legend column right of the plots.
pub(super) const LEGEND_WIDTH: f64 = 212.0;
/// Space above a panel for its title.
pub(super) const PANEL_TITLE: f64 = 22.0;
/// Space under a panel that carries an x axis (ticks, labels, axis title).
pub(super) const X_AXIS: f64 = 40.0;
/// Space between panels.
pub(super) const GAP: f64 = 10.0;
/// Room kept inside a plot above its top tick and below its bottom one, so that lines at the
/// extremes are not cut in half by the frame.
pub(super) const INSET: f64 = 5.0;

/// Where a panel's plot area sits.
#[derive(Clone, Copy)]
pub(super) struct Frame {
    pub(super) left: f64,
    pub(super) right: f64,
    pub(super) top: f64,
    pub(super) bottom: f64,
}

impl Frame {
    pub(super) fn x(&self, axis: &Axis, v: f64) -> f64 {
        self.left + axis.fraction(v) * (self.right - self.left)
    }

    pub(super) fn y(&self, axis: &Axis, v: f64) -> f64 {
        let span = self.bottom - self.top - 2.0 * INSET;
        self.bottom - INSET - axis.fraction(v).clamp(-0.05, 1.05) * span
    }
}

pub(super) struct Text {
    pub(super) size: f64,
    pub(super) anchor: &'static str,
    pub(super) bold: bool,
    pub(super) fill: &'static str,
}

pub(super) const TITLE: Text = Text {
    size: 17.0,
    anchor: "start",
    bold: true,
    fill: BLACK,
};
pub(super) const SUBTITLE: Text = Text {
    size: 12.0,
    anchor: "start",
    bold: false,
    fill: "#555555",
};
pub(super) const HEADING: Text = Text {
    size: 12.0,
    anchor: "start",
    bold: true,
    fill: "#333333",
};
pub(super) const LABEL: Text = Text {
    size: 11.0,
    anchor: "start",
    bold: false,
    fill: "#333333",
};
pub(super) const NOTE: Text = Text {
    fill: "#666666",
    ..LABEL
};
pub(super) const TICK_LEFT: Text = Text {
    size: 10.5,
    anchor: "end",
    bold: false,
    fill: "#555555",
};
pub(super) const TICK_MIDDLE: Text = Text {
    anchor: "middle",
    ..TICK_LEFT
};
pub(super) const MARKER: Text = Text {
    size: 10.5,
    ..LABEL
};

pub(super) struct Svg(pub(super) String);

impl Svg {
    pub(super) fn text(&mut self, x: f64, y: f64, text: &str, style: &Text) {
        let weight = if style.bold {
            r#" font-weight="bold""#
        } else {
            ""
        };
        let _ = writeln!(
            self.0,
            r#"<text x="{}" y="{}" font-size="{}" text-anchor="{}" fill="{}"{weight}>{}</text>"#,
            px(x),
            px(y),
            px(style.size),
            style.anchor,
            style.fill,
            escape(text)
        );
    }

    pub(super) fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), stroke: &Stroke) {
        let _ = writeln!(
            self.0,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" {}/>"#,
            px(x1),
            px(y1),
            px(x2),
            px(y2),
            stroke.attributes()
        );
    }

    /// A rectangle; `extra` holds further attributes, each with a leading space.
    pub(super) fn rect(&mut self, (x, y): (f64, f64), (w, h): (f64, f64), fill: &str, extra: &str) {
        let _ = writeln!(
            self.0,
            r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{fill}"{extra}/>"#,
            px(x),
            px(y),
            px(w.max(0.0)),
            px(h.max(0.0))
        );
    }
}

impl Figure {
    /// Whether the panel `n` carries an x axis under it: its own, or the shared one under the
    /// last panel using it.
    pub(super) fn axis_under(&self, n: usize) -> bool {
        self.panels[n].x.is_some() || self.panels.iter().rposition(|p| p.x.is_none()) == Some(n)
    }

    /// Where the first panel starts, under the title and subtitle.
    pub(super) fn header(&self) -> f64 {
        48.0 + 16.0 * self.subtitle.len() as f64
    }

    pub(super) fn height(&self) -> f64 {
        let panels: f64 = (0..self.panels.len())
            .map(|n| {
                let axis = if self.axis_under(n) { X_AXIS } else { 0.0 };
                PANEL_TITLE + self.panels[n].height + axis + GAP
            })
            .sum();
        (self.header() + panels).round()
    }

    pub(super) fn render(&self, id: &str) -> String {
        let (width, height) = (self.width, self.height());
        let mut svg = Svg(String::new());
        let _ = writeln!(
            svg.0,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, Helvetica, Arial, Liberation Sans, sans-serif">"#,
            w = px(width),
            h = px(height)
        );
        let _ = writeln!(svg.0, "<title>{}</title>", escape(&self.title));
        svg.rect((0.0, 0.0), (width, height), "#ffffff", "");
        svg.text(MARGIN, 28.0, &self.title, &TITLE);
        for (n, line) in self.subtitle.iter().enumerate() {
            svg.text(MARGIN, 48.0 + 16.0 * n as f64, line, &SUBTITLE);
        }
        let mut top = self.header();
        for (n, panel) in self.panels.iter().enumerate() {
            let frame = Frame {
                left: PLOT_LEFT,
                right: width - LEGEND_WIDTH,
                top: top + PANEL_TITLE,
                bottom: top + PANEL_TITLE + panel.height,
            };
            self.panel(&mut svg, &format!("{id}-{n}"), panel, frame);
            top = frame.bottom + GAP;
            if self.axis_under(n) {
                match &panel.x {
                    Some(own) => x_axis(&mut svg, own, &panel.x_label, frame),
                    None => x_axis(&mut svg, &self.x, &self.x_label, frame),
                }
                top += X_AXIS;
            }
        }
        svg.0.push_str("</svg>\n");
        svg.0
    }

    pub(super) fn panel(&self, svg: &mut Svg, id: &str, panel: &Panel, frame: Frame) {
        let x_of = panel.x.as_ref().unwrap_or(&self.x);
        let x = |v: f64| frame.x(x_of, v);
        let y = |v: f64| frame.y(&panel.y, v);
        let size = (frame.right - frame.left, frame.bottom - frame.top);
        svg.text(frame.left, frame.top - 7.0, &panel.title, &HEADING);
        let _ = writeln!(
            svg.0,
            r#"<clipPath id="{id}"><rect x="{}" y="{}" width="{}" height="{}"/></clipPath>"#,
            px(frame.left),
            px(frame.top),
            px(size.0),
            px(size.1)
        );
        if panel.x.is_none() {
            for shade in &self.shading {
                let (x0, x1) = (x(shade.from), x(shade.to));
                svg.rect((x0, frame.top), (x1 - x0, size.1), shade.fill, "");
            }
        }
        let grid = Stroke::solid("#e0e0e0", 1.0);
        for (v, label) in &panel.y.ticks {
            let yv = y(*v);
            svg.line((frame.left, yv), (frame.right, yv), &grid);
            svg.text(frame.left - 6.0, yv + 3.5, label, &TICK_LEFT);
        }
        if panel.x.is_none() {
            for (v, _) in &self.x.ticks {
                svg.line((x(*v), frame.top), (x(*v), frame.bottom), &grid);
            }
        }
        let _ = writeln!(svg.0, r#"<g clip-path="url(#{id})" fill="none">"#);
        for item in &panel.items {
            match item {
                Item::Step(values, stroke) => {
                    let _ = writeln!(
                        svg.0,
                        r#"<path d="{}" {} stroke-linejoin="round"/>"#,
                        step_path(values, x, y),
                        stroke.attributes()
                    );
                }
                Item::Area(values, fill) => {
                    let floor = px(y(panel.y.min));
                    let _ = writeln!(
                        svg.0,
                        r#"<path d="M{} {floor} {} V{floor} Z" fill="{fill}" fill-opacity="{AREA_OPACITY}" stroke="none"/>"#,
                        px(x(0.0)),
                        step_path(values, x, y).replacen('M', "L", 1)
                    );
                }
                Item::Rule(v, stroke) => {
                    svg.line((frame.left, y(*v)), (frame.right, y(*v)), stroke);
                }
                Item::Bars(bars, w, fill) => {
                    for &(c, v) in bars {
                        let (x0, x1) = (x(c - w / 2.0), x(c + w / 2.0));
                        svg.rect((x0, y(v)), (x1 - x0, y(panel.y.min) - y(v)), fill, "");
                    }
                }
                Item::Ticks(marks, w, stroke) => {
                    for &(c, v) in marks {
                        svg.line((x(c - w / 2.0), y(v)), (x(c + w / 2.0), y(v)), stroke);
                    }
                }
                Item::Marker(at, label, corner) => {
                    let xv = x(*at);
                    let stroke = Stroke::dashed("#555555", 1.0);
                    svg.line((xv, frame.top), (xv, frame.bottom), &stroke);
                    // On a white backing, so that the lines do not cross the text.
                    let width = 5.7 * label.chars().count() as f64 + 6.0;
                    let top = match corner {
                        Corner::Top => frame.top + 2.0,
                        Corner::Bottom => frame.bottom - 16.0,
                    };
                    let backing = r#" fill-opacity="0.85""#;
                    svg.rect((xv + 2.0, top), (width, 14.0), "#ffffff", backing);
                    svg.text(xv + 5.0, top + 10.5, label, &MARKER);
                }
            }
        }
        svg.0.push_str("</g>\n");
        let border = r##" stroke="#9a9a9a" stroke-width="1""##;
        svg.rect((frame.left, frame.top), size, "none", border);
        legend(svg, &panel.legend, frame);
    }
}

/// Ticks and labels under `frame`, and the axis title.
pub(super) fn x_axis(svg: &mut Svg, axis: &Axis, label: &str, frame: Frame) {
    let stroke = Stroke::solid("#9a9a9a", 1.0);
    for (v, text) in &axis.ticks {
        let xv = frame.x(axis, *v);
        svg.line((xv, frame.bottom), (xv, frame.bottom + 4.0), &stroke);
        svg.text(xv, frame.bottom + 16.0, text, &TICK_MIDDLE);
    }
    let middle = Text {
        anchor: "middle",
        ..LABEL
    };
    let centre = (frame.left + frame.right) / 2.0;
    svg.text(centre, frame.bottom + 33.0, label, &middle);
}

/// The legend right of `frame`, one entry per line from its top.
pub(super) fn legend(svg: &mut Svg, entries: &[(Key, String)], frame: Frame) {
    let x = frame.right + 14.0;
    for (n, (key, text)) in entries.iter().enumerate() {
        let y = frame.top + 9.0 + 15.0 * n as f64;
        let swatch = |svg: &mut Svg, fill: &str, extra: &str| {
            let outline = format!(r##" stroke="#bdbdbd" stroke-width="0.8"{extra}"##);
            svg.rect((x, y - 9.0), (22.0, 11.0), fill, &outline);
        };
        match key {
            Key::Line(stroke) => svg.line((x, y - 3.5), (x + 22.0, y - 3.5), stroke),
            Key::Swatch(fill) => swatch(svg, fill, ""),
            Key::Area(fill) => swatch(svg, fill, &format!(r#" fill-opacity="{AREA_OPACITY}""#)),
            Key::Text => {}
        }
        let style = if matches!(key, Key::Text) {
            &NOTE
        } else {
            &LABEL
        };
        svg.text(x + 28.0, y, text, style);
    }
}

/// The outline of a step series: `values[t]` from `t` to `t + 1`.
pub(super) fn step_path(values: &[f64], x: impl Fn(f64) -> f64, y: impl Fn(f64) -> f64) -> String {
    let mut d = String::new();
    let mut current: Option<String> = None;
    for (t, &v) in values.iter().enumerate() {
        let yv = px(y(v));
        if current.as_ref() == Some(&yv) {
            continue;
        }
        let xv = px(x(t as f64));
        if current.is_none() {
            let _ = write!(d, "M{xv} {yv}");
        } else {
            let _ = write!(d, " H{xv} V{yv}");
        }
        current = Some(yv);
    }
    let _ = write!(d, " H{}", px(x(values.len() as f64)));
    d
}
