/* The matrix kernel for x86-64-v3 (AVX2 + FMA + F16C): LFM2_ISA 1. It reads the layouts of linear_avx512.c
 * (bf16 pairs [out/16][in/2][16][2], int8 quads [out/16][in/4][16][4] stored as w + 128, rows padded to 64),
 * so a model packed once runs at either level. A 64-byte chunk of a 16-row block is two 256-bit vectors of 8
 * rows each. Without vdpbf16ps, a 32-bit lane (one row's two bf16 inputs) becomes two floats: the even input
 * by a left shift, the odd one by masking off the low half; both are exact. */
#if LFM2_ISA == 1

#define HI16 (-65536)        /* 0xFFFF0000: keeps a lane's upper bf16, the odd input of a pair, as a float */

static inline __m256 even_f32(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
static inline __m256 odd_f32(__m256i v, __m256i hi) { return _mm256_castsi256_ps(_mm256_and_si256(v, hi)); }

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* a . b over d bf16 values, 32 at a time in four accumulators (a plain float loop is one serial chain of
 * multiply-adds, which the compiler may not reorder). */
static inline __m256i load8x32(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

static inline float dot_bf16(const bf16_t *a, const bf16_t *b, int64_t d) {
    const __m256i hi = _mm256_set1_epi32(HI16);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 32 <= d; i += 32) {
        const __m256i a0 = load8x32(a + i), b0 = load8x32(b + i), a1 = load8x32(a + i + 16), b1 = load8x32(b + i + 16);
        s0 = _mm256_fmadd_ps(even_f32(a0), even_f32(b0), s0);
        s1 = _mm256_fmadd_ps(odd_f32(a0, hi), odd_f32(b0, hi), s1);
        s2 = _mm256_fmadd_ps(even_f32(a1), even_f32(b1), s2);
        s3 = _mm256_fmadd_ps(odd_f32(a1, hi), odd_f32(b1, hi), s3);
    }
    if (i + 16 <= d) {
        const __m256i a0 = load8x32(a + i), b0 = load8x32(b + i);
        s0 = _mm256_fmadd_ps(even_f32(a0), even_f32(b0), s0);
        s1 = _mm256_fmadd_ps(odd_f32(a0, hi), odd_f32(b0, hi), s1);
        i += 16;
    }
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < d; i++) s += f32(a[i]) * f32(b[i]);
    return s;
}

#define TT 6                 /* tokens per bf16 register tile: 16 rows x 6 = 12 accumulators of the 16 registers */
#define PANEL 8              /* 16-row blocks that share each chunk of x while it is in L1 (prefill) */
#define KC 768               /* at most this many inputs per chunk: a panel's chunk of weights stays in L2 */
#define I8_DIRECT_ROWS 8     /* up to this many tokens, int8 weights meet the split activations; beyond, bf16 */
#define AHEAD 4096           /* bytes of a weight stream prefetched ahead into L2 where memory-bound */

/* 8 floats -> bf16 (round to nearest even, NaN kept quiet, as bf() in common.h), one per 32-bit lane. */
static inline __m256i bf16x8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v), top = _mm256_srli_epi32(u, 16);
    const __m256i odd = _mm256_and_si256(top, _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_or_si256(top, _mm256_set1_epi32(0x40)), nan);
}

/* Stores 16 sums (rows 0-7 in lo, 8-15 in hi; scaled when `scale`) as bf16 into y[0..n): n < 16 only in the
 * last block, whose rows past `out` belong to no one. */
static inline void store16(uint16_t *y, __m256 lo, __m256 hi, const float *scale, int64_t n) {
    if (n <= 0) return;
    if (scale) lo = _mm256_mul_ps(lo, _mm256_loadu_ps(scale)), hi = _mm256_mul_ps(hi, _mm256_loadu_ps(scale + 8));
    /* packus works within 128-bit halves: lo0-3 hi0-3 | lo4-7 hi4-7, put back in row order */
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16x8(lo), bf16x8(hi)), 0xD8);
    if (n >= 16) {
        _mm256_storeu_si256((__m256i *)y, p);
    } else {
        uint16_t tmp[16];
        _mm256_storeu_si256((__m256i *)tmp, p);
        memcpy(y, tmp, (size_t)n * 2);
    }
}

/* bf16 [n] -> float [n]; vectorised by the compiler (a zero extend and a shift). */
static void to_f32(const uint16_t *x, float *xf, int64_t n) {
    for (int64_t i = 0; i < n; i++) xf[i] = f32(x[i]);
}

