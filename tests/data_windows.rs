//! Model-input transforms: HU windows, in-plane resizing, slice sequences.

use ichcam::data::resample::{
    resize_map_bilinear, resize_mask_nearest, resize_slice, resize_stack, resize_volume, ResizeMode,
};
use ichcam::data::sequence::{
    crop_pad, gather, gather_slices, merge_maps, merge_scores, plan, sliding, SeqMode,
};
use ichcam::data::window::{windows3, windows3_slice, windows_n, Window};
use ichcam::rng::Rng;
use ndarray::{s, Array2, Array3, Axis};

fn random_volume(d: usize, h: usize, w: usize, seed: u64, lo: f64, hi: f64) -> Array3<f32> {
    let mut r = Rng::new(seed);
    Array3::from_shape_fn((d, h, w), |_| r.range(lo, hi) as f32)
}

// ---- windows ------------------------------------------------------------------------------

#[test]
fn window_bounds_are_the_methods() {
    assert_eq!((Window::BRAIN.lo(), Window::BRAIN.hi()), (0.0, 80.0));
    assert_eq!(
        (Window::SUBDURAL.lo(), Window::SUBDURAL.hi()),
        (-20.0, 180.0)
    );
    assert_eq!((Window::BONE.lo(), Window::BONE.hi()), (-800.0, 2000.0));
    assert_eq!(
        Window::METHOD,
        [Window::BRAIN, Window::SUBDURAL, Window::BONE]
    );
}

#[test]
fn window_values_at_and_beyond_the_boundaries() {
    for w in Window::METHOD {
        assert_eq!(w.apply(w.lo()), 0.0, "{w:?} at lo");
        assert_eq!(w.apply(w.hi()), 1.0, "{w:?} at hi");
        assert!((w.apply(w.level) - 0.5).abs() < 1e-6, "{w:?} at level");
        assert_eq!(w.apply(w.lo() - 1.0), 0.0);
        assert_eq!(w.apply(-3000.0), 0.0);
        assert_eq!(w.apply(w.hi() + 1.0), 1.0);
        assert_eq!(w.apply(1e6), 1.0);
        // Linear inside, and invertible there.
        let q = w.lo() + 0.25 * w.width;
        assert!((w.apply(q) - 0.25).abs() < 1e-6);
        assert!((w.invert(w.apply(q)) - q).abs() < 1e-3);
    }
    assert_eq!(Window::BRAIN.apply(60.0), 0.75);
    assert_eq!(Window::SUBDURAL.apply(30.0), 0.25);
    assert!(
        Window::BRAIN.apply(f32::NAN).is_nan(),
        "NaN must stay visible"
    );
}

#[test]
fn windows3_stacks_channels_in_method_order() {
    let hu = random_volume(3, 5, 7, 1, -1200.0, 2500.0);
    let x = windows3(hu.view());
    assert_eq!(x.dim(), (3, 3, 5, 7));
    for ((z, c, y, xx), &v) in x.indexed_iter() {
        let want = Window::METHOD[c].apply(hu[[z, y, xx]]);
        assert_eq!(v, want, "at {:?}", (z, c, y, xx));
        assert!((0.0..=1.0).contains(&v));
    }
    // One slice gives the same as the volume's slice.
    let one = windows3_slice(hu.index_axis(Axis(0), 1));
    assert_eq!(one, x.index_axis(Axis(0), 1));
    // A transposed (non-standard layout) view gives the same values.
    let t = hu.clone().reversed_axes();
    let tt = t.view().reversed_axes();
    assert_eq!(windows3(tt), x);
    assert_eq!(
        windows_n(&[Window::BONE], hu.view()).index_axis(Axis(1), 0),
        x.index_axis(Axis(1), 2)
    );
}

// ---- resampling ---------------------------------------------------------------------------

