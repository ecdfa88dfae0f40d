/* Mamba-1's selective scan, forward and backward (mixstack.kernels.selective_scan.
 * _NativeSelective calls them; docs/math.md#mamba-1). Per channel d and state n, with g
 * the group of channel d:
 *
 *     a_t[d, n] = exp(Δ_t[d] A[d, n])
 *     h_t[d, n] = a_t[d, n] · h_{t-1}[d, n] + Δ_t[d] u_t[d] · B_t[g, n]
 *     y_t[d]    = (Σ_n C_t[g, n] · h_t[d, n] + D[d] u_t[d]) · silu(z_t[d])
 *
 * (D and z optional; the backward recomputes the pre-gate sum from the states and
 * turns dy into d pre = dy · silu(z) before the scan's terms below, with dz, dD and
 * the skip's share of du on the side.)
 *
 * Backward, from dy and the final state's gradient, G_t = ∂loss/∂h_t (all paths):
 *
 *     G_t        = dy_t[d] C_t[n] + a_{t+1} G_{t+1}      (G_{L-1} starts from dfinal)
 *     dC_t[g, n] = Σ_{d in g} dy_t[d] h_t[d, n]
 *     dΔ_t[d]    = Σ_n G_t (A a_t h_{t-1} + u_t B_t[n])
 *     dA[d, n]   = Σ_t G_t Δ_t a_t h_{t-1}
 *     du_t[d]    = Σ_n G_t Δ_t B_t[n]
 *     dB_t[g, n] = Σ_{d in g} G_t Δ_t u_t
 *     dh_{-1}    = a_0 G_0
 *
 * Memory: the forward stores the state entering every segment of K steps (checkpoints,
 * (B, ceil(L/K), N, Dn)); the backward walks the segments from the last, recomputes a
 * segment's states and decays from its checkpoint (2·K·N vectors of scratch), then runs
 * the segment in reverse.
 *
 * Work units: (batch row b, group g, block of channels inside the group): one vector of
 * LANES channels in the forward, up to VECS vectors (BLOCK channels) in the backward. A
 * unit owns its channels of row b, so u, Δ, y, du, dΔ, h0, final and dh0 rows are
 * written by one thread. Sums over channels (dB, dC: the block's vectors added, then one
 * lane sum) and over batch rows (dA) go to per-unit partial buffers that torch sums in a
 * fixed order: results never depend on the thread count. Vectors run over channels
 * (contiguous in every (.., Dn) tensor); B_t and C_t are scalars broadcast over a
 * vector. A tail vector (group width not a multiple of LANES) loads zeros in its spare
 * lanes: Δ = u = 0 there, so they stay 0 and add nothing to the sums.
 *
 * Layouts (float32, contiguous): u, delta, z, y, dy, du, ddelta, dz (B, L, Dn); D (Dn)
 * and dD partial (B, Dn) (z, D NULL: none; then dz, dD are not written); At (N, Dn)
 * (A transposed); Bm, Cm (B, L, G, N); h0, final, dfinal, dh0 (B, N, Dn) (NULL: zeros /
 * not wanted); ck (B, S, N, Dn), S = ceil(L / K) (NULL in the forward: not stored);
 * dA partial (B, N, Dn); dB, dC partials (B, L, G, J, N), J = ceil(Dg / BLOCK).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

#define VECS 4               /* vectors per backward work unit */
#define BLOCK (VECS * LANES) /* channels per backward work unit */

/* Sum of a vector's lanes, as a tree (halves added, then quarters, ...): log2(LANES)
 * dependent steps instead of LANES; with AVX-512 the compiler's own reduction, the
 * same tree. */

INLINE float hsum(vfloat v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float a[LANES];
    memcpy(a, &v, sizeof a);
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int i = 0; i < w; ++i) a[i] += a[i + w];
    return a[0];
#endif
}

typedef struct {
    int64_t B, L, Dn, N, G, K;
} Dims;

/* The unit's batch row, group, first channel and channel count. */
INLINE void unit_place(const Dims *s, int64_t unit, int64_t *b, int64_t *g, int64_t *j,
                       int64_t *c0, int64_t *nl) {
    const int64_t Dg = s->Dn / s->G, J = (Dg + LANES - 1) / LANES;
    *j = unit % J;
    *g = (unit / J) % s->G;
    *b = unit / (J * s->G);
    *c0 = *g * Dg + *j * LANES;
    *nl = min64(LANES, Dg - *j * LANES);
}

