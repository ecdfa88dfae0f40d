/* Mamba-2's SSD scan on the CPU, fused (docs/math.md#mamba-2; mixstack.kernels.ssd
 * calls it through ctypes: _NativeScan for the whole chunked scan, _NativeDiagonal for
 * its first step alone where documents are packed).
 *
 * Per head h with A < 0, per chunk of Q steps with Δ_s, a_s = Δ_s·A, inputs
 * u_s = x_s·Δ_s (P), the group's B_s, C_s (N) and CB[i, s] = C_i · B_s:
 *
 *   1. diagonal blocks   y_i  = Σ_{s<=i} CB[i, s] exp(seg[i, s]) u_s,
 *                        seg[i, s] = Σ_{k=s+1..i} a_k, built row by row (a_i added to
 *                        row i-1: the torch path's mask-then-cumsum, no differences)
 *   2. chunk states      T    = Σ_s exp(suf_s) B_s u_sᵀ       (N, P), suf_s = Σ_{k>s} a_k
 *   3. state passing     S_c  = exp(pre_{Q-1}) S_{c-1} + T_c   (sequential over chunks),
 *                        pre_t = Σ_{k<=t} a_k
 *   4. state read-out    y_t += exp(pre_t) C_t · S_{c-1};  then y_t += D ⊙ x_t
 *
 * States are held transposed, (N, P) rows, so that every product below is
 * "rows times rows". The backward runs the same steps in reverse: the gradients of the
 * entering states pass backwards over the chunks (phase B'), everything else is local
 * to a chunk. The decays' gradients are summed into da_s as in the torch path's
 * autograd: a suffix sum of the read-out's, a prefix sum of the states', the chunk
 * decay's for every step, and the diagonal blocks' rectangle sums
 * da_k = Σ_{i>=k} Σ_{s<k} dseg[i, s] (row prefix sums: no differences of large sums).
 *
 * Nothing (Q, Q) per head is stored: rows of the decays and scores are rebuilt in
 * scratch rows, forward and backward. Work units are (batch, chunk, group) triples
 * for the chunk-local phases and (batch, head) pairs for the passing; each unit is
 * computed by one thread in one order, so results never depend on the thread count.
 * Scratch is allocated per call (64-byte aligned); a failed allocation returns 1.
 *
 * Layouts (contiguous float32; L a multiple of Q, the caller pads): x, y, dy, dx
 * (B, L, H, P); dt, ddt (B, L, H); A (H); Bm, Cm, dB, dC (B, L, G, N); D (H, P) or
 * NULL; states, dstates (B, c, H, N, P); decays, gdecay (B, c, H); initial, final,
 * dfinal, dinitial (B, H, P, N) (initial and dfinal may be NULL); dA_part (B, c, H);
 * dD_part (B, c, H, P). The diagonal-only entry points: cb, dcb (U, Q, Q);
 * a, da (U, R, Q); x, y, dy, dx (B·c, Q, G, R, P); run (B·c, Q) int64 or NULL.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* Rows are handled RB at a time and columns in tiles of TILE vectors: the RB × TILE
 * accumulators stay in registers and every vector loaded feeds RB multiply-adds. */
#define RB 4
#define TILE 4
#define TILE_FLOATS (TILE * LANES)

/* out[r][c0 .. c0+width) (=, or += with `add`) Σ_{s < count} w[r][s] · in_s[c0 ..
 * c0+width), in_s = in + s·in_step, for the RB rows (width <= TILE_FLOATS). Only the
 * first `rows` rows are written; the others' weights must be readable (point them at
 * zeros). A full tile has its own loop with fixed bounds, so that the compiler keeps the
 * accumulators in registers; vectors move one memcpy each (a block copy goes through
 * narrower moves, and reading those back as whole vectors stalls store forwarding). */
static inline void rows_times_inputs(float *const out[RB], int64_t rows,
                                     const float *const w[RB], const float *in,
                                     int64_t in_step, int64_t count, int64_t c0,
                                     int64_t width, int add) {
    if (width == TILE_FLOATS) {
        vfloat acc[RB][TILE] = {{{0}}};
        for (int64_t s = 0; s < count; ++s) {
            const float *in_s = in + s * in_step + c0;
            vfloat x0, x1, x2, x3;
            memcpy(&x0, in_s, sizeof x0);
            memcpy(&x1, in_s + LANES, sizeof x1);
            memcpy(&x2, in_s + 2 * LANES, sizeof x2);
            memcpy(&x3, in_s + 3 * LANES, sizeof x3);
#pragma GCC unroll 4
            for (int r = 0; r < RB; ++r) {
                const float c = w[r][s];
                acc[r][0] += c * x0;
                acc[r][1] += c * x1;
                acc[r][2] += c * x2;
                acc[r][3] += c * x3;
            }
        }
        for (int64_t r = 0; r < rows; ++r)
            for (int v = 0; v < TILE; ++v) {
                float *o = out[r] + c0 + v * LANES;
                vfloat sum = acc[r][v];
                if (add) {
                    vfloat old;
                    memcpy(&old, o, sizeof old);
                    sum += old;
                }
                memcpy(o, &sum, sizeof sum);
            }
        return;
    }
    for (int64_t v0 = 0; v0 < width; v0 += LANES) { /* a partial tile, a vector at a time */
        const int64_t n = min64(width - v0, LANES);
        vfloat acc[RB] = {0};
        for (int64_t s = 0; s < count; ++s) {
            const vfloat x = load_lanes(in + s * in_step + c0 + v0, n);
#pragma GCC unroll 4
            for (int r = 0; r < RB; ++r) acc[r] += w[r][s] * x;
        }
        for (int64_t r = 0; r < rows; ++r) {
            float *o = out[r] + c0 + v0;
            store_lanes(o, add ? acc[r] + load_lanes(o, n) : acc[r], n);
        }
    }
}

