//! Development instrument: re-runs the refinement with many settings on the outputs of a
//! cross-validation run (`scripts/ctich_cv.sh`), without re-running the network, and prints
//! the pooled per-slice Dice, the volume Dice and the false-positive volumes of each.
//!
//!   cargo run --release --example refine_sweep -- CVDIR SETTING...
//!
//! CVDIR holds `foldK/test/{images,labels}` and `foldK/pred/<id>/{cam.nii.gz,slices.csv}`.
//! A SETTING is a comma-separated list of `key=value` over the defaults of `ichcam segment`:
//! `flags=pred|oracle|all` (the slice flags: the model's, the truth's, every slice),
//! `thr=P` (re-threshold the model's slice probabilities), `vol=P` (volume gate),
//! `cam=T` (CAM threshold), `grow=T`, `band=HU` (fixed band floor), `floor=HU` (blood floor),
//! `smooth=R`, `dilate=R`, `minml=ML`, `support=F`, `sat=S`, `k=K`, `authors=1`,
//! `open=R` (opening radius), `camall=1` (a CAM of 1 everywhere: intensity alone);
//! with a stage-3 U-Net's maps (`pred/<id>/unet.nii.gz`): `map=cam|unet|or` (what is
//! refined: the CAM, the U-Net's map in the CAM's place, or both ORed: `--fuse`),
//! `uthr=P`, `ugrow=P` (the U-Net map's levels), `flags=unet` with `uflag=P` (a slice is
//! positive where the U-Net's map reaches P).
//! It reads the truth masks: it is an evaluation tool, never part of training.

use ichcam::seg::{refine, volume_config, RefineConfig, RefineMode};
use ndarray::{Array3, Axis};
use std::path::Path;

#[derive(Clone, Debug)]
struct Setting {
    name: String,
    cfg: RefineConfig,
    flags: String,
    thr: Option<f64>,
    vol: Option<f64>,
    minml: f64,
    camall: bool,
    map: String,
    uthr: f32,
    ugrow: f32,
    uflag: f32,
}

fn parse(s: &str) -> Setting {
    let mut st = Setting {
        name: s.to_string(),
        cfg: RefineConfig::default(),
        flags: "pred".into(),
        thr: None,
        vol: None,
        minml: 0.05,
        camall: false,
        map: "cam".into(),
        uthr: 0.5,
        ugrow: 0.3,
        uflag: 0.5,
    };
    for kv in s.split(',').filter(|x| !x.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, "1"));
        let f = || {
            v.parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value in {kv}"))
        };
        match k {
            "flags" => st.flags = v.to_string(),
            "thr" => st.thr = Some(f()),
            "vol" => st.vol = Some(f()),
            "cam" => st.cfg.cam_threshold = f() as f32,
            "grow" => st.cfg.grow_cam_threshold = f() as f32,
            "band" => st.cfg.band_floor_hu = Some(f() as f32),
            "floor" => st.cfg.min_blood_hu = f() as f32,
            "smooth" => st.cfg.smooth_radius = f() as usize,
            "dilate" => st.cfg.dilate_radius = f() as usize,
            "minml" => st.minml = f(),
            "support" => st.cfg.min_cam_support = f() as f32,
            "sat" => st.cfg.saturation = f() as f32,
            "k" => st.cfg.k = f() as usize,
            "authors" => st.cfg.mode = RefineMode::Authors,
            "camall" => st.camall = true,
            "open" => st.cfg.open_radius = f() as usize,
            "map" => st.map = v.to_string(),
            "uthr" => st.uthr = f() as f32,
            "ugrow" => st.ugrow = f() as f32,
            "uflag" => st.uflag = f() as f32,
            "real" => {
                st.cfg = RefineConfig::real_ct();
                st.minml = 0.3;
            }
            "base" => {}
            _ => panic!("unknown key {k}"),
        }
    }
    st
}

#[derive(Default, Clone)]
struct Acc {
    slice_dice_sum: f64,
    truth_slices: usize,
    vol_dice: Vec<f64>,
    fp: usize,
    neg: usize,
    /// Per fold: (slice Dice sum, truth slices, FP volumes).
    folds: Vec<(f64, usize, usize)>,
}

