//! 3-D connected components against a breadth-first flood fill, on random volumes of several
//! densities and shapes, for 6/18/26-connectivity and several slab counts; plus the
//! component filter.

mod common;
use common::rng::SplitMix64;

use ichcam::engine::cpu::ccl::{
    connected_components, connected_components_reusing, connected_components_slabs,
};
use ichcam::engine::Connectivity;
use ichcam::seg::ccl::{filter_components, ComponentFilter};
use ndarray::Array3;
use std::collections::{HashMap, VecDeque};

fn random_mask(shape: (usize, usize, usize), density: f64, seed: u64) -> Array3<u8> {
    let mut r = SplitMix64(seed);
    Array3::from_shape_fn(shape, |_| u8::from(r.unit_f64() < density))
}

/// Flood fill with a queue; labels in raster order of the first voxel.
fn bfs_labels(m: &Array3<u8>, conn: Connectivity) -> (Array3<u32>, usize) {
    let (nz, ny, nx) = m.dim();
    let mut lab = Array3::<u32>::zeros(m.raw_dim());
    let mut offs = Vec::new();
    for dz in -1i64..=1 {
        for dy in -1i64..=1 {
            for dx in -1i64..=1 {
                if conn.touches(dz as i32, dy as i32, dx as i32) {
                    offs.push((dz, dy, dx));
                }
            }
        }
    }
    let mut n = 0u32;
    let mut q = VecDeque::new();
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                if m[[z, y, x]] == 0 || lab[[z, y, x]] != 0 {
                    continue;
                }
                n += 1;
                lab[[z, y, x]] = n;
                q.push_back((z, y, x));
                while let Some((a, b, c)) = q.pop_front() {
                    for &(dz, dy, dx) in &offs {
                        let (zz, yy, xx) = (a as i64 + dz, b as i64 + dy, c as i64 + dx);
                        if zz < 0
                            || yy < 0
                            || xx < 0
                            || zz >= nz as i64
                            || yy >= ny as i64
                            || xx >= nx as i64
                        {
                            continue;
                        }
                        let p = [zz as usize, yy as usize, xx as usize];
                        if m[p] != 0 && lab[p] == 0 {
                            lab[p] = n;
                            q.push_back((p[0], p[1], p[2]));
                        }
                    }
                }
            }
        }
    }
    (lab, n as usize)
}

/// The two labellings define the same partition (a bijection between labels, background
/// fixed).
fn same_partition(a: &Array3<u32>, b: &Array3<u32>) -> bool {
    let mut ab = HashMap::new();
    let mut ba = HashMap::new();
    for (&x, &y) in a.iter().zip(b.iter()) {
        if (x == 0) != (y == 0) {
            return false;
        }
        if *ab.entry(x).or_insert(y) != y || *ba.entry(y).or_insert(x) != x {
            return false;
        }
    }
    true
}

const CONNS: [Connectivity; 3] = [
    Connectivity::Six,
    Connectivity::Eighteen,
    Connectivity::TwentySix,
];

#[test]
fn matches_flood_fill_on_random_volumes() {
    let shapes = [
        (7, 13, 17),
        (1, 20, 23),
        (16, 1, 9),
        (9, 11, 1),
        (12, 16, 16),
    ];
    let densities = [0.03, 0.15, 0.3, 0.5, 0.8];
    let mut seed = 1;
    let mut checked_components = 0;
    for &shape in &shapes {
        for &d in &densities {
            seed += 1;
            let m = random_mask(shape, d, seed);
            for conn in CONNS {
                let (reference, n) = bfs_labels(&m, conn);
                let base = connected_components_slabs(m.view(), conn, 1).unwrap();
                assert_eq!(base.n_components(), n, "{shape:?} d={d} {conn:?}");
                assert!(
                    same_partition(&base.labels, &reference),
                    "{shape:?} d={d} {conn:?}"
                );
                // Raster-order numbering makes the labels equal to the flood fill's exactly.
                assert_eq!(base.labels, reference, "{shape:?} d={d} {conn:?}");
                for slabs in [2, 3, 7, 64] {
                    let o = connected_components_slabs(m.view(), conn, slabs).unwrap();
                    assert_eq!(
                        o.labels, base.labels,
                        "{shape:?} d={d} {conn:?} slabs={slabs}"
                    );
                    assert_eq!(o.sizes, base.sizes);
                }
                checked_components += n;
            }
        }
    }
    assert!(
        checked_components > 1000,
        "the random volumes should have many components"
    );
}

