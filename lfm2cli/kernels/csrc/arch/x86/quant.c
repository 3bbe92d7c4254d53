/* int8 and int4 weights in groups of 32 (the layouts of pack.c) on both x86 levels, in 256-bit code: AVX2 +
 * FMA, and where the level's flags have AVX512-VNNI (the avx512 level), its 256-bit vpdpbusd; several tokens at
 * the avx512 level run in 512-bit code (below).
 *
 * Each token is rounded per group of 32 to int8, q = round(x * 127 / m), with the float scale m / 127 (m = max|x|
 * of the group), as llama.cpp's Q8_0 activations. int8 weights: vpmaddubsw takes |x| (unsigned) times the weight
 * with x's sign (vpsignb), pairs of at most 2 * 127 * 127 in int16, and vpmaddwd by ones widens them to int32.
 * int4: vpmaddubsw takes the unsigned nibbles (q + 8) times the signed bytes, 8 of its int16 pairs add up in
 * int16 without overflow (16 products of at most 15 * 127: 30480), vpmaddwd by ones gives each row's 32 products
 * in int32, less the per-token constant 8 * sum q of the group. With AVX512-VNNI, vpdpbusd does each multiply and
 * its widening add in one instruction. Then one FMA with the product of the two scales, group after group in
 * order. All sums are exact integers, so a token's result does not depend on the level or on how many tokens
 * share the call: prefill and decode give the same bits. Prefill runs the same way (int4 measured ~1.8x the bf16
 * prefill on AVX2, which FMAs widened floats: vpmaddubsw does 32 multiply-adds per instruction, an FMA 8). */

#define GQ_STREAMS 4         /* blocks walked side by side per thread in one-token decode */
/* A few tokens (a batched decode step: up to 8 sequences) meet each block once, straight from memory, one block
 * per thread at a time: the hardware prefetcher alone left the 350M int8 step at ~12 GB/s. Prefetching GQ_AHEAD
 * bytes ahead took 8 sequences from 238-269 to 345 tok/s (2-core Zen 4; 1-4 KB ahead gained less, 16 KB 315). */
#define GQ_FEW 8
#define GQ_AHEAD 8192

static inline __m256i gq_bcast4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }

/* x [in] bf16 -> its int8 groups (see above). Vectorised; the same arithmetic as the torch reference in
 * tests/test_grouped.py (float multiply by 127 / m, round half to even), so the bytes agree exactly. */
static void gq_prepare(const uint16_t *x, int64_t in, int8_t *q, float *d, int32_t *c) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t g = 0; g < in / GQ_G; g++) {
        __m256 f[4], top = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            f[k] = f32x8(x + g * GQ_G + 8 * k);
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
 * (vpmaddubsw), or with AVX512-VNNI int32 sums per row (vpdpbusd, one instruction for a multiply and an add). */
static inline __m256i i4_dot(__m256i s, __m256i lo, __m256i hi, __m256i xl, __m256i xh) {
#if defined(__AVX512VNNI__)
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
#if defined(__AVX512VNNI__)
    return _mm256_dpbusd_epi32(s, ax, sv);
#else
    return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sv), _mm256_set1_epi16(1)));
#endif
}

/* A block's 16 scales for one group, rows 0-7 (half 0) or 8-15 (half 1), as floats: int8's are fp16, int4's bf16. */
static inline __m256 gq_scales(const uint8_t *p, int half, int fmt) {
    if (fmt == LFM2_INT8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * half)));
    return f32x8(p + 16 * half);
}

/* One piece's integer sums of a group -> float, for one token: int4's less the constant c (and, as int16 pairs,
 * added up to int32 first). */
static inline __m256 gq_group_sum(__m256i s, int fmt, int32_t c) {
    if (fmt == LFM2_INT8) return _mm256_cvtepi32_ps(s);
#if !defined(__AVX512VNNI__)
    s = _mm256_madd_epi16(s, _mm256_set1_epi16(1));
#endif
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(s, _mm256_set1_epi32(c)));
}

/* NS blocks (wb[k], each with its token a[k]) over groups [g0, g1): acc[2k], acc[2k + 1] (rows 0-7, 8-15 of
 * block k) += their products. FMT and NS are constants in each call, so the arrays stay in registers. The
 * blocks are walked side by side 64 bytes at a time: measured on a 2-core Zen 3, ~15 % faster than a whole group
 * of one block after the other, while software prefetching (of the next group or chunk, 0.5-4.5 KB ahead) was
 * 10-30 % slower. The 8 integer sums of 4 blocks, the broadcasts and a constant fit the 16 registers; the float
 * sums, touched once per group, may wait in L1. */
