/* The AArch64 levels (bf16, dotprod, neon: one file, the -march flags decide): the bf16 kernels here, the int8 /
 * int4 ones in quant.c. The pairs layout (pack.c) suits 128-bit vectors as it is: a vector is 4 rows' pair of
 * inputs, a 16-row block's pair four vectors.
 *   neon and dotprod: each 32-bit lane becomes two floats, the even input by a left shift and the odd one by
 *   masking off the low half (both exact), each multiplied by x's input (x converted to float once, taken by
 *   lane) with FMA, as the AVX2 level does.
 *   bf16 (FEAT_BF16): one BFDOT per vector does a lane's two products and adds them, against x's bf16 pair taken
 *   by lane: a quarter of the instructions. (BFMMLA needs 4 consecutive inputs per row, another layout.)
 * Decode walks a 64-row tile as four forward streams; prefill meets each 16-row block, chunk by chunk in L1,
 * with NP_TT tokens at a time. */
#if !defined(__aarch64__)
#error "the AArch64 levels need an AArch64 compiler"
#endif
#include <arm_neon.h>

#if defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
#define NP_BFDOT 1           /* the bf16 level: BFDOT on the bf16 token */
#else
#define NP_BFDOT 0
#endif

#define NP_TT 4              /* tokens per prefill tile: 4 x 4 float accumulators of the 32 vector registers */
#define NP_KC 512            /* inputs per prefill chunk: a block's chunk (16 KB) stays in L1 for all tokens */

static inline float32x4_t np_even(uint32x4_t v) { return vreinterpretq_f32_u32(vshlq_n_u32(v, 16)); }
static inline float32x4_t np_odd(uint32x4_t v) {
    return vreinterpretq_f32_u32(vandq_u32(v, vdupq_n_u32(0xFFFF0000u)));
}
static inline uint32x4_t np_load(const uint16_t *p) { return vld1q_u32((const uint32_t *)p); }
#if NP_BFDOT
static inline bfloat16x8_t np_bf(const uint16_t *p) { return vreinterpretq_bf16_u16(vld1q_u16(p)); }
#endif

/* 4 floats -> 4 bf16, rounded to nearest even with NaN kept quiet (bf() in common.h, bf16x8 in simd256.h). */
static inline uint16x4_t np_bf16x4(float32x4_t v) {
    const uint32x4_t u = vreinterpretq_u32_f32(v), top = vshrq_n_u32(u, 16);
    const uint32x4_t r = vshrq_n_u32(vaddq_u32(u, vaddq_u32(vandq_u32(top, vdupq_n_u32(1)), vdupq_n_u32(0x7fff))), 16);
    const uint32x4_t nan = vmvnq_u32(vceqq_f32(v, v));
    return vmovn_u32(vbslq_u32(nan, vorrq_u32(top, vdupq_n_u32(0x40)), r));
}

/* Stores 16 sums (4 vectors of 4 rows) as bf16 into y[0..n): n < 16 only in the last block. */
static inline void np_store16(uint16_t *y, const float32x4_t *a, int64_t n) {
    if (n <= 0) return;
    uint16_t tmp[16];
    uint16_t *d = n >= 16 ? y : tmp;
    for (int j = 0; j < 4; j++) vst1_u16(d + 4 * j, np_bf16x4(a[j]));
    if (n < 16) memcpy(y, tmp, (size_t)n * 2);
}

/* a . b over d bf16 values (the attention's dot product), 16 at a time in four accumulators. */
static inline float dot_bf16(const bf16_t *a, const bf16_t *b, int64_t d) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
#if NP_BFDOT
    for (; i + 16 <= d; i += 16) {
        s0 = vbfdotq_f32(s0, np_bf(a + i), np_bf(b + i));
        s1 = vbfdotq_f32(s1, np_bf(a + i + 8), np_bf(b + i + 8));
    }
#else
    for (; i + 16 <= d; i += 16) {
        const uint16x8_t a0 = vld1q_u16(a + i), b0 = vld1q_u16(b + i), a1 = vld1q_u16(a + i + 8), b1 = vld1q_u16(b + i + 8);
#define NP_LO(v) vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16))
#define NP_HI(v) vreinterpretq_f32_u32(vshll_high_n_u16(v, 16))
        s0 = vfmaq_f32(s0, NP_LO(a0), NP_LO(b0));
        s1 = vfmaq_f32(s1, NP_HI(a0), NP_HI(b0));
        s2 = vfmaq_f32(s2, NP_LO(a1), NP_LO(b1));
        s3 = vfmaq_f32(s3, NP_HI(a1), NP_HI(b1));
#undef NP_LO
#undef NP_HI
    }