#[test]
fn diagonal_only_connections() {
    // (z, y, x) pairs: a corner, an edge and a face neighbour; each pair across a slab cut.
    let cases = [
        ((0, 0, 0), (1, 1, 1), [2, 2, 1]),
        ((0, 0, 0), (1, 1, 0), [2, 1, 1]),
        ((0, 0, 0), (1, 0, 0), [1, 1, 1]),
    ];
    for (a, b, expected) in cases {
        for (i, conn) in CONNS.iter().enumerate() {
            let mut m = Array3::<u8>::zeros((2, 3, 3));
            m[[a.0, a.1, a.2]] = 1;
            m[[b.0, b.1, b.2]] = 1;
            for slabs in [1, 2] {
                let o = connected_components_slabs(m.view(), *conn, slabs).unwrap();
                assert_eq!(
                    o.n_components(),
                    expected[i],
                    "{a:?}-{b:?} {conn:?} slabs={slabs}"
                );
            }
        }
    }
    // In-plane diagonals, anti-diagonals across z (x+1 and x-1 with y-1 and y+1).
    let mut m = Array3::<u8>::zeros((3, 4, 4));
    m[[0, 0, 1]] = 1;
    m[[0, 1, 0]] = 1; // in-plane diagonal of the first
    m[[1, 2, 1]] = 1; // corner neighbour of (0,1,0): dz=1, dy=1, dx=1
    m[[2, 1, 0]] = 1; // corner neighbour of (1,2,1): dz=1, dy=-1, dx=-1
    let counts: Vec<usize> = CONNS
        .iter()
        .map(|&c| connected_components(&m, c).unwrap().n_components())
        .collect();
    assert_eq!(counts, vec![4, 3, 1]);
}

#[test]
fn labels_consecutive_and_sizes_right() {
    let m = random_mask((10, 30, 30), 0.25, 99);
    for conn in CONNS {
        let o = connected_components(&m, conn).unwrap();
        let n = o.n_components();
        assert!(n > 5);
        let mut seen = vec![0usize; n + 1];
        for &l in o.labels.iter() {
            assert!((l as usize) <= n);
            seen[l as usize] += 1;
        }
        assert_eq!(seen, o.sizes, "{conn:?}");
        assert!(seen.iter().all(|&c| c > 0), "every label 0..=n is used");
        assert_eq!(o.sizes[0], m.iter().filter(|&&v| v == 0).count());
        // First voxels appear in increasing label order.
        let mut next = 1u32;
        for &l in o.labels.iter() {
            if l == next {
                next += 1;
            } else {
                assert!(l < next, "label {l} before {next}");
            }
        }
    }
}

#[test]
fn empty_and_full_volumes() {
    let e = Array3::<u8>::zeros((3, 4, 5));
    let o = connected_components(&e, Connectivity::TwentySix).unwrap();
    assert_eq!(o.n_components(), 0);
    assert_eq!(o.sizes, vec![60]);
    let f = Array3::<u8>::from_elem((5, 4, 3), 7);
    for conn in CONNS {
        let o = connected_components(&f, conn).unwrap();
        assert_eq!(o.sizes, vec![0, 60]);
    }
    let z = Array3::<u8>::zeros((0, 4, 5));
    assert_eq!(
        connected_components(&z, Connectivity::Six)
            .unwrap()
            .n_components(),
        0
    );
    assert!(Connectivity::from_neighbours(8).is_err());
    assert_eq!(
        Connectivity::from_neighbours(18).unwrap(),
        Connectivity::Eighteen
    );
}