fn read_probs(path: &Path, d: usize) -> (Vec<f64>, Vec<bool>) {
    let t = std::fs::read_to_string(path).expect("slices.csv");
    let mut p = vec![0.0; d];
    let mut f = vec![false; d];
    for line in t.lines().skip(1) {
        let c: Vec<&str> = line.split(',').collect();
        let z: usize = c[0].parse().unwrap();
        p[z] = c[1].parse().unwrap();
        f[z] = c[2] == "1";
    }
    (p, f)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cv = Path::new(&args[0]);
    let settings: Vec<Setting> = args[1..].iter().map(|s| parse(s)).collect();
    let mut acc = vec![Acc::default(); settings.len()];
    let mut folds: Vec<_> = std::fs::read_dir(cv)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("pred").is_dir())
        .collect();
    folds.sort();
    for (fold_no, fold) in folds.iter().enumerate() {
        let mut ids: Vec<String> = std::fs::read_dir(fold.join("test/images"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().replace(".nii.gz", ""))
            .collect();
        ids.sort();
        for id in ids {
            let vol =
                ichcam::io::read_volume(&fold.join(format!("test/images/{id}.nii.gz"))).unwrap();
            let truth = ichcam::io::to_mask(
                &ichcam::io::read_mask(&fold.join(format!("test/labels/{id}.nii.gz"))).unwrap(),
            );
            let cam = ichcam::io::read_volume(&fold.join(format!("pred/{id}/cam.nii.gz")))
                .unwrap()
                .data;
            let unet_path = fold.join(format!("pred/{id}/unet.nii.gz"));
            let unet = unet_path
                .is_file()
                .then(|| ichcam::io::read_volume(&unet_path).unwrap().data);
            let d = vol.dims().0;
            let (probs, flags) = read_probs(&fold.join(format!("pred/{id}/slices.csv")), d);
            let tflags: Vec<bool> = truth
                .axis_iter(Axis(0))
                .map(|s| s.iter().any(|&v| v != 0))
                .collect();
            let ones = Array3::<f32>::ones(cam.dim());
            for (st, a) in settings.iter().zip(acc.iter_mut()) {
                while a.folds.len() < fold_no + 1 {
                    a.folds.push((0.0, 0, 0));
                }
                let mut pos: Vec<bool> = match st.flags.as_str() {
                    "oracle" => tflags.clone(),
                    "all" => vec![true; d],
                    "unet" => unet
                        .as_ref()
                        .expect("flags=unet needs unet.nii.gz")
                        .axis_iter(Axis(0))
                        .map(|s| s.iter().any(|&v| v >= st.uflag))
                        .collect(),
                    _ => match st.thr {
                        Some(t) => probs.iter().map(|&p| p >= t).collect(),
                        None => flags.clone(),
                    },
                };
                if let Some(v) = st.vol {
                    if probs.iter().copied().fold(0.0, f64::max) < v {
                        pos.iter_mut().for_each(|p| *p = false);
                    }
                }
                let cfg = volume_config(&st.cfg, Some(st.minml), true, &vol.data, vol.spacing);
                let c = if st.camall { &ones } else { &cam };
                let mut ucfg = cfg.clone();
                ucfg.cam_threshold = st.uthr;
                ucfg.grow_cam_threshold = st.ugrow.min(st.uthr);
                let u = || unet.as_ref().expect("map=unet|or needs unet.nii.gz");
                let mask = match st.map.as_str() {
                    "unet" => refine(&vol.data, u(), &pos, &ucfg).unwrap().mask,
                    "or" => {
                        let a = refine(&vol.data, c, &pos, &cfg).unwrap().mask;
                        let mut b = refine(&vol.data, u(), &pos, &ucfg).unwrap().mask;
                        b.zip_mut_with(&a, |x, &y| *x |= y);
                        b
                    }
                    _ => refine(&vol.data, c, &pos, &cfg).unwrap().mask,
                };
                let fa = a.folds.last_mut().unwrap();
                let (mut np, mut nt, mut tp) = (0usize, 0usize, 0usize);
                for (ps, ts) in mask.axis_iter(Axis(0)).zip(truth.axis_iter(Axis(0))) {
                    let (mut a1, mut b1, mut c1) = (0usize, 0usize, 0usize);
                    for (&p, &t) in ps.iter().zip(ts.iter()) {
                        a1 += (p != 0) as usize;
                        b1 += (t != 0) as usize;
                        c1 += (p != 0 && t != 0) as usize;
                    }
                    if b1 > 0 {
                        a.slice_dice_sum += 2.0 * c1 as f64 / (a1 + b1) as f64;
                        a.truth_slices += 1;
                        fa.0 += 2.0 * c1 as f64 / (a1 + b1) as f64;
                        fa.1 += 1;
                    }
                    np += a1;
                    nt += b1;
                    tp += c1;
                }
                if nt > 0 {
                    a.vol_dice.push(2.0 * tp as f64 / (np + nt) as f64);
                } else {
                    a.neg += 1;
                    a.fp += (np > 0) as usize;
                    fa.2 += (np > 0) as usize;
                }
            }
        }
        eprintln!("done {}", fold.display());
    }
    println!(
        "| setting | pooled slice Dice | volume Dice | FP volumes | per fold: slice Dice (FP) |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for (st, a) in settings.iter().zip(&acc) {
        let per: Vec<String> = a
            .folds
            .iter()
            .map(|f| format!("{:.3} ({})", f.0 / f.1.max(1) as f64, f.2))
            .collect();
        println!(
            "| {} | {:.3} | {:.3} | {} of {} | {} |",
            st.name,
            a.slice_dice_sum / a.truth_slices.max(1) as f64,
            a.vol_dice.iter().sum::<f64>() / a.vol_dice.len().max(1) as f64,
            a.fp,
            a.neg,
            per.join(", ")
        );
    }
}