/* One token (decode) against the 4 blocks of a 64-row tile (rows are padded to 64, so all 4 exist): four
 * forward streams of weights, one per block. On a 2-core Zen 3 that read ~15 % faster than one stream per
 * thread (more DRAM requests in flight), and faster than 2 or 8. x is float already, broadcast from memory; a
 * pair's two FMAs go to one accumulator, 8 chains of two cover the FMA latency when the tile is in cache. */
static void tile_gemv(const uint16_t *w, int64_t bs, int64_t pairs, const float *xf, uint16_t *y, int64_t n) {
    const __m256i hi = _mm256_set1_epi32(HI16);
    __m256 tot[4][2];
    _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) tot[k][0] = tot[k][1] = _mm256_setzero_ps();
    for (int64_t p0 = 0; p0 < pairs; p0 += KC / 2) { /* chunk sums added up: shorter float chains, as prefill */
        const int64_t p1 = pairs - p0 < KC / 2 ? pairs : p0 + KC / 2;
        __m256 a[4][2];
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) a[k][0] = a[k][1] = _mm256_setzero_ps();
        for (int64_t p = p0; p < p1; p++) {
            const __m256 x0 = _mm256_broadcast_ss(xf + 2 * p), x1 = _mm256_broadcast_ss(xf + 2 * p + 1);
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + k * bs + p * 32));
                const __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + k * bs + p * 32 + 16));
                a[k][0] = _mm256_fmadd_ps(odd_f32(v0, hi), x1, _mm256_fmadd_ps(even_f32(v0), x0, a[k][0]));
                a[k][1] = _mm256_fmadd_ps(odd_f32(v1, hi), x1, _mm256_fmadd_ps(even_f32(v1), x0, a[k][1]));
            }
        }
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
            tot[k][0] = _mm256_add_ps(tot[k][0], a[k][0]);
            tot[k][1] = _mm256_add_ps(tot[k][1], a[k][1]);
        }
    }
    _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) store16(y + 16 * k, tot[k][0], tot[k][1], 0, n - 16 * k);
}

/* NT tokens (rows of xf, `in` floats apart) against one 16-row block of bf16 pairs, over `pairs` pairs: each
 * weight vector is loaded once and used for every token, each broadcast of x for both halves of the block.
 * 2 NT accumulators, two weight vectors and one broadcast: 15 of the 16 registers at NT = 6 (the mask of the
 * odd inputs then comes from memory). Unless `first`, the sums are added to `part` (16 floats per token: the
 * chunks of `in` before this one); they go to y as bf16 when y is given, else back to `part`. With `ahead`
 * (a few tokens, where the block streams from memory) the weights are prefetched AHEAD bytes ahead: ~15 %
 * faster at 2-8 tokens; with many tokens the block is in cache and the prefetch cost ~4 %. NT and `ahead` are
 * constants in each call (tile_bf16), so the arrays stay in registers and the test leaves the loop. */
static inline __attribute__((always_inline)) void tile_bf16_n(
        const uint16_t *w, int64_t pairs, const float *xf, int64_t in, const int NT, const int ahead, float *part,
        int first, uint16_t *y, int64_t out, const float *scale, int64_t n) {
    const __m256i hi = _mm256_set1_epi32(HI16);
    __m256 a[TT], b[TT];
    _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) a[t] = b[t] = _mm256_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        if (ahead) _mm_prefetch((const char *)(w + p * 32) + AHEAD, _MM_HINT_T1);
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + p * 32));
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + p * 32 + 16));
        const __m256 e0 = even_f32(v0), e1 = even_f32(v1);
        _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) {
            const __m256 xv = _mm256_broadcast_ss(xf + t * in + 2 * p);
            a[t] = _mm256_fmadd_ps(e0, xv, a[t]);
            b[t] = _mm256_fmadd_ps(e1, xv, b[t]);
        }
        const __m256 o0 = odd_f32(v0, hi), o1 = odd_f32(v1, hi);
        _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) {
            const __m256 xv = _mm256_broadcast_ss(xf + t * in + 2 * p + 1);
            a[t] = _mm256_fmadd_ps(o0, xv, a[t]);
            b[t] = _mm256_fmadd_ps(o1, xv, b[t]);
        }
    }
    _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) {
        if (!first) { /* a chunk's sum joins the earlier ones' here, not as a start: shorter float chains */
            a[t] = _mm256_add_ps(a[t], _mm256_loadu_ps(part + 16 * t));
            b[t] = _mm256_add_ps(b[t], _mm256_loadu_ps(part + 16 * t + 8));
        }
        if (y) {
            store16(y + t * out, a[t], b[t], scale, n);
        } else {
            _mm256_storeu_ps(part + 16 * t, a[t]);
            _mm256_storeu_ps(part + 16 * t + 8, b[t]);
        }
    }
}

