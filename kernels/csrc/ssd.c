/* The diagonal blocks of Mamba-2's chunked SSD scan, forward and backward, fused
 * (docs/math.md#mamba-2, step 1; mixstack.kernels.ssd._NativeDiagonal calls them).
 *
 * For one chunk of Q steps, one head with log-decays a (Q) and inputs x (Q, P) (x·Δ),
 * and the group's scores CB[i, s] = C_i · B_s (Q, Q):
 *
 *     seg[i, s] = sum_{k = s+1..i} a_k            (s <= i; built row by row, a_i added
 *                                                   to row i-1: torch's mask-then-cumsum)
 *     L[i, s]   = exp(seg[i, s])                   (0 for s > i and across documents)
 *     S[i, s]   = CB[i, s] · L[i, s]
 *     y[i]      = sum_{s <= i} S[i, s] x[s]
 *
 * Backward, from dy (Q, P):  dS = dy xᵀ;  dx[s] += S[i, s] dy[i];  dCB[i, s] += dS·L
 * (summed over the group's heads);  with dseg = dS·S,
 * da[k] = sum_{i >= k} sum_{s < k} dseg[i, s]   (a prefix sum along each row, as the
 * torch path's rectangle sums: no differences of large sums).
 *
 * Nothing (Q, Q) per head is ever stored: each row of L and S is rebuilt in a scratch
 * row, forward and backward. Work units are (batch, chunk, group) triples; each unit is
 * computed by one thread in one order, so results do not depend on the thread count.
 *
 * Layouts (all contiguous, float32): cb, dcb (U, Q, Q) with U = B·c·G units;
 * a, da (U, R, Q); x, y, dy, dx (B·c, Q, G, R, P), time-major as the caller holds them;
 * run (B·c, Q) int64 document ids or NULL.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE__)
#include <xmmintrin.h>
/* Flush subnormals to zero (FTZ | DAZ) inside the kernels: decays below 1e-38 would
 * otherwise run through the slow subnormal path of the FPU for no gain. */
#define DENORMALS_OFF(saved) ((saved) = _mm_getcsr(), _mm_setcsr((saved) | 0x8040))
#define DENORMALS_RESTORE(saved) _mm_setcsr(saved)
#else
#define DENORMALS_OFF(saved) ((saved) = 0)
#define DENORMALS_RESTORE(saved) ((void)(saved))
#endif

/* Sixteen floats as one GCC/clang vector (AVX-512 registers here; the compiler splits
 * it into narrower ones elsewhere) and its integer twin for the bit work of exp. */
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
#define LANES 16

static inline vfloat select(vint mask, vfloat yes, vfloat no) {
    return (vfloat)(((vint)yes & mask) | ((vint)no & ~mask));
}

/* exp of 16 lanes: exp(x) = 2^k · exp(r), k = round(x / ln 2) (by adding and removing
 * 1.5·2^23), r = x - k·ln 2 in two parts (Cody and Waite), exp(r) by Cephes' degree-6
 * minimax polynomial for expf (about 1 ulp). Below -87 the result is 0 (the smallest
 * normal float is exp(-87.3)), above 88 infinity; NaN stays NaN. */
static inline vfloat exp_lanes(vfloat x) {
    const vfloat lo = x - x - 87.0f, hi = x - x + 88.0f, zero = x - x;
    vfloat xc = select(x < lo, lo, x);
    xc = select(xc > hi, hi, xc);
    const vfloat k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    vfloat r = xc - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    vfloat p = zero + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const vint bits = (__builtin_convertvector(k, vint) + 127) << 23;
    vfloat e = p * (vfloat)bits;
    e = select(x < lo, zero, e);
    e = select(x > hi, zero + INFINITY, e);
    return select(x != x, x, e);
}

/* v[i] = exp(v[i]) for i < n, sixteen at a time (the tail through a padded vector). */
static inline void exp_inplace(float *restrict v, int64_t n) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        vfloat x;
        memcpy(&x, v + i, sizeof x);
        x = exp_lanes(x);
        memcpy(v + i, &x, sizeof x);
    }
    if (i < n) {
        vfloat x = {0};
        memcpy(&x, v + i, (size_t)(n - i) * sizeof(float));
        x = exp_lanes(x);
        memcpy(v + i, &x, (size_t)(n - i) * sizeof(float));
    }
}

/* Row i of L and S for one head: seg (Q) holds row i-1 of the segment sums on entry and
 * row i on return; L and S receive the decays and scores of s = 0..i. */
static inline void decay_row(float *restrict seg, float *restrict L, float *restrict S,
                             const float *restrict cb_row, const int64_t *run, float a_i,
                             int64_t i) {
#pragma omp simd
    for (int64_t s = 0; s < i; ++s) seg[s] += a_i;
    seg[i] = 0.0f;
    memcpy(L, seg, (size_t)(i + 1) * sizeof(float));
    exp_inplace(L, i + 1);
    if (run != NULL) {
        const int64_t doc = run[i];
        for (int64_t s = 0; s <= i; ++s) L[s] = run[s] == doc ? L[s] : 0.0f;
    }
#pragma omp simd
    for (int64_t s = 0; s <= i; ++s) S[s] = cb_row[s] * L[s];
}

