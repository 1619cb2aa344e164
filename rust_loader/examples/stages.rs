//! Per-stage timing of the pipeline on real files: `cargo run --release --example stages -- DIR`.
use std::time::Instant;

use _loader::batch::{collate, Sample};
use _loader::decode::decode_image;
use _loader::transforms::{apply_val, AugmentConfig, Boxes};

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: stages DIR_WITH_JPEGS");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("readable dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    let bytes: Vec<Vec<u8>> = files
        .iter()
        .map(|p| std::fs::read(p).expect("readable file"))
        .collect();
    let n = bytes.len() as f64;
    let cfg = AugmentConfig::default();
    for _ in 0..2 {
        let t = Instant::now();
        let decoded: Vec<_> = bytes
            .iter()
            .map(|b| decode_image(b).expect("decodable"))
            .collect();
        let t_decode = t.elapsed().as_secs_f64() / n;
        let t = Instant::now();
        let resized: Vec<_> = decoded
            .iter()
            .map(|im| apply_val(im, &mut Boxes::default(), &cfg))
            .collect();
        let t_resize = t.elapsed().as_secs_f64() / n;
        let t = Instant::now();
        for im in resized {
            let s = Sample {
                image: im,
                boxes: vec![],
                labels: vec![],
                image_id: 0,
                orig_size: (0, 0),
                path: String::new(),
                decisions: None,
            };
            std::hint::black_box(collate(vec![s]));
        }
        let t_collate = t.elapsed().as_secs_f64() / n;
        println!(
            "per image: decode {:.2} ms, val resize {:.2} ms, collate {:.2} ms",
            t_decode * 1e3,
            t_resize * 1e3,
            t_collate * 1e3
        );
    }
}
