/* int8 and int4 weights in groups of 32 on AArch64 (LFM2_ISA 10-12), in the layouts of linear_grouped.c (made by
 * its lfm2_pack_grouped), which suit 128-bit vectors as they are: 16 bytes of a step are 4 rows' lanes of 4
 * inputs (int8) or of 2 x 4 nibbles (int4), and a lane of the token's group (its 4 bytes of those inputs) meets
 * them in one SDOT by lane (vdotq_laneq_s32: each row's 4 products added to its int32 sum). Without dotprod
 * (LFM2_ISA 10) the same sums come from SMULL (int16 products), ADDP (pairs, at most 2 * 127 * 127) and SADALP
 * (into int32). int4 multiplies the unsigned nibbles q + 8 and subtracts 8 * sum q per group, as the x86 code.
 *
 * The token is rounded per group to int8 with the arithmetic of gq_prepare (127 / m, nearest even), and each
 * group's exact integer sum takes one FMA with the product of the two scales, group after group in order: the
 * same operations as the x86 kernels, so every level of both families gives the same bits (tests/arm/harness.c
 * checks them against one scalar reference). One token runs as a tile of one, so decode and prefill agree too.
 * (SMMLA, i8mm, would need two tokens' and two rows' 8 inputs side by side: another layout; not used.) */
#if LFM2_ARM

#if LFM2_ISA >= 11
#define GN_DOT(acc, w, x, lane) vdotq_laneq_s32(acc, w, x, lane)
#else
static inline int32x4_t gn_dot(int32x4_t acc, int8x16_t w, int8x16_t xb) {
    const int16x8_t p0 = vmull_s8(vget_low_s8(w), vget_low_s8(xb)), p1 = vmull_high_s8(w, xb);
    return vpadalq_s16(acc, vpaddq_s16(p0, p1)); /* lane r += row r's 4 products */
}
#define GN_DOT(acc, w, x, lane) gn_dot(acc, w, vreinterpretq_s8_s32(vdupq_laneq_s32(vreinterpretq_s32_s8(x), lane)))
#endif

#define GN_TT 4              /* tokens per tile: 4 x 4 integer sums, their 8 group vectors, and the pieces */

/* x [in] bf16 -> its int8 groups q, scales d = m / 127 and c = 8 * sum q (the x86 gq_prepare's arithmetic). */
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
 * products. Each 16-byte piece is loaded (int4: unpacked) once for all NT tokens. BITS and NT are constants in
 * each call, so the arrays stay in registers. */
static inline __attribute__((always_inline)) void gn_tokens_n(float32x4_t (*acc)[4], const uint8_t *w,
        const gq_act *a, const int BITS, const int NT, int64_t g0, int64_t g1) {
    const int64_t GB = gq_bytes(BITS);
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *p = w + g * GB;
        int8x16_t xl[GN_TT], xh[GN_TT];
        int32x4_t s[GN_TT][4];
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            xl[t] = vld1q_s8(a[t].q + g * GQ_G), xh[t] = vld1q_s8(a[t].q + g * GQ_G + 16);
            for (int m = 0; m < 4; m++) s[t][m] = vdupq_n_s32(0);
        }
        if (BITS == 8) {
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
            dw[m] = BITS == 8 ? vcvt_f32_f16(vreinterpret_f16_u16(h)) : vreinterpretq_f32_u32(vshll_n_u16(h, 16));
        }
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            const float dx = a[t].d[g];
            const int32x4_t c = vdupq_n_s32(BITS == 8 ? 0 : a[t].c[g]);
            for (int m = 0; m < 4; m++)
                acc[t][m] = vfmaq_f32(acc[t][m], vcvtq_f32_s32(vsubq_s32(s[t][m], c)), vmulq_n_f32(dw[m], dx));
        }
    }
}

static void gn_tokens(float32x4_t (*acc)[4], const uint8_t *w, const gq_act *a, int bits, int64_t nt, int64_t g0,
                      int64_t g1) {
#define GN_CASE(B) \
    switch (nt) { \
    case 1: gn_tokens_n(acc, w, a, B, 1, g0, g1); break; \
    case 2: gn_tokens_n(acc, w, a, B, 2, g0, g1); break; \
    case 3: gn_tokens_n(acc, w, a, B, 3, g0, g1); break; \
    default: gn_tokens_n(acc, w, a, B, 4, g0, g1); break; \
    }
    if (bits == 4) { GN_CASE(4) } else { GN_CASE(8) }
#undef GN_CASE
}

/* One 16-row block `w` (all its groups) against T tokens; y[t * out + r] for r < n. */
static void gq_block_tokens(const uint8_t *w, int64_t groups, int bits, const gq_act *a, int64_t T, void *scratch,
                            uint16_t *y, int64_t out, int64_t n) {
    float32x4_t (*acc)[4] = (float32x4_t (*)[4])scratch;
    for (int64_t t = 0; t < T; t++)
        for (int m = 0; m < 4; m++) acc[t][m] = vdupq_n_f32(0.0f);
    for (int64_t g0 = 0; g0 < groups; g0 += GQ_CHUNK) {
        const int64_t g1 = groups - g0 < GQ_CHUNK ? groups : g0 + GQ_CHUNK;
        for (int64_t t = 0; t < T; t += GN_TT) gn_tokens(acc + t, w, a + t, bits, T - t, g0, g1);
    }
    for (int64_t t = 0; t < T; t++) np_store16(y + t * out, acc[t], n);
}

