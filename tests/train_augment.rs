//! The on-the-fly augmentation: deterministic for a seed, identities where they should be,
//! flips invertible, shifts exact, rotations bilinear about the centre, intensity in range.

use ichcam::rng::Rng;
use ichcam::train::augment::{flip_h, flip_v, AugmentConfig, Transform};

fn random_image(planes: usize, h: usize, w: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..planes * h * w).map(|_| r.f64() as f32).collect()
}

#[test]
fn same_seed_same_transform_and_output() {
    let cfg = AugmentConfig::paper();
    let (h, w) = (24, 20);
    let img = random_image(6, h, w, 1);
    let mut seen = std::collections::HashSet::new();
    for idx in 0..40u64 {
        let a = Transform::for_sequence(&cfg, 7, 3, idx, h, w);
        let b = Transform::for_sequence(&cfg, 7, 3, idx, h, w);
        assert_eq!(a, b);
        let (mut x, mut y) = (img.clone(), img.clone());
        a.apply(&mut x, 6, h, w).unwrap();
        b.apply(&mut y, 6, h, w).unwrap();
        assert_eq!(x, y);
        seen.insert(format!("{a:?}"));
    }
    // Different sequences, epochs and seeds draw different transforms.
    assert!(seen.len() > 35, "only {} distinct transforms", seen.len());
    assert_ne!(
        Transform::for_sequence(&cfg, 7, 3, 0, h, w),
        Transform::for_sequence(&cfg, 7, 4, 0, h, w)
    );
    assert_ne!(
        Transform::for_sequence(&cfg, 7, 3, 0, h, w),
        Transform::for_sequence(&cfg, 8, 3, 0, h, w)
    );
}

#[test]
fn sampled_ranges_match_the_authors() {
    let cfg = AugmentConfig::paper();
    let (h, w) = (512, 512);
    let (mut fh, mut fv, mut max_shift, mut max_angle) = (0, 0, 0i64, 0f64);
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    let n = 2000;
    for i in 0..n {
        let t = Transform::for_sequence(&cfg, 1, 1, i, h, w);
        fh += t.flip_h as usize;
        fv += t.flip_v as usize;
        max_shift = max_shift.max(t.shift_x.abs()).max(t.shift_y.abs());
        max_angle = max_angle.max(t.angle_deg.abs());
        lo = lo.min(t.intensity);
        hi = hi.max(t.intensity);
    }
    assert!(
        (800..1200).contains(&fh) && (800..1200).contains(&fv),
        "flips {fh} {fv}"
    );
    assert!((13..=15).contains(&max_shift), "shift {max_shift}");
    assert!(max_angle <= 15.0 && max_angle > 14.0, "angle {max_angle}");
    assert!(
        lo >= 0.9 && hi <= 1.1 && lo < 0.92 && hi > 1.08,
        "intensity {lo}..{hi}"
    );
    // 15 px of 512 scales to the training size: at most 2 px at 64.
    for i in 0..500 {
        let t = Transform::for_sequence(&cfg, 1, 1, i, 64, 64);
        assert!(t.shift_x.abs() <= 2 && t.shift_y.abs() <= 2);
    }
    // Disabled: always the identity.
    let none = AugmentConfig::none();
    assert!((0..50).all(|i| Transform::for_sequence(&none, 1, 1, i, h, w).is_identity()));
}

#[test]
fn identities_and_flip_inverse() {
    let (h, w) = (17, 13);
    let img = random_image(3, h, w, 2);
    // Rotation by 0 and shift by 0 leave every value bit-identical.
    let mut x = img.clone();
    Transform::identity().apply(&mut x, 3, h, w).unwrap();
    assert_eq!(x, img);
    let mut x = img.clone();
    let t = Transform {
        angle_deg: 0.0,
        shift_x: 0,
        shift_y: 0,
        ..Transform::identity()
    };
    t.apply(&mut x, 3, h, w).unwrap();
    assert_eq!(x, img);
    // A rotation by 360 degrees is the identity up to rounding.
    let mut x = img.clone();
    Transform {
        angle_deg: 360.0,
        ..Transform::identity()
    }
    .apply(&mut x, 3, h, w)
    .unwrap();
    let err = x
        .iter()
        .zip(&img)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-4, "360-degree rotation off by {err}");

    // Flipped twice is the original, exactly; a flip is not the identity.
    for (fh, fv) in [(true, false), (false, true), (true, true)] {
        let t = Transform {
            flip_h: fh,
            flip_v: fv,
            ..Transform::identity()
        };
        let mut x = img.clone();
        t.apply(&mut x, 3, h, w).unwrap();
        assert_ne!(x, img);
        t.apply(&mut x, 3, h, w).unwrap();
        assert_eq!(x, img);
    }
    // flip_h mirrors columns, flip_v rows.
    let mut p: Vec<f32> = (0..6).map(|v| v as f32).collect();
    flip_h(&mut p, 2, 3);
    assert_eq!(p, vec![2.0, 1.0, 0.0, 5.0, 4.0, 3.0]);
    flip_v(&mut p, 2, 3);
    assert_eq!(p, vec![5.0, 4.0, 3.0, 2.0, 1.0, 0.0]);
}

