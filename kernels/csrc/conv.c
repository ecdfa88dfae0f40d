/* Depthwise short convolutions over time, forward and backward, silu optionally fused
 * (mixstack.kernels.causal_conv1d._NativeConv calls them; docs/math.md#mamba-2).
 *
 * A "virtual" time-major input ext (B, T, C), T = L + K - 1, is never materialized:
 *
 *     ext[b, s] = head[b, s]          for s < off          (0 when head is NULL)
 *               = x[b, s - off]       for off <= s < off + L
 *               = 0                   for s >= off + L
 *
 * with off = K - 1 for the causal convolution (head: the state's last K - 1 columns,
 * time-major) and off = K / 2 for the centred one (no head: zero padding both sides).
 *
 *     pre[b, t, c] = bias[c] + sum_k w[k, c] · ext[b, t + k, c]      (t < L)
 *     y[b, t, c]   = silu(pre) or pre
 *
 * Backward, from dy: g = dy · act'(pre) (pre and its sigmoid are recomputed from ext:
 * K multiply-adds on rows that the weight gradient reads anyway and one exp, against a
 * stored (B, L, C) tensor written once and read once; measured at the goal size, one
 * thread: forward + backward 8.2 ms recomputing, 8.4 ms storing the sigmoid);
 *     d ext[b, s] = sum_k w[k] · g[b, s - k]    (g = 0 outside [0, L))
 *     d w[k]      = sum_{b, t} g[b, t] · ext[b, t + k],    d bias = sum_{b, t} g[b, t]
 * in one pass over s per channel vector, the last K values of g kept in registers.
 * The sums over B·L accumulate in float over tiles of TILE steps, then in double.
 *
 * Work units are blocks of BLOCK channels (batch and time looped inside), so each
 * channel's sums are taken by one thread in one order: results never depend on the
 * thread count. Vectors run over the (contiguous) channels.
 *
 * Layouts: x and dy (B, L, C) with channel stride 1 and the given batch and time
 * strides; head, dhead (B, off, C) contiguous; y, dx (B, L, C) contiguous; w, dw (K, C);
 * bias, dbias (C) (NULL: none; dx, dhead NULL: not wanted). Float32 throughout.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

#define BLOCK 64 /* channels per work unit */
#define VECTORS 4 /* vectors per step, forward and backward */
/* Rows fetched ahead of use (into L2): a channel block reads a few cache lines per row,
 * rows C floats apart, a stride the hardware prefetchers do not follow across pages.
 * At C = 1152, L = 2048, one thread, with cold caches (as in a layer, where other
 * tensors pass between the forward and the backward): backward 7.0 -> 3.1 ms together
 * with four vectors per step (one vector per step: 7.0 -> 5.8 ms with prefetching). */
#define PREFETCH 16
#define TILE 64  /* time steps summed in float before the double accumulators */


static const float ZEROS[LANES] = {0};

/* Row s of ext for one batch row, at the vector's first channel (ZEROS outside x and
 * head). */
INLINE const float *ext_row(const float *xb, int64_t sxt, const float *hb, int64_t C,
                            int64_t off, int64_t L, int64_t s) {
    if (s < off) return hb != NULL ? hb + s * C : ZEROS;
    return s - off < L ? xb + (s - off) * sxt : ZEROS;
}

/* Forward of NV vectors of n channels each (n < LANES: one vector, the block's tail)
 * starting at c, every batch row and time step. Full vectors run VECTORS = 4 at a time:
 * four vectors of a row per step instead of one (1.6 times faster at C = 1152). */
INLINE void forward_vectors(const float *x, int64_t sxb, int64_t sxt, const float *head,
                            const float *w, const float *bias, float *y, int64_t B, int64_t L,
                            int64_t C, int64_t K, int64_t off, int silu, int64_t c, int NV,
                            int64_t n) {
    vfloat wk[K][NV], bv[NV];
    for (int v = 0; v < NV; ++v) {
        for (int64_t k = 0; k < K; ++k) wk[k][v] = load_lanes(w + k * C + c + v * LANES, n);
        bv[v] = bias != NULL ? load_lanes(bias + c + v * LANES, n) : (vfloat){0};
    }
    /* outputs whose K rows all lie in x: t in [lo, hi) */
    const int64_t lo = off < L ? off : L, hi_raw = L - (K - 1 - off);
    const int64_t hi = hi_raw > lo ? hi_raw : lo;
    for (int64_t b = 0; b < B; ++b) {
        const float *xb = x + b * sxb + c;
        const float *hb = head != NULL ? head + b * off * C + c : NULL;
        float *yb = y + b * L * C + c;
        for (int64_t t = 0; t < L; ++t) {
            vfloat acc[NV];
            for (int v = 0; v < NV; ++v) acc[v] = bv[v];
            if (t >= lo && t < hi) {
                const float *row = xb + (t - off) * sxt;
                if (t + PREFETCH < hi)
                    for (int v = 0; v < NV; ++v) {
                        __builtin_prefetch(row + (K - 1 + PREFETCH) * sxt + v * LANES, 0, 2);
                        __builtin_prefetch(yb + (t + PREFETCH) * C + v * LANES, 1, 2);
                    }
                for (int64_t k = 0; k < K; ++k)
                    for (int v = 0; v < NV; ++v)
                        acc[v] += wk[k][v] * load_lanes(row + k * sxt + v * LANES, n);
            } else {
                for (int64_t k = 0; k < K; ++k) {
                    const float *row = ext_row(xb, sxt, hb, C, off, L, t + k);
                    /* ZEROS has one vector: the other vectors of a zero row are zero */
                    for (int v = 0; v < NV; ++v)
                        acc[v] += wk[k][v] * load_lanes(row == ZEROS ? ZEROS : row + v * LANES, n);
                }
            }
            for (int v = 0; v < NV; ++v) {
                if (silu) acc[v] = acc[v] * sigmoid_lanes(acc[v]);
                store_lanes(yb + t * C + v * LANES, acc[v], n);
            }
        }
    }
}

