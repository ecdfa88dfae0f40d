/* What mixstack's native kernels share: subnormal flushing, float vectors of the
 * target's width (GCC/clang vector extensions), a vectorised exp, partial-vector loads
 * and a per-call scratch arena. */
#ifndef MIXSTACK_NATIVE_COMMON_H
#define MIXSTACK_NATIVE_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__SSE__)
#include <xmmintrin.h>
/* Flush subnormals to zero (FTZ | DAZ) inside the kernels: decays below 1e-38, silu of
 * very negative inputs and small products would otherwise take the slow subnormal path
 * of the FPU for no gain. */
#define DENORMALS_OFF(saved) ((saved) = _mm_getcsr(), _mm_setcsr((saved) | 0x8040))
#define DENORMALS_RESTORE(saved) _mm_setcsr(saved)
#else
#define DENORMALS_OFF(saved) ((saved) = 0)
#define DENORMALS_RESTORE(saved) ((void)(saved))
#endif

/* One GCC/clang vector of the target's own width (16 floats with AVX-512, 8 with AVX,
 * else 4): a wider vector than the registers would be split, and its comparisons and
 * selects done lane by lane. vint and vdouble are its integer
 * and double twins. */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef int32_t vint __attribute__((vector_size(LANES * 4)));
typedef double vdouble __attribute__((vector_size(LANES * 8)));
#define INLINE static inline __attribute__((always_inline))

INLINE vfloat select(vint mask, vfloat yes, vfloat no) {
    return (vfloat)(((vint)yes & mask) | ((vint)no & ~mask));
}

/* exp of every lane: 2^k · exp(r), k = round(x / ln 2), r = x - k·ln 2 in two parts (Cody
 * and Waite), exp(r) by Cephes' degree-6 polynomial for expf (about 1 ulp). With
 * AVX-512, vscalefps applies 2^k and takes care of overflow (infinity) and underflow
 * (0), x clamped to [-100, 100] first (NaN passes): 13 instructions instead of about
 * 30, a third of the silu forward's time. Elsewhere: k by adding and
 * removing 1.5·2^23, the exponent bits built by hand, 0 below -87, infinity above 88,
 * NaN kept. */
INLINE vfloat exp_poly(vfloat r) {
    vfloat p = (vfloat){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return p * (r * r) + r + 1.0f;
}

#if defined(__AVX512F__)
INLINE vfloat exp_lanes(vfloat x) {
    /* max(lo, x) and min(hi, .) return their second operand for NaN: x's NaN stays */
    const __m512 xc = _mm512_min_ps(_mm512_set1_ps(100.0f),
                                    _mm512_max_ps(_mm512_set1_ps(-100.0f), (__m512)x));
    const vfloat k = (vfloat)_mm512_roundscale_ps(
        (__m512)((vfloat)xc * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vfloat r = (vfloat)xc - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    return (vfloat)_mm512_scalef_ps((__m512)exp_poly(r), (__m512)k);
}
#else
INLINE vfloat exp_lanes(vfloat x) {
    /* constants from a zero vector, not from x - x (NaN for infinite x) */
    const vfloat zero = {0}, lo = zero - 87.0f, hi = zero + 88.0f;
    vfloat xc = select(x < lo, lo, x);
    xc = select(xc > hi, hi, xc);
    const vfloat k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    vfloat r = xc - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    const vint bits = (__builtin_convertvector(k, vint) + 127) << 23;
    vfloat e = exp_poly(r) * (vfloat)bits;
    e = select(x < lo, zero, e);
    e = select(x > hi, zero + INFINITY, e);
    return select(x != x, x, e);
}
#endif

INLINE vfloat sigmoid_lanes(vfloat x) { return 1.0f / (1.0f + exp_lanes(-x)); }

/* v[i] = exp(v[i]) for i < n, a vector at a time (the tail through a padded vector). */
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


static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/* n <= LANES floats from p (the rest 0) / to p; n == LANES compiles to one vector move. */
INLINE vfloat load_lanes(const float *p, int64_t n) {
    vfloat v = {0};
    memcpy(&v, p, (size_t)n * sizeof(float));
    return v;
}

INLINE void store_lanes(float *p, vfloat v, int64_t n) {
    memcpy(p, &v, (size_t)n * sizeof(float));
}

/* Scratch: one aligned block per call, handed out in 64-byte multiples. */
typedef struct {
    float *base, *next;
} Arena;

static inline int arena_open(Arena *arena, int64_t floats) {
    const size_t bytes = (size_t)round_up(floats + 64, 16) * sizeof(float);
    arena->base = arena->next = aligned_alloc(64, bytes);
    return arena->base == NULL;
}

static inline float *take(Arena *arena, int64_t floats) {
    float *p = arena->next;
    arena->next += round_up(floats, 16);
    return p;
}

#endif