/* y[i] = x[i] W[i]^T for i < n, one token each, W in groups of `bits` (8 or 4): the 16-row blocks of all n
 * matrices are taken dynamically; each distinct token is prepared once (a MoE layer's w13 products share one). */
static void linear_group_grouped(int64_t n, const void *const *w, const uint16_t *const *x, uint16_t *const *y,
                                 int64_t out, int64_t in, int bits, int threads) {
    if (n <= 0 || out <= 0) return;
    const int64_t groups = in / GQ_G, blocks = (out + 15) / 16, bytes = groups * gq_bytes(bits);
    int64_t *u = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * n)), *first = u + n;
    const int64_t nu = distinct_inputs(n, x, u, first);
    int8_t *q = (int8_t *)malloc((size_t)(nu * in));
    float *d = (float *)malloc(sizeof(float) * (size_t)(nu * groups));
    int32_t *c = (int32_t *)malloc(sizeof(int32_t) * (size_t)(nu * groups));
    for (int64_t k = 0; k < nu; k++) gq_prepare(x[first[k]], in, q + k * in, d + k * groups, c + k * groups);
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 2)
    for (int64_t g = 0; g < n * blocks; g++) {
        const int64_t i = g / blocks, b = g % blocks;
        const gq_act a = gq_token(q, d, c, in, u[i]);
        float32x4_t acc[1][4];
        gq_block_tokens((const uint8_t *)w[i] + b * bytes, groups, bits, &a, 1, acc, y[i] + 16 * b, out,
                        out - 16 * b);
    }
    free(q); free(d); free(c); free(u);
}

/* W [rows, in] bf16 -> nibbles and bf16 scales exactly as lfm2cli.quantize.quantize_int4 makes them (the x86
 * version's rule, in scalar C): per group, m = the value of largest magnitude (the positive one on a tie),
 * d = bf16(m / -8), q = round(w / d) (a true division, half to even) clamped to -8..7, 0 where d = 0. */
void lfm2_quantize_int4(const uint16_t *w, int64_t rows, int64_t in, uint8_t *nib, uint16_t *scales,
                        int threads) {
    const int64_t groups = in / GQ_G;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *src = w + r * in + g * GQ_G;
            float mx = -INFINITY, mn = INFINITY;
            for (int i = 0; i < GQ_G; i++) {
                const float f = f32(src[i]);
                mx = mx > f ? mx : f, mn = mn < f ? mn : f; /* as maxps / minps */
            }
            const bf16_t d = bf((mx >= -mn ? mx : mn) / -8.0f);
            scales[r * groups + g] = d;
            uint8_t *o = nib + r * (in / 2) + g * (GQ_G / 2);
            if (f32(d) == 0.0f) { memset(o, 0x88, GQ_G / 2); continue; }
            for (int i = 0; i < GQ_G; i += 2) {
                uint8_t b[2];
                for (int j = 0; j < 2; j++) {
                    const float v = nearbyintf(f32(src[i + j]) / f32(d));
                    b[j] = (uint8_t)((v < -8.0f ? -8.0f : v > 7.0f ? 7.0f : v) + 8.0f);
                }
                o[i / 2] = (uint8_t)(b[0] | (b[1] << 4));
            }
        }
}

/* W [rows, in] bf16 -> int8 q and fp16 scales exactly as lfm2cli.quantize.quantize_int8 makes them: per group,
 * d = fp16(max|w| / 127) (FCVT rounds to nearest even, as torch), q = round(w / d) clamped to -127..127, 0 where
 * d = 0. */
void lfm2_quantize_int8(const uint16_t *w, int64_t rows, int64_t in, int8_t *q, uint16_t *scales, int threads) {
    const int64_t groups = in / GQ_G;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *src = w + r * in + g * GQ_G;
            uint16_t top = 0; /* max |w| on the bits: without the sign, bf16 bits order as the values do */
            for (int i = 0; i < GQ_G; i++) {
                const uint16_t a = src[i] & 0x7fffu;
                top = a > top ? a : top;
            }
            const float16x4_t h = vcvt_f16_f32(vdupq_n_f32(f32(top) / 127.0f));
            scales[r * groups + g] = vget_lane_u16(vreinterpret_u16_f16(h), 0);
            const float d = vgetq_lane_f32(vcvt_f32_f16(h), 0);
            int8_t *dst = q + r * in + g * GQ_G;
            for (int i = 0; i < GQ_G; i++) {
                const float v = d != 0.0f ? nearbyintf(f32(src[i]) / d) : 0.0f;
                dst[i] = (int8_t)(v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v);
            }
        }
}
#endif /* LFM2_ARM */
