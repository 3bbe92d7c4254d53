/* Weight-only int8 and int4 in groups (lfm2cli/quantize.py): 32 consecutive inputs of a row share one scale;
 * int8 q in -127..127 with an fp16 scale (llama.cpp's Q8_0 rule), int4 q in -8..7 with a bf16 scale (Q4_0's).
 * One file for both levels, in 256-bit code: AVX2 + FMA, plus AVX512-VNNI's 256-bit vpdpbusd at LFM2_ISA 2.
 *
 * Layouts (made by lfm2_pack_grouped): [out/16][in/32][bytes]. Per 16-row block and group: the 16 rows' scales
 * (32 bytes), then steps of 64 bytes, each as rows 0-7 then rows 8-15 (32 bytes each):
 *   int8 (544 bytes = 17 * 32): eight steps of 4 inputs; a row's 32-bit lane holds q of inputs 4s..4s+3.
 *   int4 (288 bytes = 9 * 32): four steps of 8 inputs; a row's lane holds q + 8 of input 8s + j (j < 4) in the
 *   low nibble of byte j and of input 8s + j + 4 in its high nibble.
 * A block's groups follow each other, so decode reads each block, scales included, as one forward stream; every
 * 32-byte piece is 32-byte aligned and none crosses a cache line. Rows are padded to a multiple of 64 with zero
 * scales.
 *
 * Each token is rounded per group of 32 to int8, q = round(x * 127 / m), with the float scale m / 127 (m = max|x|
 * of the group), as llama.cpp's Q8_0 activations. int8 weights: vpmaddubsw takes |x| (unsigned) times the weight
 * with x's sign (vpsignb), pairs of at most 2 * 127 * 127 in int16, and vpmaddwd by ones widens them to int32.
 * int4: vpmaddubsw takes the unsigned nibbles (q + 8) times the signed bytes, 8 of its int16 pairs add up in
 * int16 without overflow (16 products of at most 15 * 127: 30480), vpmaddwd by ones gives each row's 32 products
 * in int32, less the per-token constant 8 * sum q of the group. At LFM2_ISA 2, AVX512-VNNI's vpdpbusd (in its
 * 256-bit form) does each multiply and its widening add in one instruction. Then one FMA with the product of the
 * two scales, group after group in order. All sums are exact integers, so a token's result does not depend on
 * the level or on how many tokens share the call: prefill and decode give the same bits. Prefill runs the same
 * way (int4 measured ~1.8x the bf16 prefill on AVX2, which FMAs widened floats: vpmaddubsw does 32
 * multiply-adds per instruction, an FMA 8). */
#if LFM2_ISA >= 1
#define GQ_G 32              /* inputs per group */
#define I8_BYTES 544         /* one block's int8 group: 16 scales (32 bytes) and 16 x 32 bytes */
#define I4_BYTES 288         /* one block's int4 group: 16 scales (32 bytes) and 16 x 32 nibbles */
#define GQ_TILE 32           /* tokens that meet each block in turn (many tokens): their int8 rows stay in L2 */
#define GQ_STREAMS 4         /* blocks walked side by side per thread in one-token decode */
#define GQ_PART_BYTES (1 << 19) /* about this many weight bytes per part that the threads take in turn */
#define GQ_CHUNK 32          /* groups per pass for several tokens: a block's chunk (9-17 KB) stays in L1/L2 */

static inline int64_t gq_bytes(int bits) { return bits == 4 ? I4_BYTES : I8_BYTES; }

/* One token's int8 activations, group by group: q [in], scale d [in / 32], c = 8 * sum q [in / 32]. */
typedef struct { const int8_t *q; const float *d; const int32_t *c; } gq_act;

/* Token u's activations in arrays prepared for several tokens. */
static inline gq_act gq_token(const int8_t *q, const float *d, const int32_t *c, int64_t in, int64_t u) {
    const int64_t groups = in / GQ_G;
    gq_act a = {q + u * in, d + u * groups, c + u * groups};
    return a;
}

#define GQ_SCRATCH 64 /* bytes of one token's partial sums for a 16-row block (16 floats), in gq_block_tokens */

