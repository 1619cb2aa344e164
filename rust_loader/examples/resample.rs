//! Timing of the streaming resize kernels alone (`cargo run --release --example resample`), one
//! thread, synthetic 640x480 noise: ms per resize for the train/val resizes the pipeline does
//! (upscales with two taps, the crop branch's downscales with three or four). An argument picks
//! one case by index.
use std::mem::MaybeUninit;
use std::time::Instant;

use _loader::decode::RgbImage;
use _loader::resample::Resize;

fn noise(w: usize, h: usize) -> RgbImage {
    let mut s = 0x9e3779b9u32;
    let data = (0..w * h * 3)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 7) as u8
        })
        .collect();
    RgbImage::new(w, h, data)
}

/// Best of 5 rounds of `reps` runs, ms per run.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() * 1e3 / reps as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let img = noise(640, 480);
    let whole = (0.0, 0.0, 640.0, 480.0);
    type Case = (&'static str, (f64, f64, f64, f64), (usize, usize), bool);
    let cases: [Case; 5] = [
        ("val 640x480 -> 1066x800", whole, (1066, 800), false),
        ("train 640x480 -> 682x512 flip", whole, (682, 512), true),
        ("train 640x480 -> 600x450", whole, (600, 450), false),
        (
            "crop window -> 400x384 (x1.2)",
            (40.0, 20.0, 480.0, 460.8),
            (400, 384),
            false,
        ),
        ("crop window -> 400x300 (x1.6)", whole, (400, 300), false),
    ];
    // An optional argument picks one case (by index), e.g. for `perf stat`.
    let only: Option<usize> = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("case index"));
    for (i, (name, bx, (ow, oh), flip)) in cases.into_iter().enumerate() {
        if only.is_some_and(|k| k != i) {
            continue;
        }
        let (pad_h, pad_w) = (oh.max(800), ow.max(1066));
        let mut slot = vec![MaybeUninit::new(0.0f32); 3 * pad_h * pad_w];
        match Resize::new((640, 480), bx, (ow, oh), flip) {
            Some(r) => {
                let fused = time(20, || r.write_normalised(&img, &mut slot, pad_w));
                let rgb = time(20, || drop(std::hint::black_box(r.to_rgb(&img))));
                println!("{name}: write_normalised {fused:.3} ms, to_rgb {rgb:.3} ms");
            }
            None => println!("{name}: not a streaming resize"),
        }
    }
}
