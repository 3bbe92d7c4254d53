/* Weight-only int4 (lfm2cli/quantize.py): groups of 32 consecutive inputs, one bf16 scale per row and group,
 * q in -8..7. One file for both levels, in 256-bit AVX2 + FMA code (valid on every AVX512 CPU too).
 *
 * Layout ("nibbles", made by lfm2_pack_int4): [out/16][in/32][I4_BYTES]. Per 16-row block and group: the 16
 * rows' scales (bf16, 32 bytes), then four steps of 8 inputs, each as rows 0-7 then rows 8-15 (32 bytes each),
 * a row's 32-bit lane holding q + 8 of input 8s + j (j < 4) in the low nibble of byte j and of input
 * 8s + j + 4 in its high nibble. A block's groups follow each other, so decode reads each block, scales
 * included, as one forward stream; every 32-byte piece is 32-byte aligned (288 = 9 * 32), none crosses a
 * cache line. Rows are padded to a multiple of 64 with zero scales.
 *
 * Each token is rounded per group of 32 to int8, q = round(x * 127 / m), with the float scale m / 127 (m = max|x|
 * of the group), as llama.cpp's Q8_0 activations. vpmaddubsw takes the unsigned nibbles (q + 8) times the signed
 * bytes, and 8 of its int16 pairs add up in int16 without overflow (16 products of at most 15 * 127: 30480);
 * vpmaddwd by ones gives each row's 32 products in int32, less the per-token constant 8 * sum q of the group,
 * then one FMA with the product of the two scales, group after group in order. So a token's result does not
 * depend on how many tokens share the call: prefill and decode give the same bits. Prefill runs the same way
 * (measured ~1.8x the bf16 and int8 prefill, which widen weights to bf16 for FMA tiles: vpmaddubsw does 32
 * multiply-adds per instruction, an FMA 8). With AVX512-VNNI, vpdpbusd on 512 bits would do 4x as many. */
#if LFM2_ISA >= 1

#define I4_G 32              /* inputs per group */
#define I4_BYTES 288         /* one block's group: 16 scales (32 bytes) and 16 x 32 nibbles (256 bytes) */
#define I4_TILE 32           /* tokens that meet each block in turn (many tokens): their int8 rows stay in L2 */
#define I4_STREAMS 4         /* blocks walked side by side per thread in one-token decode */
#define I4_PART_BYTES (1 << 19) /* about this many weight bytes per part that the threads take in turn */
#define I4_CHUNK 32          /* groups per pass for several tokens: a block's chunk (9 KB) stays in L1 */

/* One token's int8 activations, group by group: q [in], scale d [in / 32], c = 8 * sum q [in / 32]. */
typedef struct { const int8_t *q; const float *d; const int32_t *c; } i4_act;

static inline __m256i i4_bcast4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }

/* 8 bf16 values -> 8 floats (exact). */
static inline __m256 i4_f32x8(const void *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 8 floats -> bf16 in the upper half of each lane, rounded to nearest even; NaN stays a quiet NaN (as bf()). */
static inline __m256i i4_round_bf16(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
}

/* x [in] bf16 -> its int8 groups (see above). Vectorised; the same arithmetic as the torch reference in
 * tests/test_int4.py (float multiply by 127 / m, round half to even), so the bytes agree exactly. */
static void i4_prepare(const uint16_t *x, int64_t in, int8_t *q, float *d, int32_t *c) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t g = 0; g < in / I4_G; g++) {
        __m256 f[4], top = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            f[k] = i4_f32x8(x + g * I4_G + 8 * k);
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
        _mm256_storeu_si256((__m256i *)(q + g * I4_G), _mm256_permutevar8x32_epi32(b, perm));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        c[g] = 8 * _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
    }
}

/* Stores 16 sums (rows 0-7 in lo, 8-15 in hi) as bf16 into y[0..n), n < 16 only in the last block. */
static inline void i4_store16(uint16_t *y, __m256 lo, __m256 hi, int64_t n) {
    if (n <= 0) return;
    const __m256i a = i4_round_bf16(lo), b = i4_round_bf16(hi);
    const __m256i p = _mm256_permute4x64_epi64(
        _mm256_packus_epi32(_mm256_srli_epi32(a, 16), _mm256_srli_epi32(b, 16)), 0xD8);
    if (n >= 16) {
        _mm256_storeu_si256((__m256i *)y, p);
    } else {
        uint16_t tmp[16];
        _mm256_storeu_si256((__m256i *)tmp, p);
        memcpy(y, tmp, (size_t)n * 2);
    }
}