/* Each family's part defines these (x86 below, AArch64 in linear_grouped_neon.c); the many-token driver
 * linear_grouped at the end of this file is shared. gq_prepare: x [in] bf16 -> its int8 groups. gq_block_tokens:
 * one 16-row block (all its groups) against T tokens, y[t * out + r] for r < n, with T * GQ_SCRATCH bytes of
 * `scratch`. linear_group_grouped: one token per matrix (decode, a MoE layer's experts). */
static void gq_prepare(const uint16_t *x, int64_t in, int8_t *q, float *d, int32_t *c);
static void gq_block_tokens(const uint8_t *w, int64_t groups, int bits, const gq_act *a, int64_t T, void *scratch,
                            uint16_t *y, int64_t out, int64_t n);
static void linear_group_grouped(int64_t n, const void *const *w, const uint16_t *const *x, uint16_t *const *y,
                                 int64_t out, int64_t in, int bits, int threads);
#endif /* LFM2_ISA >= 1: the layouts above are the AArch64 kernels' too (linear_grouped_neon.c) */

#if LFM2_X86

static inline __m256i gq_bcast4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }

/* 8 bf16 values -> 8 floats (exact). */
static inline __m256 gq_f32x8(const void *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* x [in] bf16 -> its int8 groups (see above). Vectorised; the same arithmetic as the torch reference in
 * tests/test_grouped.py (float multiply by 127 / m, round half to even), so the bytes agree exactly. */
static void gq_prepare(const uint16_t *x, int64_t in, int8_t *q, float *d, int32_t *c) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t g = 0; g < in / GQ_G; g++) {
        __m256 f[4], top = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            f[k] = gq_f32x8(x + g * GQ_G + 8 * k);
            top = _mm256_max_ps(top, _mm256_and_ps(f[k], absmask));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float m = _mm_cvtss_f32(m4), inv = m > 0.0f ? 127.0f / m : 0.0f;
        d[g] = m / 127.0f;
        const __m256 vinv = _mm256_set1_ps(inv);
        __m256i i[4], sum = _mm256_setzero_si256();
        for (int k = 0; k < 4; k++) {
            i[k] = _mm256_cvtps_epi32(_mm256_mul_ps(f[k], vinv)); /* nearest even; |x * inv| <= 127 */
            sum = _mm256_add_epi32(sum, i[k]);
        }
        const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        _mm256_storeu_si256((__m256i *)(q + g * GQ_G), _mm256_permutevar8x32_epi32(b, perm));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        c[g] = 8 * _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
    }
}

/* int4: s += the unpacked nibbles lo, hi (8 rows x 4 inputs each) times the token's bytes xl, xh: int16 pair sums
 * (vpmaddubsw), or at LFM2_ISA 2 int32 sums per row (vpdpbusd, one instruction for a multiply and an add). */
static inline __m256i i4_dot(__m256i s, __m256i lo, __m256i hi, __m256i xl, __m256i xh) {
#if LFM2_ISA >= 2
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(s, lo, xl), hi, xh);
#else
    return _mm256_add_epi16(s, _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)));
#endif
}

/* int4: s += one 32-byte piece (8 rows x 8 inputs) times the token's bytes xl, xh. */
static inline __m256i i4_madd(__m256i s, __m256i v, __m256i xl, __m256i xh, __m256i m4) {
    return i4_dot(s, _mm256_and_si256(v, m4), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), xl, xh);
}

/* int8: s (int32 per row) += one 32-byte piece (8 rows x 4 inputs) times the token's 4 bytes xb (|xb| in ax). */
static inline __m256i i8_dot(__m256i s, __m256i v, __m256i xb, __m256i ax) {
    const __m256i sv = _mm256_sign_epi8(v, xb);
#if LFM2_ISA >= 2
    return _mm256_dpbusd_epi32(s, ax, sv);
#else
    return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sv), _mm256_set1_epi16(1)));
#endif
}

/* A block's 16 scales for one group, rows 0-7 (half 0) or 8-15 (half 1), as floats: int8's are fp16, int4's bf16. */
static inline __m256 gq_scales(const uint8_t *p, int half, int bits) {
    if (bits == 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * half)));
    return gq_f32x8(p + 16 * half);
}