int ssd_diag_forward(int64_t lo, int64_t hi, const float *cb, const float *a, const float *x,
                     const int64_t *run, float *y, int64_t G, int64_t R, int64_t Q, int64_t P) {
    float *buf = malloc((size_t)(3 * Q) * sizeof(float));
    if (buf == NULL) return 1;
    float *seg = buf, *L = buf + Q, *S = buf + 2 * Q;
    unsigned csr;
    DENORMALS_OFF(csr);
    const int64_t step = G * R * P; /* between consecutive time steps of one head */
    for (int64_t u = lo; u < hi; ++u) {
        const int64_t bc = u / G, g = u % G;
        const float *cb_u = cb + u * Q * Q;
        const int64_t *run_u = run != NULL ? run + bc * Q : NULL;
        for (int64_t r = 0; r < R; ++r) {
            const float *a_h = a + (u * R + r) * Q;
            const int64_t head = bc * Q * step + (g * R + r) * P;
            const float *x_h = x + head;
            float *y_h = y + head;
            memset(seg, 0, (size_t)Q * sizeof(float));
            for (int64_t i = 0; i < Q; ++i) {
                decay_row(seg, L, S, cb_u + i * Q, run_u, a_h[i], i);
                float *restrict y_i = y_h + i * step;
                memset(y_i, 0, (size_t)P * sizeof(float));
                for (int64_t s = 0; s <= i; ++s) {
                    const float w = S[s];
                    const float *restrict x_s = x_h + s * step;
#pragma omp simd
                    for (int64_t p = 0; p < P; ++p) y_i[p] += w * x_s[p];
                }
            }
        }
    }
    DENORMALS_RESTORE(csr);
    free(buf);
    return 0;
}

int ssd_diag_backward(int64_t lo, int64_t hi, const float *cb, const float *a, const float *x,
                      const int64_t *run, const float *dy, float *dcb, float *da, float *dx,
                      int64_t G, int64_t R, int64_t Q, int64_t P) {
    float *buf = malloc((size_t)(4 * Q + P * Q) * sizeof(float));
    if (buf == NULL) return 1;
    float *seg = buf, *L = buf + Q, *S = buf + 2 * Q, *dS = buf + 3 * Q, *xT = buf + 4 * Q;
    unsigned csr;
    DENORMALS_OFF(csr);
    const int64_t step = G * R * P;
    for (int64_t u = lo; u < hi; ++u) {
        const int64_t bc = u / G, g = u % G;
        const float *cb_u = cb + u * Q * Q;
        float *dcb_u = dcb + u * Q * Q;
        const int64_t *run_u = run != NULL ? run + bc * Q : NULL;
        memset(dcb_u, 0, (size_t)(Q * Q) * sizeof(float));
        for (int64_t r = 0; r < R; ++r) {
            const float *a_h = a + (u * R + r) * Q;
            float *da_h = da + (u * R + r) * Q;
            const int64_t head = bc * Q * step + (g * R + r) * P;
            const float *x_h = x + head, *dy_h = dy + head;
            float *dx_h = dx + head;
            memset(da_h, 0, (size_t)Q * sizeof(float));
            for (int64_t s = 0; s < Q; ++s) {
                memset(dx_h + s * step, 0, (size_t)P * sizeof(float));
                for (int64_t p = 0; p < P; ++p) xT[p * Q + s] = x_h[s * step + p];
            }
            memset(seg, 0, (size_t)Q * sizeof(float));
            for (int64_t i = 0; i < Q; ++i) {
                decay_row(seg, L, S, cb_u + i * Q, run_u, a_h[i], i);
                const float *restrict dy_i = dy_h + i * step;
                /* dS[s] = dy_i · x_s, as P passes over the rows of xᵀ (vector over s) */
                memset(dS, 0, (size_t)(i + 1) * sizeof(float));
                for (int64_t p = 0; p < P; ++p) {
                    const float d = dy_i[p];
                    const float *restrict xT_p = xT + p * Q;
#pragma omp simd
                    for (int64_t s = 0; s <= i; ++s) dS[s] += d * xT_p[s];
                }
                for (int64_t s = 0; s <= i; ++s) {
                    const float w = S[s];
                    float *restrict dx_s = dx_h + s * step;
#pragma omp simd
                    for (int64_t p = 0; p < P; ++p) dx_s[p] += w * dy_i[p];
                }
                float *restrict dcb_i = dcb_u + i * Q;
#pragma omp simd
                for (int64_t s = 0; s <= i; ++s) {
                    dcb_i[s] += dS[s] * L[s];
                    dS[s] *= S[s]; /* now the gradient of seg[i, s] */
                }
                float rect = 0.0f; /* sum_{s' <= s} dseg[i, s'], added to da[s + 1] */
                for (int64_t s = 0; s < i; ++s) {
                    rect += dS[s];
                    da_h[s + 1] += rect;
                }
            }
        }
    }
    DENORMALS_RESTORE(csr);
    free(buf);
    return 0;
}