#endif
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < d; i++) s += f32(a[i]) * f32(b[i]);
    return s;
}

/* One token against the 4 blocks of a 64-row tile (`bs` elements apart): 16 accumulators, one per 4 rows. x is
 * bf16 at the bf16 level, else its float copy xf. */
static void np_tile_gemv(const uint16_t *w, int64_t bs, int64_t pairs, const uint16_t *x, const float *xf,
                         uint16_t *y, int64_t n) {
    float32x4_t a[4][4];
    for (int k = 0; k < 4; k++)
        for (int j = 0; j < 4; j++) a[k][j] = vdupq_n_f32(0.0f);
    int64_t p = 0;
#if NP_BFDOT
    (void)xf;
    for (; p + 4 <= pairs; p += 4) {
        const bfloat16x8_t xb = np_bf(x + 2 * p);
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
            const uint16_t *wk = w + k * bs + p * 32;
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {
                a[k][j] = vbfdotq_laneq_f32(a[k][j], np_bf(wk + 8 * j), xb, 0);
                a[k][j] = vbfdotq_laneq_f32(a[k][j], np_bf(wk + 32 + 8 * j), xb, 1);
                a[k][j] = vbfdotq_laneq_f32(a[k][j], np_bf(wk + 64 + 8 * j), xb, 2);
                a[k][j] = vbfdotq_laneq_f32(a[k][j], np_bf(wk + 96 + 8 * j), xb, 3);
            }
        }
    }
    for (; p < pairs; p++) {
        uint32_t pair;
        memcpy(&pair, x + 2 * p, 4);
        const bfloat16x8_t xb = vreinterpretq_bf16_u32(vdupq_n_u32(pair));
        for (int k = 0; k < 4; k++)
            for (int j = 0; j < 4; j++) a[k][j] = vbfdotq_f32(a[k][j], np_bf(w + k * bs + p * 32 + 8 * j), xb);
    }
#else
    (void)x;
    for (; p + 2 <= pairs; p += 2) {
        const float32x4_t xv = vld1q_f32(xf + 2 * p);
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
            const uint16_t *wk = w + k * bs + p * 32;
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {
                const uint32x4_t v0 = np_load(wk + 8 * j), v1 = np_load(wk + 32 + 8 * j);
                a[k][j] = vfmaq_laneq_f32(a[k][j], np_even(v0), xv, 0);
                a[k][j] = vfmaq_laneq_f32(a[k][j], np_odd(v0), xv, 1);
                a[k][j] = vfmaq_laneq_f32(a[k][j], np_even(v1), xv, 2);
                a[k][j] = vfmaq_laneq_f32(a[k][j], np_odd(v1), xv, 3);
            }
        }
    }
    for (; p < pairs; p++) {
        const float32x2_t xv = vld1_f32(xf + 2 * p);
        for (int k = 0; k < 4; k++)
            for (int j = 0; j < 4; j++) {
                const uint32x4_t v = np_load(w + k * bs + p * 32 + 8 * j);
                a[k][j] = vfmaq_lane_f32(vfmaq_lane_f32(a[k][j], np_even(v), xv, 0), np_odd(v), xv, 1);
            }
    }
#endif
    for (int k = 0; k < 4; k++) np_store16(y + 16 * k, a[k], n - 16 * k);
}

/* NT tokens (rows of x / xf, `in` apart) against one 16-row block over `pairs` pairs from the chunk's start:
 * acc[t] (4 vectors of 4 rows) += their products. NT is a constant in each call. */
static inline __attribute__((always_inline)) void np_tile_n(const uint16_t *w, int64_t pairs, const uint16_t *x,
        const float *xf, int64_t in, const int NT, float *part) {
    float32x4_t a[NP_TT][4];
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
        for (int j = 0; j < 4; j++) a[t][j] = vld1q_f32(part + 16 * t + 4 * j);
    int64_t p = 0;
#if NP_BFDOT
    (void)xf;
    for (; p + 4 <= pairs; p += 4) {
        bfloat16x8_t xb[NP_TT];
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) xb[t] = np_bf(x + t * in + 2 * p);
#define NP_PAIR(L) \
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) { \
            const bfloat16x8_t v = np_bf(w + (p + L) * 32 + 8 * j); \
            _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) a[t][j] = vbfdotq_laneq_f32(a[t][j], v, xb[t], L); \
        }
        NP_PAIR(0) NP_PAIR(1) NP_PAIR(2) NP_PAIR(3)
