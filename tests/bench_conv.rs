//! `ichcam bench --what conv` (src/commands/bench.rs): the distinct convolution shapes it
//! derives from a preset's model config against a built network (every backbone conv's
//! parameter name and weight shape, and the last feature map against
//! `memory::backbone_activations`), the multiply-adds of ResNet-18 and ResNet-101 at 224^2
//! against torchvision's published figures (1.81 and 7.80 GFLOPS, counted as multiply-adds,
//! the fc's included), and the output of a CPU run: every (shape, pass) timed, and each
//! `conv-summary` line the sum of count x median of its rows. The CUDA run (f32, WMMA and
//! mma.sync at bf16 and tf32, Auto's pick) is `#[ignore]`d: it needs a device, a GPU or the
//! emulated driver (`scripts/cuda-emu.sh run target/release/deps/bench_conv-* --ignored`),
//! and fails without one; on the emulator its timings mean nothing, only the output's
//! completeness and consistency are checked.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use ichcam::engine::cpu::CpuBackend;
use ichcam::model::{memory, BlockKind, IchNet, ModelConfig};
use serde_json::Value;

fn ichcam(args: &[&str]) -> String {
    let out = common::bin().args(args).output().expect("running ichcam");
    assert!(
        out.status.success(),
        "ichcam {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn describe(config: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "bench",
        "--device",
        "cpu",
        "--what",
        "conv",
        "--config",
        config,
        "--describe",
    ];
    args.extend_from_slice(extra);
    let out = ichcam(&args);
    serde_json::from_str(out.trim().lines().last().expect("a line")).expect("--describe is JSON")
}

fn u(v: &Value, k: &str) -> usize {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("field {k} in {v}"))
        .try_into()
        .unwrap()
}