static void tile_bf16(const uint16_t *w, int64_t pairs, const float *xf, int64_t in, int64_t nt, int ahead,
                      float *part, int first, uint16_t *y, int64_t out, const float *scale, int64_t n) {
#define LFM2_TILE(NT, A) tile_bf16_n(w, pairs, xf, in, NT, A, part, first, y, out, scale, n)
    if (ahead) { /* few tokens: at most 2 TT */
        switch (nt) {
        case 1: LFM2_TILE(1, 1); break;
        case 2: LFM2_TILE(2, 1); break;
        case 3: LFM2_TILE(3, 1); break;
        case 4: LFM2_TILE(4, 1); break;
        case 5: LFM2_TILE(5, 1); break;
        default: LFM2_TILE(6, 1); break;
        }
    } else {
        switch (nt) {
        case 1: LFM2_TILE(1, 0); break;
        case 2: LFM2_TILE(2, 0); break;
        case 3: LFM2_TILE(3, 0); break;
        case 4: LFM2_TILE(4, 0); break;
        case 5: LFM2_TILE(5, 0); break;
        default: LFM2_TILE(6, 0); break;
        }
    }
#undef LFM2_TILE
}

/* ---- int8 weights. A token's activations are rounded to int16 with one scale, exactly as linear_avx512.c's
 * split_rows does (q = round(x / s), s = max|x| / QMAX, q = 256 h + l with h, l signed bytes). Without VNNI
 * the product is vpmaddubsw (u8 x s8, pairs summed to int16 with saturation), then vpmaddwd by ones (int16
 * pairs -> int32 per row). Its unsigned operand is |x|; the signed one is the weight s = u - 128 where x >= 0
 * and ~s = -s - 1 where x < 0, both made from the stored u by one xor with a per-token byte mask (0x80 or
 * 0x7F). So the sum is sum s x - sum_{x<0} |x|, the second term a per-token constant added back at the end,
 * and 32 weights cost an xor, vpmaddubsw, vpmaddwd and an add per byte of x: one op fewer than applying x's
 * sign with vpsignb, which on Zen 3 competes for the two pipes that multiply. No pair saturates, whatever the
 * stored bytes: products are |x| <= 127 times [-128, 127] for x >= 0 and |x| <= 128 times [-128, 127] for
 * x < 0 (only l reaches -128), so a pair lies in [-32768, 32512]. The int32 sums sum s h and sum s l are then
 * exact and equal the AVX512 path's, as are the float steps after them (join, store16): both levels give the
 * same bits. */
#define QMAX 32639           /* 127 * 257: the largest |q| whose two bytes both fit in int8 */

/* 32 int32 (8 each in a, b, c, d) -> 32 int8 in order (saturating packs, then the lanes put back). */
static inline __m256i pack_i8(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i v = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    return _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

static inline __m256i round_q(const uint16_t *x, __m256 vinv, __m256i lim) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)x));
    const __m256 f = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
    const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(f, vinv)); /* nearest even, as lrintf */
    return _mm256_max_epi32(_mm256_min_epi32(q, lim), _mm256_sub_epi32(_mm256_setzero_si256(), lim));
}

/* Sum of the negative lanes' magnitudes, in int32. */
static inline __m256i add_neg(__m256i acc, __m256i v) {
    return _mm256_add_epi32(acc, _mm256_max_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), v), _mm256_setzero_si256()));
}

/* x [T, in] bf16 -> per token, at hl + 4 in t: |h| [in], the masks of h [in], |l| [in], the masks of l [in]
 * (|-128| reads 128 as an unsigned byte; a mask byte is 0x80 for x >= 0, 0x7F for x < 0), its scale xs, and
 * the corrections ch = sum_{h<0} |h|, cl = sum_{l<0} |l|. h, l and xs are linear_avx512.c's split_rows'. */
