//! Per-stage timing of the pipeline on real files, single-threaded:
//! `cargo run --release --example stages -- DIR_WITH_JPEGS`. The train augmentation leaves its
//! final (streaming) resize pending, as the pipeline does: that resize runs inside the collation.
use std::time::Instant;

use _loader::batch::{collate_into, BatchPools, Sample};
use _loader::decode::decode_image;
use _loader::resample::SampleImage;
use _loader::rng::KeyedRng;
use _loader::transforms::{
    apply_train_staged, apply_val_staged, draw_train_decisions, AugmentConfig, Boxes,
};

fn per_image_ms(start: Instant, n: usize) -> f64 {
    start.elapsed().as_secs_f64() * 1e3 / n as f64
}

fn sample(image: SampleImage) -> Sample {
    Sample {
        image,
        boxes: vec![],
        labels: vec![],
        image_id: 0,
        orig_size: (0, 0),
        path: String::new(),
        decisions: None,
    }
}

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
    let n = bytes.len();
    let cfg = AugmentConfig::default();
    // Recycled batch buffers, as the pipeline uses them.
    let pools = BatchPools::new(2);
    for round in 0..3 {
        let t = Instant::now();
        let decoded: Vec<_> = bytes
            .iter()
            .map(|b| decode_image(b, _loader::decode::DEFAULT_MAX_PIXELS).expect("decodable"))
            .collect();
        let t_decode = per_image_ms(t, n);
        let val_sources = decoded.clone();
        let t = Instant::now();
        let mut val = val_sources
            .into_iter()
            .map(|im| apply_val_staged(im, &mut Boxes::default(), &cfg));
        while let (Some(a), b) = (val.next(), val.next()) {
            let mut samples = vec![sample(a)];
            samples.extend(b.map(sample));
            std::hint::black_box(collate_into(samples, &pools));
        }
        let t_val = per_image_ms(t, n);
        let mut flipped = decoded.clone();
        let t = Instant::now();
        for im in &mut flipped {
            _loader::transforms::hflip(im, &mut Boxes::default());
        }
        let t_flip = per_image_ms(t, n);
        drop(flipped);
        let t = Instant::now();
        let train: Vec<_> = decoded
            .into_iter()
            .enumerate()
            .map(|(i, im)| {
                let mut rng = KeyedRng::from_key(&[round, i as u64]);
                let d = draw_train_decisions(&mut rng, im.width as u32, im.height as u32, &cfg);
                apply_train_staged(im, &mut Boxes::default(), &d, &cfg)
            })
            .collect();
        let t_train = per_image_ms(t, n);
        let t = Instant::now();
        let mut train = train.into_iter();
        while let (Some(a), b) = (train.next(), train.next()) {
            let mut samples = vec![sample(a)];
            samples.extend(b.map(sample));
            std::hint::black_box(collate_into(samples, &pools));
        }
        let t_collate = per_image_ms(t, n);
        let t_total = t_train + t_collate;
        println!(
            "per image: decode {t_decode:.2} ms, val resize + collate {t_val:.2} ms, \
             train augment {t_train:.2} ms (hflip alone {t_flip:.2} ms), collate (batch 2) \
             {t_collate:.2} ms, augment + collate {t_total:.2} ms"
        );
    }
}
