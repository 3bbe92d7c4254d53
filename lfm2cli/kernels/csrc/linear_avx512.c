/* The matrix kernel for AVX512-BF16 + AVX512-VNNI (every CPU with AVX512-BF16 has VNNI): LFM2_ISA 2.
 *
 * Layouts. bf16 ("pairs"): W [out, in] is stored as [out/16][in/2][16][2]: 16 output channels side by side,
 * each with two consecutive inputs, so one 64-byte load feeds one vdpbf16ps against a broadcast pair of x.
 * int8 ("quads"): [out/16][in/4][16][4], each value stored plus 128 as an unsigned byte, so one 64-byte load
 * feeds vpdpbusd (u8 x s8) directly; a per-row scale is applied to the sum. Rows are padded with zeros to a
 * multiple of 64 (4 blocks per tile); `in` must be even (int8: a multiple of 4). The AVX2 level reads the same
 * layouts (linear_avx2.c), so a packed model does not depend on the level. */
#if LFM2_ISA == 2

/* a . b over d bf16 values, in pairs and 16 lanes (the order a bf16 matmul sums in). A plain loop is a float
 * reduction the compiler may not reorder: one multiply-add per cycle, which at 2048 cached positions cost
 * LFM2-350M ~6 ms per token. */
static inline float dot_bf16(const bf16_t *a, const bf16_t *b, int64_t d) {
    int64_t i = 0;
    __m512 acc = _mm512_setzero_ps();
    for (; i + 32 <= d; i += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + i), (__m512bh)_mm512_loadu_si512(b + i));
    float s = _mm512_reduce_add_ps(acc);
    for (; i < d; i++) s += f32(a[i]) * f32(b[i]);
    return s;
}


#define NB 4                 /* 16-channel blocks per tile: 64 outputs */
#define TT 6                 /* tokens per bf16 tile: NB * TT = 24 accumulators of the 32 registers */
#define I8_DIRECT_ROWS 8     /* up to this many tokens, int8 weights meet the split activations; beyond, bf16 */

static inline __m512bh load_bf16(const void *p) { return (__m512bh)_mm512_loadu_si512(p); }

/* Stores 16 sums (scaled when `scale`) as bf16 into row y[0..n), n < 16 only in the last block. */
static inline void store16(uint16_t *y, __m512 v, const float *scale, int64_t n) {
    if (n <= 0) return;
    if (scale) v = _mm512_mul_ps(v, _mm512_loadu_ps(scale));
    __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    _mm256_mask_storeu_epi16(y, m, (__m256i)_mm512_cvtneps_pbh(v));
}

/* A tile of 64 outputs x up to TT tokens: `w` points at the tile's first block, blocks `bs` elements apart;
 * each weight vector is loaded once and used for every token. */
static void tile_bf16(const uint16_t *w, int64_t bs, int64_t pairs, const uint16_t *x, int64_t in, int64_t nt,
                      uint16_t *y, int64_t out, int64_t col, const float *scale) {
    __m512 a[NB][TT];
    for (int k = 0; k < NB; k++)
        for (int t = 0; t < TT; t++) a[k][t] = _mm512_setzero_ps();
    const uint32_t *xr[TT];
    for (int t = 0; t < TT; t++) xr[t] = (const uint32_t *)(x + (t < nt ? t : 0) * in);
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh wv[NB];
        _Pragma("GCC unroll 4") for (int k = 0; k < NB; k++) wv[k] = load_bf16(w + k * bs + p * 32);
        _Pragma("GCC unroll 8") for (int t = 0; t < TT; t++) {
            if (t < nt) {
                __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xr[t][p]);
                _Pragma("GCC unroll 4") for (int k = 0; k < NB; k++) a[k][t] = _mm512_dpbf16_ps(a[k][t], wv[k], xv);
            }
        }
    }
    for (int t = 0; t < nt; t++)
        for (int k = 0; k < NB; k++)
            store16(y + t * out + col + 16 * k, a[k][t], scale ? scale + col + 16 * k : 0, out - col - 16 * k);
}

/* One token (decode) against one 16-row block: a single forward stream per thread, which the hardware
 * prefetchers follow better than a tile's four (measured ~8 % faster at batch 1), four accumulators for ILP. */