static void split_rows(const uint16_t *x, int64_t T, int64_t in, uint8_t *hl, float *xs, int32_t *ch, int32_t *cl) {
    const __m256i lim = _mm256_set1_epi32(QMAX), r128 = _mm256_set1_epi32(128), m80 = _mm256_set1_epi8((char)0x80);
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *xr = x + t * in;
        uint8_t *ah = hl + t * 4 * in, *mh = ah + in, *al = mh + in, *ml = al + in;
        __m256i top = _mm256_setzero_si256(); /* max |x| as bits: a non-negative float orders like its int */
        int64_t i = 0;
        for (; i + 8 <= in; i += 8) {
            const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(xr + i))), 16);
            top = _mm256_max_epi32(top, _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)));
        }
        __m128i m4 = _mm_max_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
        m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0x4E));
        m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0xB1));
        float m = _mm_cvtss_f32(_mm_castsi128_ps(m4));
        for (; i < in; i++) m = fmaxf(m, fabsf(f32(xr[i])));
        xs[t] = m > 0.0f ? m / (float)QMAX : 1.0f;
        const float inv = 1.0f / xs[t];
        const __m256 vinv = _mm256_set1_ps(inv);
        __m256i nh = _mm256_setzero_si256(), nl = nh;
        for (i = 0; i + 32 <= in; i += 32) {
            __m256i hv[4], lv[4];
            for (int k = 0; k < 4; k++) {
                const __m256i q = round_q(xr + i + 8 * k, vinv, lim);
                hv[k] = _mm256_srai_epi32(_mm256_add_epi32(q, r128), 8);
                lv[k] = _mm256_sub_epi32(q, _mm256_slli_epi32(hv[k], 8));
                nh = add_neg(nh, hv[k]), nl = add_neg(nl, lv[k]);
            }
            const __m256i hb = pack_i8(hv[0], hv[1], hv[2], hv[3]), lb = pack_i8(lv[0], lv[1], lv[2], lv[3]);
            const __m256i zero = _mm256_setzero_si256();
            _mm256_storeu_si256((__m256i *)(ah + i), _mm256_abs_epi8(hb));
            _mm256_storeu_si256((__m256i *)(mh + i), _mm256_xor_si256(_mm256_cmpgt_epi8(zero, hb), m80));
            _mm256_storeu_si256((__m256i *)(al + i), _mm256_abs_epi8(lb));
            _mm256_storeu_si256((__m256i *)(ml + i), _mm256_xor_si256(_mm256_cmpgt_epi8(zero, lb), m80));
        }
        __m128i n4 = _mm_add_epi32(_mm256_castsi256_si128(nh), _mm256_extracti128_si256(nh, 1));
        n4 = _mm_add_epi32(n4, _mm_shuffle_epi32(n4, 0x4E));
        int32_t sum_h = _mm_cvtsi128_si32(_mm_add_epi32(n4, _mm_shuffle_epi32(n4, 0xB1)));
        n4 = _mm_add_epi32(_mm256_castsi256_si128(nl), _mm256_extracti128_si256(nl, 1));
        n4 = _mm_add_epi32(n4, _mm_shuffle_epi32(n4, 0x4E));
        int32_t sum_l = _mm_cvtsi128_si32(_mm_add_epi32(n4, _mm_shuffle_epi32(n4, 0xB1)));
        for (; i < in; i++) {
            int32_t q = (int32_t)lrintf(f32(xr[i]) * inv);
            q = q > QMAX ? QMAX : q < -QMAX ? -QMAX : q;
            const int32_t hi = (q + 128) >> 8, lo = q - 256 * hi;
            ah[i] = (uint8_t)(hi < 0 ? -hi : hi), mh[i] = hi < 0 ? 0x7F : 0x80;
            al[i] = (uint8_t)(lo < 0 ? -lo : lo), ml[i] = lo < 0 ? 0x7F : 0x80;
            sum_h += hi < 0 ? -hi : 0, sum_l += lo < 0 ? -lo : 0;
        }
        ch[t] = sum_h, cl[t] = sum_l;
    }
}

/* acc += per row (32-bit lane) the four products of the stored bytes at w with the broadcast quad whose
 * magnitudes are ax and whose masks are mk (see above: short of the per-token correction). */
static inline __m256i dot4(__m256i acc, const uint8_t *w, __m256i ax, __m256i mk, __m256i ones) {
    const __m256i t = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)w), mk);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, t), ones));
}

static inline __m256i bcast4(const uint8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }

/* 16 dot products from their two int32 sums and corrections, as linear_avx512.c's join: (256 h + l) * xs. */
static inline __m256 join(__m256i h, __m256i l, int32_t ch, int32_t cl, float xs) {
    const __m256 hf = _mm256_cvtepi32_ps(_mm256_add_epi32(h, _mm256_set1_epi32(ch)));
    const __m256 lf = _mm256_cvtepi32_ps(_mm256_add_epi32(l, _mm256_set1_epi32(cl)));
    return _mm256_mul_ps(_mm256_fmadd_ps(hf, _mm256_set1_ps(256.0f), lf), _mm256_set1_ps(xs));
}

/* NT (1 or 2) tokens against one 16-row block, each weight vector loaded for both (from L1 the second time),
 * each broadcast serving both halves of the block. 4 NT accumulators, a token's four broadcasts and a
 * temporary: 14 registers at NT = 2, so more tokens go in further passes over the block, which then comes
 * from L1 or L2, not memory. */