static inline __attribute__((always_inline)) void gq_blocks_n(__m256 *acc, const uint8_t *const *wb,
        const gq_act *a, const int FMT, const int NS, const int SH, int64_t g0, int64_t g1) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const int64_t GB = FORMATS[FMT].block_bytes;
    __m256 s[2 * GQ_STREAMS];
    _Pragma("GCC unroll 8") for (int k = 0; k < 2 * NS; k++) s[k] = acc[k];
    for (int64_t g = g0; g < g1; g++) {
        __m256i lo[GQ_STREAMS], hi[GQ_STREAMS];
        _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) lo[k] = hi[k] = _mm256_setzero_si256();
        for (int st = 0; st < (FMT == LFM2_INT4 ? 4 : 8); st++)
            _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) {
                const uint8_t *p = wb[k] + g * GB + 32 + 64 * st;
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)p);
                const __m256i v1 = _mm256_loadu_si256((const __m256i *)(p + 32));
                if (FMT == LFM2_INT4) {
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
            s[2 * k] = _mm256_fmadd_ps(gq_group_sum(lo[k], FMT, t->c[g]), _mm256_mul_ps(gq_scales(p, 0, FMT), dx),
                                       s[2 * k]);
            s[2 * k + 1] = _mm256_fmadd_ps(gq_group_sum(hi[k], FMT, t->c[g]),
                                           _mm256_mul_ps(gq_scales(p, 1, FMT), dx), s[2 * k + 1]);
        }
    }
    _Pragma("GCC unroll 8") for (int k = 0; k < 2 * NS; k++) acc[k] = s[k];
}

/* NS 16-row blocks of the call (units g[k], see group_job), each against its matrix's token. */
static void gq_blocks(const group_job *J, const int64_t *g, int NS) {
    const uint8_t *wb[GQ_STREAMS];
    gq_act a[GQ_STREAMS];
    __m256 acc[2 * GQ_STREAMS];
    const int64_t groups = J->in / GQ_G;
    for (int k = 0; k < NS; k++) {
        const int64_t i = g[k] / J->units, b = g[k] % J->units;
        wb[k] = (const uint8_t *)J->w[i] + b * block_bytes(J->fmt, J->in), a[k] = gq_view(J->act[i], J->in);
        acc[2 * k] = acc[2 * k + 1] = _mm256_setzero_ps();
    }
    int shared = 1;
    for (int k = 1; k < NS; k++) shared &= a[k].q == a[0].q;
#define GQ_RUN(F) \
    if (NS == 1) gq_blocks_n(acc, wb, a, F, 1, 1, 0, groups); \
    else if (shared) gq_blocks_n(acc, wb, a, F, GQ_STREAMS, 1, 0, groups); \
    else gq_blocks_n(acc, wb, a, F, GQ_STREAMS, 0, 0, groups);
    if (J->fmt == LFM2_INT4) { GQ_RUN(LFM2_INT4) } else { GQ_RUN(LFM2_INT8) }
#undef GQ_RUN
    for (int k = 0; k < NS; k++) {
        const int64_t i = g[k] / J->units, b = g[k] % J->units;
        store16x2(J->y[i] + 16 * b, acc[2 * k], acc[2 * k + 1], J->out - 16 * b);
    }
}

/* group_kernel.span: the blocks g0..g1-1 of the call walked as GQ_STREAMS runs side by side. */
static void gq_span(const group_job *J, int64_t g0, int64_t g1) {
    const int64_t len = (g1 - g0) / GQ_STREAMS;
    int64_t g[GQ_STREAMS];
    for (int64_t i = 0; i < len; i++) {
        for (int k = 0; k < GQ_STREAMS; k++) g[k] = g0 + k * len + i;
        gq_blocks(J, g, GQ_STREAMS);
    }
    for (int64_t r = g0 + GQ_STREAMS * len; r < g1; r++) gq_blocks(J, &r, 1);
}

#if defined(__AVX512F__)
/* ---- Several tokens (decode of a few, and prefill), 512-bit: a 64-byte step of a block (16 rows x 4 inputs of
 * int8, 16 x 8 of int4) is one zmm with row r in lane r, loaded (int4: unpacked) once and met by NT tokens, each
 * with one vpdpbusd per 4 inputs against its broadcast bytes. vpdpbusd takes unsigned weights: int8's w + 128
 * (the sign bit flipped) times signed x adds 128 * sum x per group, int4's nibbles q + 8 add 8 * sum x (c);
 * the int32 sums start at minus that, so each group's sum is the exact integer of the 256-bit code and takes the
 * same single FMA with the two scales, in group order: the same bits as one token alone. NT = 8 keeps 8 integer
 * and 8 float sums, the weights and the constants in the 32 registers; an int8 token costs 8 vpdpbusd per
 * block and group where the 256-bit code takes 16 and 16 vpsignb. */