static void block_bf16(const uint16_t *w, int64_t pairs, const uint16_t *x, uint16_t *y, int64_t n) {
    const uint32_t *xp = (const uint32_t *)x;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t p = 0;
    for (; p + 4 <= pairs; p += 4) {
        a0 = _mm512_dpbf16_ps(a0, load_bf16(w + p * 32), (__m512bh)_mm512_set1_epi32((int)xp[p]));
        a1 = _mm512_dpbf16_ps(a1, load_bf16(w + p * 32 + 32), (__m512bh)_mm512_set1_epi32((int)xp[p + 1]));
        a2 = _mm512_dpbf16_ps(a2, load_bf16(w + p * 32 + 64), (__m512bh)_mm512_set1_epi32((int)xp[p + 2]));
        a3 = _mm512_dpbf16_ps(a3, load_bf16(w + p * 32 + 96), (__m512bh)_mm512_set1_epi32((int)xp[p + 3]));
    }
    for (; p < pairs; p++) a0 = _mm512_dpbf16_ps(a0, load_bf16(w + p * 32), (__m512bh)_mm512_set1_epi32((int)xp[p]));
    store16(y, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), 0, n);
}

/* ---- int8 weights (see the layout above). A token's activations are rounded to int16 with one scale,
 * q = round(x / s), s = max|x| / QMAX, and split into two signed bytes q = 256 h + l. Against the stored
 * u = w + 128:  sum w q = 256 (sum u h - 128 sum h) + (sum u l - 128 sum l), so each 64 weights cost one load
 * and two vpdpbusd (u8 x s8, four products per lane): no widening, which left the loop compute-bound.
 * Exact in int32 for in <= 65536 (each lane adds in products of at most 255 * 128). */
#define QMAX 32639           /* 127 * 257: the largest |q| whose two bytes both fit in int8 */

static inline __m512 load16_f32(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* x [T, in] bf16 -> per token the bytes h [in] then l [in] in hl, its scale xs, and the corrections
 * 128 sum h (ch) and 128 sum l (cl). Vectorised: it runs before every int8 product. */
static void split_rows(const uint16_t *x, int64_t T, int64_t in, int8_t *hl, float *xs, int32_t *ch, int32_t *cl) {
    const __m512i lim = _mm512_set1_epi32(QMAX), r128 = _mm512_set1_epi32(128);
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *xr = x + t * in;
        int8_t *h = hl + t * 2 * in, *l = h + in;
        __m512 top = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= in; i += 16) top = _mm512_max_ps(top, _mm512_abs_ps(load16_f32(xr + i)));
        float m = _mm512_reduce_max_ps(top);
        for (; i < in; i++) m = fmaxf(m, fabsf(f32(xr[i])));
        xs[t] = m > 0.0f ? m / (float)QMAX : 1.0f;
        const float inv = 1.0f / xs[t];
        const __m512 vinv = _mm512_set1_ps(inv);
        __m512i sh = _mm512_setzero_si512(), sl = sh;
        for (i = 0; i + 16 <= in; i += 16) { /* round to nearest even, as lrintf */
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16_f32(xr + i), vinv));
            q = _mm512_max_epi32(_mm512_min_epi32(q, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
            const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(q, r128), 8);
            const __m512i lo = _mm512_sub_epi32(q, _mm512_slli_epi32(hi, 8));
            _mm_storeu_si128((__m128i *)(h + i), _mm512_cvtepi32_epi8(hi));
            _mm_storeu_si128((__m128i *)(l + i), _mm512_cvtepi32_epi8(lo));
            sh = _mm512_add_epi32(sh, hi);
            sl = _mm512_add_epi32(sl, lo);
        }
        int32_t sum_h = _mm512_reduce_add_epi32(sh), sum_l = _mm512_reduce_add_epi32(sl);
        for (; i < in; i++) {
            int32_t q = (int32_t)lrintf(f32(xr[i]) * inv);
            q = q > QMAX ? QMAX : q < -QMAX ? -QMAX : q;
            const int32_t hi = (q + 128) >> 8, lo = q - 256 * hi;
            h[i] = (int8_t)hi, l[i] = (int8_t)lo, sum_h += hi, sum_l += lo;
        }
        ch[t] = 128 * sum_h, cl[t] = 128 * sum_l;
    }
}