#[test]
fn constant_image_stays_constant() {
    let sizes = [
        (512, 512, 64, 64),
        (100, 37, 96, 96),
        (37, 100, 100, 37),
        (8, 8, 8, 8),
        (10, 10, 3, 7),
        (5, 5, 17, 23),
    ];
    for (h, w, oh, ow) in sizes {
        let img = Array3::from_elem((2, h, w), 42.5f32);
        for mode in [ResizeMode::Bilinear, ResizeMode::Area] {
            let out = resize_volume(img.view(), oh, ow, mode);
            assert_eq!(out.dim(), (2, oh, ow));
            for &v in out.iter() {
                assert!((v - 42.5).abs() < 1e-4, "{mode:?} {h}x{w}->{oh}x{ow}: {v}");
            }
        }
    }
}

#[test]
fn area_mode_preserves_the_mean() {
    for (h, w, oh, ow) in [
        (512, 512, 64, 64),
        (100, 90, 37, 41),
        (64, 64, 96, 80),
        (33, 47, 33, 12),
    ] {
        let img = random_volume(2, h, w, 7, -100.0, 300.0);
        let out = resize_volume(img.view(), oh, ow, ResizeMode::Area);
        for z in 0..2 {
            let a = img.index_axis(Axis(0), z).mean().unwrap();
            let b = out.index_axis(Axis(0), z).mean().unwrap();
            assert!((a - b).abs() < 1e-3, "{h}x{w}->{oh}x{ow}: mean {a} vs {b}");
        }
    }
}

#[test]
fn area_mode_integer_factor_is_block_mean() {
    let img = random_volume(1, 12, 12, 3, 0.0, 1.0);
    let out = resize_volume(img.view(), 4, 3, ResizeMode::Area);
    for oy in 0..4 {
        for ox in 0..3 {
            let block = img.slice(s![0, oy * 3..oy * 3 + 3, ox * 4..ox * 4 + 4]);
            let m = block.mean().unwrap();
            assert!((out[[0, oy, ox]] - m).abs() < 1e-5);
        }
    }
}

#[test]
fn bilinear_reproduces_a_linear_ramp_inside() {
    // f(y, x) = 2x + 3y is reproduced exactly by bilinear interpolation away from the border
    // (half-pixel centres: source coordinate = (o + 0.5) * scale - 0.5).
    let (h, w, oh, ow) = (40, 50, 67, 23);
    let img = Array2::from_shape_fn((h, w), |(y, x)| (2 * x + 3 * y) as f32);
    let out = resize_slice(img.view(), oh, ow, ResizeMode::Bilinear);
    let (sy, sx) = (h as f64 / oh as f64, w as f64 / ow as f64);
    for oy in 0..oh {
        for ox in 0..ow {
            let (fy, fx) = ((oy as f64 + 0.5) * sy - 0.5, (ox as f64 + 0.5) * sx - 0.5);
            if fy < 0.0 || fx < 0.0 || fy > (h - 1) as f64 || fx > (w - 1) as f64 {
                continue;
            }
            let want = 2.0 * fx + 3.0 * fy;
            assert!(
                (out[[oy, ox]] as f64 - want).abs() < 1e-3,
                "at {oy},{ox}: {} vs {want}",
                out[[oy, ox]]
            );
        }
    }
    // resize_map_bilinear is the same operation on maps.
    let vol = img.clone().insert_axis(Axis(0));
    assert_eq!(
        resize_map_bilinear(vol.view(), oh, ow).index_axis(Axis(0), 0),
        out
    );
}