/* out (M, ncols) (=, or += with `add`) w (M, K) · in (K, ncols); rows of out, w and in
 * are out_step, w_step and in_step floats apart; zeros: at least K zero floats. */
static void gemm(float *out, int64_t out_step, const float *w, int64_t w_step,
                 const float *in, int64_t in_step, int64_t M, int64_t K, int64_t ncols,
                 int add, const float *zeros) {
    for (int64_t m0 = 0; m0 < M; m0 += RB) {
        const int64_t rows = min64(M - m0, RB);
        float *o[RB];
        const float *wr[RB];
        for (int64_t r = 0; r < RB; ++r) {
            o[r] = r < rows ? out + (m0 + r) * out_step : NULL;
            wr[r] = r < rows ? w + (m0 + r) * w_step : zeros;
        }
        for (int64_t c0 = 0; c0 < ncols; c0 += TILE_FLOATS)
            rows_times_inputs(o, rows, wr, in, in_step, K, c0, min64(ncols - c0, TILE_FLOATS),
                              add);
    }
}

/* in_s[c0 .. c0+width) += Σ_k w[k][s] · d[k][c0 .. c0+width) for s < count: the
 * transposed product of rows_times_inputs, the RB rows of d held in registers for the
 * whole pass over s. */
static inline void add_rows_to_inputs(float *in, int64_t in_step, int64_t count,
                                      const float *const w[RB], const float *const d[RB],
                                      int64_t c0, int64_t width) {
    if (width == TILE_FLOATS) {
        vfloat dk[RB][TILE];
        for (int k = 0; k < RB; ++k)
            for (int v = 0; v < TILE; ++v) memcpy(&dk[k][v], d[k] + c0 + v * LANES, sizeof(vfloat));
        for (int64_t s = 0; s < count; ++s) {
            float *in_s = in + s * in_step + c0;
            vfloat a0, a1, a2, a3;
            memcpy(&a0, in_s, sizeof a0);
            memcpy(&a1, in_s + LANES, sizeof a1);
            memcpy(&a2, in_s + 2 * LANES, sizeof a2);
            memcpy(&a3, in_s + 3 * LANES, sizeof a3);
#pragma GCC unroll 4
            for (int k = 0; k < RB; ++k) {
                const float c = w[k][s];
                a0 += c * dk[k][0];
                a1 += c * dk[k][1];
                a2 += c * dk[k][2];
                a3 += c * dk[k][3];
            }
            memcpy(in_s, &a0, sizeof a0);
            memcpy(in_s + LANES, &a1, sizeof a1);
            memcpy(in_s + 2 * LANES, &a2, sizeof a2);
            memcpy(in_s + 3 * LANES, &a3, sizeof a3);
        }
        return;
    }
    for (int64_t v0 = 0; v0 < width; v0 += LANES) {
        const int64_t n = min64(width - v0, LANES);
        vfloat dk[RB];
        for (int k = 0; k < RB; ++k) dk[k] = load_lanes(d[k] + c0 + v0, n);
        for (int64_t s = 0; s < count; ++s) {
            float *in_s = in + s * in_step + c0 + v0;
            vfloat acc = load_lanes(in_s, n);
#pragma GCC unroll 4
            for (int k = 0; k < RB; ++k) acc += w[k][s] * dk[k];
            store_lanes(in_s, acc, n);
        }
    }
}

/* dst (cols, rows) with rows dst_step apart = srcᵀ, src (rows, cols) with rows src_step
 * apart. */
static void transpose(float *restrict dst, int64_t dst_step, const float *restrict src,
                      int64_t src_step, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) dst[c * dst_step + r] = src[r * src_step + c];
}

/* Copy `rows` rows of n floats, src rows src_step apart, into contiguous dst. */
static void gather_rows(float *restrict dst, const float *restrict src, int64_t src_step,
                        int64_t rows, int64_t n) {
    for (int64_t r = 0; r < rows; ++r)
        memcpy(dst + r * n, src + r * src_step, (size_t)n * sizeof(float));
}

/* -- step 1: the diagonal blocks of one head ------------------------------------------- */

/* Row i of the decays L and scores S: seg (Q) holds row i-1 of the segment sums on entry
 * and row i on return; L and S get s = 0..i, and zeros for s = i+1..end-1 (the rest of
 * a block of rows). */