/* One piece's integer sums of a group -> float, for one token: int4's less the constant c (and, as int16 pairs,
 * added up to int32 first). */
static inline __m256 gq_group_sum(__m256i s, int bits, int32_t c) {
    if (bits == 8) return _mm256_cvtepi32_ps(s);
#if LFM2_ISA < 2
    s = _mm256_madd_epi16(s, _mm256_set1_epi16(1));
#endif
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(s, _mm256_set1_epi32(c)));
}

/* NS blocks (wb[k], each with its token a[k]) over groups [g0, g1): acc[2k], acc[2k + 1] (rows 0-7, 8-15 of
 * block k) += their products. BITS and NS are constants in each call, so the arrays stay in registers. The
 * blocks are walked side by side 64 bytes at a time: measured on a 2-core Zen 3, ~15 % faster than a whole group
 * of one block after the other, while software prefetching (of the next group or chunk, 0.5-4.5 KB ahead) was
 * 10-30 % slower. The 8 integer sums of 4 blocks, the broadcasts and a constant fit the 16 registers; the float
 * sums, touched once per group, may wait in L1. */
static inline __attribute__((always_inline)) void gq_blocks_n(__m256 *acc, const uint8_t *const *wb,
        const gq_act *a, const int BITS, const int NS, const int SH, int64_t g0, int64_t g1) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const int64_t GB = gq_bytes(BITS);
    __m256 s[2 * GQ_STREAMS];
    _Pragma("GCC unroll 8") for (int k = 0; k < 2 * NS; k++) s[k] = acc[k];
    for (int64_t g = g0; g < g1; g++) {
        __m256i lo[GQ_STREAMS], hi[GQ_STREAMS];
        _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) lo[k] = hi[k] = _mm256_setzero_si256();
        for (int st = 0; st < (BITS == 4 ? 4 : 8); st++)
            _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) {
                const uint8_t *p = wb[k] + g * GB + 32 + 64 * st;
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)p);
                const __m256i v1 = _mm256_loadu_si256((const __m256i *)(p + 32));
                if (BITS == 4) {
                    const int8_t *xq = a[SH ? 0 : k].q + g * GQ_G + 8 * st; /* SH: one token, loaded once */
                    const __m256i xl = gq_bcast4(xq), xh = gq_bcast4(xq + 4);
                    lo[k] = i4_madd(lo[k], v0, xl, xh, m4);
                    __asm__("" : "+x"(lo[k])); /* keeps each sum in its register (else gcc reorders and spills) */
                    hi[k] = i4_madd(hi[k], v1, xl, xh, m4);
                    __asm__("" : "+x"(hi[k]));
                } else {
                    const __m256i xb = gq_bcast4(a[SH ? 0 : k].q + g * GQ_G + 4 * st), ax = _mm256_abs_epi8(xb);
                    lo[k] = i8_dot(lo[k], v0, xb, ax);
                    __asm__("" : "+x"(lo[k]));
                    hi[k] = i8_dot(hi[k], v1, xb, ax);
                    __asm__("" : "+x"(hi[k]));
                }
            }
        _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) {
            const uint8_t *p = wb[k] + g * GB;
            const gq_act *t = a + (SH ? 0 : k);
            const __m256 dx = _mm256_set1_ps(t->d[g]);
            s[2 * k] = _mm256_fmadd_ps(gq_group_sum(lo[k], BITS, t->c[g]), _mm256_mul_ps(gq_scales(p, 0, BITS), dx),
                                       s[2 * k]);
            s[2 * k + 1] = _mm256_fmadd_ps(gq_group_sum(hi[k], BITS, t->c[g]),
                                           _mm256_mul_ps(gq_scales(p, 1, BITS), dx), s[2 * k + 1]);
        }
    }
    _Pragma("GCC unroll 8") for (int k = 0; k < 2 * NS; k++) acc[k] = s[k];
}