/* acc += u (64 weights) times the four bytes at x broadcast; in asm because gcc 12 copies the accumulator
 * of the intrinsic around every call, and a broadcast from memory saves a register. */
static inline __m512i dpbusd(__m512i acc, __m512i u, const void *x) {
    __asm__("vpdpbusd %1%{1to16%}, %2, %0" : "+v"(acc) : "m"(*(const int32_t *)x), "v"(u));
    return acc;
}

/* 16 dot products from their two byte sums: (256 (hi - ch) + (lo - cl)) * xs, corrections in exact int32. */
static inline __m512 join(__m512i hi, __m512i lo, int32_t ch, int32_t cl, float xs) {
    const __m512 h = _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, _mm512_set1_epi32(ch)));
    const __m512 l = _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, _mm512_set1_epi32(cl)));
    return _mm512_mul_ps(_mm512_fmadd_ps(h, _mm512_set1_ps(256.0f), l), _mm512_set1_ps(xs));
}

/* One token against one 16-row block (decode), one stream per thread as in block_bf16. Two pairs of accumulators:
 * with one (block_i8_n for one token) the vpdpbusd latency chain caps it at ~0.65x this speed from cache. */
static void block_i8(const uint8_t *w, int64_t quads, const int8_t *h, const int8_t *l, int32_t ch, int32_t cl,
                     float xs, const float *scale, uint16_t *y, int64_t n) {
    __m512i h0 = _mm512_setzero_si512(), h1 = h0, l0 = h0, l1 = h0;
    int64_t q = 0;
    for (; q + 2 <= quads; q += 2) {
        const __m512i u0 = _mm512_loadu_si512(w + q * 64), u1 = _mm512_loadu_si512(w + q * 64 + 64);
        h0 = dpbusd(h0, u0, h + 4 * q), l0 = dpbusd(l0, u0, l + 4 * q);
        h1 = dpbusd(h1, u1, h + 4 * q + 4), l1 = dpbusd(l1, u1, l + 4 * q + 4);
    }
    if (q < quads) {
        const __m512i u0 = _mm512_loadu_si512(w + q * 64);
        h0 = dpbusd(h0, u0, h + 4 * q), l0 = dpbusd(l0, u0, l + 4 * q);
    }
    store16(y, join(_mm512_add_epi32(h0, h1), _mm512_add_epi32(l0, l1), ch, cl, xs), scale, n);
}

/* A few tokens (2..I8_DIRECT_ROWS: chat's short turns, prefill tails) against one 16-row block, each weight
 * vector loaded once for all of them. NT is a constant in each call of block_i8_few, so the accumulators stay
 * in registers (gcc keeps an array of vectors there only when its loops unroll completely). */
static inline __attribute__((always_inline)) void block_i8_n(
        const uint8_t *w, int64_t quads, const int8_t *hl, int64_t in, const int32_t *ch, const int32_t *cl,
        const float *xs, const int NT, const float *scale, uint16_t *y, int64_t out, int64_t n) {
    __m512i ah[I8_DIRECT_ROWS], al[I8_DIRECT_ROWS];
    _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) ah[t] = al[t] = _mm512_setzero_si512();
    for (int64_t q = 0; q < quads; q++) {
        const __m512i u = _mm512_loadu_si512(w + q * 64);
        _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) {
            ah[t] = dpbusd(ah[t], u, hl + t * 2 * in + 4 * q);
            al[t] = dpbusd(al[t], u, hl + t * 2 * in + in + 4 * q);
        }
    }
    _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++)
        store16(y + t * out, join(ah[t], al[t], ch[t], cl[t], xs[t]), scale, n);
}

static void block_i8_few(const uint8_t *w, int64_t quads, const int8_t *hl, int64_t in, const int32_t *ch,
                         const int32_t *cl, const float *xs, int64_t nt, const float *scale, uint16_t *y, int64_t out,
                         int64_t n) {
#define LFM2_FEW(NT) block_i8_n(w, quads, hl, in, ch, cl, xs, NT, scale, y, out, n)
    switch (nt) {
    case 2: LFM2_FEW(2); break;
    case 3: LFM2_FEW(3); break;
    case 4: LFM2_FEW(4); break;
    case 5: LFM2_FEW(5); break;
    case 6: LFM2_FEW(6); break;
    case 7: LFM2_FEW(7); break;
    default: LFM2_FEW(8); break;
    }
#undef LFM2_FEW
}