static inline void decay_row(float *restrict seg, float *restrict L, float *restrict S,
                             const float *restrict cb_row, const int64_t *run, float a_i,
                             int64_t i, int64_t end) {
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
    for (int64_t s = i + 1; s < end; ++s) L[s] = S[s] = 0.0f;
}

/* Scratch floats of diag_forward / diag_backward. */
static int64_t diag_scratch(int64_t Q, int64_t P) {
    const int64_t Qp = round_up(Q, TILE_FLOATS);
    return 4 * Q + 3 * RB * Qp + P * Qp + RB * P + 64 * 16;
}

/* y (Q, P) rows y_step apart = the diagonal blocks' output for inputs u (Q, P)
 * (contiguous), log-decays a (Q), scores cb (Q, Q); run: document ids or NULL. */
static void diag_forward(float *y, int64_t y_step, const float *cb, const float *a,
                         const float *u, const int64_t *run, int64_t Q, int64_t P,
                         Arena scratch) {
    float *seg = take(&scratch, Q), *L = take(&scratch, RB * Q), *S = take(&scratch, RB * Q);
    memset(seg, 0, (size_t)Q * sizeof(float));
    for (int64_t i0 = 0; i0 < Q; i0 += RB) {
        const int64_t rows = min64(Q - i0, RB), end = i0 + rows;
        float *out[RB];
        const float *w[RB];
        for (int64_t k = 0; k < RB; ++k) {
            w[k] = S + k * Q;
            if (k < rows) {
                decay_row(seg, L + k * Q, S + k * Q, cb + (i0 + k) * Q, run, a[i0 + k], i0 + k,
                          end);
                out[k] = y + (i0 + k) * y_step;
            } else {
                memset(S + k * Q, 0, (size_t)Q * sizeof(float));
                out[k] = NULL;
            }
        }
        for (int64_t p = 0; p < P; p += TILE_FLOATS)
            rows_times_inputs(out, rows, w, u, P, end, p, min64(P - p, TILE_FLOATS), 0);
    }
}

/* Backward of diag_forward: dcb (Q, Q) += the scores' gradient (summed over a group's
 * heads by the caller's repeated calls), da (Q) = the log-decays' gradient, du (Q, P)
 * (contiguous) += the inputs'; dy (Q, P) contiguous. */
static void diag_backward(float *dcb, float *da, float *du, const float *cb, const float *a,
                          const float *u, const float *dy, const int64_t *run, int64_t Q,
                          int64_t P, Arena scratch) {
    /* uT (P, Qp): the inputs transposed, so dS = dy·uᵀ runs over contiguous s; dS rows
     * and uT have Qp columns (uT zero past Q) so that whole tiles can be used */
    const int64_t Qp = round_up(Q, TILE_FLOATS);
    float *seg = take(&scratch, Q), *L = take(&scratch, RB * Qp), *S = take(&scratch, RB * Qp);
    float *dS = take(&scratch, RB * Qp), *uT = take(&scratch, P * Qp);
    float *dy_blk = take(&scratch, RB * P); /* (RB, P): the block's dy, zero rows past Q */
    memset(uT, 0, (size_t)(P * Qp) * sizeof(float));
    transpose(uT, Qp, u, P, Q, P);
    memset(da, 0, (size_t)Q * sizeof(float));
    memset(seg, 0, (size_t)Q * sizeof(float));
    for (int64_t i0 = 0; i0 < Q; i0 += RB) {
        const int64_t rows = min64(Q - i0, RB), end = i0 + rows;
        float *dS_rows[RB];
        const float *S_rows[RB], *dy_rows[RB];
        for (int64_t k = 0; k < RB; ++k) {
            dS_rows[k] = dS + k * Qp;
            S_rows[k] = S + k * Qp;
            dy_rows[k] = dy_blk + k * P;
            if (k < rows) {
                decay_row(seg, L + k * Qp, S + k * Qp, cb + (i0 + k) * Q, run, a[i0 + k],
                          i0 + k, end);
                memcpy(dy_blk + k * P, dy + (i0 + k) * P, (size_t)P * sizeof(float));
            } else {
                memset(S + k * Qp, 0, (size_t)end * sizeof(float));
                memset(dy_blk + k * P, 0, (size_t)P * sizeof(float));
            }
        }
        /* dS[k][s] = dy_k · u_s for s < end, in whole tiles (columns past end unread) */
        for (int64_t s = 0; s < end; s += TILE_FLOATS)
            rows_times_inputs(dS_rows, RB, dy_rows, uT, Qp, P, s, TILE_FLOATS, 0);
        /* du_s += Σ_k S[k][s] · dy_k for s < end (S is 0 past each row's i) */
        for (int64_t p = 0; p < P; p += TILE_FLOATS)
            add_rows_to_inputs(du, P, end, S_rows, dy_rows, p, min64(P - p, TILE_FLOATS));
        for (int64_t k = 0; k < rows; ++k) {
            const int64_t i = i0 + k;
            float *restrict dS_k = dS + k * Qp;
            const float *restrict L_k = L + k * Qp, *restrict S_k = S + k * Qp;
            float *restrict dcb_i = dcb + i * Q;
#pragma omp simd
            for (int64_t s = 0; s <= i; ++s) {
                dcb_i[s] += dS_k[s] * L_k[s];
                dS_k[s] *= S_k[s]; /* now the gradient of seg[i, s] */
            }
        }
        /* da[s + 1] += Σ_{s' <= s} dseg[i, s'] for s < i, every row i of the block: the
         * rows' prefix sums run side by side (independent chains of adds) */
        float rect[RB] = {0};
        for (int64_t s = 0; s < end - 1; ++s) {
            float add = 0.0f;
            for (int64_t k = 0; k < rows; ++k) {
                if (s < i0 + k) { /* row i0 + k reaches s + 1 <= i */
                    rect[k] += dS[k * Qp + s];
                    add += rect[k];
                }
            }
            da[s + 1] += add;
        }
    }
}

