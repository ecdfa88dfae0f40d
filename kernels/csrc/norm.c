/* Group-wise gated RMSNorm on the CPU, forward and backward fused
 * (mixstack.kernels.gated_norm; docs/math.md#mamba-2 step 6).
 *
 * Per row of width D, groups of S channels, gate silu(z), weight w:
 *   before = 0 (Mamba-2):  h = y ⊙ silu(z),  out = h · rstd_g ⊙ w
 *   before = 1 (Hydra):    h = y,            out = h · rstd_g ⊙ w ⊙ silu(z)
 *   rstd_g = 1 / sqrt(mean_g(h²) + eps); z may be NULL (a plain grouped RMSNorm).
 * Backward with n = h · rstd_g, g_out = dout (⊙ silu(z) when before):
 *   dw += g_out ⊙ n;  dn = g_out ⊙ w;  dh = rstd_g (dn − n mean_g(dn ⊙ n));
 *   before = 0: dy = dh ⊙ silu(z), d silu(z) = dh ⊙ y;  before = 1: dy = dh,
 *   d silu(z) = dout ⊙ n ⊙ w;  dz = d silu(z) · σ(z) (1 + z (1 − σ(z))).
 * The forward keeps rstd (rows, G) for the backward, which rebuilds the rest. Work
 * units are blocks of `block` rows; each unit writes its own partial dw (D), which the
 * caller sums, so results never depend on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* sig = σ(z), gate = z σ(z) for n values (sig is also the scratch of exp(-z)). */
static void silu_row(float *restrict gate, float *restrict sig, const float *restrict z,
                     int64_t n) {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) sig[d] = -z[d];
    exp_inplace(sig, n);
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) {
        sig[d] = 1.0f / (1.0f + sig[d]);
        gate[d] = z[d] * sig[d];
    }
}

/* Σ a[d] b[d] over n values, one partial sum per vector lane (then the lanes summed), so
 * the rounding error grows with n / LANES, not n. */
static float dot(const float *a, const float *b, int64_t n) {
    vfloat acc = {0};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES) {
        vfloat x, v;
        memcpy(&x, a + d, sizeof x);
        memcpy(&v, b + d, sizeof v);
        acc += x * v;
    }
    if (d < n) acc += load_lanes(a + d, n - d) * load_lanes(b + d, n - d);
    float total = 0.0f;
    for (int k = 0; k < LANES; ++k) total += acc[k];
    return total;
}

int gated_norm_forward(int64_t lo, int64_t hi, const float *y, const float *z, const float *w,
                       float *out, float *rstd, int64_t block, int64_t rows, int64_t D,
                       int64_t S, float eps, int64_t before) {
    Arena arena;
    if (arena_open(&arena, 3 * D + 48)) return 1;
    float *h = take(&arena, D), *gate = take(&arena, D), *sig = take(&arena, D);
    const int64_t G = D / S;
    unsigned csr;
    DENORMALS_OFF(csr);
    for (int64_t unit = lo; unit < hi; ++unit) {
        for (int64_t row = unit * block; row < min64(rows, (unit + 1) * block); ++row) {
            const float *y_r = y + row * D;
            float *o = out + row * D;
            if (z != NULL) silu_row(gate, sig, z + row * D, D);
            if (z != NULL && !before) {
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) h[d] = y_r[d] * gate[d];
            } else {
                memcpy(h, y_r, (size_t)D * sizeof(float));
            }
            for (int64_t g = 0; g < G; ++g) {
                const float r = 1.0f / sqrtf(dot(h + g * S, h + g * S, S) / (float)S + eps);
                rstd[row * G + g] = r;
#pragma omp simd
                for (int64_t d = g * S; d < (g + 1) * S; ++d) o[d] = h[d] * r * w[d];
            }
            if (z != NULL && before) {
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) o[d] *= gate[d];
            }
        }
    }
    DENORMALS_RESTORE(csr);
    free(arena.base);
    return 0;
}

int gated_norm_backward(int64_t lo, int64_t hi, const float *y, const float *z, const float *w,
                        const float *rstd, const float *dout, float *dy, float *dz,
                        float *dw_part, int64_t block, int64_t rows, int64_t D, int64_t S,
                        int64_t before) {
    Arena arena;
    if (arena_open(&arena, 5 * D + 80)) return 1;
    float *n = take(&arena, D), *gate = take(&arena, D), *sig = take(&arena, D);
    float *dn = take(&arena, D), *dgate = take(&arena, D);
    const int64_t G = D / S;
    unsigned csr;
    DENORMALS_OFF(csr);
    for (int64_t unit = lo; unit < hi; ++unit) {
        float *dw = dw_part + unit * D;
        memset(dw, 0, (size_t)D * sizeof(float));
        for (int64_t row = unit * block; row < min64(rows, (unit + 1) * block); ++row) {
            const float *y_r = y + row * D, *g = dout + row * D, *r = rstd + row * G;
            float *dy_r = dy + row * D;
            if (z != NULL) silu_row(gate, sig, z + row * D, D);
            const int gated_in = z != NULL && !before, gated_out = z != NULL && before;
            for (int64_t k = 0; k < G; ++k)
#pragma omp simd
                for (int64_t d = k * S; d < (k + 1) * S; ++d)
                    n[d] = (gated_in ? y_r[d] * gate[d] : y_r[d]) * r[k];
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) {
                const float g_out = gated_out ? g[d] * gate[d] : g[d];
                dw[d] += g_out * n[d];
                dn[d] = g_out * w[d];
                if (gated_out) dgate[d] = g[d] * n[d] * w[d];
            }
            for (int64_t k = 0; k < G; ++k) {
                const float proj = dot(dn + k * S, n + k * S, S) / (float)S;
#pragma omp simd
                for (int64_t d = k * S; d < (k + 1) * S; ++d) {
                    const float dh = r[k] * (dn[d] - n[d] * proj);
                    dy_r[d] = gated_in ? dh * gate[d] : dh;
                    if (gated_in) dgate[d] = dh * y_r[d];
                }
            }
            if (z != NULL) {
                const float *z_r = z + row * D;
                float *dz_r = dz + row * D;
#pragma omp simd
                for (int64_t d = 0; d < D; ++d)
                    dz_r[d] = dgate[d] * sig[d] * (1.0f + z_r[d] * (1.0f - sig[d]));
            }
        }
    }
    DENORMALS_RESTORE(csr);
    free(arena.base);
    return 0;
}