/* One tile's int8 blocks (quads, offset) -> bf16 in the pairs layout, for many tokens (prefill), where the
 * bf16 tile's reuse of each weight vector pays for the conversion. Values up to 128 are exact in bf16. */
static void widen_tile(const uint8_t *w, int64_t bs, int64_t quads, uint16_t *dst) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1)), off = _mm512_set1_epi16(128);
    for (int k = 0; k < NB; k++)
        for (int64_t q = 0; q < quads; q++) {
            const __m512i u = _mm512_loadu_si512(w + k * bs + q * 64); /* rows 0-15, inputs 4q..4q+3 */
            __m512i half[2];
            for (int j = 0; j < 2; j++) { /* rows 8j..8j+7 as 32 bf16 values */
                const __m512i v = _mm512_sub_epi16(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(u, j)), off);
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(v)));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(v, 1)));
                half[j] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
            }
            /* a 32-bit lane is one row's pair of inputs: even lanes hold inputs 4q, 4q+1, odd ones 4q+2, 4q+3 */
            _mm512_storeu_si512(dst + k * bs + 2 * q * 32, _mm512_permutex2var_epi32(half[0], even, half[1]));
            _mm512_storeu_si512(dst + k * bs + (2 * q + 1) * 32, _mm512_permutex2var_epi32(half[0], odd, half[1]));
        }
}

/* lfm2_linear (step.c) for this level's formats: W packed by lfm2_pack (bf16 pairs, or int8 quads with per-row
 * `scales`; rows padded to a multiple of 64); x [T, in] bf16, y [T, out] bf16; `in` even (int8: a multiple of 4).
 * Blocks or tiles of 64 outputs are shared among `threads` threads, dynamically: a core slowed by other work does
 * not hold up the rest. */
static void linear_packed(const void *w, const float *scales, const uint16_t *x, uint16_t *y, int64_t T,
                          int64_t out, int64_t in, int int8, int threads) {
    const int64_t tiles = (out + 16 * NB - 1) / (16 * NB), bs = 16 * in, pairs = in / 2, quads = in / 4;
    if (T == 1 && !int8) {
        #pragma omp parallel for num_threads(threads) schedule(dynamic, 8)
        for (int64_t b = 0; b < tiles * NB; b++) block_bf16((const uint16_t *)w + b * bs, pairs, x, y + 16 * b, out - 16 * b);
        return;
    }
    if (int8 && T <= I8_DIRECT_ROWS) {
        int8_t *hl = (int8_t *)malloc((size_t)(T * 2 * in));
        float xs[I8_DIRECT_ROWS];
        int32_t ch[I8_DIRECT_ROWS], cl[I8_DIRECT_ROWS];
        split_rows(x, T, in, hl, xs, ch, cl);
        #pragma omp parallel for num_threads(threads) schedule(dynamic, 8)
        for (int64_t b = 0; b < tiles * NB; b++) {
            const uint8_t *wb = (const uint8_t *)w + b * bs;
            if (T == 1)
                block_i8(wb, quads, hl, hl + in, ch[0], cl[0], xs[0], scales + 16 * b, y + 16 * b, out - 16 * b);
            else
                block_i8_few(wb, quads, hl, in, ch, cl, xs, T, scales + 16 * b, y + 16 * b, out, out - 16 * b);
        }
        free(hl);
        return;
    }
    #pragma omp parallel num_threads(threads)
    {
        uint16_t *scratch = int8 ? (uint16_t *)aligned_alloc(64, (size_t)(NB * bs * 2 + 63) / 64 * 64) : 0;
        #pragma omp for schedule(dynamic, 2)
        for (int64_t g = 0; g < tiles; g++) {
            if (scratch) widen_tile((const uint8_t *)w + g * NB * bs, bs, quads, scratch);
            const uint16_t *tw = scratch ? scratch : (const uint16_t *)w + g * NB * bs;
            for (int64_t t0 = 0; t0 < T; t0 += TT)
                tile_bf16(tw, bs, pairs, x + t0 * in, in, T - t0 < TT ? T - t0 : TT, y + t0 * out, out, g * 16 * NB,
                          scratch ? scales : 0);
        }
        free(scratch);
    }
}
#endif /* LFM2_ISA == 2 */
