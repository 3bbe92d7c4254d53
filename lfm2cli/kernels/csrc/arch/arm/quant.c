/* int8 and int4 weights in groups of 32 (the layouts of pack.c) on the AArch64 levels. The layouts suit 128-bit
 * vectors as they are: 16 bytes of a step are 4 rows' lanes of 4 inputs (int8) or of 2 x 4 nibbles (int4), and a
 * lane of the token's group (its 4 bytes of those inputs) meets them in one SDOT by lane (vdotq_laneq_s32: each
 * row's 4 products added to its int32 sum). Without dotprod (the neon level) the same sums come from SMULL (int16
 * products), ADDP (pairs, at most 2 * 127 * 127) and SADALP (into int32). int4 multiplies the unsigned nibbles
 * q + 8 and subtracts 8 * sum q per group, as the x86 code.
 *
 * The token is rounded per group to int8 with the arithmetic of the x86 gq_prepare (127 / m, nearest even), and
 * each group's exact integer sum takes one FMA with the product of the two scales, group after group in order:
 * the same operations as the x86 kernels, so every level of both families gives the same bits (tests/arm/harness.c
 * checks them against one scalar reference). One token runs as a tile of one, so decode and prefill agree too.
 * (SMMLA, i8mm, would need two tokens' and two rows' 8 inputs side by side: another layout; not used.) */
#if defined(__ARM_FEATURE_DOTPROD)
#define GN_DOT(acc, w, x, lane) vdotq_laneq_s32(acc, w, x, lane)
#else
static inline int32x4_t gn_dot(int32x4_t acc, int8x16_t w, int8x16_t xb) {
    const int16x8_t p0 = vmull_s8(vget_low_s8(w), vget_low_s8(xb)), p1 = vmull_high_s8(w, xb);
    return vpadalq_s16(acc, vpaddq_s16(p0, p1)); /* lane r += row r's 4 products */
}
#define GN_DOT(acc, w, x, lane) gn_dot(acc, w, vreinterpretq_s8_s32(vdupq_laneq_s32(vreinterpretq_s32_s8(x), lane)))
#endif

#define GN_TT 4              /* tokens per tile: 4 x 4 integer sums, their 8 group vectors, and the pieces */

/* x [in] bf16 -> its int8 groups q, scales d = m / 127 and c = 8 * sum q (arch/x86/quant.c's arithmetic). */
static void gq_prepare(const uint16_t *x, int64_t in, int8_t *q, float *d, int32_t *c) {
    for (int64_t g = 0; g < in / GQ_G; g++) {
        float32x4_t f[8], top = vdupq_n_f32(0.0f);
        for (int k = 0; k < 4; k++) {
            const uint16x8_t u = vld1q_u16(x + g * GQ_G + 8 * k);
            f[2 * k] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(u), 16));
            f[2 * k + 1] = vreinterpretq_f32_u32(vshll_high_n_u16(u, 16));
            top = vmaxq_f32(top, vmaxq_f32(vabsq_f32(f[2 * k]), vabsq_f32(f[2 * k + 1])));
        }
        const float m = vmaxvq_f32(top), inv = m > 0.0f ? 127.0f / m : 0.0f;
        d[g] = m / 127.0f;
        int32x4_t sum = vdupq_n_s32(0);
        int16x8_t h[4];
        for (int k = 0; k < 4; k++) {
            const int32x4_t a = vcvtnq_s32_f32(vmulq_n_f32(f[2 * k], inv)); /* nearest even; |x * inv| <= 127 */
            const int32x4_t b = vcvtnq_s32_f32(vmulq_n_f32(f[2 * k + 1], inv));
            sum = vaddq_s32(sum, vaddq_s32(a, b));
            h[k] = vcombine_s16(vqmovn_s32(a), vqmovn_s32(b));
        }
        vst1q_s8(q + g * GQ_G, vcombine_s8(vqmovn_s16(h[0]), vqmovn_s16(h[1])));
        vst1q_s8(q + g * GQ_G + 16, vcombine_s8(vqmovn_s16(h[2]), vqmovn_s16(h[3])));
        c[g] = 8 * vaddvq_s32(sum);
    }
}

/* NT tokens (a[t]) against one 16-row block `w` over groups [g0, g1): acc[t] (4 vectors of 4 rows) += their
 * products. Each 16-byte piece is loaded (int4: unpacked) once for all NT tokens. FMT and NT are constants in
 * each call, so the arrays stay in registers. */
