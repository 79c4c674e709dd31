// How the emulated tensor-core instructions (emu_wmma.h, emu_mma.h, emu_wgmma.h) add the
// products of one instruction to the accumulator. Default: in k order with fmaf, each step
// rounded to nearest (IEEE f32). EMU_MMA_ACCUM=rz: the exact sum of the instruction's
// products and the accumulator, rounded once toward zero to f32 -- a coarse model of the
// hardware, whose MMA units are reported to align and normalise the partial sums with
// truncation (an experiment for docs/precision.md's tf32 question, not the default).
#pragma once

#include <math.h>
#include <stdlib.h>
#include <string.h>

static inline bool emu_mma_accum_rz() {
    static const int on = [] {
        const char* e = getenv("EMU_MMA_ACCUM");
        return e && strcmp(e, "rz") == 0 ? 1 : 0;
    }();
    return on != 0;
}

// acc + sum_k a[k] * b[k], as the mode above says.
static inline float emu_mma_dot(float acc, const float* a, const float* b, int n) {
    if (!emu_mma_accum_rz()) {
        for (int k = 0; k < n; ++k) acc = fmaf(a[k], b[k], acc);
        return acc;
    }
    double s = acc;
    for (int k = 0; k < n; ++k) s += (double)a[k] * (double)b[k];
    float f = (float)s;
    if (fabs((double)f) > fabs(s)) f = nextafterf(f, 0.0f);
    return f;
}
