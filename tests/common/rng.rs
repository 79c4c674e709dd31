//! SplitMix64, the tests' and benches' one small seeded generator: the library's own
//! `ichcam::rng::splitmix64` step, with the draws the tests need (53-bit f64, 24-bit f32,
//! integers below n, coin flips) and per-run seeds that are printed so that a failure can
//! be replayed (`ICHCAM_SEED=N` fixes them).

/// SplitMix64 over its 64-bit state.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// A generator seeded per run (from the clock, or `ICHCAM_SEED`), the seed printed
    /// under `name`.
    pub fn fresh(name: &str) -> Self {
        SplitMix64(fresh_seed(name))
    }

    pub fn next_u64(&mut self) -> u64 {
        ichcam::rng::splitmix64(&mut self.0)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)` with 53 random bits.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit_f64()
    }

    /// Uniform in `[0, 1)` with 24 random bits.
    pub fn unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[lo, hi)` with 24 random bits.
    pub fn uniform_f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit_f32()
    }

    /// `n` values uniform in `[lo, hi)` (53 bits each).
    pub fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }

    /// `n` values uniform in `[lo, hi)` (24 bits each).
    pub fn vec_f32(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform_f32(lo, hi)).collect()
    }

    /// `n` values in `[-1, 1)`, each at least `gap` away from 0 (keeps ReLU kinks out of
    /// reach of a finite-difference step).
    pub fn vec_off_zero(&mut self, n: usize, gap: f64) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let v = self.uniform(gap, 1.0);
                if self.next_u64() & 1 == 0 {
                    v
                } else {
                    -v
                }
            })
            .collect()
    }

    /// `n` values that are 1 with probability `p`, else 0 (53-bit draws).
    pub fn mask(&mut self, n: usize, p: f64) -> Vec<f64> {
        (0..n)
            .map(|_| (self.uniform(0.0, 1.0) < p) as u8 as f64)
            .collect()
    }

    /// `n` values that are 1 with probability `p`, else 0 (24-bit draws).
    pub fn mask_f32(&mut self, n: usize, p: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (self.uniform_f32(0.0, 1.0) < p) as u8 as f32)
            .collect()
    }

    /// Uniform in `0..n` (`n > 0`; 0 is taken as 1).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit_f64() <= p
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }

    /// `n` pseudo-random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next_u64() >> 56) as u8).collect()
    }
}

/// The splitmix64 output for counter `i` of a stream starting at `offset`
/// (`mix(offset + i * golden)`): a stateless hash, for inputs generated in parallel.
pub fn counter(i: u64, offset: u64) -> u64 {
    const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
    SplitMix64(
        i.wrapping_mul(GOLDEN)
            .wrapping_add(offset)
            .wrapping_sub(GOLDEN),
    )
    .next_u64()
}

/// A seed that changes from run to run (fresh inputs every time), or `ICHCAM_SEED`;
/// printed under `name` for replay.
pub fn fresh_seed(name: &str) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x1234_5678)
        ^ (name.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let seed = std::env::var("ICHCAM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(t);
    println!("{name}: seed {seed} (ICHCAM_SEED={seed} replays it)");
    seed
}
