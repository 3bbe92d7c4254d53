/* The avx2 level, x86-64-v3 (AVX2 + FMA + F16C): the bf16 kernels here, the int8 / int4 ones in quant.c.
 *
 * bf16 weights in the pairs layout (pack.c): a 64-byte chunk of a 16-row block is two 256-bit vectors of 8 rows
 * each. Without vdpbf16ps, a 32-bit lane (one row's two bf16 inputs) becomes two floats: the even input by a left
 * shift, the odd one by masking off the low half; both are exact. */
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "the avx2 level needs AVX2, FMA and F16C (-march=x86-64-v3)"
#endif
#include "simd256.h"
#include "quant.c"

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
#define AHEAD 4096           /* bytes of a weight stream prefetched ahead into L2 where memory-bound */

/* Inputs per chunk of a row's sum: `in` cut in equal chunks of at most KC (a multiple of 4: whole pairs, the
 * last chunk shorter). Decode and prefill both sum in these chunks, so a row's bits do not depend on the tokens. */
static inline int64_t bf16_chunk(int64_t in) {
    const int64_t chunks = (in + KC - 1) / KC;
    return chunks > 1 ? ((in + chunks - 1) / chunks + 3) / 4 * 4 : in;
}

/* One token (decode) against NS blocks side by side (w: the first, blocks `bs` elements apart): NS forward
 * streams of weights, prefetched `ahead` bytes ahead when PF. x is float already, broadcast from memory; a pair's
 * two FMAs go to one accumulator, 2 NS chains of two. `in` is summed in prefill's chunks (bf16_chunk), each
 * chunk's sum added to the earlier ones' as tile_bf16_n does: a row gets the same bits alone or among many
 * tokens. NS and PF are constants in each call (tile_gemv), so the arrays stay in registers. */
static inline __attribute__((always_inline)) void gemv_blocks_n(const uint16_t *w, int64_t bs, int64_t pairs,
        const float *xf, uint16_t *y, int64_t n, const int NS, const int PF, int64_t ahead) {
    const __m256i hi = _mm256_set1_epi32(HI16);
    const int64_t kp = bf16_chunk(2 * pairs) / 2;
    __m256 tot[4][2];
    _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) tot[k][0] = tot[k][1] = _mm256_setzero_ps();
    for (int64_t p0 = 0; p0 < pairs; p0 += kp) {
        const int64_t p1 = pairs - p0 < kp ? pairs : p0 + kp;
        __m256 a[4][2];
        _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) a[k][0] = a[k][1] = _mm256_setzero_ps();
        for (int64_t p = p0; p < p1; p++) {
            const __m256 x0 = _mm256_broadcast_ss(xf + 2 * p), x1 = _mm256_broadcast_ss(xf + 2 * p + 1);
            _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) {
                if (PF) _mm_prefetch((const char *)(w + k * bs + p * 32) + ahead, _MM_HINT_T0);
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + k * bs + p * 32));
                const __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + k * bs + p * 32 + 16));
                a[k][0] = _mm256_fmadd_ps(odd_f32(v0, hi), x1, _mm256_fmadd_ps(even_f32(v0), x0, a[k][0]));
                a[k][1] = _mm256_fmadd_ps(odd_f32(v1, hi), x1, _mm256_fmadd_ps(even_f32(v1), x0, a[k][1]));
            }
        }
        _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) { /* the first chunk's sum as it is (a -0 stays) */
            tot[k][0] = p0 ? _mm256_add_ps(a[k][0], tot[k][0]) : a[k][0];
            tot[k][1] = p0 ? _mm256_add_ps(a[k][1], tot[k][1]) : a[k][1];
        }
    }
    _Pragma("GCC unroll 4") for (int k = 0; k < NS; k++) store16x2(y + 16 * k, tot[k][0], tot[k][1], n - 16 * k);
}

/* One token (decode) against the 4 blocks of a 64-row tile (rows are padded to 64, so all 4 exist),
 * TUNING.streams blocks side by side: on a 2-core Zen 3 four streams per thread read ~15 % faster than one (more
 * DRAM requests in flight), and faster than 2 or 8. The tuning never changes a row's bits. */