static inline __attribute__((always_inline)) void block_i8_n(
        const uint8_t *w, int64_t quads, const uint8_t *hl, int64_t in, const int32_t *ch, const int32_t *cl,
        const float *xs, const int NT, const float *scale, uint16_t *y, int64_t out, int64_t n) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i h0[2], h1[2], l0[2], l1[2];
    _Pragma("GCC unroll 2") for (int t = 0; t < NT; t++)
        h0[t] = h1[t] = l0[t] = l1[t] = _mm256_setzero_si256();
    for (int64_t q = 0; q < quads; q++) {
        const uint8_t *wq = w + q * 64;
        _mm_prefetch((const char *)wq + AHEAD, _MM_HINT_T1);
        _Pragma("GCC unroll 2") for (int t = 0; t < NT; t++) {
            const uint8_t *p = hl + t * 4 * in + 4 * q;
            const __m256i ah = bcast4(p), mh = bcast4(p + in), al = bcast4(p + 2 * in), ml = bcast4(p + 3 * in);
            h0[t] = dot4(h0[t], wq, ah, mh, ones);
            h1[t] = dot4(h1[t], wq + 32, ah, mh, ones);
            l0[t] = dot4(l0[t], wq, al, ml, ones);
            l1[t] = dot4(l1[t], wq + 32, al, ml, ones);
        }
    }
    _Pragma("GCC unroll 2") for (int t = 0; t < NT; t++)
        store16(y + t * out, join(h0[t], l0[t], ch[t], cl[t], xs[t]), join(h1[t], l1[t], ch[t], cl[t], xs[t]),
                scale, n);
}

/* T (<= I8_DIRECT_ROWS) tokens against one 16-row block, two at a time. */
static void block_i8(const uint8_t *w, int64_t quads, const uint8_t *hl, int64_t in, const int32_t *ch,
                     const int32_t *cl, const float *xs, int64_t T, const float *scale, uint16_t *y, int64_t out,
                     int64_t n) {
    int64_t t = 0;
    for (; t + 2 <= T; t += 2)
        block_i8_n(w, quads, hl + t * 4 * in, in, ch + t, cl + t, xs + t, 2, scale, y + t * out, out, n);
    if (t < T) block_i8_n(w, quads, hl + t * 4 * in, in, ch + t, cl + t, xs + t, 1, scale, y + t * out, out, n);
}

/* One 16-row block of int8 quads -> bf16 pairs (prefill), where the bf16 tile's reuse of each weight vector
 * pays for the conversion: each byte is sign-extended to int32 and converted to float, whose upper half is the
 * exact bf16 (|w| <= 128 has at most 8 significant bits). */
static void widen_block(const uint8_t *w, int64_t quads, uint16_t *dst) {
    const __m256i flip = _mm256_set1_epi8((char)0x80), hi = _mm256_set1_epi32(HI16);
    for (int64_t q = 0; q < quads; q++)
        for (int j = 0; j < 2; j++) { /* rows 8j..8j+7: a lane holds one row's inputs 4q..4q+3 */
            const __m256i s = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + q * 64 + 32 * j)), flip);
            const __m256i f0 = _mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(s, 24), 24)));
            const __m256i f1 = _mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(s, 16), 24)));
            const __m256i f2 = _mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(s, 8), 24)));
            const __m256i f3 = _mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_srai_epi32(s, 24)));
            _mm256_storeu_si256((__m256i *)(dst + 2 * q * 32 + 16 * j),
                                _mm256_or_si256(_mm256_srli_epi32(f0, 16), _mm256_and_si256(f1, hi)));
            _mm256_storeu_si256((__m256i *)(dst + (2 * q + 1) * 32 + 16 * j),
                                _mm256_or_si256(_mm256_srli_epi32(f2, 16), _mm256_and_si256(f3, hi)));
        }
}

/* ---- One token (decode): lfm2_linear with T = 1 and lfm2_linear_group (a MoE layer's routed experts, n
 * products of one shape). int8: the 16-row blocks of all n matrices form one sequence, cut in parts that the
 * threads take in turn; a part is walked as four runs of consecutive blocks side by side, one block of each at
 * a time. Blocks follow each other in memory, so each run is one forward stream for the hardware prefetchers.
 * On a 2-core Zen 3 four streams per thread read faster than one, two or eight. Against the former 64-row
 * tile kernel (16 sums for 4 blocks at once, which gcc kept in memory, and a prefetch 4 KB ahead) this reads
 * ~15-25 % faster: as fast per byte as the bf16 kernel, where that was ~80 %. */