/* s += the int16 pair sums of one 32-byte piece (8 rows x 8 inputs) with the token's 8 bytes xl, xh. */
static inline __m256i i4_madd(__m256i s, __m256i v, __m256i xl, __m256i xh, __m256i m4) {
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(v, m4), xl));
    return _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), xh));
}

/* NS blocks (wb[k], each with its token a[k]) over groups [g0, g1): acc[2k], acc[2k + 1] (rows 0-7, 8-15 of
 * block k) += their products. NS is a constant in each call, so the arrays stay in registers. The blocks are
 * walked side by side 64 bytes at a time, as the int8 kernel walks its four runs: measured on a 2-core Zen 3,
 * ~15 % faster than a whole group (288 bytes) of one block after the other, while software prefetching (of
 * the next group or chunk, 0.5-4.5 KB ahead) was 10-30 % slower. The 8 int16 sums of 4 blocks, the two
 * broadcasts and the mask fit the 16 registers; the float sums, touched once per group, may wait in L1. */
static inline __attribute__((always_inline)) void i4_blocks_n(__m256 *acc, const uint8_t *const *wb,
        const i4_act *a, const int NS, const int SH, int64_t g0, int64_t g1) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 s[2 * I4_STREAMS];
    _Pragma("GCC unroll 8") for (int k = 0; k < 2 * NS; k++) s[k] = acc[k];
    for (int64_t g = g0; g < g1; g++) {
        __m256i lo[I4_STREAMS], hi[I4_STREAMS];
        _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) lo[k] = hi[k] = _mm256_setzero_si256();
        _Pragma("GCC unroll 4") for (int st = 0; st < 4; st++)
            _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) {
                const uint8_t *p = wb[k] + g * I4_BYTES + 32 + 64 * st;
                const int8_t *xq = a[SH ? 0 : k].q + g * I4_G + 8 * st; /* SH: one token, loaded once */
                const __m256i xl = i4_bcast4(xq), xh = i4_bcast4(xq + 4);
                lo[k] = i4_madd(lo[k], _mm256_loadu_si256((const __m256i *)p), xl, xh, m4);
                __asm__("" : "+x"(lo[k])); /* keeps each sum in its register (else gcc reorders and spills) */
                hi[k] = i4_madd(hi[k], _mm256_loadu_si256((const __m256i *)(p + 32)), xl, xh, m4);
                __asm__("" : "+x"(hi[k]));
            }
        _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) {
            const uint8_t *p = wb[k] + g * I4_BYTES;
            const __m256i c = _mm256_set1_epi32(a[SH ? 0 : k].c[g]);
            const __m256 dx = _mm256_set1_ps(a[SH ? 0 : k].d[g]);
            const __m256 il = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_madd_epi16(lo[k], ones), c));
            const __m256 ih = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_madd_epi16(hi[k], ones), c));
            s[2 * k] = _mm256_fmadd_ps(il, _mm256_mul_ps(i4_f32x8(p), dx), s[2 * k]);
            s[2 * k + 1] = _mm256_fmadd_ps(ih, _mm256_mul_ps(i4_f32x8(p + 16), dx), s[2 * k + 1]);
        }
    }
    _Pragma("GCC unroll 8") for (int k = 0; k < 2 * NS; k++) acc[k] = s[k];
}

/* ---- One token per matrix: lfm2_linear with T = 1, and a MoE layer's routed experts (n matrices of one
 * shape, each with its own token). As the AVX2 int8 group kernel: the 16-row blocks of all n matrices form one
 * sequence, cut in parts the threads take in turn, each part walked as I4_STREAMS runs side by side. */
typedef struct {
    const uint8_t *const *w; uint16_t *const *y;
    int64_t out, in, blocks;
    const int64_t *u; const int8_t *q; const float *d; const int32_t *c; /* token u[i] of matrix i, prepared */
} i4_job;

static inline i4_act i4_token(const i4_job *J, int64_t u) {
    const int64_t groups = J->in / I4_G;
    i4_act a = {J->q + u * J->in, J->d + u * groups, J->c + u * groups};
    return a;
}