static void tile_gemv(const uint16_t *w, int64_t bs, int64_t pairs, const float *xf, uint16_t *y, int64_t n) {
    const int ns = TUNING.streams, pf = TUNING.ahead > 0;
    const int64_t ahead = TUNING.ahead;
    for (int k0 = 0; k0 < 4; k0 += ns) {
        const uint16_t *wk = w + k0 * bs;
        uint16_t *yk = y + 16 * k0;
#define LFM2_BLOCKS(NS, PF) gemv_blocks_n(wk, bs, pairs, xf, yk, n - 16 * k0, NS, PF, ahead)
        if (ns == 4) { if (pf) LFM2_BLOCKS(4, 1); else LFM2_BLOCKS(4, 0); }
        else if (ns == 2) { if (pf) LFM2_BLOCKS(2, 1); else LFM2_BLOCKS(2, 0); }
        else { if (pf) LFM2_BLOCKS(1, 1); else LFM2_BLOCKS(1, 0); }
#undef LFM2_BLOCKS
    }
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
        int first, uint16_t *y, int64_t out, int64_t n) {
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
            store16x2(y + t * out, a[t], b[t], n);
        } else {
            _mm256_storeu_ps(part + 16 * t, a[t]);
            _mm256_storeu_ps(part + 16 * t + 8, b[t]);
        }
    }
}

static void tile_bf16(const uint16_t *w, int64_t pairs, const float *xf, int64_t in, int64_t nt, int ahead,
                      float *part, int first, uint16_t *y, int64_t out, int64_t n) {
#define LFM2_TILE(NT, A) tile_bf16_n(w, pairs, xf, in, NT, A, part, first, y, out, n)
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

/* Several tokens (prefill) against bf16 weights packed by lfm2_pack: x [T, in] bf16, y [T, out] bf16, `in`
 * even. Panels of rows are shared among `threads` threads dynamically: a core slowed by other work does not hold
 * up the rest. */
static void linear_bf16_tokens(const void *w, const uint16_t *x, uint16_t *y, int64_t T, int64_t out, int64_t in,
                               int threads) {
    const int64_t blocks = (out + 15) / 16, bs = 16 * in;
    if (T <= 0 || out <= 0) return;
    /* Many tokens (prefill), blocked as a GEMM: a thread takes a panel of up to PANEL blocks and walks `in` in
     * chunks of at most KC inputs; per chunk, each group of TT tokens meets every block of the panel, so the
     * group's chunk of x stays in L1 and the panel's chunk of weights in L2. Sums carry from chunk to chunk in
     * `part`. x is converted to float once for all threads. */
    int64_t pb = PANEL;
    while (pb > 1 && blocks < 2 * pb * threads) pb /= 2; /* enough panels to share */
    const int64_t panels = (blocks + pb - 1) / pb, kc = bf16_chunk(in), chunks = (in + kc - 1) / kc;
    const int ahead = T <= 2 * TT;
    float *xf = (float *)malloc(sizeof(float) * (size_t)(T * in));
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) bf16_to_f32(x + t * in, xf + t * in, in);
        float *part = chunks > 1 ? (float *)malloc(sizeof(float) * (size_t)(pb * T * 16)) : 0;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t pn = 0; pn < panels; pn++) {
            const int64_t b0 = pn * pb, nb = blocks - b0 < pb ? blocks - b0 : pb;
            for (int64_t k0 = 0; k0 < in; k0 += kc) {
                const int64_t kn = in - k0 < kc ? in - k0 : kc;
                const uint16_t *wc[PANEL];
                for (int64_t j = 0; j < nb; j++) wc[j] = (const uint16_t *)w + (b0 + j) * bs + k0 * 16;
                for (int64_t t0 = 0; t0 < T; t0 += TT)
                    for (int64_t j = 0; j < nb; j++) {
                        const int64_t col = 16 * (b0 + j);
                        tile_bf16(wc[j], kn / 2, xf + t0 * in + k0, in, T - t0 < TT ? T - t0 : TT, ahead,
                                  part ? part + (j * T + t0) * 16 : 0, k0 == 0, k0 + kn == in ? y + t0 * out + col : 0,
                                  out, out - col);
                    }
            }
        }
        free(part);
    }
    free(xf);
}

/* group_kernel.unit: tile t (64 rows) of matrix i against its token, in floats. */
static void gemv_unit(const group_job *J, int64_t i, int64_t t) {
    tile_gemv((const uint16_t *)J->w[i] + t * 64 * J->in, 16 * J->in, J->in / 2, (const float *)J->act[i],
              J->y[i] + 64 * t, J->out - 64 * t);
}

/* One token per matrix: each token converted to float once (a MoE layer's w13 products share theirs), the 64-row
 * tiles taken one at a time. */
static const group_kernel GROUP_KERNELS[LFM2_FORMATS] = {
    [LFM2_BF16] = {f32_act_bytes, f32_act, 64, gemv_unit, 0, 1},
    [LFM2_INT8] = GQ_GROUP_KERNEL,
    [LFM2_INT4] = GQ_GROUP_KERNEL,
};