#define GQ_NT 8

static inline __attribute__((always_inline)) void gq_tokens_n(float (*part)[16], const uint8_t *w,
        const gq_act *a, const int FMT, const int NT, const int PF, int64_t g0, int64_t g1) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
    const int64_t GB = FORMATS[FMT].block_bytes;
    const int32_t K = FMT == LFM2_INT8 ? 16 : 1; /* c = 8 * sum x: int8's offset is 16 c, int4's c */
    __m512 f[GQ_NT];
    _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) f[t] = _mm512_loadu_ps(part[t]);
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *p = w + g * GB;
        __m512i s[GQ_NT];
        _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) s[t] = _mm512_set1_epi32(-K * a[t].c[g]);
        for (int st = 0; st < (FMT == LFM2_INT4 ? 4 : 8); st++) {
            if (PF) _mm_prefetch((const char *)(p + 32 + 64 * st) + GQ_AHEAD, _MM_HINT_T1);
            const __m512i v = _mm512_loadu_si512(p + 32 + 64 * st);
            if (FMT == LFM2_INT4) {
                const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) {
                    const int8_t *xq = a[t].q + g * GQ_G + 8 * st;
                    int32_t x0, x1;
                    memcpy(&x0, xq, 4), memcpy(&x1, xq + 4, 4);
                    s[t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s[t], lo, _mm512_set1_epi32(x0)), hi,
                                               _mm512_set1_epi32(x1));
                }
            } else {
                const __m512i u = _mm512_xor_si512(v, flip);
                _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) {
                    int32_t x0;
                    memcpy(&x0, a[t].q + g * GQ_G + 4 * st, 4);
                    s[t] = _mm512_dpbusd_epi32(s[t], u, _mm512_set1_epi32(x0));
                }
            }
        }
        const __m512 dw = FMT == LFM2_INT8
            ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p))
            : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
        _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++)
            f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), _mm512_mul_ps(dw, _mm512_set1_ps(a[t].d[g])), f[t]);
    }
    _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) _mm512_storeu_ps(part[t], f[t]);
}

/* T tokens over groups [g0, g1), in passes of at most GQ_NT of about equal size (10 tokens: 5 and 5). */
static inline __attribute__((always_inline)) void gq_chunk(float (*part)[16], const uint8_t *w, const gq_act *a,
                                                           const int FMT, const int PF, int64_t T, int64_t g0,
                                                           int64_t g1) {
    for (int64_t t = 0; t < T;) {
        const int64_t left = (T - t + GQ_NT - 1) / GQ_NT, n = (T - t + left - 1) / left;
        switch (n) {
        case 1: gq_tokens_n(part + t, w, a + t, FMT, 1, PF, g0, g1); break;
        case 2: gq_tokens_n(part + t, w, a + t, FMT, 2, PF, g0, g1); break;
        case 3: gq_tokens_n(part + t, w, a + t, FMT, 3, PF, g0, g1); break;
        case 4: gq_tokens_n(part + t, w, a + t, FMT, 4, PF, g0, g1); break;
        case 5: gq_tokens_n(part + t, w, a + t, FMT, 5, PF, g0, g1); break;
        case 6: gq_tokens_n(part + t, w, a + t, FMT, 6, PF, g0, g1); break;
        case 7: gq_tokens_n(part + t, w, a + t, FMT, 7, PF, g0, g1); break;
        default: gq_tokens_n(part + t, w, a + t, FMT, 8, PF, g0, g1); break;
        }
        t += n;
    }
}
#else
/* ---- Several tokens (decode of a few, and prefill): each block chunk by chunk, met by the tokens NT at a time
 * while the chunk is in cache. Each 32-byte piece is loaded (int4: unpacked) once for NT tokens (NT = 4: 8
 * integer sums, the pieces, broadcasts and a constant fill the 16 registers). The float sums wait in part[t]
 * (16 per token) and take each group in order, as gq_blocks_n does: the same bits as one token alone. */
