/* The avx512 level (AVX512-BF16 and AVX512-VNNI: Zen 4 and later, Sapphire Rapids and later): the bf16
 * kernels here, vdpbf16ps on the pairs layout (pack.c), one 64-byte load of a 16-row block against a broadcast
 * pair of x; the int8 / int4 kernels are quant.c's, with VNNI's vpdpbusd. */
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512BF16__) \
    || !defined(__AVX512VNNI__)
#error "the avx512 level needs AVX512-BF16 and AVX512-VNNI (-march=x86-64-v4 -mavx512bf16 -mavx512vnni)"
#endif
#include "simd256.h"
#include "quant.c"

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

/* One token (decode) against NS blocks of a tile side by side (w: the first, blocks `bs` elements apart): NS
 * forward streams of weights, one accumulator each, prefetched `ahead` bytes ahead when PF. NS and PF are
 * constants in each call (tile4_bf16), so the accumulators stay in registers and the test leaves the loop. */
static inline __attribute__((always_inline)) void blocks_bf16_n(const uint16_t *w, int64_t bs, int64_t pairs,
        const uint32_t *xp, __m512 *a, const int NS, const int PF, int64_t ahead) {
    for (int64_t p = 0; p < pairs; p++) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xp[p]);
        _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) {
            if (PF) _mm_prefetch((const char *)(w + k * bs + p * 32) + ahead, _MM_HINT_T0);
            a[k] = _mm512_dpbf16_ps(a[k], load_bf16(w + k * bs + p * 32), xv);
        }
    }
}

/* One token (decode) against the 4 blocks of a 64-row tile (rows are padded to 64, so all 4 exist), TUNING.streams
 * blocks side by side, one accumulator each, summed pair by pair as tile_bf16 sums every token: a row gets the
 * same bits alone or among many tokens, whatever the tuning. Several streams per thread keep more memory
 * requests in flight: on a 2-core Xeon (AVX512-BF16) 4 streams read 29 GB/s against one stream's 21. */
static void tile4_bf16(const uint16_t *w, int64_t bs, int64_t pairs, const uint16_t *x, uint16_t *y, int64_t n) {
    const uint32_t *xp = (const uint32_t *)x;
    const int ns = TUNING.streams, pf = TUNING.ahead > 0;
    const int64_t ahead = TUNING.ahead;
    __m512 a[NB];
    for (int k = 0; k < NB; k++) a[k] = _mm512_setzero_ps();
    for (int k0 = 0; k0 < NB; k0 += ns) {
        const uint16_t *wk = w + k0 * bs;
#define LFM2_BLOCKS(NS, PF) blocks_bf16_n(wk, bs, pairs, xp, a + k0, NS, PF, ahead)
        if (ns == 4) { if (pf) LFM2_BLOCKS(4, 1); else LFM2_BLOCKS(4, 0); }
        else if (ns == 2) { if (pf) LFM2_BLOCKS(2, 1); else LFM2_BLOCKS(2, 0); }
        else { if (pf) LFM2_BLOCKS(1, 1); else LFM2_BLOCKS(1, 0); }
#undef LFM2_BLOCKS
    }
    for (int k = 0; k < NB; k++) store16(y + 16 * k, a[k], n - 16 * k);
}

/* Several tokens (prefill) against bf16 weights packed by lfm2_pack: x [T, in] bf16, y [T, out] bf16, `in`
 * even. Tiles of 64 outputs are shared among `threads` threads, dynamically: a core slowed by other work does
 * not hold up the rest. */
static void linear_bf16_tokens(const void *w, const uint16_t *x, uint16_t *y, int64_t T, int64_t out, int64_t in,
                               int threads) {
    const int64_t tiles = (out + 16 * NB - 1) / (16 * NB), bs = 16 * in, pairs = in / 2;
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 2)
    for (int64_t g = 0; g < tiles; g++)
        for (int64_t t0 = 0; t0 < T; t0 += TT)
            tile_bf16((const uint16_t *)w + g * NB * bs, bs, pairs, x + t0 * in, in, T - t0 < TT ? T - t0 : TT,
                      y + t0 * out, out, g * 16 * NB);
}

/* group_kernel.unit: tile t (64 rows) of matrix i against its bf16 token. */
static void tile4_unit(const group_job *J, int64_t i, int64_t t) {
    const int64_t bs = 16 * J->in;
    tile4_bf16((const uint16_t *)J->w[i] + t * NB * bs, bs, J->in / 2, (const uint16_t *)J->act[i],
               J->y[i] + 16 * NB * t, J->out - 16 * NB * t);
}

/* One token per matrix: the token as it is (vdpbf16ps takes bf16), the 64-row tiles taken two at a time. */
static const group_kernel GROUP_KERNELS[LFM2_FORMATS] = {
    [LFM2_BF16] = {0, 0, 16 * NB, tile4_unit, 0, 2},
    [LFM2_INT8] = GQ_GROUP_KERNEL,
    [LFM2_INT4] = GQ_GROUP_KERNEL,
};