#undef NP_PAIR
    }
    for (; p < pairs; p++)
        for (int t = 0; t < NT; t++) {
            uint32_t pair;
            memcpy(&pair, x + t * in + 2 * p, 4);
            const bfloat16x8_t xb = vreinterpretq_bf16_u32(vdupq_n_u32(pair));
            for (int j = 0; j < 4; j++) a[t][j] = vbfdotq_f32(a[t][j], np_bf(w + p * 32 + 8 * j), xb);
        }
#else
    (void)x;
    for (; p < pairs; p++) {
        float32x2_t xv[NP_TT];
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) xv[t] = vld1_f32(xf + t * in + 2 * p);
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {
            const uint32x4_t v = np_load(w + p * 32 + 8 * j);
            const float32x4_t e = np_even(v), o = np_odd(v);
            _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
                a[t][j] = vfmaq_lane_f32(vfmaq_lane_f32(a[t][j], e, xv[t], 0), o, xv[t], 1);
        }
    }
#endif
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
        for (int j = 0; j < 4; j++) vst1q_f32(part + 16 * t + 4 * j, a[t][j]);
}

static void np_tile(const uint16_t *w, int64_t pairs, const uint16_t *x, const float *xf, int64_t in, int64_t nt,
                    float *part) {
    switch (nt) {
    case 1: np_tile_n(w, pairs, x, xf, in, 1, part); break;
    case 2: np_tile_n(w, pairs, x, xf, in, 2, part); break;
    case 3: np_tile_n(w, pairs, x, xf, in, 3, part); break;
    default: np_tile_n(w, pairs, x, xf, in, 4, part); break;
    }
}

/* Several tokens (prefill) against bf16 weights packed by lfm2_pack: x [T, in] bf16, y [T, out] bf16, `in` even.
 * The 16-row blocks are taken dynamically, each walked in chunks of NP_KC inputs that every token meets while the
 * chunk is in L1 (sums wait in `part`, 16 floats per token). */
static void linear_bf16_tokens(const void *w, const uint16_t *x, uint16_t *y, int64_t T, int64_t out, int64_t in,
                               int threads) {
    if (T <= 0 || out <= 0) return;
    const int64_t blocks = (out + 15) / 16, bs = 16 * in;
    float *xf = NP_BFDOT ? 0 : (float *)malloc(sizeof(float) * (size_t)(T * in));
    #pragma omp parallel num_threads(threads)
    {
        if (xf) {
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < T; t++) bf16_to_f32(x + t * in, xf + t * in, in);
        }
        float *part = (float *)malloc(sizeof(float) * 16 * (size_t)T);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < blocks; b++) {
            memset(part, 0, sizeof(float) * 16 * (size_t)T);
            for (int64_t k0 = 0; k0 < in; k0 += NP_KC) {
                const int64_t kn = in - k0 < NP_KC ? in - k0 : NP_KC;
                for (int64_t t0 = 0; t0 < T; t0 += NP_TT)
                    np_tile((const uint16_t *)w + b * bs + k0 * 16, kn / 2, x + t0 * in + k0,
                            xf ? xf + t0 * in + k0 : 0, in, T - t0 < NP_TT ? T - t0 : NP_TT, part + 16 * t0);
            }
            for (int64_t t = 0; t < T; t++) {
                float32x4_t a[4];
                for (int j = 0; j < 4; j++) a[j] = vld1q_f32(part + 16 * t + 4 * j);
                np_store16(y + t * out + 16 * b, a, out - 16 * b);
            }
        }
        free(part);
    }
    free(xf);
}

/* group_kernel.unit: tile t (64 rows) of matrix i against its token (bf16 at the bf16 level, else floats). */
static void gemv_unit(const group_job *J, int64_t i, int64_t t) {
    np_tile_gemv((const uint16_t *)J->w[i] + t * 64 * J->in, 16 * J->in, J->in / 2, (const uint16_t *)J->act[i],
                 (const float *)J->act[i], J->y[i] + 64 * t, J->out - 64 * t);
}

#include "quant.c"

/* One token per matrix: each distinct token converted once (not at the bf16 level, whose BFDOT takes it as it
 * is), the 64-row tiles taken one at a time; int8 / int4 blocks two at a time. */
static const group_kernel GROUP_KERNELS[LFM2_FORMATS] = {
    [LFM2_BF16] = {NP_BFDOT ? 0 : f32_act_bytes, NP_BFDOT ? 0 : f32_act, 64, gemv_unit, 0, 1},
    [LFM2_INT8] = {gq_act_bytes, gq_prepare_act, 16, gq_block_unit, 0, 2},
    [LFM2_INT4] = {gq_act_bytes, gq_prepare_act, 16, gq_block_unit, 0, 2},
};