static inline __attribute__((always_inline)) void gq_tokens_n(float (*part)[16], const uint8_t *w,
        const gq_act *a, const int FMT, const int NT, const int PF, int64_t g0, int64_t g1) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const int64_t GB = FORMATS[FMT].block_bytes;
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *p = w + g * GB;
        __m256i s0[4], s1[4];
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) s0[t] = s1[t] = _mm256_setzero_si256();
        for (int st = 0; st < (FMT == LFM2_INT4 ? 4 : 8); st++) {
            if (PF) _mm_prefetch((const char *)(p + 32 + 64 * st) + GQ_AHEAD, _MM_HINT_T1);
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(p + 32 + 64 * st));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(p + 64 + 64 * st));
            if (FMT == LFM2_INT4) {
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
        const __m256 d0 = gq_scales(p, 0, FMT), d1 = gq_scales(p, 1, FMT);
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            const __m256 dx = _mm256_set1_ps(a[t].d[g]);
            const __m256 i0 = gq_group_sum(s0[t], FMT, a[t].c[g]), i1 = gq_group_sum(s1[t], FMT, a[t].c[g]);
            _mm256_storeu_ps(part[t], _mm256_fmadd_ps(i0, _mm256_mul_ps(d0, dx), _mm256_loadu_ps(part[t])));
            _mm256_storeu_ps(part[t] + 8, _mm256_fmadd_ps(i1, _mm256_mul_ps(d1, dx), _mm256_loadu_ps(part[t] + 8)));
        }
    }
}

static inline __attribute__((always_inline)) void gq_chunk(float (*part)[16], const uint8_t *w, const gq_act *a,
                                                           const int FMT, const int PF, int64_t T, int64_t g0,
                                                           int64_t g1) {
    for (int64_t t = 0; t < T; t += 4)
        switch (T - t) {
        case 1: gq_tokens_n(part + t, w, a + t, FMT, 1, PF, g0, g1); break;
        case 2: gq_tokens_n(part + t, w, a + t, FMT, 2, PF, g0, g1); break;
        case 3: gq_tokens_n(part + t, w, a + t, FMT, 3, PF, g0, g1); break;
        default: gq_tokens_n(part + t, w, a + t, FMT, 4, PF, g0, g1); break;
        }
}

#endif

static void gq_block_tokens(const uint8_t *w, int64_t groups, int fmt, const gq_act *a, int64_t T, void *scratch,
                            uint16_t *y, int64_t out, int64_t n) {
    float (*part)[16] = (float (*)[16])scratch;
    memset(part, 0, sizeof(float) * 16 * (size_t)T);
    for (int64_t g0 = 0; g0 < groups; g0 += GQ_CHUNK) {
        const int64_t g1 = groups - g0 < GQ_CHUNK ? groups : g0 + GQ_CHUNK;
        if (T > GQ_FEW) { /* later passes over the chunk find it in cache */
            if (fmt == LFM2_INT4) gq_chunk(part, w, a, LFM2_INT4, 0, T, g0, g1);
            else gq_chunk(part, w, a, LFM2_INT8, 0, T, g0, g1);
        } else {
            if (fmt == LFM2_INT4) gq_chunk(part, w, a, LFM2_INT4, 1, T, g0, g1);
            else gq_chunk(part, w, a, LFM2_INT8, 1, T, g0, g1);
        }
    }
    for (int64_t t = 0; t < T; t++)
        store16x2(y + t * out, _mm256_loadu_ps(part[t]), _mm256_loadu_ps(part[t] + 8), n);
}

/* One int4 group (quantize.c's lfm2_quantize_int4): quantize_int4_scalar's rule, its divisions 8 at a time. */
static inline bf16_t quantize_int4_group(const uint16_t *src, uint8_t *o) {
    __m256 f[4], hi = _mm256_set1_ps(-INFINITY), lo = _mm256_set1_ps(INFINITY);
    for (int k = 0; k < 4; k++) {
        f[k] = f32x8(src + 8 * k);
        hi = _mm256_max_ps(hi, f[k]), lo = _mm256_min_ps(lo, f[k]);
    }
    __m128 h4 = _mm_max_ps(_mm256_castps256_ps128(hi), _mm256_extractf128_ps(hi, 1));
    __m128 l4 = _mm_min_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps(lo, 1));
    h4 = _mm_max_ps(h4, _mm_movehl_ps(h4, h4)), l4 = _mm_min_ps(l4, _mm_movehl_ps(l4, l4));
    const float mx = _mm_cvtss_f32(_mm_max_ss(h4, _mm_movehdup_ps(h4)));
    const float mn = _mm_cvtss_f32(_mm_min_ss(l4, _mm_movehdup_ps(l4)));
    const bf16_t d = bf((mx >= -mn ? mx : mn) / -8.0f);
    if (f32(d) == 0.0f) {
        memset(o, 0x88, GQ_G / 2);
        return d;
    }
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
    return d;
}

/* One token per matrix (decode; a MoE layer's experts): 16-row blocks, about GROUP_PART_BYTES of them per part,
 * each part walked as GQ_STREAMS runs side by side. */
#define GQ_GROUP_KERNEL {gq_act_bytes, gq_prepare_act, 16, 0, gq_span, 0}