static void i4_blocks(const i4_job *J, const int64_t *g, int NS) {
    const uint8_t *wb[I4_STREAMS];
    i4_act a[I4_STREAMS];
    __m256 acc[2 * I4_STREAMS];
    const int64_t groups = J->in / I4_G;
    for (int k = 0; k < NS; k++) {
        const int64_t i = g[k] / J->blocks, b = g[k] % J->blocks;
        wb[k] = J->w[i] + b * groups * I4_BYTES, a[k] = i4_token(J, J->u[i]);
        acc[2 * k] = acc[2 * k + 1] = _mm256_setzero_ps();
    }
    int shared = 1;
    for (int k = 1; k < NS; k++) shared &= a[k].q == a[0].q;
    if (NS == 1) i4_blocks_n(acc, wb, a, 1, 1, 0, groups);
    else if (shared) i4_blocks_n(acc, wb, a, I4_STREAMS, 1, 0, groups);
    else i4_blocks_n(acc, wb, a, I4_STREAMS, 0, 0, groups);
    for (int k = 0; k < NS; k++) {
        const int64_t i = g[k] / J->blocks, b = g[k] % J->blocks;
        i4_store16(J->y[i] + 16 * b, acc[2 * k], acc[2 * k + 1], J->out - 16 * b);
    }
}

static void i4_span(const i4_job *J, int64_t g0, int64_t g1) {
    const int64_t len = (g1 - g0) / I4_STREAMS;
    int64_t g[I4_STREAMS];
    for (int64_t i = 0; i < len; i++) {
        for (int k = 0; k < I4_STREAMS; k++) g[k] = g0 + k * len + i;
        i4_blocks(J, g, I4_STREAMS);
    }
    for (int64_t r = g0 + I4_STREAMS * len; r < g1; r++) i4_blocks(J, &r, 1);
}

/* y[i] = x[i] W[i]^T for i < n, one token each, in one parallel region; each distinct token is prepared once
 * (a MoE layer's w13 products all read the same one). */
void lfm2_linear_group_int4(int64_t n, const void *const *w, const uint16_t *const *x, uint16_t *const *y,
                            int64_t out, int64_t in, int threads) {
    if (n <= 0 || out <= 0) return;
    const int64_t groups = in / I4_G;
    int64_t *u = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * n)), *first = u + n, nu = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t j = 0;
        while (j < nu && x[first[j]] != x[i]) j++;
        if (j == nu) first[nu++] = i;
        u[i] = j;
    }
    int8_t *q = (int8_t *)malloc((size_t)(nu * in));
    float *d = (float *)malloc(sizeof(float) * (size_t)(nu * groups));
    int32_t *c = (int32_t *)malloc(sizeof(int32_t) * (size_t)(nu * groups));
    i4_job J = {(const uint8_t *const *)w, y, out, in, (out + 15) / 16, u, q, d, c};
    /* equal parts of about I4_PART_BYTES, a multiple of `threads` of them, taken dynamically */
    const int64_t total = n * J.blocks, nt = threads > 1 ? threads : 1;
    const int64_t per = I4_PART_BYTES / (groups * I4_BYTES) > 1 ? I4_PART_BYTES / (groups * I4_BYTES) : 1;
    const int64_t parts = ((total + per - 1) / per + nt - 1) / nt * nt;
    /* the tokens first, here: a few microseconds, less than a barrier costs */
    for (int64_t k = 0; k < nu; k++) i4_prepare(x[first[k]], in, q + k * in, d + k * groups, c + k * groups);
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t p = 0; p < parts; p++) i4_span(&J, total * p / parts, total * (p + 1) / parts);
    free(q); free(d); free(c); free(u);
}

/* ---- Several tokens (decode of a few, and prefill): each block chunk by chunk, met by the tokens NT at a time
 * while the chunk is in L1. Each 32-byte piece is unpacked once for NT tokens (NT = 4: the unpacked piece, 8
 * int16 sums, 2 broadcasts, the mask and 2 products fill 15 registers). The float sums wait in part[t] (16 per
 * token) and take each group in order, as i4_blocks_n does: the same bits as one token alone. */
