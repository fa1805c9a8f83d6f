// AdamW's update in f32 (torch.optim.AdamW: decoupled weight decay, then the bias-corrected
// step), in place, as two elementwise passes over a parameter: each moment (`adamw_ema`), then
// the parameter (`adamw_param`). Each operation is rounded on its own (`__fmul_rn` and kin: nvcc
// would otherwise contract `a * b + c` into one fused multiply-add), in the order of
// preftune-kernels' `adamw` module, so a GPU step gives the CPU's bits.
#pragma once
#include "common.cuh"

// a = beta a + (1 - beta) g, or with `square`, beta a + (1 - beta) g g.
extern "C" __global__ void adamw_ema_f32(float* a, const float* g, size_t n, float beta,
                                         int square) {
    const float c = __fsub_rn(1.0f, beta);
    FOR_EACH(i, n) {
        float t = __fmul_rn(c, g[i]);
        if (square) t = __fmul_rn(t, g[i]);
        a[i] = __fadd_rn(__fmul_rn(beta, a[i]), t);
    }
}

// p = p decay - step_size m / (sqrt(v) / bc2_sqrt + eps)
extern "C" __global__ void adamw_param_f32(float* p, const float* m, const float* v, size_t n,
                                           float bc2_sqrt, float eps, float step_size,
                                           float decay) {
    FOR_EACH(i, n) {
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v[i]), bc2_sqrt), eps);
        p[i] = __fsub_rn(__fmul_rn(p[i], decay), __fdiv_rn(__fmul_rn(step_size, m[i]), denom));
    }
}
