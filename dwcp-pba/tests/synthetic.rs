//! The chosen predictor against last value, one step (250 ms) ahead, on synthetic traces (steady
//! with noise, a step, a ramp, an oscillation). The one-second-ahead figures on recorded traces are
//! `cargo xtask bench pba` (src/eval.rs).

use dwcp_pba::eval::noise;
use dwcp_pba::predict::LinkPredictor;
use dwcp_pba::sample::Observation;

/// Mean absolute error of the one-step forecast, for PBA's choice and for last value.
fn errors(trace: &[f64]) -> (f64, f64) {
    let mut p = LinkPredictor::new();
    let (mut chosen, mut last, mut n) = (0.0, 0.0, 0.0);
    for (k, &x) in trace.iter().enumerate() {
        if k >= 8 {
            chosen += (p.predict_at(0.25) - x).abs();
            last += (trace[k - 1] - x).abs();
            n += 1.0;
        }
        p.observe(&Observation {
            goodput: x,
            rtt: None,
            lower_bound: false,
            interval: 0.25,
        });
    }
    (chosen / n, last / n)
}

fn traces() -> Vec<(&'static str, Vec<f64>)> {
    let n = 400u64;
    vec![
        (
            "steady, 10 % noise",
            (0..n).map(|k| 100e6 * (1.0 + 0.1 * noise(k))).collect(),
        ),
        (
            "step 100 -> 40 MB/s, 5 % noise",
            (0..n)
                .map(|k| if k < 200 { 100e6 } else { 40e6 } * (1.0 + 0.05 * noise(k)))
                .collect(),
        ),
        (
            "ramp 10 -> 210 MB/s",
            (0..n).map(|k| 10e6 + 0.5e6 * k as f64).collect(),
        ),
        (
            "oscillation 60 +- 30 MB/s, period 8 samples, 10 % noise",
            (0..n)
                .map(|k| {
                    (60e6 + 30e6 * (k as f64 * std::f64::consts::TAU / 8.0).sin())
                        * (1.0 + 0.1 * noise(k))
                })
                .collect(),
        ),
    ]
}

#[test]
fn the_chosen_predictor_beats_last_value_where_there_is_something_to_beat() {
    let mut ratios = Vec::new();
    for (name, trace) in traces() {
        let (chosen, last) = errors(&trace);
        let ratio = chosen / last;
        eprintln!(
            "{name}: MAE chosen {:.2} MB/s, last value {:.2} MB/s, ratio {ratio:.2}",
            chosen / 1e6,
            last / 1e6
        );
        ratios.push((name, ratio));
    }
    // Noise: smoothing must pay. A ramp: the trend must pay. Never much worse than last value.
    assert!(ratios[0].1 <= 0.8, "{ratios:?}");
    assert!(ratios[2].1 <= 0.5, "{ratios:?}");
    assert!(ratios.iter().all(|(_, r)| *r <= 1.1), "{ratios:?}");
}