/* ---- One token per matrix: lfm2_linear with T = 1, and a MoE layer's routed experts (n matrices of one
 * shape, each with its own token). The 16-row blocks of all n matrices form one sequence, cut in parts the
 * threads take in turn, each part walked as GQ_STREAMS runs side by side. */
typedef struct {
    const uint8_t *const *w; uint16_t *const *y;
    int64_t out, in, blocks; int bits;
    const int64_t *u; const int8_t *q; const float *d; const int32_t *c; /* token u[i] of matrix i, prepared */
} gq_job;

static void gq_blocks(const gq_job *J, const int64_t *g, int NS) {
    const uint8_t *wb[GQ_STREAMS];
    gq_act a[GQ_STREAMS];
    __m256 acc[2 * GQ_STREAMS];
    const int64_t groups = J->in / GQ_G;
    for (int k = 0; k < NS; k++) {
        const int64_t i = g[k] / J->blocks, b = g[k] % J->blocks;
        wb[k] = J->w[i] + b * groups * gq_bytes(J->bits), a[k] = gq_token(J->q, J->d, J->c, J->in, J->u[i]);
        acc[2 * k] = acc[2 * k + 1] = _mm256_setzero_ps();
    }
    int shared = 1;
    for (int k = 1; k < NS; k++) shared &= a[k].q == a[0].q;
#define GQ_RUN(B) \
    if (NS == 1) gq_blocks_n(acc, wb, a, B, 1, 1, 0, groups); \
    else if (shared) gq_blocks_n(acc, wb, a, B, GQ_STREAMS, 1, 0, groups); \
    else gq_blocks_n(acc, wb, a, B, GQ_STREAMS, 0, 0, groups);
    if (J->bits == 4) { GQ_RUN(4) } else { GQ_RUN(8) }
#undef GQ_RUN
    for (int k = 0; k < NS; k++) {
        const int64_t i = g[k] / J->blocks, b = g[k] % J->blocks;
        store16x2(J->y[i] + 16 * b, acc[2 * k], acc[2 * k + 1], J->out - 16 * b);
    }
}

static void gq_span(const gq_job *J, int64_t g0, int64_t g1) {
    const int64_t len = (g1 - g0) / GQ_STREAMS;
    int64_t g[GQ_STREAMS];
    for (int64_t i = 0; i < len; i++) {
        for (int k = 0; k < GQ_STREAMS; k++) g[k] = g0 + k * len + i;
        gq_blocks(J, g, GQ_STREAMS);
    }
    for (int64_t r = g0 + GQ_STREAMS * len; r < g1; r++) gq_blocks(J, &r, 1);
}

/* y[i] = x[i] W[i]^T for i < n, one token each, W in groups of `bits` (8 or 4), in one parallel region; each
 * distinct token is prepared once (a MoE layer's w13 products all read the same one). */
static void linear_group_grouped(int64_t n, const void *const *w, const uint16_t *const *x, uint16_t *const *y,
                                 int64_t out, int64_t in, int bits, int threads) {
    if (n <= 0 || out <= 0) return;
    const int64_t groups = in / GQ_G;
    int64_t *u = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * n)), *first = u + n;
    const int64_t nu = distinct_inputs(n, x, u, first);
    int8_t *q = (int8_t *)malloc((size_t)(nu * in));
    float *d = (float *)malloc(sizeof(float) * (size_t)(nu * groups));
    int32_t *c = (int32_t *)malloc(sizeof(int32_t) * (size_t)(nu * groups));
    gq_job J = {(const uint8_t *const *)w, y, out, in, (out + 15) / 16, bits, u, q, d, c};
    /* equal parts of about GQ_PART_BYTES, a multiple of `threads` of them, taken dynamically */
    const int64_t total = n * J.blocks, nt = threads > 1 ? threads : 1, block = groups * gq_bytes(bits);
    const int64_t per = GQ_PART_BYTES / block > 1 ? GQ_PART_BYTES / block : 1;
    const int64_t parts = ((total + per - 1) / per + nt - 1) / nt * nt;
    /* the tokens first, here: a few microseconds, less than a barrier costs */
    for (int64_t k = 0; k < nu; k++) gq_prepare(x[first[k]], in, q + k * in, d + k * groups, c + k * groups);
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t p = 0; p < parts; p++) gq_span(&J, total * p / parts, total * (p + 1) / parts);
    free(q); free(d); free(c); free(u);
}