#[test]
fn shifts_are_exact_translations() {
    let (h, w) = (9, 11);
    let img = random_image(2, h, w, 3);
    let t = Transform {
        shift_x: 3,
        shift_y: -2,
        ..Transform::identity()
    };
    let mut x = img.clone();
    t.apply(&mut x, 2, h, w).unwrap();
    for p in 0..2 {
        for y in 0..h {
            for xx in 0..w {
                let (sy, sx) = (y as i64 + 2, xx as i64 - 3);
                let want = if sy >= 0 && sy < h as i64 && sx >= 0 && sx < w as i64 {
                    img[p * h * w + sy as usize * w + sx as usize]
                } else {
                    0.0
                };
                assert_eq!(x[p * h * w + y * w + xx], want);
            }
        }
    }
    // Shifting back restores the part that stayed inside.
    let back = Transform {
        shift_x: -3,
        shift_y: 2,
        ..Transform::identity()
    };
    back.apply(&mut x, 2, h, w).unwrap();
    for y in 2..h {
        for xx in 0..w - 3 {
            assert_eq!(x[y * w + xx], img[y * w + xx]);
        }
    }
}

#[test]
fn rotation_turns_about_the_centre() {
    // A bright dot right of the centre ends up above or below it after +-90 degrees, and a
    // dot at the centre stays put.
    let n = 21;
    let c = n / 2;
    let mut img = vec![0f32; n * n];
    img[c * n + c + 6] = 1.0;
    img[c * n + c] = 0.5;
    let mut x = img.clone();
    Transform {
        angle_deg: 90.0,
        ..Transform::identity()
    }
    .apply(&mut x, 1, n, n)
    .unwrap();
    assert!((x[c * n + c] - 0.5).abs() < 1e-5);
    let up = x[(c - 6) * n + c];
    let down = x[(c + 6) * n + c];
    assert!(
        (up.max(down) - 1.0).abs() < 1e-5 && up.min(down).abs() < 1e-5,
        "up {up} down {down}"
    );
    assert!(x[c * n + c + 6].abs() < 1e-5);
    // A smooth image rotated by 15 degrees keeps its mean roughly (only the corners leave).
    let smooth: Vec<f32> = (0..n * n)
        .map(|i| 0.5 + 0.1 * ((i % n) as f32 / n as f32))
        .collect();
    let mut r = smooth.clone();
    Transform {
        angle_deg: 15.0,
        ..Transform::identity()
    }
    .apply(&mut r, 1, n, n)
    .unwrap();
    let inner = |v: &[f32]| {
        (5..16)
            .flat_map(|y| (5..16).map(move |x| (y, x)))
            .map(|(y, x)| v[y * n + x])
            .sum::<f32>()
    };
    assert!((inner(&r) - inner(&smooth)).abs() / inner(&smooth) < 0.01);
}

#[test]
fn intensity_scales_within_bounds() {
    let cfg = AugmentConfig {
        flip_h: false,
        flip_v: false,
        max_shift_frac: 0.0,
        max_rotate_deg: 0.0,
        ..AugmentConfig::paper()
    };
    let (h, w) = (8, 8);
    let img = random_image(3, h, w, 4);
    for i in 0..100 {
        let t = Transform::for_sequence(&cfg, 5, 1, i, h, w);
        assert!(t.intensity >= 0.9 && t.intensity <= 1.1);
        let mut x = img.clone();
        t.apply(&mut x, 3, h, w).unwrap();
        for (a, b) in x.iter().zip(&img) {
            assert!((a - b * t.intensity as f32).abs() <= 1e-6);
            assert!(*a <= b * 1.1 + 1e-6 && *a >= b * 0.9 - 1e-6);
        }
    }
}

#[test]
fn one_transform_for_every_slice_of_a_sequence() {
    let (h, w, planes) = (16, 16, 8 * 3);
    let plane = random_image(1, h, w, 5);
    let mut seq: Vec<f32> = plane.iter().cycle().take(planes * h * w).copied().collect();
    let t = Transform {
        flip_h: true,
        shift_x: 2,
        angle_deg: 10.0,
        intensity: 1.05,
        ..Transform::identity()
    };
    t.apply(&mut seq, planes, h, w).unwrap();
    let first = &seq[..h * w];
    assert!(seq.chunks_exact(h * w).all(|p| p == first));
    assert!(t.apply(&mut seq[1..], planes, h, w).is_err());
}