/* Forward of one unit; NN the state size (a constant where specialised). */
INLINE void forward_unit(const Dims *s, int64_t unit, int64_t NN, const float *u,
                         const float *delta, const float *At, const float *Bm,
                         const float *Cm, const float *h0, const float *D, const float *z,
                         float *y, float *final, float *ck) {
    int64_t b, g, j, c0, nl;
    unit_place(s, unit, &b, &g, &j, &c0, &nl);
    const int64_t L = s->L, Dn = s->Dn, G = s->G, K = s->K;
    vfloat A[NN], h[NN];
    const vfloat Dv = D != NULL ? load_lanes(D + c0, nl) : (vfloat){0};
    for (int64_t n = 0; n < NN; ++n) {
        A[n] = load_lanes(At + n * Dn + c0, nl);
        h[n] = h0 != NULL ? load_lanes(h0 + (b * NN + n) * Dn + c0, nl) : (vfloat){0};
    }
    const int64_t S = (L + K - 1) / K;
    for (int64_t t = 0; t < L; ++t) {
        if (ck != NULL && t % K == 0)
            for (int64_t n = 0; n < NN; ++n)
                store_lanes(ck + ((b * S + t / K) * NN + n) * Dn + c0, h[n], nl);
        const int64_t row = (b * L + t) * Dn + c0;
        const vfloat dt = load_lanes(delta + row, nl), ut = load_lanes(u + row, nl);
        const vfloat du = dt * ut;
        const float *Bt = Bm + ((b * L + t) * G + g) * NN;
        const float *Ct = Cm + ((b * L + t) * G + g) * NN;
        vfloat acc = Dv * ut; /* the skip (0 without D) */
        for (int64_t n = 0; n < NN; ++n) {
            h[n] = exp_lanes(dt * A[n]) * h[n] + du * Bt[n];
            acc += Ct[n] * h[n];
        }
        if (z != NULL) {
            const vfloat zt = load_lanes(z + row, nl);
            acc = acc * zt * sigmoid_lanes(zt);
        }
        store_lanes(y + row, acc, nl);
    }
    if (final != NULL)
        for (int64_t n = 0; n < NN; ++n) store_lanes(final + (b * NN + n) * Dn + c0, h[n], nl);
}

int selective_forward(int64_t lo, int64_t hi, const float *u, const float *delta,
                      const float *At, const float *Bm, const float *Cm, const float *h0,
                      const float *D, const float *z, float *y, float *final, float *ck, int64_t B, int64_t L, int64_t Dn,
                      int64_t N, int64_t G, int64_t K) {
    unsigned csr;
    DENORMALS_OFF(csr);
    const Dims s = {B, L, Dn, N, G, K};
    for (int64_t unit = lo; unit < hi; ++unit) {
        if (N == 16)
            forward_unit(&s, unit, 16, u, delta, At, Bm, Cm, h0, D, z, y, final, ck);
        else
            forward_unit(&s, unit, N, u, delta, At, Bm, Cm, h0, D, z, y, final, ck);
    }
    DENORMALS_RESTORE(csr);
    return 0;
}

/* Backward of one unit: NV <= VECS vectors of channels from c0 (nl[v] channels each),
 * NN the state size (constants where specialised); hs, as: scratch of K·NN·NV vectors
 * each (a segment's states and decays). Every channel's terms of the dB and dC sums are
 * added over the NV vectors first, then over the lanes: one lane sum per (step, state)
 * for the whole block. */
