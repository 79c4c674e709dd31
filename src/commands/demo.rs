//! `ichcam demo`: the whole method on synthetic phantoms in a few minutes on a laptop CPU.
//! Synthesises head CTs with exact masks, trains the `tiny` config on 70% of them from slice
//! labels only (the training folder holds no masks), segments the other 30%, evaluates the
//! masks against the truth, writes `OUT/eval.json` and the overlays, and prints the table.

use anyhow::Context;
use ichcam::data::split_patients;
use ichcam::data::synth::{self, SynthConfig};
use ichcam::infer::{expand_inputs, segment_all, SegmentOptions, Segmenter};
use ichcam::train::{train, TrainConfig, TrainInput, TrainOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Output folder: data/, train/ (images + slice labels only), test/, model.safetensors,
    /// pred/<id>/ (masks, CAMs, overlays), eval.json.
    #[arg(long, default_value = "out/demo")]
    out: PathBuf,
    /// Number of synthetic volumes (about 40% without hemorrhage).
    #[arg(long, default_value_t = 30)]
    volumes: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Stage-1 epochs (default: the tiny preset's).
    #[arg(long)]
    epochs: Option<usize>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Fewer messages.
    #[arg(long, short)]
    quiet: bool,
}

/// Copies the listed cases' files and slice-label rows into a new dataset folder; masks only
/// when `with_masks`.
fn subset(data: &Path, dst: &Path, ids: &[String], with_masks: bool) -> anyhow::Result<()> {
    let copy_dir = |sub: &str| -> anyhow::Result<()> {
        std::fs::create_dir_all(dst.join(sub))
            .with_context(|| format!("creating {}", dst.join(sub).display()))?;
        for id in ids {
            let name = format!("{id}.nii.gz");
            std::fs::copy(data.join(sub).join(&name), dst.join(sub).join(&name))
                .with_context(|| format!("copying {sub}/{name}"))?;
        }
        Ok(())
    };
    copy_dir("images")?;
    if with_masks {
        copy_dir("labels")?;
    }
    let csv = std::fs::read_to_string(data.join("slice_labels.csv"))
        .context("reading slice_labels.csv")?;
    let mut lines = csv.lines();
    let header = lines.next().unwrap_or_default().to_string();
    let rows: Vec<&str> = lines
        .filter(|l| {
            ids.iter()
                .any(|id| l.split(',').next() == Some(id.as_str()))
        })
        .collect();
    ichcam::io::atomic::write_atomic(&dst.join("slice_labels.csv"), |w| {
        writeln!(w, "{header}")?;
        for r in &rows {
            writeln!(w, "{r}")?;
        }
        Ok(())
    })?;
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let progress = !a.quiet;
    anyhow::ensure!(
        a.volumes >= 4,
        "--volumes must be at least 4 (train, validation and test need cases)"
    );
    let device = super::open_device(&a.device, a.quiet)?;
    let data = a.out.join("data");
    let cfg = SynthConfig {
        size: 256,
        slices: 24,
        clean: false,
    };
    eprintln!(
        "[1/4] synthesising {} phantoms in {}",
        a.volumes,
        data.display()
    );
    let recs =
        synth::write_dataset(&data, a.volumes, a.seed, &cfg).context("writing the phantoms")?;

    let ids: Vec<String> = recs.iter().map(|r| r.id.clone()).collect();
    let split = split_patients(&ids, 0.3, a.seed)?;
    let train_ids: Vec<String> = split.train.iter().map(|&i| ids[i].clone()).collect();
    let test_ids: Vec<String> = split.val.iter().map(|&i| ids[i].clone()).collect();
    let train_dir = a.out.join("train");
    let test_dir = a.out.join("test");
    for d in [&train_dir, &test_dir] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("clearing {}", d.display()))?;
        }
    }
    subset(&data, &train_dir, &train_ids, false)?;
    subset(&data, &test_dir, &test_ids, true)?;

    let mut tcfg = TrainConfig::preset("tiny")?;
    if let Some(e) = a.epochs {
        tcfg.epochs = e;
    }
    let model = a.out.join("model.safetensors");
    eprintln!(
        "[2/4] training `tiny` on {} volumes from slice labels only (no masks in {})",
        train_ids.len(),
        train_dir.display()
    );
    let topts = TrainOptions {
        seed: a.seed,
        resume: false,
        stop_after_epochs: None,
        progress,
        data_name: Some("phantoms".into()),
        stage2_from: None,
        stage3_from: None,
        loss_readback: Default::default(),
    };
    let t_train = Instant::now();
    let rep =
        train(&device, TrainInput::Dir(&train_dir), &model, &tcfg, &topts).context("training")?;
    let train_s = t_train.elapsed().as_secs_f64();

    eprintln!("[3/4] segmenting {} held-out volumes", test_ids.len());
    let pred = a.out.join("pred");
    let t_seg = Instant::now();
    let items = expand_inputs(&[test_dir.join("images")])?;
    let seg = ichcam::on_device!(device, be => {
        let mut s = Segmenter::load(be, &model, SegmentOptions::default())
            .with_context(|| format!("loading the model {}", model.display()))?;
        segment_all(&mut s, &items, &pred, progress)
    });
    let seg_s = t_seg.elapsed().as_secs_f64();
    if !seg.failed.is_empty() {
        for (id, e) in &seg.failed {
            eprintln!("failed: {id}: {e}");
        }
        anyhow::bail!("{} volume(s) failed to segment", seg.failed.len());
    }

    eprintln!("[4/4] evaluating against the true masks");
    let (report, _) =
        ichcam::eval::dirs::evaluate_dirs(&pred, &test_dir.join("labels")).context("evaluating")?;
    let json = report.to_json().context("serialising the report")?;
    let eval_json = a.out.join("eval.json");
    ichcam::io::atomic::write_atomic(&eval_json, |w| {
        w.write_all(json.as_bytes())?;
        w.write_all(b"\n")
    })?;
    print!("{}", report.table());
    let s = &report.summary;
    println!(
        "demo: held-out Dice {} over {} volumes with hemorrhage (per-slice Dice {}), {} false-positive volume(s) of {} without",
        s.dice.map_or("n/a".into(), |d| format!("{d:.3}")),
        s.n_positive,
        s.dice_slice.map_or("n/a".into(), |d| format!("{d:.3}")),
        s.false_positive_volumes,
        s.n_negative
    );
    println!(
        "stage-1 val AUC {}, stage-2 val AUC {}; train {:.0} s, segment {:.1} s, total {:.0} s",
        rep.best_auc_stage1
            .map_or("n/a".into(), |v| format!("{v:.3}")),
        rep.best_auc_stage2
            .map_or("n/a".into(), |v| format!("{v:.3}")),
        train_s,
        seg_s,
        t0.elapsed().as_secs_f64()
    );
    println!(
        "outputs: {} (eval.json, pred/<id>/overlay.png)",
        a.out.display()
    );
    Ok(())
}