#define I8_STREAMS 4
#define I8_CHUNK 32          /* quads per pass: a chunk of 4 blocks is 8 KB, read again from L1 for the l plane */
#define I8_PART 32           /* blocks per part (1 MB at in = 2048: 4 runs of 256 KB) */

/* acc[2k], acc[2k + 1] (rows 0-7, 8-15 of block k of NS) += their products with one byte plane of the split
 * token over quads [q0, q1): magnitudes at a[k] + 4q, masks `in` bytes further (`shared`: every a[k] is a[0],
 * one pair of broadcasts serves all blocks). `ahead` > 0 prefetches each block that far ahead. The empty asm
 * pins each sum in its register: without it gcc computes all eight products first and spills two sums. */
static inline __attribute__((always_inline)) void plane_i8(__m256i *acc, const uint8_t *const *wb,
        const uint8_t *const *a, int64_t in, const int NS, const int shared, int64_t q0, int64_t q1,
        const int ahead) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s[2 * I8_STREAMS];
    _Pragma("GCC unroll 8") for (int k = 0; k < 2 * NS; k++) s[k] = acc[k];
    for (int64_t q = q0; q < q1; q++) {
        if (ahead) _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++)
            _mm_prefetch((const char *)(wb[k] + q * 64) + ahead, _MM_HINT_T0);
        __m256i ax = bcast4(a[0] + 4 * q), mk = bcast4(a[0] + in + 4 * q);
        _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) {
            if (!shared && k) ax = bcast4(a[k] + 4 * q), mk = bcast4(a[k] + in + 4 * q);
            s[2 * k] = dot4(s[2 * k], wb[k] + q * 64, ax, mk, ones);
            __asm__("" : "+x"(s[2 * k]));
            s[2 * k + 1] = dot4(s[2 * k + 1], wb[k] + q * 64 + 32, ax, mk, ones);
            __asm__("" : "+x"(s[2 * k + 1]));
        }
    }
    _Pragma("GCC unroll 8") for (int k = 0; k < 2 * NS; k++) acc[k] = s[k];
}

/* NS blocks (wb[k]) against their tokens (split at hl[k]; xs, ch, cl as join takes them), chunk by chunk: the
 * h plane's sums, then the l plane's over the same quads, now in L1. A plane at a time, the 8 sums of 4 blocks
 * and the broadcasts fit in the 16 registers (both planes at once spill). While the l plane runs, the next
 * chunk of each block is prefetched: the h plane's loads then wait less. Measured on a 2-core Zen 3: ~6 %
 * faster than no prefetch, while prefetching further ahead, or during the h plane, was 10-25 % slower. */
static inline __attribute__((always_inline)) void blocks_i8_n(const int NS, const int shared,
        const uint8_t *const *wb, const uint8_t *const *hl, int64_t quads, int64_t in, const int32_t *ch,
        const int32_t *cl, const float *xs, const float *const *sc, uint16_t *const *yb, const int64_t *nb) {
    __m256i h[2 * I8_STREAMS], l[2 * I8_STREAMS];
    const uint8_t *lo[I8_STREAMS];
    _Pragma("GCC unroll 8") for (int k = 0; k < 2 * NS; k++) h[k] = l[k] = _mm256_setzero_si256();
    _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) lo[k] = hl[k] + 2 * in;
    for (int64_t q0 = 0; q0 < quads; q0 += I8_CHUNK) {
        const int64_t q1 = quads - q0 < I8_CHUNK ? quads : q0 + I8_CHUNK;
        plane_i8(h, wb, hl, in, NS, shared, q0, q1, 0);
        plane_i8(l, wb, lo, in, NS, shared, q0, q1, I8_CHUNK * 64);
    }
    _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++)
        store16(yb[k], join(h[2 * k], l[2 * k], ch[k], cl[k], xs[k]),
                join(h[2 * k + 1], l[2 * k + 1], ch[k], cl[k], xs[k]), sc[k], nb[k]);
}

/* One call's matrices: n of [out, in], packed. Block g of the sequence is block g % blocks of matrix
 * g / blocks; matrix i meets prepared token u[i] (int8: split at hl + 4 in u[i]; bf16: floats at xf + in u[i]). */
typedef struct {
    const void *const *w; const float *const *scales; uint16_t *const *y;
    int64_t out, in, blocks;
    const int64_t *u; const uint8_t *hl; const float *xs; const int32_t *ch, *cl; const float *xf;
} group_job;