INLINE void backward_unit(const Dims *s, int64_t b, int64_t g, int64_t j, int64_t c0,
                          const int64_t *nl, int NV, int64_t NN, const float *u,
                          const float *delta, const float *At, const float *Bm,
                          const float *Cm, const float *D, const float *z, const float *ck,
                          const float *dy, const float *dfinal, float *du_out,
                          float *ddelta, float *dA, float *dBp, float *dCp, float *dh0,
                          float *dD, float *dz, vfloat *hs, vfloat *as) {
    const int64_t L = s->L, Dn = s->Dn, G = s->G, K = s->K;
    const int64_t J = (Dn / G + BLOCK - 1) / BLOCK, S = (L + K - 1) / K;
    const int64_t W = NN * NV; /* vectors per step: state n of vector v at n * NV + v */
    vfloat A[NN * NV], gr[NN * NV], dAv[NN * NV], start[NN * NV], Dv[NV], dDv[NV];
    for (int v = 0; v < NV; ++v) {
        Dv[v] = D != NULL ? load_lanes(D + c0 + v * LANES, nl[v]) : (vfloat){0};
        dDv[v] = (vfloat){0};
    }
    for (int64_t n = 0; n < NN; ++n)
        for (int v = 0; v < NV; ++v) {
            const int64_t c = c0 + v * LANES, k = n * NV + v;
            A[k] = load_lanes(At + n * Dn + c, nl[v]);
            gr[k] = dfinal != NULL ? load_lanes(dfinal + (b * NN + n) * Dn + c, nl[v])
                                   : (vfloat){0};
            dAv[k] = (vfloat){0};
        }
    for (int64_t seg = S - 1; seg >= 0; --seg) {
        const int64_t t0 = seg * K, t1 = min64(L, t0 + K);
        /* recompute the segment's states from its checkpoint */
        for (int64_t n = 0; n < NN; ++n)
            for (int v = 0; v < NV; ++v)
                start[n * NV + v] =
                    load_lanes(ck + ((b * S + seg) * NN + n) * Dn + c0 + v * LANES, nl[v]);
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t row = (b * L + t) * Dn + c0;
            vfloat dt[NV], du[NV];
            for (int v = 0; v < NV; ++v) {
                dt[v] = load_lanes(delta + row + v * LANES, nl[v]);
                du[v] = dt[v] * load_lanes(u + row + v * LANES, nl[v]);
            }
            const float *Bt = Bm + ((b * L + t) * G + g) * NN;
            const vfloat *prev = t == t0 ? start : hs + (t - 1 - t0) * W;
            vfloat *h = hs + (t - t0) * W, *a = as + (t - t0) * W;
            for (int64_t n = 0; n < NN; ++n)
                for (int v = 0; v < NV; ++v) {
                    const int64_t k = n * NV + v;
                    a[k] = exp_lanes(dt[v] * A[k]);
                    h[k] = a[k] * prev[k] + du[v] * Bt[n];
                }
        }
        /* and run it in reverse */
        for (int64_t t = t1 - 1; t >= t0; --t) {
            const int64_t row = (b * L + t) * Dn + c0;
            const int64_t bc = ((b * L + t) * G + g) * NN;
            vfloat dt[NV], ut[NV], dyt[NV], dtu[NV], ddt[NV], dut[NV];
            const float *Bt = Bm + bc, *Ct = Cm + bc;
            for (int v = 0; v < NV; ++v) {
                dt[v] = load_lanes(delta + row + v * LANES, nl[v]);
                ut[v] = load_lanes(u + row + v * LANES, nl[v]);
                dyt[v] = load_lanes(dy + row + v * LANES, nl[v]);
                dtu[v] = dt[v] * ut[v];
                ddt[v] = dut[v] = (vfloat){0};
            }
            if (z != NULL) {
                /* the gate: y = pre · silu(z), pre = C·h + D·u recomputed from the states */
                const vfloat *hn = hs + (t - t0) * W;
                for (int v = 0; v < NV; ++v) {
                    vfloat pre = Dv[v] * ut[v];
                    for (int64_t n = 0; n < NN; ++n) pre += Ct[n] * hn[n * NV + v];
                    const vfloat zt = load_lanes(z + row + v * LANES, nl[v]);
                    const vfloat sg = sigmoid_lanes(zt);
                    store_lanes(dz + row + v * LANES,
                                dyt[v] * pre * sg * (1.0f + zt * (1.0f - sg)), nl[v]);
                    dyt[v] = dyt[v] * zt * sg; /* d pre */
                }
            }
            for (int v = 0; v < NV; ++v) dDv[v] += dyt[v] * ut[v];
            float *dBt = dBp + (((b * L + t) * G + g) * J + j) * NN;
            float *dCt = dCp + (((b * L + t) * G + g) * J + j) * NN;
            const vfloat *h = hs + (t - t0) * W, *a = as + (t - t0) * W;
            const vfloat *prev = t == t0 ? start : hs + (t - 1 - t0) * W;
            for (int64_t n = 0; n < NN; ++n) {
                vfloat sb = {0}, sc = {0};
                for (int v = 0; v < NV; ++v) {
                    const int64_t k = n * NV + v;
                    gr[k] += dyt[v] * Ct[n];
                    sc += dyt[v] * h[k];
                    const vfloat ghp = gr[k] * a[k] * prev[k];
                    ddt[v] += A[k] * ghp + gr[k] * ut[v] * Bt[n];
                    dAv[k] += dt[v] * ghp;
                    dut[v] += gr[k] * Bt[n];
                    sb += gr[k] * dtu[v];
                    gr[k] = a[k] * gr[k];
                }
                dCt[n] = hsum(sc);
                dBt[n] = hsum(sb);
            }
            for (int v = 0; v < NV; ++v) {
                store_lanes(ddelta + row + v * LANES, ddt[v], nl[v]);
                store_lanes(du_out + row + v * LANES, dut[v] * dt[v] + dyt[v] * Dv[v], nl[v]);
            }
        }
    }
    for (int v = 0; v < NV; ++v)
        if (dD != NULL) store_lanes(dD + b * Dn + c0 + v * LANES, dDv[v], nl[v]);
    for (int64_t n = 0; n < NN; ++n)
        for (int v = 0; v < NV; ++v) {
            const int64_t c = c0 + v * LANES, k = n * NV + v;
            store_lanes(dA + (b * NN + n) * Dn + c, dAv[k], nl[v]);
            if (dh0 != NULL) store_lanes(dh0 + (b * NN + n) * Dn + c, gr[k], nl[v]);
        }
}