static inline __attribute__((always_inline)) void i4_tokens_n(float (*part)[16], const uint8_t *w,
        const i4_act *a, const int NT, int64_t g0, int64_t g1) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *p = w + g * I4_BYTES;
        __m256i s0[4], s1[4];
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) s0[t] = s1[t] = _mm256_setzero_si256();
        _Pragma("GCC unroll 4") for (int st = 0; st < 4; st++) {
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(p + 32 + 64 * st));
            const __m256i l0 = _mm256_and_si256(v0, m4), h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
            _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
                const int8_t *xq = a[t].q + g * I4_G + 8 * st;
                s0[t] = _mm256_add_epi16(s0[t], _mm256_add_epi16(_mm256_maddubs_epi16(l0, i4_bcast4(xq)),
                                                                 _mm256_maddubs_epi16(h0, i4_bcast4(xq + 4))));
                __asm__("" : "+x"(s0[t]));
            }
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(p + 64 + 64 * st));
            const __m256i l1 = _mm256_and_si256(v1, m4), h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
            _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
                const int8_t *xq = a[t].q + g * I4_G + 8 * st;
                s1[t] = _mm256_add_epi16(s1[t], _mm256_add_epi16(_mm256_maddubs_epi16(l1, i4_bcast4(xq)),
                                                                 _mm256_maddubs_epi16(h1, i4_bcast4(xq + 4))));
                __asm__("" : "+x"(s1[t]));
            }
        }
        const __m256 d0 = i4_f32x8(p), d1 = i4_f32x8(p + 16);
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            const __m256i c = _mm256_set1_epi32(a[t].c[g]);
            const __m256 dx = _mm256_set1_ps(a[t].d[g]);
            const __m256 i0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_madd_epi16(s0[t], ones), c));
            const __m256 i1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_madd_epi16(s1[t], ones), c));
            _mm256_storeu_ps(part[t], _mm256_fmadd_ps(i0, _mm256_mul_ps(d0, dx), _mm256_loadu_ps(part[t])));
            _mm256_storeu_ps(part[t] + 8, _mm256_fmadd_ps(i1, _mm256_mul_ps(d1, dx), _mm256_loadu_ps(part[t] + 8)));
        }
    }
}

static void i4_block_tokens(const uint8_t *w, int64_t groups, const i4_act *a, int64_t T, float (*part)[16],
                            uint16_t *y, int64_t out, int64_t n) {
    memset(part, 0, sizeof(float) * 16 * (size_t)T);
    for (int64_t g0 = 0; g0 < groups; g0 += I4_CHUNK) {
        const int64_t g1 = groups - g0 < I4_CHUNK ? groups : g0 + I4_CHUNK;
        for (int64_t t = 0; t < T; t += 4)
            switch (T - t) {
            case 1: i4_tokens_n(part + t, w, a + t, 1, g0, g1); break;
            case 2: i4_tokens_n(part + t, w, a + t, 2, g0, g1); break;
            case 3: i4_tokens_n(part + t, w, a + t, 3, g0, g1); break;
            default: i4_tokens_n(part + t, w, a + t, 4, g0, g1); break;
            }
    }
    for (int64_t t = 0; t < T; t++)
        i4_store16(y + t * out, _mm256_loadu_ps(part[t]), _mm256_loadu_ps(part[t] + 8), n);
}

/* W packed by lfm2_pack_int4, x [T, in] bf16, y [T, out] bf16, `in` a multiple of 32. */
void lfm2_linear_int4(const void *w, const uint16_t *x, uint16_t *y, int64_t T, int64_t out, int64_t in,
                      int threads) {
    if (T <= 0 || out <= 0) return;
    if (T == 1) {
        lfm2_linear_group_int4(1, &w, &x, &y, out, in, threads);
        return;
    }
    const int64_t groups = in / I4_G, blocks = (out + 15) / 16;
    int8_t *q = (int8_t *)malloc((size_t)(T * in));
    float *d = (float *)malloc(sizeof(float) * (size_t)(T * groups));
    int32_t *c = (int32_t *)malloc(sizeof(int32_t) * (size_t)(T * groups));
    i4_act *a = (i4_act *)malloc(sizeof(i4_act) * (size_t)T);
    #pragma omp parallel num_threads(threads)
    {
        float (*part)[16] = (float (*)[16])malloc(sizeof(float) * 16 * I4_TILE);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            i4_prepare(x + t * in, in, q + t * in, d + t * groups, c + t * groups);
            a[t].q = q + t * in, a[t].d = d + t * groups, a[t].c = c + t * groups;
        }
        for (int64_t t0 = 0; t0 < T; t0 += I4_TILE) { /* tiles are independent: no barrier between them */
            const int64_t nt = T - t0 < I4_TILE ? T - t0 : I4_TILE;
            #pragma omp for schedule(dynamic, 1) nowait
            for (int64_t b = 0; b < blocks; b++)
                i4_block_tokens((const uint8_t *)w + b * groups * I4_BYTES, groups, a + t0, nt, part,
                                y + t0 * out + 16 * b, out, out - 16 * b);
        }
        free(part);
    }
    free(q); free(d); free(c); free(a);
}