static inline __attribute__((always_inline)) void gn_tokens_n(float32x4_t (*acc)[4], const uint8_t *w,
        const gq_act *a, const int FMT, const int NT, int64_t g0, int64_t g1) {
    const int64_t GB = FORMATS[FMT].block_bytes;
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *p = w + g * GB;
        int8x16_t xl[GN_TT], xh[GN_TT];
        int32x4_t s[GN_TT][4];
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            xl[t] = vld1q_s8(a[t].q + g * GQ_G), xh[t] = vld1q_s8(a[t].q + g * GQ_G + 16);
            for (int m = 0; m < 4; m++) s[t][m] = vdupq_n_s32(0);
        }
        if (FMT == LFM2_INT8) {
            /* step st: inputs 4st..4st+3, lane st % 4 of the token's first or second 16 bytes */
#define GN_I8(st, X, L) \
            _Pragma("GCC unroll 4") for (int m = 0; m < 4; m++) { \
                const int8x16_t v = vld1q_s8((const int8_t *)p + 32 + 64 * st + 16 * m); \
                _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) s[t][m] = GN_DOT(s[t][m], v, X[t], L); \
            }
            GN_I8(0, xl, 0) GN_I8(1, xl, 1) GN_I8(2, xl, 2) GN_I8(3, xl, 3)
            GN_I8(4, xh, 0) GN_I8(5, xh, 1) GN_I8(6, xh, 2) GN_I8(7, xh, 3)
#undef GN_I8
        } else {
            /* step st: low nibbles are inputs 8st..8st+3 (lane L), high ones 8st+4..8st+7 (lane L + 1) */
#define GN_I4(st, X, L) \
            _Pragma("GCC unroll 4") for (int m = 0; m < 4; m++) { \
                const uint8x16_t v = vld1q_u8(p + 32 + 64 * st + 16 * m); \
                const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, m4)), hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4)); \
                _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) \
                    s[t][m] = GN_DOT(GN_DOT(s[t][m], lo, X[t], L), hi, X[t], L + 1); \
            }
            GN_I4(0, xl, 0) GN_I4(1, xl, 2) GN_I4(2, xh, 0) GN_I4(3, xh, 2)
#undef GN_I4
        }
        float32x4_t dw[4]; /* rows 4m..4m+3: int8's scales are fp16, int4's bf16 */
        for (int m = 0; m < 4; m++) {
            const uint16x4_t h = vld1_u16((const uint16_t *)p + 4 * m);
            dw[m] = FMT == LFM2_INT8 ? vcvt_f32_f16(vreinterpret_f16_u16(h))
                                     : vreinterpretq_f32_u32(vshll_n_u16(h, 16));
        }
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            const float dx = a[t].d[g];
            const int32x4_t c = vdupq_n_s32(FMT == LFM2_INT8 ? 0 : a[t].c[g]);
            for (int m = 0; m < 4; m++)
                acc[t][m] = vfmaq_f32(acc[t][m], vcvtq_f32_s32(vsubq_s32(s[t][m], c)), vmulq_n_f32(dw[m], dx));
        }
    }
}

static void gn_tokens(float32x4_t (*acc)[4], const uint8_t *w, const gq_act *a, int fmt, int64_t nt, int64_t g0,
                      int64_t g1) {
#define GN_CASE(B) \
    switch (nt) { \
    case 1: gn_tokens_n(acc, w, a, B, 1, g0, g1); break; \
    case 2: gn_tokens_n(acc, w, a, B, 2, g0, g1); break; \
    case 3: gn_tokens_n(acc, w, a, B, 3, g0, g1); break; \
    default: gn_tokens_n(acc, w, a, B, 4, g0, g1); break; \
    }
    if (fmt == LFM2_INT4) { GN_CASE(LFM2_INT4) } else { GN_CASE(LFM2_INT8) }
#undef GN_CASE
}

/* One 16-row block `w` (all its groups) against T tokens; y[t * out + r] for r < n. */
static void gq_block_tokens(const uint8_t *w, int64_t groups, int fmt, const gq_act *a, int64_t T, void *scratch,
                            uint16_t *y, int64_t out, int64_t n) {
    float32x4_t (*acc)[4] = (float32x4_t (*)[4])scratch;
    for (int64_t t = 0; t < T; t++)
        for (int m = 0; m < 4; m++) acc[t][m] = vdupq_n_f32(0.0f);
    for (int64_t g0 = 0; g0 < groups; g0 += GQ_CHUNK) {
        const int64_t g1 = groups - g0 < GQ_CHUNK ? groups : g0 + GQ_CHUNK;
        for (int64_t t = 0; t < T; t += GN_TT) gn_tokens(acc + t, w, a + t, fmt, T - t, g0, g1);
    }
    for (int64_t t = 0; t < T; t++) np_store16(y + t * out, acc[t], n);
}

/* One int4 group (quantize.c): the scalar rule. */
static inline bf16_t quantize_int4_group(const uint16_t *src, uint8_t *o) { return quantize_int4_scalar(src, o); }