/* -- step 1 alone (packed documents; the torch path does steps 2 to 4) ----------------- */

int ssd_diag_forward(int64_t lo, int64_t hi, const float *cb, const float *a, const float *x,
                     const int64_t *run, float *y, int64_t G, int64_t R, int64_t Q, int64_t P) {
    Arena arena;
    if (arena_open(&arena, diag_scratch(Q, P) + Q * P)) return 1;
    float *uc = take(&arena, Q * P);
    unsigned csr;
    DENORMALS_OFF(csr);
    const int64_t step = G * R * P; /* between consecutive time steps of one head */
    for (int64_t u = lo; u < hi; ++u) {
        const int64_t bc = u / G, g = u % G;
        const int64_t *run_u = run != NULL ? run + bc * Q : NULL;
        for (int64_t r = 0; r < R; ++r) {
            const int64_t head = bc * Q * step + (g * R + r) * P;
            /* the head's rows lie G·R·P floats apart (4 KiB for 16 heads of 64): in the
             * same few L1 cache sets, so they are copied together before use */
            gather_rows(uc, x + head, step, Q, P);
            diag_forward(y + head, step, cb + u * Q * Q, a + (u * R + r) * Q, uc, run_u, Q, P,
                         arena);
        }
    }
    DENORMALS_RESTORE(csr);
    free(arena.base);
    return 0;
}

int ssd_diag_backward(int64_t lo, int64_t hi, const float *cb, const float *a, const float *x,
                      const int64_t *run, const float *dy, float *dcb, float *da, float *dx,
                      int64_t G, int64_t R, int64_t Q, int64_t P) {
    Arena arena;
    if (arena_open(&arena, diag_scratch(Q, P) + 3 * Q * P + 3 * 16)) return 1;
    float *uc = take(&arena, Q * P), *dyc = take(&arena, Q * P), *duc = take(&arena, Q * P);
    unsigned csr;
    DENORMALS_OFF(csr);
    const int64_t step = G * R * P;
    for (int64_t u = lo; u < hi; ++u) {
        const int64_t bc = u / G, g = u % G;
        const int64_t *run_u = run != NULL ? run + bc * Q : NULL;
        memset(dcb + u * Q * Q, 0, (size_t)(Q * Q) * sizeof(float));
        for (int64_t r = 0; r < R; ++r) {
            const int64_t head = bc * Q * step + (g * R + r) * P;
            gather_rows(uc, x + head, step, Q, P);
            gather_rows(dyc, dy + head, step, Q, P);
            memset(duc, 0, (size_t)(Q * P) * sizeof(float));
            diag_backward(dcb + u * Q * Q, da + (u * R + r) * Q, duc, cb + u * Q * Q,
                          a + (u * R + r) * Q, uc, dyc, run_u, Q, P, arena);
            for (int64_t s = 0; s < Q; ++s)
                memcpy(dx + head + s * step, duc + s * P, (size_t)P * sizeof(float));
        }
    }
    DENORMALS_RESTORE(csr);
    free(arena.base);
    return 0;
}

/* -- the whole scan ---------------------------------------------------------------------- */

typedef struct {
    int64_t B, L, H, G, N, P, Q;
} Dims;

/* One head's per-chunk quantities from Δ (Q each): a = Δ A, pre (inclusive prefix sums
 * of a), suf (exclusive suffix sums), enter = exp(pre), out = exp(suf). */
typedef struct {
    float *a, *pre, *suf, *enter, *out;
} Decays;

static Decays take_decays(Arena *arena, int64_t Q) {
    Decays d;
    d.a = take(arena, Q);
    d.pre = take(arena, Q);
    d.suf = take(arena, Q);
    d.enter = take(arena, Q);
    d.out = take(arena, Q);
    return d;
}

/* Fill d from Δ (Q values dt_step apart) and A; returns exp(pre_{Q-1}), the chunk's
 * decay. */