/* ---- Several tokens (decode of a few, and prefill): each block chunk by chunk, met by the tokens NT at a time
 * while the chunk is in cache. Each 32-byte piece is loaded (int4: unpacked) once for NT tokens (NT = 4: 8
 * integer sums, the pieces, broadcasts and a constant fill the 16 registers). The float sums wait in part[t]
 * (16 per token) and take each group in order, as gq_blocks_n does: the same bits as one token alone. */
static inline __attribute__((always_inline)) void gq_tokens_n(float (*part)[16], const uint8_t *w,
        const gq_act *a, const int BITS, const int NT, int64_t g0, int64_t g1) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const int64_t GB = gq_bytes(BITS);
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *p = w + g * GB;
        __m256i s0[4], s1[4];
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) s0[t] = s1[t] = _mm256_setzero_si256();
        for (int st = 0; st < (BITS == 4 ? 4 : 8); st++) {
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(p + 32 + 64 * st));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(p + 64 + 64 * st));
            if (BITS == 4) {
                const __m256i l0 = _mm256_and_si256(v0, m4), h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
                _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
                    const int8_t *xq = a[t].q + g * GQ_G + 8 * st;
                    s0[t] = i4_dot(s0[t], l0, h0, gq_bcast4(xq), gq_bcast4(xq + 4));
                    __asm__("" : "+x"(s0[t]));
                }
                const __m256i l1 = _mm256_and_si256(v1, m4), h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
                _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
                    const int8_t *xq = a[t].q + g * GQ_G + 8 * st;
                    s1[t] = i4_dot(s1[t], l1, h1, gq_bcast4(xq), gq_bcast4(xq + 4));
                    __asm__("" : "+x"(s1[t]));
                }
            } else {
                _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
                    const __m256i xb = gq_bcast4(a[t].q + g * GQ_G + 4 * st), ax = _mm256_abs_epi8(xb);
                    s0[t] = i8_dot(s0[t], v0, xb, ax);
                    __asm__("" : "+x"(s0[t]));
                    s1[t] = i8_dot(s1[t], v1, xb, ax);
                    __asm__("" : "+x"(s1[t]));
                }
            }
        }
        const __m256 d0 = gq_scales(p, 0, BITS), d1 = gq_scales(p, 1, BITS);
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            const __m256 dx = _mm256_set1_ps(a[t].d[g]);
            const __m256 i0 = gq_group_sum(s0[t], BITS, a[t].c[g]), i1 = gq_group_sum(s1[t], BITS, a[t].c[g]);
            _mm256_storeu_ps(part[t], _mm256_fmadd_ps(i0, _mm256_mul_ps(d0, dx), _mm256_loadu_ps(part[t])));
            _mm256_storeu_ps(part[t] + 8, _mm256_fmadd_ps(i1, _mm256_mul_ps(d1, dx), _mm256_loadu_ps(part[t] + 8)));
        }
    }
}

static inline __attribute__((always_inline)) void gq_chunk(float (*part)[16], const uint8_t *w, const gq_act *a,
                                                           const int BITS, int64_t T, int64_t g0, int64_t g1) {
    for (int64_t t = 0; t < T; t += 4)
        switch (T - t) {
        case 1: gq_tokens_n(part + t, w, a + t, BITS, 1, g0, g1); break;
        case 2: gq_tokens_n(part + t, w, a + t, BITS, 2, g0, g1); break;
        case 3: gq_tokens_n(part + t, w, a + t, BITS, 3, g0, g1); break;
        default: gq_tokens_n(part + t, w, a + t, BITS, 4, g0, g1); break;
        }
}

