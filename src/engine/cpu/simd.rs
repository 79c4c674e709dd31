//! Runtime choice of the vector instruction set for the CPU backend's hot loops: the crate
//! is built for baseline x86-64, and `multiversion!` compiles a loop nest a second and
//! third time with AVX2+FMA and AVX-512 enabled, picking one at run time from what the
//! processor reports (the portable build runs everywhere, the wide one where it can).
//! Knows nothing about the ops.

/// The widest instruction set this processor offers, among those the loops are built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Base,
}

/// Detected once; `ICHCAM_ISA=base|avx2` caps it (for measurements and tests).
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("ICHCAM_ISA").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            if cap != "base"
                && cap != "avx2"
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
            {
                return Isa::Avx512;
            }
            if cap != "base"
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        let _ = cap;
        Isa::Base
    })
}

/// `multiversion!(name, body_fn, <T: Bound>, (arg: Type, ...))` defines `name`, which
/// calls `body_fn` (an `#[inline(always)]` function with that signature) compiled for
/// AVX-512, AVX2+FMA or the baseline, whichever [`isa`] picks.
#[macro_export]
#[doc(hidden)]
macro_rules! multiversion {
    ($name:ident, $body:ident, <$T:ident: $bound:path>, ($($a:ident: $t:ty),* $(,)?)) => {
        #[allow(clippy::too_many_arguments)]
        fn $name<$T: $bound>($($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide<$T: $bound>($($a: $t),*) {
                    $body($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn mid<$T: $bound>($($a: $t),*) {
                    $body($($a),*)
                }
                match $crate::engine::cpu::simd::isa() {
                    // SAFETY: isa() saw these features on this processor.
                    $crate::engine::cpu::simd::Isa::Avx512 => return unsafe { wide($($a),*) },
                    $crate::engine::cpu::simd::Isa::Avx2 => return unsafe { mid($($a),*) },
                    $crate::engine::cpu::simd::Isa::Base => {}
                }
            }
            $body($($a),*)
        }
    };
}