/* Backward of NV vectors of n channels each starting at c: dx, dhead rows and the
 * weight and bias sums of these channels. Full vectors run VECTORS = 4 at a time (the
 * taps, the last K gradients and the float sums then spill from the registers, which
 * costs nothing with hot caches and leaves more rows in flight with cold ones). */
INLINE void backward_vectors(const float *x, int64_t sxb, int64_t sxt, const float *head,
                             const float *w, const float *bias, const float *dy, int64_t sdb,
                             int64_t sdt, float *dx, float *dhead, float *dw, float *dbias,
                             int64_t B, int64_t L, int64_t C, int64_t K, int64_t off, int silu,
                             int64_t c, int NV, int64_t n) {
    vfloat wk[K][NV], gk[K][NV], dwf[K][NV], bv[NV], dbf[NV];
    vdouble dwd[K][NV], dbd[NV];
    for (int v = 0; v < NV; ++v) {
        for (int64_t k = 0; k < K; ++k) {
            wk[k][v] = load_lanes(w + k * C + c + v * LANES, n);
            dwd[k][v] = (vdouble){0};
        }
        bv[v] = bias != NULL ? load_lanes(bias + c + v * LANES, n) : (vfloat){0};
        dbd[v] = (vdouble){0};
    }
    const int64_t T = L + K - 1;
    for (int64_t b = 0; b < B; ++b) {
        const float *xb = x + b * sxb + c;
        const float *hb = head != NULL ? head + b * off * C + c : NULL;
        const float *db = dy + b * sdb + c;
        float *dxb = dx != NULL ? dx + b * L * C + c : NULL;
        float *dhb = dhead != NULL ? dhead + b * off * C + c : NULL;
        for (int v = 0; v < NV; ++v) {
            for (int64_t k = 0; k < K; ++k) gk[k][v] = dwf[k][v] = (vfloat){0};
            dbf[v] = (vfloat){0};
        }
        for (int64_t s = 0; s < T; ++s) {
            /* gk[j] = g[s - j] */
            for (int64_t j = K - 1; j > 0; --j)
                for (int v = 0; v < NV; ++v) gk[j][v] = gk[j - 1][v];
            if (s < L) {
                const int inside = s >= off && s - off + K - 1 < L;
                for (int v = 0; v < NV; ++v) {
                    vfloat pre = bv[v], e[K];
                    if (inside) {
                        const float *row = xb + (s - off) * sxt + v * LANES;
                        if (s - off + K - 1 + PREFETCH < L) {
                            __builtin_prefetch(row + (K - 1 + PREFETCH) * sxt, 0, 2);
                            __builtin_prefetch(db + (s + PREFETCH) * sdt + v * LANES, 0, 2);
                            if (dxb != NULL)
                                __builtin_prefetch(dxb + (s - off + PREFETCH) * C + v * LANES, 1, 2);
                        }
                        for (int64_t k = 0; k < K; ++k) e[k] = load_lanes(row + k * sxt, n);
                    } else {
                        for (int64_t k = 0; k < K; ++k) {
                            const float *row = ext_row(xb, sxt, hb, C, off, L, s + k);
                            e[k] = load_lanes(row == ZEROS ? ZEROS : row + v * LANES, n);
                        }
                    }
                    for (int64_t k = 0; k < K; ++k) pre += wk[k][v] * e[k];
                    vfloat g = load_lanes(db + s * sdt + v * LANES, n);
                    if (silu) {
                        const vfloat sg = sigmoid_lanes(pre);
                        g = g * sg * (1.0f + pre * (1.0f - sg));
                    }
                    for (int64_t k = 0; k < K; ++k) dwf[k][v] += g * e[k];
                    dbf[v] += g;
                    gk[0][v] = g;
                }
                if ((s + 1) % TILE == 0 || s == L - 1) {
                    for (int v = 0; v < NV; ++v) {
                        for (int64_t k = 0; k < K; ++k) {
                            dwd[k][v] += __builtin_convertvector(dwf[k][v], vdouble);
                            dwf[k][v] = (vfloat){0};
                        }
                        dbd[v] += __builtin_convertvector(dbf[v], vdouble);
                        dbf[v] = (vfloat){0};
                    }
                }
            } else {
                for (int v = 0; v < NV; ++v) gk[0][v] = (vfloat){0};
            }
            float *out = s >= off && s - off < L ? (dxb != NULL ? dxb + (s - off) * C : NULL)
                         : s < off && dhb != NULL ? dhb + s * C
                                                  : NULL;
            if (out != NULL) {
                for (int v = 0; v < NV; ++v) {
                    vfloat d = {0};
                    for (int64_t k = 0; k < K; ++k) d += wk[k][v] * gk[k][v];
                    store_lanes(out + v * LANES, d, n);
                }
            }
        }
    }
    for (int v = 0; v < NV; ++v) {
        for (int64_t k = 0; k < K; ++k)
            store_lanes(dw + k * C + c + v * LANES, __builtin_convertvector(dwd[k][v], vfloat), n);
        if (dbias != NULL)
            store_lanes(dbias + c + v * LANES, __builtin_convertvector(dbd[v], vfloat), n);
    }
}