static void gq_block_tokens(const uint8_t *w, int64_t groups, int bits, const gq_act *a, int64_t T, void *scratch,
                            uint16_t *y, int64_t out, int64_t n) {
    float (*part)[16] = (float (*)[16])scratch;
    memset(part, 0, sizeof(float) * 16 * (size_t)T);
    for (int64_t g0 = 0; g0 < groups; g0 += GQ_CHUNK) {
        const int64_t g1 = groups - g0 < GQ_CHUNK ? groups : g0 + GQ_CHUNK;
        if (bits == 4) gq_chunk(part, w, a, 4, T, g0, g1);
        else gq_chunk(part, w, a, 8, T, g0, g1);
    }
    for (int64_t t = 0; t < T; t++)
        store16x2(y + t * out, _mm256_loadu_ps(part[t]), _mm256_loadu_ps(part[t] + 8), n);
}

/* W [rows, in] bf16 -> nibbles and bf16 scales exactly as lfm2cli.quantize.quantize_int4 makes them (the
 * torch version is the definition; this one is ~50x faster at load time): per group, m = the value of
 * largest magnitude (the positive one on a tie), d = bf16(m / -8), q = round(w / d) (a true division, half to
 * even) clamped to -8..7, 0 where d = 0. */
void lfm2_quantize_int4(const uint16_t *w, int64_t rows, int64_t in, uint8_t *nib, uint16_t *scales,
                        int threads) {
    const int64_t groups = in / GQ_G;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *src = w + r * in + g * GQ_G;
            __m256 f[4], hi = _mm256_set1_ps(-INFINITY), lo = _mm256_set1_ps(INFINITY);
            for (int k = 0; k < 4; k++) {
                f[k] = gq_f32x8(src + 8 * k);
                hi = _mm256_max_ps(hi, f[k]), lo = _mm256_min_ps(lo, f[k]);
            }
            __m128 h4 = _mm_max_ps(_mm256_castps256_ps128(hi), _mm256_extractf128_ps(hi, 1));
            __m128 l4 = _mm_min_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps(lo, 1));
            h4 = _mm_max_ps(h4, _mm_movehl_ps(h4, h4)), l4 = _mm_min_ps(l4, _mm_movehl_ps(l4, l4));
            const float mx = _mm_cvtss_f32(_mm_max_ss(h4, _mm_movehdup_ps(h4)));
            const float mn = _mm_cvtss_f32(_mm_min_ss(l4, _mm_movehdup_ps(l4)));
            const bf16_t d = bf((mx >= -mn ? mx : mn) / -8.0f);
            scales[r * groups + g] = d;
            uint8_t *o = nib + r * (in / 2) + g * (GQ_G / 2);
            if (f32(d) == 0.0f) { memset(o, 0x88, GQ_G / 2); continue; }
            const __m256 vd = _mm256_set1_ps(f32(d));
            __m256i q[4];
            for (int k = 0; k < 4; k++) { /* q + 8 in 0..15 */
                const __m256i v = _mm256_cvtps_epi32(_mm256_div_ps(f[k], vd));
                q[k] = _mm256_add_epi32(_mm256_max_epi32(_mm256_min_epi32(v, _mm256_set1_epi32(7)),
                                                         _mm256_set1_epi32(-8)), _mm256_set1_epi32(8));
            }
            /* 32 values in order as bytes, then each pair into one byte */
            const __m256i b = _mm256_permutevar8x32_epi32(
                _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])),
                _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            const __m256i pair = _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi16(0x0F)),
                                                 _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi16(0xF0)));
            const __m256i packed = _mm256_packus_epi16(pair, pair); /* 8 bytes per 128-bit half */
            const int64_t lo8 = _mm256_extract_epi64(packed, 0), hi8 = _mm256_extract_epi64(packed, 2);
            memcpy(o, &lo8, 8), memcpy(o + 8, &hi8, 8);
        }
}

/* W [rows, in] bf16 -> int8 q and fp16 scales exactly as lfm2cli.quantize.quantize_int8 makes them (the torch code is
 * the definition: float32 arithmetic, a true division, round half to even), at memory speed instead of ~20 M
 * weights/s: per group, d = fp16(max|w| / 127), q = round(w / d) clamped to -127..127, 0 where d = 0. */
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
            const uint16_t h = _cvtss_sh(f32(top) / 127.0f, _MM_FROUND_TO_NEAREST_INT); /* as torch rounds it */
            scales[r * groups + g] = h;
            const float d = _cvtsh_ss(h);
            int8_t *dst = q + r * in + g * GQ_G;
            for (int i = 0; i < GQ_G; i++) {
                const float v = d != 0.0f ? nearbyintf(f32(src[i]) / d) : 0.0f;
                dst[i] = (int8_t)(v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v);
            }
        }
}