int selective_backward(int64_t lo, int64_t hi, const float *u, const float *delta,
                       const float *At, const float *Bm, const float *Cm, const float *D,
                       const float *z, const float *ck, const float *dy, const float *dfinal,
                       float *du, float *ddelta, float *dA, float *dBp, float *dCp,
                       float *dh0, float *dD, float *dz, int64_t B, int64_t L,
                       int64_t Dn, int64_t N, int64_t G, int64_t K) {
    Arena arena;
    if (arena_open(&arena, 2 * K * N * BLOCK + 32)) return 1;
    vfloat *hs = (vfloat *)take(&arena, K * N * BLOCK);
    vfloat *as = (vfloat *)take(&arena, K * N * BLOCK);
    unsigned csr;
    DENORMALS_OFF(csr);
    const Dims s = {B, L, Dn, N, G, K};
    const int64_t Dg = Dn / G, J = (Dg + BLOCK - 1) / BLOCK;
    for (int64_t unit = lo; unit < hi; ++unit) {
        const int64_t j = unit % J, g = (unit / J) % G, b = unit / (J * G);
        const int64_t c0 = g * Dg + j * BLOCK, width = min64(BLOCK, Dg - j * BLOCK);
        const int NV = (int)((width + LANES - 1) / LANES);
        int64_t nl[VECS];
        for (int v = 0; v < VECS; ++v) nl[v] = v < NV ? min64(LANES, width - v * LANES) : 0;
#define BWD(NVC, NNC)                                                                          \
    backward_unit(&s, b, g, j, c0, nl, NVC, NNC, u, delta, At, Bm, Cm, D, z, ck, dy, dfinal,  \
                  du, ddelta, dA, dBp, dCp, dh0, dD, dz, hs, as)
        if (NV == VECS && N == 16)
            BWD(VECS, 16);
        else if (NV == VECS)
            BWD(VECS, N);
        else
            BWD(NV, N);
#undef BWD
    }
    DENORMALS_RESTORE(csr);
    free(arena.base);
    return 0;
}

/* Channels per backward work unit (the partial dB and dC sums are per block). */
int selective_block(void) { return BLOCK; }

/* The vector width this build runs (channels per work unit). */
int selective_lanes(void) { return LANES; }