static float chunk_decays(const float *dt, int64_t dt_step, float A, int64_t Q, Decays d) {
    float run = 0.0f;
    for (int64_t s = 0; s < Q; ++s) {
        d.a[s] = dt[s * dt_step] * A;
        run += d.a[s];
        d.pre[s] = run;
    }
    run = 0.0f;
    for (int64_t s = Q - 1; s >= 0; --s) {
        d.suf[s] = run;
        run += d.a[s];
    }
    memcpy(d.enter, d.pre, (size_t)Q * sizeof(float));
    exp_inplace(d.enter, Q);
    memcpy(d.out, d.suf, (size_t)Q * sizeof(float));
    exp_inplace(d.out, Q);
    return d.enter[Q - 1];
}

/* The unit (b, c, g)'s B and C rows (Q, N) contiguous, Bᵀ (N, Qp) and CB = C Bᵀ (Q, Q). */
static void unit_scores(const Dims *d, const float *Bm, const float *Cm, int64_t b, int64_t c,
                        int64_t g, float *Bc, float *Cc, float *BT, float *CB,
                        const float *zeros) {
    const int64_t Q = d->Q, N = d->N, Qp = round_up(Q, TILE_FLOATS);
    const int64_t first = ((b * d->L + c * Q) * d->G + g) * N;
    gather_rows(Bc, Bm + first, d->G * N, Q, N);
    gather_rows(Cc, Cm + first, d->G * N, Q, N);
    memset(BT, 0, (size_t)(N * Qp) * sizeof(float));
    transpose(BT, Qp, Bc, N, Q, N);
    gemm(CB, Q, Cc, N, BT, Qp, Q, N, Q, 0, zeros);
}

static int64_t unit_scratch(const Dims *d) {
    const int64_t Q = d->Q, N = d->N, P = d->P, Qp = round_up(Q, TILE_FLOATS);
    const int64_t most = N > P ? (N > Qp ? N : Qp) : (P > Qp ? P : Qp);
    return diag_scratch(Q, P) + 6 * Q * N + N * Qp + 3 * Q * Q + 8 * Q + 6 * Q * P +
           4 * N * P + 3 * N * Qp + most + 40 * 16;
}

/* Phase A: per unit (b, c, g) and head, y = diagonal blocks + D ⊙ x, the chunk's state
 * contribution T (N, P) into states, its decay exp(pre_{Q-1}) into decays. */
int ssd_scan_chunks(int64_t lo, int64_t hi, const float *x, const float *dt, const float *A,
                    const float *Bm, const float *Cm, const float *D, float *y, float *states,
                    float *decays, int64_t B, int64_t L, int64_t H, int64_t G, int64_t N,
                    int64_t P, int64_t Q) {
    const Dims d = {B, L, H, G, N, P, Q};
    const int64_t nc = L / Q, R = H / G, Qp = round_up(Q, TILE_FLOATS);
    Arena arena;
    if (arena_open(&arena, unit_scratch(&d))) return 1;
    float *zeros = take(&arena, Qp + N + P);
    memset(zeros, 0, (size_t)(Qp + N + P) * sizeof(float));
    float *Bc = take(&arena, Q * N), *Cc = take(&arena, Q * N), *BT = take(&arena, N * Qp);
    float *CB = take(&arena, Q * Q), *BwT = take(&arena, N * Qp);
    const Decays dec = take_decays(&arena, Q);
    float *uc = take(&arena, Q * P), *yc = take(&arena, Q * P);
    unsigned csr;
    DENORMALS_OFF(csr);
    for (int64_t unit = lo; unit < hi; ++unit) {
        const int64_t b = unit / (nc * G), c = unit / G % nc, g = unit % G;
        unit_scores(&d, Bm, Cm, b, c, g, Bc, Cc, BT, CB, zeros);
        for (int64_t r = 0; r < R; ++r) {
            const int64_t h = g * R + r, t0 = b * L + c * Q; /* first row (b, t) */
            const float decay = chunk_decays(dt + t0 * H + h, H, A[h], Q, dec);
            for (int64_t s = 0; s < Q; ++s) {
                const float *x_s = x + ((t0 + s) * H + h) * P;
                const float dt_s = dt[(t0 + s) * H + h];
#pragma omp simd
                for (int64_t p = 0; p < P; ++p) uc[s * P + p] = x_s[p] * dt_s;
            }
            diag_forward(yc, P, CB, dec.a, uc, NULL, Q, P, arena);
            for (int64_t s = 0; s < Q; ++s) {
                const float *x_s = x + ((t0 + s) * H + h) * P;
                float *y_s = y + ((t0 + s) * H + h) * P;
                const float *D_h = D != NULL ? D + h * P : zeros;
#pragma omp simd
                for (int64_t p = 0; p < P; ++p) y_s[p] = yc[s * P + p] + D_h[p] * x_s[p];
            }
            /* T = Σ_s out_s B_s u_sᵀ: (N, Q) with the decays folded in, times u (Q, P) */
            for (int64_t n = 0; n < N; ++n)
                for (int64_t s = 0; s < Q; ++s) BwT[n * Qp + s] = BT[n * Qp + s] * dec.out[s];
            float *T = states + ((b * nc + c) * H + h) * N * P;
            gemm(T, P, BwT, Qp, uc, P, N, Q, P, 0, zeros);
            decays[(b * nc + c) * H + h] = decay;
        }
    }
    DENORMALS_RESTORE(csr);
    free(arena.base);
    return 0;
}