/// The backbone's convolutions of the preset, checked against a network built from the
/// config `--describe` prints.
fn shapes_match_network(config: &str) {
    let d = describe(config, &[]);
    let cfg = ModelConfig::from_fixture_json(&d["model"].to_string()).expect("the model config");
    let net = IchNet::new(CpuBackend::<f32>::new(), cfg.clone(), 1).expect("building the net");
    let shapes = d["conv_shapes"].as_array().expect("conv_shapes");
    let mut listed = BTreeSet::new();
    let mut distinct = BTreeSet::new();
    let mut count = 0;
    for s in shapes {
        let key = ["n", "c_in", "h", "w", "c_out", "k", "stride", "pad"].map(|k| u(s, k));
        assert!(distinct.insert(key), "{config}: shape listed twice: {s}");
        let layers = s["layers"].as_array().expect("layers");
        assert_eq!(u(s, "count"), layers.len(), "{s}");
        assert_eq!(s["layer"], layers[0]);
        count += layers.len();
        for l in layers {
            let l = l.as_str().expect("a layer name");
            assert!(listed.insert(l.to_string()), "{config}: {l} listed twice");
            let shape = net
                .shape(&format!("{l}.weight"))
                .unwrap_or_else(|e| panic!("{config}: the net has no {l}.weight: {e}"));
            assert_eq!(
                shape,
                vec![u(s, "c_out"), u(s, "c_in"), u(s, "k"), u(s, "k")],
                "{config}: {l}"
            );
        }
        // The data gradient of every conv but the stem's (the input needs none).
        let stem = layers.iter().any(|l| l == "conv1");
        assert_eq!(u(s, "dgrad_count"), layers.len() - usize::from(stem), "{s}");
        assert_eq!(u(s, "n"), u(&d, "batch") * u(&d, "slices"), "{s}");
    }
    assert_eq!(count, u(&d, "conv_count"));
    // Every 4-D parameter of the backbone (the stem and the stages) is listed.
    let convs: BTreeSet<String> = net
        .names()
        .into_iter()
        .filter(|n| n.starts_with("conv1") || n.starts_with("layer"))
        .filter(|n| net.shape(n).map(|s| s.len() == 4).unwrap_or(false))
        .map(|n| n.trim_end_matches(".weight").to_string())
        .collect();
    assert_eq!(convs, listed, "{config}: the net's convolutions");
    // The last block's last conv writes the feature map the memory plan counts.
    let (stage, &blocks) = cfg
        .layers
        .iter()
        .enumerate()
        .rev()
        .find(|(_, &b)| b > 0)
        .expect("a stage");
    let unit = match cfg.block {
        BlockKind::Basic => 2,
        BlockKind::Bottleneck => 3,
    };
    let name = format!("layer{}.{}.conv{unit}", stage + 1, blocks - 1);
    let last = shapes
        .iter()
        .find(|s| {
            s["layers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l == name.as_str())
        })
        .unwrap_or_else(|| panic!("{config}: {name} not listed"));
    let size = u(&d, "size");
    let (_, (c, h, w)) =
        memory::backbone_activations(&cfg, u(&d, "batch") * u(&d, "slices"), size, size)
            .expect("counted");
    assert_eq!(
        (c as usize, h as usize, w as usize),
        (u(last, "c_out"), u(last, "out_h"), u(last, "out_w")),
        "{config}: the last feature map"
    );
}

#[test]
fn conv_shapes_match_the_tiny_network() {
    shapes_match_network("tiny");
}

#[test]
fn conv_shapes_match_the_small_network() {
    shapes_match_network("small");
}

/// ResNet-18 (`small`) and ResNet-101 (`paper`) on one 224^2 image: torchvision's published
/// 1.81 and 7.80 GFLOPS (multiply-adds, the fc's 0.5 M and 2 M included) within 1 %. A
/// stride on the bottleneck's 1x1 instead of its 3x3 (ResNet v1) gives 7.6, 2.5 % less.
#[test]
fn conv_macs_match_torchvision() {
    for (config, convs, gmacs) in [("small", 20, 1.81), ("paper", 104, 7.80)] {
        let d = describe(config, &["--size", "224", "--batch", "1", "--slices", "1"]);
        assert_eq!(u(&d, "conv_count"), convs, "{config}");
        let macs: f64 = d["conv_fwd_macs"].as_str().unwrap().parse().unwrap();
        let sum: f64 = d["conv_shapes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["macs"].as_str().unwrap().parse::<f64>().unwrap() * u(s, "count") as f64)
            .sum();
        assert_eq!(macs, sum, "{config}");
        assert!(
            (macs / 1e9 - gmacs).abs() / gmacs < 0.01,
            "{config}: {} GMACs, torchvision {gmacs}",
            macs / 1e9
        );
    }
}

/// The JSON lines of a run: every (shape, pass) the network runs is timed on every variant,
/// each row's kernel is its family's, Auto picks exactly one variant of each tensor-core
/// precision per (shape, pass), and every summary is the sum of count x median of its rows
/// (Auto's of the rows it picks; the best's of the fastest per precision).
fn check_run(out: &str, variants: &[&str]) {
    let lines: Vec<Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let rows: Vec<&Value> = lines.iter().filter(|l| l["what"] == "conv").collect();
    let sums: BTreeMap<String, &Value> = lines
        .iter()
        .filter(|l| l["what"] == "conv-summary")
        .map(|l| (l["variant"].as_str().unwrap().to_string(), l))
        .collect();
    assert!(!rows.is_empty());
    // (shape, pass) -> variant -> row
    let mut by: BTreeMap<(usize, String), BTreeMap<String, &Value>> = BTreeMap::new();
    for r in &rows {
        let key = (u(r, "shape"), r["pass"].as_str().unwrap().to_string());
        let v = r["variant"].as_str().unwrap().to_string();
        assert!(
            by.entry(key).or_default().insert(v.clone(), r).is_none(),
            "{r}"
        );
        let ms = r["median_ms"].as_f64().unwrap();
        assert!(
            ms > 0.0 && ms.is_finite() && r["min_ms"].as_f64().unwrap() <= ms,
            "{r}"
        );
        assert!(r["tflops"].as_f64().unwrap() > 0.0, "{r}");
        assert!(u(r, "count") > 0, "{r}");
        let k = r["kernel"].as_str().unwrap();
        let pass = match r["pass"].as_str().unwrap() {
            "fwd" => "conv2d_fwd",
            "dgrad" => "conv2d_bwd_data",
            "wgrad" => "conv2d_bwd_weight",
            p => panic!("pass {p}"),
        };
        let want = match v.split_once('-') {
            None => pass.to_string(),
            Some(("wmma", p)) => format!("{pass}_{p}"),
            Some(("mma", p)) => format!("{pass}_mma_{p}"),
            _ => panic!("variant {v}"),
        };
        assert_eq!(k, want, "{r}");
    }
    let shapes = sums.values().next().map(|s| u(s, "shapes")).unwrap_or(0);
    let stem_dgrad = by.keys().any(|(s, p)| *s == 0 && p == "dgrad");
    assert!(!stem_dgrad, "the stem's data gradient is timed");
    assert_eq!(
        by.len(),
        3 * shapes - 1,
        "every (shape, pass) but the stem's dgrad"
    );
    for ((s, p), vs) in &by {
        let got: BTreeSet<&str> = vs.keys().map(String::as_str).collect();
        let want: BTreeSet<&str> = variants.iter().copied().collect();
        assert_eq!(got, want, "shape {s} {p}");
    }
    let total = |pick: &dyn Fn(&BTreeMap<String, &Value>) -> f64| -> f64 {
        by.values()
            .map(|vs| u(vs.values().next().unwrap(), "count") as f64 * pick(vs))
            .sum()
    };
    let ms = |r: &Value| r["median_ms"].as_f64().unwrap();
    let close = |a: f64, b: f64, what: &str| {
        assert!(
            (a - b).abs() <= 1e-9 * b.abs().max(1.0),
            "{what}: {a} vs {b}"
        )
    };
    for v in variants {
        let s = sums.get(*v).unwrap_or_else(|| panic!("no summary for {v}"));
        close(s["total_ms"].as_f64().unwrap(), total(&|vs| ms(vs[*v])), v);
        close(
            s["total_ms"].as_f64().unwrap(),
            ["fwd_ms", "dgrad_ms", "wgrad_ms"]
                .iter()
                .map(|k| s[*k].as_f64().unwrap())
                .sum(),
            v,
        );
    }
    let precs: BTreeSet<&str> = variants
        .iter()
        .filter_map(|v| v.split_once('-').map(|x| x.1))
        .collect();
    let mut expect_sums = variants.len();
    for p in precs {
        expect_sums += 2;
        // (median, whether Auto picks it) of the precision's rows.
        let of_p = |vs: &BTreeMap<String, &Value>| -> Vec<(f64, bool)> {
            vs.iter()
                .filter(|(k, _)| k.ends_with(&format!("-{p}")))
                .map(|(_, r)| (ms(r), r["auto"] == true))
                .collect()
        };
        let picked = |vs: &BTreeMap<String, &Value>| -> f64 {
            let a: Vec<f64> = of_p(vs).into_iter().filter(|r| r.1).map(|r| r.0).collect();
            assert_eq!(a.len(), 1, "Auto picks one {p} kernel: {a:?}");
            a[0]
        };
        let best = |vs: &BTreeMap<String, &Value>| -> f64 {
            of_p(vs)
                .into_iter()
                .map(|r| r.0)
                .fold(f64::INFINITY, f64::min)
        };
        let auto = sums[&format!("auto-{p}")];
        let bst = sums[&format!("best-{p}")];
        close(auto["total_ms"].as_f64().unwrap(), total(&picked), "auto");
        close(bst["total_ms"].as_f64().unwrap(), total(&best), "best");
        let slower = by.values().filter(|vs| picked(vs) > best(vs)).count();
        let lost: f64 = by
            .values()
            .map(|vs| u(vs.values().next().unwrap(), "count") as f64 * (picked(vs) - best(vs)))
            .sum();
        assert_eq!(u(auto, "auto_slower"), slower, "{auto}");
        assert_eq!(u(auto, "pairs"), by.len(), "{auto}");
        close(auto["auto_lost_ms"].as_f64().unwrap(), lost, "lost");
    }
    assert_eq!(sums.len(), expect_sums, "summaries: {:?}", sums.keys());
    assert!(out.contains("network conv time (sum of count x median, ms)"));
}

#[test]
fn cpu_conv_bench_output_is_complete() {
    let out = ichcam(&[
        "bench", "--device", "cpu", "--what", "conv", "--config", "tiny", "--iters", "1",
        "--warmup", "0", "--json",
    ]);
    check_run(&out, &["f32"]);
    let d = describe("tiny", &[]);
    assert_eq!(out.matches("\"conv-summary\"").count(), 1);
    assert!(out.contains(&format!(
        "{} distinct shapes of {} convolutions",
        d["conv_shapes"].as_array().unwrap().len(),
        u(&d, "conv_count")
    )));
}

/// Needs a CUDA device: a GPU, or the emulated driver (`scripts/cuda-emu.sh run
/// target/release/deps/bench_conv-* --ignored`); fails without one.
#[test]
#[ignore = "needs a CUDA device (a GPU or scripts/cuda-emu.sh run ... --ignored)"]
fn cuda_conv_bench_output_is_complete() {
    let out = ichcam(&[
        "bench", "--device", "cuda", "--what", "conv", "--config", "tiny", "--iters", "1",
        "--warmup", "0", "--json",
    ]);
    check_run(&out, &["f32", "wmma-bf16", "mma-bf16"]);
    let out = ichcam(&[
        "bench",
        "--device",
        "cuda",
        "--what",
        "conv",
        "--config",
        "tiny",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--json",
        "--precision",
        "tf32",
    ]);
    check_run(
        &out,
        &["f32", "wmma-bf16", "mma-bf16", "wmma-tf32", "mma-tf32"],
    );
}
