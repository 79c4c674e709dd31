//! Validation metrics of the slice classifier: ROC AUC by ranks (the Mann-Whitney U
//! statistic, ties given their average rank) and accuracy at probability 0.5.
//! Knows nothing about the network: scores and labels only.

/// ROC AUC of `scores` (any monotone score: logits or probabilities) against `labels`.
/// `None` when one class is absent (the AUC is undefined) or a score is NaN.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    if scores.len() != labels.len() || scores.iter().any(|s| s.is_nan()) {
        return None;
    }
    let n_pos = labels.iter().filter(|&&l| l).count();
    let n_neg = labels.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the positives' ranks (1-based), each tie group sharing its average rank.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i + 1;
        while j < idx.len() && scores[idx[j]] == scores[idx[i]] {
            j += 1;
        }
        let avg_rank = (i + 1 + j) as f64 / 2.0;
        let pos_in_group = idx[i..j].iter().filter(|&&k| labels[k]).count();
        rank_sum += avg_rank * pos_in_group as f64;
        i = j;
    }
    let u = rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// Fraction of slices whose logit sign (probability >= 0.5) matches the label.
pub fn accuracy_from_logits(logits: &[f64], labels: &[bool]) -> Option<f64> {
    if logits.is_empty() || logits.len() != labels.len() {
        return None;
    }
    let ok = logits
        .iter()
        .zip(labels)
        .filter(|(&z, &l)| (z >= 0.0) == l)
        .count();
    Some(ok as f64 / logits.len() as f64)
}

/// Mean binary cross-entropy with logits and PyTorch's pos_weight, computed on the host
/// for validation (the same formula as the backend's loss).
pub fn bce_with_logits(logits: &[f64], labels: &[bool], pos_weight: f64) -> Option<f64> {
    if logits.is_empty() || logits.len() != labels.len() {
        return None;
    }
    let mut sum = 0.0;
    for (&z, &l) in logits.iter().zip(labels) {
        // log(1 + e^-z) and log(1 + e^z), stable for large |z|.
        let sp_neg = (-z).max(0.0) + (-z.abs()).exp().ln_1p();
        let sp_pos = z.max(0.0) + (-z.abs()).exp().ln_1p();
        sum += if l { pos_weight * sp_neg } else { sp_pos };
    }
    Some(sum / logits.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The O(n^2) definition: P(score_pos > score_neg) + 0.5 P(equal).
    fn auc_pairs(s: &[f64], l: &[bool]) -> f64 {
        let (mut num, mut den) = (0.0, 0.0);
        for i in 0..s.len() {
            for j in 0..s.len() {
                if l[i] && !l[j] {
                    den += 1.0;
                    num += if s[i] > s[j] {
                        1.0
                    } else if s[i] == s[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        num / den
    }

    #[test]
    fn matches_pairwise_definition_with_ties() {
        let mut r = super::super::augment::Rng::new(3);
        for _ in 0..20 {
            let n = 5 + r.below(40);
            // Coarse scores so that ties are frequent.
            let s: Vec<f64> = (0..n).map(|_| r.below(5) as f64).collect();
            let mut l: Vec<bool> = (0..n).map(|_| r.chance(0.5)).collect();
            l[0] = true;
            l[1] = false;
            let a = roc_auc(&s, &l).unwrap();
            assert!((a - auc_pairs(&s, &l)).abs() < 1e-12);
        }
    }

    #[test]
    fn perfect_inverse_and_undefined() {
        let l = [false, false, true, true];
        assert_eq!(roc_auc(&[0.1, 0.2, 0.3, 0.4], &l), Some(1.0));
        assert_eq!(roc_auc(&[0.4, 0.3, 0.2, 0.1], &l), Some(0.0));
        assert_eq!(roc_auc(&[1.0; 4], &l), Some(0.5));
        assert_eq!(roc_auc(&[0.1, 0.2], &[true, true]), None);
        assert_eq!(accuracy_from_logits(&[-1.0, 2.0, 0.5, -0.1], &l), Some(0.5));
    }

    #[test]
    fn bce_matches_naive() {
        let z = [0.3, -1.2, 2.0];
        let l = [true, false, true];
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let naive = (-(2.0 * sig(0.3).ln()) - (1.0 - sig(-1.2)).ln() - 2.0 * sig(2.0).ln()) / 3.0;
        assert!((bce_with_logits(&z, &l, 2.0).unwrap() - naive).abs() < 1e-12);
    }
}

/// The slice probability threshold that maximises Youden's J (sensitivity + specificity - 1)
/// on `logits` vs `labels`. Every cut between two distinct scores that reaches the maximum
/// is taken, and the threshold is the middle (in probability) of the range they span: a
/// small validation set leaves a wide plateau, and its edge overfits. `None` without both
/// classes. The fc head trained with `pos_weight` is biased upwards, so 0.5 calls too many
/// slices positive; this is the calibrated default that `ichcam segment` reads from the
/// model.
pub fn youden_threshold(logits: &[f64], labels: &[bool]) -> Option<f64> {
    let pos = labels.iter().filter(|&&l| l).count();
    let neg = labels.len() - pos;
    if pos == 0 || neg == 0 || logits.len() != labels.len() {
        return None;
    }
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let mut order: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    // Walk the cut down from above the highest score: everything above the cut is positive.
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut best_j = f64::NEG_INFINITY;
    let (mut hi, mut lo) = (1.0f64, 0.0f64);
    for (k, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1;
        } else {
            fp += 1;
        }
        // Only cut between distinct scores.
        let next = order.get(k + 1).map(|&j| logits[j]);
        if next == Some(logits[i]) {
            continue;
        }
        let j = tp as f64 / pos as f64 - fp as f64 / neg as f64;
        // The cut lies anywhere between this score and the next one down.
        let (top, bottom) = (sig(logits[i]), next.map_or(0.0, sig));
        if j > best_j + 1e-12 {
            best_j = j;
            (hi, lo) = (top, bottom);
        } else if (j - best_j).abs() <= 1e-12 {
            lo = bottom;
        }
    }
    if best_j == f64::NEG_INFINITY {
        return None;
    }
    Some((0.5 * (hi + lo)).clamp(0.0, 1.0))
}

#[cfg(test)]
mod youden_tests {
    use super::youden_threshold;

    fn logit(p: f64) -> f64 {
        (p / (1.0 - p)).ln()
    }

    #[test]
    fn threshold_sits_in_the_middle_of_the_separating_gap() {
        // Negatives up to 0.3, positives from 0.7: every cut in (0.3, 0.7) is perfect.
        let probs = [0.05, 0.2, 0.3, 0.7, 0.8, 0.95];
        let labels = [false, false, false, true, true, true];
        let l: Vec<f64> = probs.iter().map(|&p| logit(p)).collect();
        let t = youden_threshold(&l, &labels).unwrap();
        assert!((t - 0.5).abs() < 1e-9, "{t}");
        // Shift the classes up: the threshold follows.
        let probs = [0.5, 0.6, 0.7, 0.9, 0.95, 0.99];
        let l: Vec<f64> = probs.iter().map(|&p| logit(p)).collect();
        let t = youden_threshold(&l, &labels).unwrap();
        assert!((t - 0.8).abs() < 1e-9, "{t}");
        // One class only: undefined.
        assert_eq!(youden_threshold(&l, &[true; 6]), None);
    }
}
