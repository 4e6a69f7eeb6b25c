//! Durations as the config file writes them (`250us`, `10ms`, `1.5s`, `2m`, `1h`).

/// A duration written with a unit (`250us`, `10ms`, `1.5s`, `2m`, `1h`), in whole microseconds;
/// `what` names it in errors (`window`, `period`). Range checks are the caller's.
pub fn parse_duration_us(s: &str, what: &str) -> Result<f64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let unit_us: f64 = match unit.trim() {
        "us" | "µs" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => {
            return Err(format!(
                "invalid {what} {s:?}: expected a number with a unit of ms, s, m or h, like 500ms or 1s"
            ));
        }
    };
    let number: f64 = number
        .parse()
        .map_err(|_| format!("invalid {what} {s:?}: {number:?} is not a number"))?;
    let micros = number * unit_us;
    if (micros - micros.round()).abs() > 1e-6 {
        return Err(format!(
            "invalid {what} {s:?}: not a whole number of microseconds"
        ));
    }
    Ok(micros.round())
}