/* Blocks g[0..NS) of the sequence (NS = I8_STREAMS or 1). */
static void blocks_i8(const group_job *J, const int64_t *g, int NS) {
    const uint8_t *wb[I8_STREAMS], *hl[I8_STREAMS];
    const float *sc[I8_STREAMS];
    uint16_t *yb[I8_STREAMS];
    int64_t nb[I8_STREAMS];
    int32_t ch[I8_STREAMS], cl[I8_STREAMS];
    float xs[I8_STREAMS];
    int shared = 1;
    for (int k = 0; k < NS; k++) {
        const int64_t i = g[k] / J->blocks, b = g[k] % J->blocks, u = J->u[i];
        wb[k] = (const uint8_t *)J->w[i] + b * 16 * J->in, hl[k] = J->hl + u * 4 * J->in;
        sc[k] = J->scales[i] + 16 * b, yb[k] = J->y[i] + 16 * b, nb[k] = J->out - 16 * b;
        ch[k] = J->ch[u], cl[k] = J->cl[u], xs[k] = J->xs[u];
        shared &= hl[k] == hl[0];
    }
    if (NS == 1) blocks_i8_n(1, 1, wb, hl, J->in / 4, J->in, ch, cl, xs, sc, yb, nb);
    else if (shared) blocks_i8_n(I8_STREAMS, 1, wb, hl, J->in / 4, J->in, ch, cl, xs, sc, yb, nb);
    else blocks_i8_n(I8_STREAMS, 0, wb, hl, J->in / 4, J->in, ch, cl, xs, sc, yb, nb);
}

/* Blocks [g0, g1) of the sequence as I8_STREAMS runs side by side; the few left over one at a time. */
static void span_i8(const group_job *J, int64_t g0, int64_t g1) {
    const int64_t len = (g1 - g0) / I8_STREAMS;
    int64_t g[I8_STREAMS];
    for (int64_t i = 0; i < len; i++) {
        for (int k = 0; k < I8_STREAMS; k++) g[k] = g0 + k * len + i;
        blocks_i8(J, g, I8_STREAMS);
    }
    for (int64_t r = g0 + I8_STREAMS * len; r < g1; r++) blocks_i8(J, &r, 1);
}

/* y[i] = x[i] W[i]^T for i < n, one token each, in one parallel region (one fork and join, and the threads'
 * streams run on from one matrix into the next). Each distinct token is prepared once (a MoE layer's w13
 * products all read the same one). bf16 keeps the 64-row tile kernel, its tiles of all n matrices taken
 * dynamically: four long runs per thread measured no faster there. Per block the arithmetic is as before
 * (int8: exact int32 sums, then join and store16 as at the AVX512 level), so the bits are too. */
static void linear_group_packed(int64_t n, const void *const *w, const float *const *scales,
                                const uint16_t *const *x, uint16_t *const *y, int64_t out, int64_t in, int int8,
                                int threads) {
    if (n <= 0 || out <= 0) return;
    int64_t *u = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * n)), *first = u + n, nu = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t j = 0;
        while (j < nu && x[first[j]] != x[i]) j++;
        if (j == nu) first[nu++] = i;
        u[i] = j;
    }
    group_job J = {w, scales, y, out, in, (out + 15) / 16, u, 0, 0, 0, 0, 0};
    uint8_t *hl = 0;
    float *xs = 0, *xf = 0;
    int32_t *ch = 0, *cl = 0;
    if (int8) {
        hl = (uint8_t *)malloc((size_t)(nu * 4 * in)), xs = (float *)malloc(sizeof(float) * (size_t)nu);
        ch = (int32_t *)malloc(sizeof(int32_t) * (size_t)(2 * nu)), cl = ch + nu;
        J.hl = hl, J.xs = xs, J.ch = ch, J.cl = cl;
    } else {
        xf = (float *)malloc(sizeof(float) * (size_t)(nu * in));
        J.xf = xf;
    }
    /* int8: equal parts of about I8_PART blocks, a multiple of `threads` of them. Taken dynamically, they split
     * evenly between equal threads, and a thread slowed by other work takes fewer (static shares measured no
     * faster). */
    const int64_t total = n * J.blocks, tiles = (out + 63) / 64, nt = threads > 1 ? threads : 1;
    const int64_t parts = ((total + I8_PART - 1) / I8_PART + nt - 1) / nt * nt;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t k = 0; k < nu; k++) {
            if (int8) split_rows(x[first[k]], 1, in, hl + k * 4 * in, xs + k, ch + k, cl + k);
            else to_f32(x[first[k]], xf + k * in, in);
        }
        if (int8) {
            #pragma omp for schedule(dynamic, 1)
            for (int64_t p = 0; p < parts; p++) span_i8(&J, total * p / parts, total * (p + 1) / parts);
        } else {
            #pragma omp for schedule(dynamic, 1)
            for (int64_t g = 0; g < n * tiles; g++) {
                const int64_t i = g / tiles, t = g % tiles;
                tile_gemv((const uint16_t *)w[i] + t * 64 * in, 16 * in, in / 2, xf + u[i] * in, y[i] + 64 * t,
                          out - 64 * t);
            }
        }
    }
    free(hl); free(xs); free(ch); free(xf); free(u);
}
#define LFM2_HAVE_GROUP 1