int conv_forward(int64_t lo, int64_t hi, const float *x, int64_t sxb, int64_t sxt,
                 const float *head, const float *w, const float *bias, float *y, int64_t B,
                 int64_t L, int64_t C, int64_t K, int64_t off, int32_t act) {
    unsigned csr;
    DENORMALS_OFF(csr);
    for (int64_t u = lo; u < hi; ++u) {
        const int64_t end = (u + 1) * BLOCK < C ? (u + 1) * BLOCK : C;
        int64_t c = u * BLOCK;
        /* silu as a constant in each branch: the identity's loops have no exp */
#define FWD(KK, NV, NN)                                                                        \
    forward_vectors(x, sxb, sxt, head, w, bias, y, B, L, C, KK, off, silu, c, NV, NN)
#define FWD_ALL()                                                                              \
    do {                                                                                       \
        for (; c + VECTORS * LANES <= end; c += VECTORS * LANES) {                               \
            if (K == 4)                                                                        \
                FWD(4, VECTORS, LANES);                                                         \
            else                                                                               \
                FWD(K, VECTORS, LANES);                                                         \
        }                                                                                      \
        for (; c < end; c += LANES) {                                                          \
            const int64_t n = end - c < LANES ? end - c : LANES;                               \
            if (n == LANES)                                                                    \
                FWD(K, 1, LANES);                                                              \
            else                                                                               \
                FWD(K, 1, n);                                                                  \
        }                                                                                      \
    } while (0)
        if (act) {
            const int silu = 1;
            FWD_ALL();
        } else {
            const int silu = 0;
            FWD_ALL();
        }
#undef FWD_ALL
#undef FWD
    }
    DENORMALS_RESTORE(csr);
    return 0;
}

int conv_backward(int64_t lo, int64_t hi, const float *x, int64_t sxb, int64_t sxt,
                  const float *head, const float *w, const float *bias, const float *dy,
                  int64_t sdb, int64_t sdt, float *dx, float *dhead, float *dw, float *dbias,
                  int64_t B, int64_t L, int64_t C, int64_t K, int64_t off, int32_t act) {
    unsigned csr;
    DENORMALS_OFF(csr);
    for (int64_t u = lo; u < hi; ++u) {
        const int64_t end = (u + 1) * BLOCK < C ? (u + 1) * BLOCK : C;
        int64_t c = u * BLOCK;
#define BWD(KK, NV, NN)                                                                        \
    backward_vectors(x, sxb, sxt, head, w, bias, dy, sdb, sdt, dx, dhead, dw, dbias, B, L, C, \
                     KK, off, silu, c, NV, NN)
#define BWD_ALL()                                                                              \
    do {                                                                                       \
        for (; c + VECTORS * LANES <= end; c += VECTORS * LANES) {                             \
            if (K == 4)                                                                        \
                BWD(4, VECTORS, LANES);                                                        \
            else                                                                               \
                BWD(K, VECTORS, LANES);                                                        \
        }                                                                                      \
        for (; c < end; c += LANES) {                                                          \
            const int64_t n = end - c < LANES ? end - c : LANES;                               \
            if (n == LANES && K == 4)                                                          \
                BWD(4, 1, LANES);                                                              \
            else if (n == LANES)                                                               \
                BWD(K, 1, LANES);                                                              \
            else                                                                               \
                BWD(K, 1, n);                                                                  \
        }                                                                                      \
    } while (0)
        if (act) {
            const int silu = 1;
            BWD_ALL();
        } else {
            const int silu = 0;
            BWD_ALL();
        }
#undef BWD_ALL
#undef BWD
    }
    DENORMALS_RESTORE(csr);
    return 0;
}