#endif /* LFM2_X86 */

#if LFM2_ISA >= 1
/* int8 q [rows, in] (bits 8) or nibbles [rows, in / 2] (bits 4: byte k holds q + 8 of input 2k low, of 2k + 1
 * high), and their 16-bit scales [rows, in / 32] -> the layouts above, rows padded with zeros to `padded` (a multiple of
 * 16). */
void lfm2_pack_grouped(const uint8_t *src, const uint16_t *scales, uint8_t *dst, int64_t rows, int64_t padded,
                       int64_t in, int bits, int threads) {
    const int64_t groups = in / GQ_G, bytes = gq_bytes(bits), row_bytes = in * bits / 8;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < padded / 16; b++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *o = dst + (b * groups + g) * bytes;
            memset(o, 0, (size_t)bytes);
            for (int64_t r = 0; r < 16 && b * 16 + r < rows; r++) {
                const int64_t row = b * 16 + r;
                memcpy(o + 2 * r, scales + row * groups + g, 2);
                const uint8_t *s = src + row * row_bytes + g * GQ_G * bits / 8;
                uint8_t *lane = o + 32 + 32 * (r / 8) + 4 * (r % 8);
                if (bits == 8) {
                    for (int st = 0; st < 8; st++) memcpy(lane + 64 * st, s + 4 * st, 4);
                    continue;
                }
                for (int st = 0; st < 4; st++)
                    for (int j = 0; j < 4; j++) {
                        const int i = 8 * st + j; /* inputs i and i + 4 */
                        const uint8_t lo = (uint8_t)((s[i / 2] >> (4 * (i % 2))) & 0x0F);
                        const uint8_t hi = (uint8_t)((s[(i + 4) / 2] >> (4 * ((i + 4) % 2))) & 0x0F);
                        lane[64 * st + j] = (uint8_t)(lo | (hi << 4));
                    }
            }
        }
}

/* W packed by lfm2_pack_grouped in groups of `bits`, x [T, in] bf16, y [T, out] bf16, `in` a multiple of 32. */
static void linear_grouped(const void *w, const uint16_t *x, uint16_t *y, int64_t T, int64_t out, int64_t in,
                           int bits, int threads) {
    if (T <= 0 || out <= 0) return;
    if (T == 1) {
        linear_group_grouped(1, &w, &x, &y, out, in, bits, threads);
        return;
    }
    const int64_t groups = in / GQ_G, blocks = (out + 15) / 16, block = groups * gq_bytes(bits);
    int8_t *q = (int8_t *)malloc((size_t)(T * in));
    float *d = (float *)malloc(sizeof(float) * (size_t)(T * groups));
    int32_t *c = (int32_t *)malloc(sizeof(int32_t) * (size_t)(T * groups));
    gq_act *a = (gq_act *)malloc(sizeof(gq_act) * (size_t)T);
    #pragma omp parallel num_threads(threads)
    {
        void *part = malloc(GQ_SCRATCH * GQ_TILE);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            gq_prepare(x + t * in, in, q + t * in, d + t * groups, c + t * groups);
            a[t] = gq_token(q, d, c, in, t);
        }
        for (int64_t t0 = 0; t0 < T; t0 += GQ_TILE) { /* tiles are independent: no barrier between them */
            const int64_t nt = T - t0 < GQ_TILE ? T - t0 : GQ_TILE;
            #pragma omp for schedule(dynamic, 1) nowait
            for (int64_t b = 0; b < blocks; b++)
                gq_block_tokens((const uint8_t *)w + b * block, groups, bits, a + t0, nt, part,
                                y + t0 * out + 16 * b, out, out - 16 * b);
        }
        free(part);
    }
    free(q); free(d); free(c); free(a);
}
#endif /* LFM2_ISA >= 1 */