/* W [rows, in] bf16 -> nibbles and bf16 scales exactly as lfm2cli.quantize.quantize_int4 makes them (the
 * torch version is the definition; this one is ~50x faster at load time): per group, m = the value of
 * largest magnitude (the positive one on a tie), d = bf16(m / -8), q = round(w / d) (a true division, half to
 * even) clamped to -8..7, 0 where d = 0. */
void lfm2_quantize_int4(const uint16_t *w, int64_t rows, int64_t in, uint8_t *nib, uint16_t *scales,
                        int threads) {
    const int64_t groups = in / I4_G;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *src = w + r * in + g * I4_G;
            __m256 f[4], hi = _mm256_set1_ps(-INFINITY), lo = _mm256_set1_ps(INFINITY);
            for (int k = 0; k < 4; k++) {
                f[k] = i4_f32x8(src + 8 * k);
                hi = _mm256_max_ps(hi, f[k]), lo = _mm256_min_ps(lo, f[k]);
            }
            __m128 h4 = _mm_max_ps(_mm256_castps256_ps128(hi), _mm256_extractf128_ps(hi, 1));
            __m128 l4 = _mm_min_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps(lo, 1));
            h4 = _mm_max_ps(h4, _mm_movehl_ps(h4, h4)), l4 = _mm_min_ps(l4, _mm_movehl_ps(l4, l4));
            const float mx = _mm_cvtss_f32(_mm_max_ss(h4, _mm_movehdup_ps(h4)));
            const float mn = _mm_cvtss_f32(_mm_min_ss(l4, _mm_movehdup_ps(l4)));
            const bf16_t d = bf((mx >= -mn ? mx : mn) / -8.0f);
            scales[r * groups + g] = d;
            uint8_t *o = nib + r * (in / 2) + g * (I4_G / 2);
            if (f32(d) == 0.0f) { memset(o, 0x88, I4_G / 2); continue; }
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

/* Nibbles [rows, in / 2] (byte k: q + 8 of input 2k low, of 2k + 1 high) and bf16 scales [rows, in / 32] ->
 * the layout above, rows padded with zeros to `padded` (a multiple of 16). */
void lfm2_pack_int4(const uint8_t *nib, const uint16_t *scales, uint8_t *dst, int64_t rows, int64_t padded,
                    int64_t in, int threads) {
    const int64_t groups = in / I4_G;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < padded / 16; b++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *o = dst + (b * groups + g) * I4_BYTES;
            memset(o, 0, I4_BYTES);
            for (int64_t r = 0; r < 16 && b * 16 + r < rows; r++) {
                const int64_t row = b * 16 + r;
                memcpy(o + 2 * r, scales + row * groups + g, 2);
                const uint8_t *s = nib + row * (in / 2) + g * (I4_G / 2);
                for (int st = 0; st < 4; st++)
                    for (int j = 0; j < 4; j++) {
                        const int i = 8 * st + j; /* inputs i and i + 4 */
                        const uint8_t lo = (uint8_t)((s[i / 2] >> (4 * (i % 2))) & 0x0F);
                        const uint8_t hi = (uint8_t)((s[(i + 4) / 2] >> (4 * ((i + 4) % 2))) & 0x0F);
                        o[32 + 64 * st + 32 * (r / 8) + 4 * (r % 8) + j] = (uint8_t)(lo | (hi << 4));
                    }
            }
        }
}
#endif /* LFM2_ISA >= 1 */
