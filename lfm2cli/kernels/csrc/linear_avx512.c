/* The bf16 matrix kernel for AVX512-BF16 (LFM2_ISA 2; every CPU with AVX512-BF16 also has AVX512-VNNI, which
 * linear_grouped.c uses for int8 weights).
 *
 * Layout ("pairs"): W [out, in] is stored as [out/16][in/2][16][2]: 16 output channels side by side, each with
 * two consecutive inputs, so one 64-byte load feeds one vdpbf16ps against a broadcast pair of x. Rows are padded
 * with zeros to a multiple of 64 (4 blocks per tile); `in` must be even. The AVX2 level reads the same layout
 * (linear_avx2.c), so a packed model does not depend on the level. */
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

static inline __m512bh load_bf16(const void *p) { return (__m512bh)_mm512_loadu_si512(p); }

/* Stores 16 sums as bf16 into row y[0..n), n < 16 only in the last block. */
static inline void store16(uint16_t *y, __m512 v, int64_t n) {
    if (n <= 0) return;
    __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    _mm256_mask_storeu_epi16(y, m, (__m256i)_mm512_cvtneps_pbh(v));
}

/* A tile of 64 outputs x up to TT tokens: `w` points at the tile's first block, blocks `bs` elements apart;
 * each weight vector is loaded once and used for every token. */
static void tile_bf16(const uint16_t *w, int64_t bs, int64_t pairs, const uint16_t *x, int64_t in, int64_t nt,
                      uint16_t *y, int64_t out, int64_t col) {
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
            store16(y + t * out + col + 16 * k, a[k][t], out - col - 16 * k);
}

/* One token (decode) against the 4 blocks of a 64-row tile (rows are padded to 64, so all 4 exist): four forward
 * streams of weights, two accumulators each. On a 2-core Xeon (AVX512-BF16, AMX) this read 29 GB/s against one
 * stream per thread's 21 (1.39x; benchmarks of the products alone, 2026-12-02); on a Zen 5 one stream had measured
 * ~8 % faster than a tile's four, but that tile kernel also made each token's sums in another order. */
static void tile4_bf16(const uint16_t *w, int64_t bs, int64_t pairs, const uint16_t *x, uint16_t *y, int64_t n) {
    const uint32_t *xp = (const uint32_t *)x;
    __m512 a[NB][2];
    for (int k = 0; k < NB; k++) a[k][0] = a[k][1] = _mm512_setzero_ps();
    int64_t p = 0;
    for (; p + 2 <= pairs; p += 2) {
        const __m512bh x0 = (__m512bh)_mm512_set1_epi32((int)xp[p]), x1 = (__m512bh)_mm512_set1_epi32((int)xp[p + 1]);
        _Pragma("GCC unroll 4") for (int k = 0; k < NB; k++) {
            a[k][0] = _mm512_dpbf16_ps(a[k][0], load_bf16(w + k * bs + p * 32), x0);
            a[k][1] = _mm512_dpbf16_ps(a[k][1], load_bf16(w + k * bs + p * 32 + 32), x1);
        }
    }
    for (; p < pairs; p++) {
        const __m512bh x0 = (__m512bh)_mm512_set1_epi32((int)xp[p]);
        for (int k = 0; k < NB; k++) a[k][0] = _mm512_dpbf16_ps(a[k][0], load_bf16(w + k * bs + p * 32), x0);
    }
    for (int k = 0; k < NB; k++) store16(y + 16 * k, _mm512_add_ps(a[k][0], a[k][1]), n - 16 * k);
}

/* lfm2_linear (step.c) for bf16 weights packed by lfm2_pack (rows padded to a multiple of 64); x [T, in] bf16,
 * y [T, out] bf16; `in` even. Blocks or tiles of 64 outputs are shared among `threads` threads, dynamically: a
 * core slowed by other work does not hold up the rest. */
static void linear_packed(const void *w, const uint16_t *x, uint16_t *y, int64_t T, int64_t out, int64_t in,
                          int threads) {
    const int64_t tiles = (out + 16 * NB - 1) / (16 * NB), bs = 16 * in, pairs = in / 2;
    if (T == 1) {
        #pragma omp parallel for num_threads(threads) schedule(dynamic, 2)
        for (int64_t g = 0; g < tiles; g++)
            tile4_bf16((const uint16_t *)w + g * NB * bs, bs, pairs, x, y + 16 * NB * g, out - 16 * NB * g);
        return;
    }
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 2)
    for (int64_t g = 0; g < tiles; g++)
        for (int64_t t0 = 0; t0 < T; t0 += TT)
            tile_bf16((const uint16_t *)w + g * NB * bs, bs, pairs, x + t0 * in, in, T - t0 < TT ? T - t0 : TT,
                      y + t0 * out, out, g * 16 * NB);
}
#endif /* LFM2_ISA == 2 */
