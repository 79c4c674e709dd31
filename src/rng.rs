//! The crate's one seeded PRNG: splitmix64 (the seeder, also the tests' small generator)
//! and xoshiro256** on top of it, normals by Box-Muller. Everything that must be
//! reproducible byte for byte draws from it: weight initialisation (`model`), patient
//! splits, synthetic phantoms and augmentation (`data`, `train`). No global state: every
//! stream is derived from a seed and a stream index, so work split across threads draws the
//! same numbers in any order. Not for cryptography; knows nothing about CT or the network.
//!
//! Two seed derivations exist because seeded outputs depend on them bit for bit: one
//! splitmix64 round ([`Rng::stream`]: per-tensor initialisation) and two rounds
//! ([`derive_seed`], [`Rng::derived`]: phantoms, splits, augmentation).

/// One splitmix64 step: a good 64-bit mixer, also used to derive independent seeds.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The state a stream index moves a seed to before the splitmix64 rounds.
fn stream_state(seed: u64, stream: u64) -> u64 {
    seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// A seed for stream `stream` of `seed` (two splitmix64 rounds): distinct streams are
/// statistically independent.
pub fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut s = stream_state(seed, stream);
    splitmix64(&mut s);
    splitmix64(&mut s)
}

/// xoshiro256** with the second normal of each Box-Muller pair kept for the next
/// [`Rng::normal`].
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
    spare: Option<f64>,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut s = [0u64; 4];
        for v in &mut s {
            *v = splitmix64(&mut sm);
        }
        // All-zero state is the one fixed point of xoshiro; splitmix64 cannot produce four
        // zeros in a row, but guard anyway.
        if s == [0; 4] {
            s[0] = 1;
        }
        Rng { s, spare: None }
    }

    /// An independent stream for item `index` of a seed (one splitmix64 round; e.g. one
    /// per parameter tensor, so adding a tensor does not shift the values of the others).
    pub fn stream(seed: u64, index: u64) -> Self {
        let mut sm = stream_state(seed, index);
        Rng::new(splitmix64(&mut sm))
    }

    /// The generator for stream `stream` of `seed` (see [`derive_seed`]).
    pub fn derived(seed: u64, stream: u64) -> Self {
        Rng::new(derive_seed(seed, stream))
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }

    /// Uniform integer in `[0, n)`; `n == 0` gives 0.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        // Multiply-shift: bias is below 2^-64 * n, irrelevant here.
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    /// The radius and angle of one Box-Muller pair.
    fn polar(&mut self) -> (f64, f64) {
        let u1 = 1.0 - self.f64(); // (0, 1]: ln is finite
        let u2 = self.f64();
        ((-2.0 * u1.ln()).sqrt(), std::f64::consts::TAU * u2)
    }

    /// A standard normal deviate (Box-Muller, both values of a pair used in turn).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let (r, a) = self.polar();
        let (s, c) = a.sin_cos();
        self.spare = Some(r * s);
        r * c
    }

    /// A standard normal deviate from a fresh Box-Muller pair, its second value discarded
    /// (the phantoms draw their noise this way; their bytes depend on it).
    pub fn normal_fresh(&mut self) -> f64 {
        let (r, a) = self.polar();
        r * a.cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_distinct_streams() {
        let draw = |mut r: Rng| (0..8).map(|_| r.next_u64()).collect::<Vec<u64>>();
        assert_eq!(draw(Rng::derived(7, 1)), draw(Rng::derived(7, 1)));
        assert_ne!(draw(Rng::derived(7, 1)), draw(Rng::derived(7, 2)));
        assert_ne!(draw(Rng::stream(7, 1)), draw(Rng::stream(7, 2)));
        assert_ne!(draw(Rng::stream(7, 1)), draw(Rng::derived(7, 1)));
    }

    #[test]
    fn uniform_and_normal_moments() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let mut c = Rng::new(3);
        let n = 200_000;
        let (mut s, mut s2, mut u, mut f) = (0.0, 0.0, 0.0, 0.0);
        for _ in 0..n {
            let z = a.normal();
            assert_eq!(z, b.normal());
            s += z;
            s2 += z * z;
            let v = c.f64();
            assert!((0.0..1.0).contains(&v));
            u += v;
            f += c.normal_fresh();
        }
        let n = n as f64;
        assert!((s / n).abs() < 0.01, "normal mean {}", s / n);
        assert!((s2 / n - 1.0).abs() < 0.02, "normal var {}", s2 / n);
        assert!((u / n - 0.5).abs() < 0.005, "uniform mean {}", u / n);
        assert!((f / n).abs() < 0.01, "normal_fresh mean {}", f / n);
    }

    #[test]
    fn a_pair_gives_both_its_values_and_fresh_draws_skip_the_second() {
        let (mut a, mut b) = (Rng::new(11), Rng::new(11));
        let first = a.normal();
        assert_eq!(first, b.normal_fresh());
        let second = a.normal();
        // The pair's second value is r*sin(angle): same radius, so first^2 + second^2 = r^2.
        let mut c = Rng::new(11);
        let (r, _) = c.polar();
        assert!((first * first + second * second - r * r).abs() < 1e-9);
        // The fresh draw consumed its pair: both generators are at the same state again.
        assert_eq!(a.next_u64(), b.next_u64());
    }
}