/* Phase B: per unit (b, h), over the chunks in order: states[c] becomes the state
 * entering chunk c (transposed, (N, P)); final (P, N) the state after the last. */
int ssd_scan_pass(int64_t lo, int64_t hi, float *states, const float *decays,
                  const float *initial, float *final, int64_t B, int64_t L, int64_t H,
                  int64_t N, int64_t P, int64_t Q) {
    (void)B;
    const int64_t nc = L / Q, size = N * P;
    Arena arena;
    if (arena_open(&arena, 2 * size + 32)) return 1;
    float *S = take(&arena, size), *T = take(&arena, size);
    for (int64_t unit = lo; unit < hi; ++unit) {
        const int64_t b = unit / H, h = unit % H;
        if (initial != NULL)
            transpose(S, P, initial + (b * H + h) * size, N, P, N);
        else
            memset(S, 0, (size_t)size * sizeof(float));
        for (int64_t c = 0; c < nc; ++c) {
            float *slot = states + ((b * nc + c) * H + h) * size;
            const float decay = decays[(b * nc + c) * H + h];
            memcpy(T, slot, (size_t)size * sizeof(float));
            memcpy(slot, S, (size_t)size * sizeof(float));
#pragma omp simd
            for (int64_t k = 0; k < size; ++k) S[k] = decay * S[k] + T[k];
        }
        transpose(final + (b * H + h) * size, N, S, P, N, P);
    }
    free(arena.base);
    return 0;
}

/* Phase C: per unit (b, c, g) and head, y_t += exp(pre_t) C_t · S_{c-1}. */
int ssd_scan_read(int64_t lo, int64_t hi, const float *dt, const float *A, const float *Cm,
                  const float *states, float *y, int64_t B, int64_t L, int64_t H, int64_t G,
                  int64_t N, int64_t P, int64_t Q) {
    (void)B;
    const int64_t nc = L / Q, R = H / G;
    Arena arena;
    if (arena_open(&arena, 3 * Q * N + 5 * Q + N + 32 * 16)) return 1;
    float *zeros = take(&arena, N), *Cc = take(&arena, Q * N), *Ce = take(&arena, Q * N);
    const Decays dec = take_decays(&arena, Q);
    memset(zeros, 0, (size_t)N * sizeof(float));
    unsigned csr;
    DENORMALS_OFF(csr);
    for (int64_t unit = lo; unit < hi; ++unit) {
        const int64_t b = unit / (nc * G), c = unit / G % nc, g = unit % G, t0 = b * L + c * Q;
        gather_rows(Cc, Cm + (t0 * G + g) * N, G * N, Q, N);
        for (int64_t r = 0; r < R; ++r) {
            const int64_t h = g * R + r;
            chunk_decays(dt + t0 * H + h, H, A[h], Q, dec);
            for (int64_t t = 0; t < Q; ++t)
                for (int64_t n = 0; n < N; ++n) Ce[t * N + n] = Cc[t * N + n] * dec.enter[t];
            gemm(y + (t0 * H + h) * P, H * P, Ce, N, states + ((b * nc + c) * H + h) * N * P,
                 P, Q, N, P, 1, zeros);
        }
    }
    DENORMALS_RESTORE(csr);
    free(arena.base);
    return 0;
}

/* Phase A': per unit (b, c, g) and head, U_c = Σ_t exp(pre_t) C_t dy_tᵀ (N, P), the
 * chunk's outputs' share of the gradient of the state entering it, into dstates. */
int ssd_scan_back_chunks(int64_t lo, int64_t hi, const float *dt, const float *A,
                         const float *Cm, const float *dy, float *dstates, int64_t B, int64_t L,
                         int64_t H, int64_t G, int64_t N, int64_t P, int64_t Q) {
    (void)B;
    const int64_t nc = L / Q, R = H / G, Qp = round_up(Q, TILE_FLOATS);
    Arena arena;
    if (arena_open(&arena, Q * N + N * Qp + Q * P + 5 * Q + Qp + 32 * 16)) return 1;
    float *zeros = take(&arena, Qp), *Cc = take(&arena, Q * N), *CeT = take(&arena, N * Qp);
    float *dyc = take(&arena, Q * P);
    const Decays dec = take_decays(&arena, Q);
    memset(zeros, 0, (size_t)Qp * sizeof(float));
    unsigned csr;
    DENORMALS_OFF(csr);
    for (int64_t unit = lo; unit < hi; ++unit) {
        const int64_t b = unit / (nc * G), c = unit / G % nc, g = unit % G, t0 = b * L + c * Q;
        gather_rows(Cc, Cm + (t0 * G + g) * N, G * N, Q, N);
        for (int64_t r = 0; r < R; ++r) {
            const int64_t h = g * R + r;
            chunk_decays(dt + t0 * H + h, H, A[h], Q, dec);
            for (int64_t n = 0; n < N; ++n)
                for (int64_t t = 0; t < Q; ++t) CeT[n * Qp + t] = Cc[t * N + n] * dec.enter[t];
            gather_rows(dyc, dy + (t0 * H + h) * P, H * P, Q, P);
            gemm(dstates + ((b * nc + c) * H + h) * N * P, P, CeT, Qp, dyc, P, N, Q, P, 0,
                 zeros);
        }
    }
    DENORMALS_RESTORE(csr);
    free(arena.base);
    return 0;
}