/* lfm2_linear (step.c) for this level's formats: W packed by lfm2_pack (bf16 pairs, or int8 quads with per-row
 * `scales`; rows padded to a multiple of 64); x [T, in] bf16, y [T, out] bf16; `in` even (int8: a multiple of 4).
 * One token is a group of one. Otherwise blocks or panels of rows are shared among `threads` threads dynamically:
 * a core slowed by other work does not hold up the rest. */
static void linear_packed(const void *w, const float *scales, const uint16_t *x, uint16_t *y, int64_t T,
                          int64_t out, int64_t in, int int8, int threads) {
    const int64_t blocks = (out + 15) / 16, bs = 16 * in, quads = in / 4;
    if (T <= 0 || out <= 0) return;
    if (T == 1) {
        linear_group_packed(1, &w, &scales, &x, &y, out, in, int8, threads);
        return;
    }
    if (int8 && T <= I8_DIRECT_ROWS) {
        uint8_t *hl = (uint8_t *)malloc((size_t)(T * 4 * in));
        float xs[I8_DIRECT_ROWS];
        int32_t ch[I8_DIRECT_ROWS], cl[I8_DIRECT_ROWS];
        split_rows(x, T, in, hl, xs, ch, cl);
        #pragma omp parallel for num_threads(threads) schedule(dynamic, 4)
        for (int64_t b = 0; b < blocks; b++)
            block_i8((const uint8_t *)w + b * bs, quads, hl, in, ch, cl, xs, T, scales + 16 * b, y + 16 * b, out,
                     out - 16 * b);
        free(hl);
        return;
    }
    /* Many tokens (prefill), blocked as a GEMM: a thread takes a panel of up to PANEL blocks and walks `in` in
     * chunks of at most KC inputs; per chunk, each group of TT tokens meets every block of the panel, so the
     * group's chunk of x stays in L1 and the panel's chunk of weights (int8: widened once) in L2. Sums carry
     * from chunk to chunk in `part`. x is converted to float once for all threads. */
    int64_t pb = PANEL;
    while (pb > 1 && blocks < 2 * pb * threads) pb /= 2; /* enough panels to share */
    const int64_t panels = (blocks + pb - 1) / pb, chunks = (in + KC - 1) / KC;
    const int64_t kc = ((in + chunks - 1) / chunks + 3) / 4 * 4; /* a multiple of 4 (int8 quads) */
    const int ahead = T <= 2 * TT;
    float *xf = (float *)malloc(sizeof(float) * (size_t)(T * in));
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) to_f32(x + t * in, xf + t * in, in);
        uint16_t *scratch = int8 ? (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(pb * 16 * kc)) : 0;
        float *part = chunks > 1 ? (float *)malloc(sizeof(float) * (size_t)(pb * T * 16)) : 0;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t pn = 0; pn < panels; pn++) {
            const int64_t b0 = pn * pb, nb = blocks - b0 < pb ? blocks - b0 : pb;
            for (int64_t k0 = 0; k0 < in; k0 += kc) {
                const int64_t kn = in - k0 < kc ? in - k0 : kc;
                const uint16_t *wc[PANEL];
                for (int64_t j = 0; j < nb; j++) {
                    if (scratch) {
                        wc[j] = scratch + j * 16 * kc;
                        widen_block((const uint8_t *)w + (b0 + j) * bs + k0 * 16, kn / 4, scratch + j * 16 * kc);
                    } else {
                        wc[j] = (const uint16_t *)w + (b0 + j) * bs + k0 * 16;
                    }
                }
                for (int64_t t0 = 0; t0 < T; t0 += TT)
                    for (int64_t j = 0; j < nb; j++) {
                        const int64_t col = 16 * (b0 + j);
                        tile_bf16(wc[j], kn / 2, xf + t0 * in + k0, in, T - t0 < TT ? T - t0 : TT, ahead,
                                  part ? part + (j * T + t0) * 16 : 0, k0 == 0, k0 + kn == in ? y + t0 * out + col : 0,
                                  out, scratch ? scales + col : 0, out - col);
                    }
            }
        }
        free(scratch);
        free(part);
    }
    free(xf);
}
#endif /* LFM2_ISA == 1 */