#[test]
fn stack_resize_equals_per_plane_resize() {
    let vol = random_volume(6, 30, 20, 5, -50.0, 50.0);
    let stack = vol.clone().into_shape_with_order((3, 2, 30, 20)).unwrap();
    let a = resize_stack(stack.view(), 11, 13, ResizeMode::Area);
    let b = resize_volume(vol.view(), 11, 13, ResizeMode::Area)
        .into_shape_with_order((3, 2, 11, 13))
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn mask_nearest_round_trip_and_values() {
    let mut r = Rng::new(9);
    let m = Array3::from_shape_fn((3, 32, 48), |_| u8::from(r.chance(0.3)));
    for k in [2usize, 3, 4] {
        let up = resize_mask_nearest(m.view(), 32 * k, 48 * k);
        assert_eq!(up.dim(), (3, 32 * k, 48 * k));
        // Each up-sampled pixel copies its source pixel.
        for ((z, y, x), &v) in up.indexed_iter() {
            assert_eq!(v, m[[z, y / k, x / k]]);
        }
        let back = resize_mask_nearest(up.view(), 32, 48);
        assert_eq!(back, m, "x{k} round trip");
    }
    // Non-integer factors copy values, never blend them.
    let odd = resize_mask_nearest(m.view(), 37, 29);
    assert!(odd.iter().all(|&v| v <= 1));
    let frac = odd.iter().filter(|&&v| v == 1).count() as f64 / odd.len() as f64;
    assert!((frac - 0.3).abs() < 0.08, "foreground fraction {frac}");
}

#[test]
fn degenerate_sizes_do_not_panic() {
    let img = Array3::<f32>::zeros((2, 0, 5));
    assert_eq!(
        resize_volume(img.view(), 4, 4, ResizeMode::Area).dim(),
        (2, 4, 4)
    );
    let img = Array3::<f32>::ones((2, 5, 5));
    assert_eq!(
        resize_volume(img.view(), 0, 4, ResizeMode::Bilinear).dim(),
        (2, 0, 4)
    );
    assert_eq!(
        resize_mask_nearest(Array3::<u8>::zeros((1, 0, 0)).view(), 3, 3).dim(),
        (1, 3, 3)
    );
}

// ---- sequences ----------------------------------------------------------------------------

#[test]
fn crop_and_pad_indices() {
    let long = crop_pad(40, 32).unwrap();
    assert_eq!(long.z, (0..32).collect::<Vec<_>>());
    assert_eq!(long.n_real, 32);
    let short = crop_pad(20, 32).unwrap();
    assert_eq!(short.len(), 32);
    assert_eq!(&short.z[..20], &(0..20).collect::<Vec<_>>()[..]);
    assert!(
        short.z[20..].iter().all(|&z| z == 19),
        "padding repeats the last slice"
    );
    assert_eq!(short.n_real, 20);
    assert!(short.is_real(19) && !short.is_real(20));
    assert_eq!(short.real_weights().iter().sum::<f32>(), 20.0);
    let exact = crop_pad(32, 32).unwrap();
    assert_eq!(exact.n_real, 32);
    assert!(crop_pad(0, 32).is_err());
    assert!(crop_pad(10, 0).is_err());
}

#[test]
fn sliding_windows_cover_every_slice() {
    for n in [1usize, 5, 31, 32, 33, 47, 64, 65, 100, 241] {
        for (s, stride) in [(32usize, 16usize), (32, 32), (32, 1), (8, 3)] {
            let ws = sliding(n, s, stride).unwrap();
            let mut seen = vec![0; n];
            for (k, w) in ws.iter().enumerate() {
                assert_eq!(w.len(), s);
                for (_, z) in w.real() {
                    seen[z] += 1;
                }
                if n >= s {
                    assert_eq!(w.n_real, s);
                    assert!(w.z.windows(2).all(|p| p[1] == p[0] + 1), "contiguous");
                    if k + 1 < ws.len() {
                        assert_eq!(w.z[0], k * stride);
                    }
                }
            }
            assert!(
                seen.iter().all(|&c| c > 0),
                "n={n} s={s} stride={stride}: uncovered slice"
            );
            assert_eq!(
                ws.last().unwrap().z[ws.last().unwrap().n_real - 1],
                n - 1,
                "last window reaches the top"
            );
        }
    }
    assert!(sliding(10, 4, 0).is_err());
    assert!(
        sliding(10, 4, 5).is_err(),
        "a stride longer than the window skips slices"
    );
    assert_eq!(
        plan(40, 32, SeqMode::CropPad).unwrap(),
        vec![crop_pad(40, 32).unwrap()]
    );
    assert_eq!(
        plan(40, 32, SeqMode::Sliding { stride: 8 }).unwrap(),
        sliding(40, 32, 8).unwrap()
    );
}

#[test]
fn merge_averages_overlapping_windows_and_drops_padding() {
    let n = 70;
    let ws = sliding(n, 32, 16).unwrap();
    // Window k predicts z + 100 k at each position: the merge must give z + 100 * (mean k
    // over the windows that hold z).
    let preds: Vec<Vec<f32>> = ws
        .iter()
        .enumerate()
        .map(|(k, w)| w.z.iter().map(|&z| z as f32 + 100.0 * k as f32).collect())
        .collect();
    let (m, covered) = merge_scores(n, &ws, &preds).unwrap();
    assert!(covered.iter().all(|&c| c));
    for (z, &mz) in m.iter().enumerate() {
        let ks: Vec<usize> = ws
            .iter()
            .enumerate()
            .filter(|(_, w)| w.z.contains(&z))
            .map(|(k, _)| k)
            .collect();
        let mean_k = ks.iter().sum::<usize>() as f32 / ks.len() as f32;
        assert!(
            (mz - (z as f32 + 100.0 * mean_k)).abs() < 1e-3,
            "z={z}: {} from windows {ks:?}",
            mz
        );
    }
    // Padding positions never leak into the merge; slices past a crop are reported uncovered.
    let w = crop_pad(20, 32).unwrap();
    let p: Vec<f32> = (0..32)
        .map(|pos| if w.is_real(pos) { 1.0 } else { 999.0 })
        .collect();
    let (m, cov) = merge_scores(20, std::slice::from_ref(&w), &[p]).unwrap();
    assert!(m.iter().all(|&v| v == 1.0) && cov.iter().all(|&c| c));
    let crop = crop_pad(40, 32).unwrap();
    let (m, cov) = merge_scores(40, &[crop], &[vec![0.5; 32]]).unwrap();
    assert_eq!(cov.iter().filter(|&&c| c).count(), 32);
    assert_eq!(m[35], 0.0);
    // Wrong lengths are errors, not panics.
    assert!(merge_scores(20, std::slice::from_ref(&w), &[vec![0.0; 31]]).is_err());
    assert!(merge_scores(20, std::slice::from_ref(&w), &[]).is_err());
    assert!(
        merge_scores(10, &[w], &[vec![0.0; 32]]).is_err(),
        "window refers past the volume"
    );
}

#[test]
fn merge_maps_matches_merge_scores() {
    let n = 45;
    let ws = sliding(n, 16, 5).unwrap();
    let mut r = Rng::new(4);
    let maps: Vec<Array3<f32>> = ws
        .iter()
        .map(|w| Array3::from_shape_fn((w.len(), 3, 2), |_| r.f64() as f32))
        .collect();
    let views: Vec<_> = maps.iter().map(|m| m.view()).collect();
    let (merged, cov) = merge_maps(n, &ws, &views).unwrap();
    assert_eq!(merged.dim(), (n, 3, 2));
    assert!(cov.iter().all(|&c| c));
    for (y, x) in [(0, 0), (2, 1), (1, 0)] {
        let preds: Vec<Vec<f32>> = maps
            .iter()
            .map(|m| m.slice(s![.., y, x]).to_vec())
            .collect();
        let (sc, _) = merge_scores(n, &ws, &preds).unwrap();
        for z in 0..n {
            assert!((merged[[z, y, x]] - sc[z]).abs() < 1e-5);
        }
    }
}

#[test]
fn gather_maps_labels_and_slices_through_the_sequence() {
    let labels: Vec<u8> = (0..20).map(|z| u8::from(z % 3 == 0)).collect();
    let w = crop_pad(20, 24).unwrap();
    let g = gather(&labels, &w).unwrap();
    assert_eq!(g.len(), 24);
    for (p, &z) in w.z.iter().enumerate() {
        assert_eq!(g[p], labels[z]);
    }
    let vol = random_volume(20, 4, 4, 2, 0.0, 1.0);
    let gs = gather_slices(vol.view(), &w).unwrap();
    assert_eq!(gs.index_axis(Axis(0), 23), vol.index_axis(Axis(0), 19));
    assert!(gather(&labels[..10], &w).is_err());
}