/* Phase B': per unit (b, h), over the chunks in reverse: dstates[c] becomes the
 * gradient of the state leaving chunk c; gdecay[c] = exp(pre_{Q-1}) <S_{c-1}, that>
 * (the chunk decay's log-gradient); dinitial (P, N) the initial state's gradient.
 * dfinal (P, N) may be NULL (no gradient reaches the final state). */
int ssd_scan_back_pass(int64_t lo, int64_t hi, const float *states, const float *decays,
                       float *dstates, const float *dfinal, float *gdecay, float *dinitial,
                       int64_t B, int64_t L, int64_t H, int64_t N, int64_t P, int64_t Q) {
    (void)B;
    const int64_t nc = L / Q, size = N * P;
    Arena arena;
    if (arena_open(&arena, 2 * size + 32)) return 1;
    float *Gr = take(&arena, size), *U = take(&arena, size);
    for (int64_t unit = lo; unit < hi; ++unit) {
        const int64_t b = unit / H, h = unit % H;
        if (dfinal != NULL)
            transpose(Gr, P, dfinal + (b * H + h) * size, N, P, N);
        else
            memset(Gr, 0, (size_t)size * sizeof(float));
        for (int64_t c = nc - 1; c >= 0; --c) {
            const int64_t at = (b * nc + c) * H + h;
            float *slot = dstates + at * size;
            const float *S_in = states + at * size;
            const float decay = decays[at];
            memcpy(U, slot, (size_t)size * sizeof(float));
            memcpy(slot, Gr, (size_t)size * sizeof(float));
            double dot = 0.0;
            for (int64_t k = 0; k < size; ++k) dot += (double)S_in[k] * Gr[k];
            gdecay[at] = (float)(dot * decay);
#pragma omp simd
            for (int64_t k = 0; k < size; ++k) Gr[k] = U[k] + decay * Gr[k];
        }
        transpose(dinitial + (b * H + h) * size, N, Gr, P, N, P);
    }
    free(arena.base);
    return 0;
}

/* Phase C': per unit (b, c, g), every gradient local to the chunk: dx, ddt, dB, dC
 * (the unit's rows), dA_part and dD_part (the unit's heads, summed over b and c by the
 * caller). states: entering states (N, P); dstates: gradients of the leaving ones. */