#[test]
fn filter_by_size_and_cam_support() {
    // Three bars along x in separate rows: 2, 6 and 12 voxels.
    let mut m = Array3::<u8>::zeros((1, 7, 14));
    for x in 0..2 {
        m[[0, 0, x]] = 1;
    }
    for x in 0..6 {
        m[[0, 3, x]] = 1;
    }
    for x in 0..12 {
        m[[0, 6, x]] = 1;
    }
    let o = connected_components(&m, Connectivity::TwentySix).unwrap();
    assert_eq!(o.sizes[1..], [2, 6, 12]);
    let f = ComponentFilter {
        min_voxels: 5,
        cam_threshold: 0.7,
        min_cam_fraction: 0.0,
        min_peak_cam: 0.0,
    };
    let r = filter_components(&o.labels, &o.sizes, None, &f).unwrap();
    assert_eq!(r.sizes[1..], [6, 12]);
    assert_eq!((r.dropped_small, r.dropped_cam), (1, 0));
    assert_eq!(r.mask.iter().filter(|&&v| v != 0).count(), 18);
    assert_eq!(r.mask[[0, 0, 0]], 0);

    // CAM high over the first 8 columns: the 6-bar is fully inside, the 12-bar 8/12 inside.
    let cam = Array3::from_shape_fn((1, 7, 14), |(_, _, x)| if x < 8 { 0.9f32 } else { 0.1 });
    let strict = ComponentFilter {
        min_cam_fraction: 0.8,
        ..f
    };
    let r = filter_components(&o.labels, &o.sizes, Some(&cam), &strict).unwrap();
    assert_eq!(r.sizes[1..], [6]);
    assert_eq!((r.dropped_small, r.dropped_cam), (1, 1));
    assert_eq!(r.labels[[0, 3, 0]], 1);
    assert_eq!(r.labels[[0, 6, 0]], 0);
    let lax = ComponentFilter {
        min_cam_fraction: 0.6,
        ..f
    };
    assert_eq!(
        filter_components(&o.labels, &o.sizes, Some(&cam), &lax)
            .unwrap()
            .n_components(),
        2
    );
    let peak = ComponentFilter {
        min_peak_cam: 0.95,
        ..f
    };
    assert_eq!(
        filter_components(&o.labels, &o.sizes, Some(&cam), &peak)
            .unwrap()
            .n_components(),
        0
    );
    // A CAM of the wrong shape is an error, not a panic.
    let bad = Array3::<f32>::zeros((1, 7, 13));
    assert!(filter_components(&o.labels, &o.sizes, Some(&bad), &f).is_err());
    // Labels beyond `sizes` are an error too.
    assert!(filter_components(&o.labels, &o.sizes[..2], None, &f).is_err());
}

#[test]
fn reused_buffer_gives_the_same_labels() {
    let a = random_mask((9, 20, 21), 0.3, 5);
    let b = random_mask((9, 20, 21), 0.1, 6);
    let first = connected_components(&a, Connectivity::TwentySix).unwrap();
    // The old labels are garbage for `b`: they must be cleared, not merged.
    let again = connected_components_reusing(&b, Connectivity::TwentySix, first.labels).unwrap();
    let fresh = connected_components(&b, Connectivity::TwentySix).unwrap();
    assert_eq!(again.labels, fresh.labels);
    assert_eq!(again.sizes, fresh.sizes);
    // A buffer of another shape is replaced.
    let other =
        connected_components_reusing(&b, Connectivity::Six, Array3::zeros((2, 2, 2))).unwrap();
    assert_eq!(
        other.labels,
        connected_components(&b, Connectivity::Six).unwrap().labels
    );
}