int ssd_scan_back_grads(int64_t lo, int64_t hi, const float *x, const float *dt, const float *A,
                        const float *Bm, const float *Cm, const float *D, const float *dy,
                        const float *states, const float *dstates, const float *gdecay,
                        float *dx, float *ddt, float *dA_part, float *dBm, float *dCm,
                        float *dD_part, int64_t B, int64_t L, int64_t H, int64_t G, int64_t N,
                        int64_t P, int64_t Q) {
    const Dims d = {B, L, H, G, N, P, Q};
    const int64_t nc = L / Q, R = H / G, Qp = round_up(Q, TILE_FLOATS);
    Arena arena;
    if (arena_open(&arena, unit_scratch(&d))) return 1;
    const int64_t most = N > P ? (N > Qp ? N : Qp) : (P > Qp ? P : Qp);
    float *zeros = take(&arena, most);
    memset(zeros, 0, (size_t)most * sizeof(float));
    float *Bc = take(&arena, Q * N), *Cc = take(&arena, Q * N), *BT = take(&arena, N * Qp);
    float *CB = take(&arena, Q * Q), *dCB = take(&arena, Q * Q), *dCBT = take(&arena, Q * Q);
    float *dBc = take(&arena, Q * N), *dCc = take(&arena, Q * N), *raw = take(&arena, Q * N);
    float *Bw = take(&arena, Q * N);
    const Decays dec = take_decays(&arena, Q);
    float *da = take(&arena, Q);
    float *g_pre = take(&arena, Q), *g_suf = take(&arena, Q);
    float *uc = take(&arena, Q * P), *dyc = take(&arena, Q * P), *duc = take(&arena, Q * P);
    float *xc = take(&arena, Q * P);
    float *SinT = take(&arena, N * P), *dSoutT = take(&arena, N * P);
    unsigned csr;
    DENORMALS_OFF(csr);
    for (int64_t unit = lo; unit < hi; ++unit) {
        const int64_t b = unit / (nc * G), c = unit / G % nc, g = unit % G, t0 = b * L + c * Q;
        unit_scores(&d, Bm, Cm, b, c, g, Bc, Cc, BT, CB, zeros);
        memset(dCB, 0, (size_t)(Q * Q) * sizeof(float));
        memset(dBc, 0, (size_t)(Q * N) * sizeof(float));
        memset(dCc, 0, (size_t)(Q * N) * sizeof(float));
        for (int64_t r = 0; r < R; ++r) {
            const int64_t h = g * R + r, at = (b * nc + c) * H + h;
            chunk_decays(dt + t0 * H + h, H, A[h], Q, dec);
            gather_rows(xc, x + (t0 * H + h) * P, H * P, Q, P);
            gather_rows(dyc, dy + (t0 * H + h) * P, H * P, Q, P);
            for (int64_t s = 0; s < Q; ++s) {
                const float dt_s = dt[(t0 + s) * H + h];
#pragma omp simd
                for (int64_t p = 0; p < P; ++p) uc[s * P + p] = xc[s * P + p] * dt_s;
            }
            const float *S_in = states + at * N * P, *dS_out = dstates + at * N * P;
            transpose(SinT, N, S_in, P, N, P);     /* (P, N) */
            transpose(dSoutT, N, dS_out, P, N, P); /* (P, N) */
            memset(duc, 0, (size_t)(Q * P) * sizeof(float));
            /* 1. diagonal blocks: dCB (summed over heads), da, du */
            diag_backward(dCB, da, duc, CB, dec.a, uc, dyc, NULL, Q, P, arena);
            /* 4. read-out: raw = dy S_inᵀ... as (Q, P)·(P, N); dC_t += enter_t raw_t,
             * and the log-gradient of enter_t is enter_t C_t · raw_t */
            gemm(raw, N, dyc, P, SinT, N, Q, P, N, 0, zeros);
            for (int64_t t = 0; t < Q; ++t) {
                float dot = 0.0f;
                for (int64_t n = 0; n < N; ++n) {
                    dot += raw[t * N + n] * Cc[t * N + n];
                    dCc[t * N + n] += dec.enter[t] * raw[t * N + n];
                }
                g_pre[t] = dec.enter[t] * dot;
            }
            /* 2. chunk state: raw = u dS_outᵀ (Q, N); dB_s += out_s raw_s, the
             * log-gradient of out_s is out_s B_s · raw_s, du_s += out_s dS_out B_s */
            gemm(raw, N, uc, P, dSoutT, N, Q, P, N, 0, zeros);
            for (int64_t s = 0; s < Q; ++s) {
                float dot = 0.0f;
                for (int64_t n = 0; n < N; ++n) {
                    dot += raw[s * N + n] * Bc[s * N + n];
                    dBc[s * N + n] += dec.out[s] * raw[s * N + n];
                    Bw[s * N + n] = Bc[s * N + n] * dec.out[s];
                }
                g_suf[s] = dec.out[s] * dot;
            }
            gemm(duc, P, Bw, N, dS_out, P, Q, N, P, 1, zeros);
            /* da_k += Σ_{t>=k} g_pre_t + Σ_{s<k} g_suf_s + the chunk decay's gradient */
            const float g_decay = gdecay[at];
            float tail = 0.0f, head = 0.0f;
            for (int64_t k = Q - 1; k >= 0; --k) {
                tail += g_pre[k];
                da[k] += tail + g_decay;
            }
            for (int64_t k = 0; k < Q; ++k) {
                da[k] += head;
                head += g_suf[k];
            }
            /* a = Δ A, u = x Δ: back to Δ, A, x; D's skip */
            float dA_h = 0.0f;
            float *dD_h = dD_part != NULL ? dD_part + at * P : NULL;
            if (dD_h != NULL) memset(dD_h, 0, (size_t)P * sizeof(float));
            const float *D_h = D != NULL ? D + h * P : zeros;
            for (int64_t s = 0; s < Q; ++s) {
                const float dt_s = dt[(t0 + s) * H + h];
                const float *x_s = xc + s * P, *dy_s = dyc + s * P, *du_s = duc + s * P;
                float *dx_s = dx + ((t0 + s) * H + h) * P;
                float du_x = 0.0f;
#pragma omp simd reduction(+ : du_x)
                for (int64_t p = 0; p < P; ++p) {
                    du_x += du_s[p] * x_s[p];
                    dx_s[p] = du_s[p] * dt_s + D_h[p] * dy_s[p];
                }
                if (dD_h != NULL)
                    for (int64_t p = 0; p < P; ++p) dD_h[p] += dy_s[p] * x_s[p];
                ddt[(t0 + s) * H + h] = da[s] * A[h] + du_x;
                dA_h += da[s] * dt_s;
            }
            dA_part[at] = dA_h;
        }
        /* CB = C Bᵀ: dC += dCB B, dB += dCBᵀ C */
        gemm(dCc, N, dCB, Q, Bc, N, Q, Q, N, 1, zeros);
        transpose(dCBT, Q, dCB, Q, Q, Q);
        gemm(dBc, N, dCBT, Q, Cc, N, Q, Q, N, 1, zeros);
        for (int64_t s = 0; s < Q; ++s) {
            const int64_t row = ((t0 + s) * G + g) * N;
            memcpy(dBm + row, dBc + s * N, (size_t)N * sizeof(float));
            memcpy(dCm + row, dCc + s * N, (size_t)N * sizeof(float));
        }
    }
    DENORMALS_RESTORE(csr);
    free(arena.base);
    return 0;
}
