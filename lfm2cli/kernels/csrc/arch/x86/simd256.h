/* 256-bit helpers of both x86 levels (x86-64-v3 and up): the AVX2 level's bf16 kernel and the int8 / int4
 * kernels of quant.c. */
#include <immintrin.h>

/* 8 floats -> bf16 (round to nearest even, NaN kept quiet, as bf() in common.h), one per 32-bit lane. */
static inline __m256i bf16x8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v), top = _mm256_srli_epi32(u, 16);
    const __m256i odd = _mm256_and_si256(top, _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_or_si256(top, _mm256_set1_epi32(0x40)), nan);
}

/* Stores 16 sums (rows 0-7 in lo, 8-15 in hi) as bf16 into y[0..n): n < 16 only in the last block, whose rows
 * past `out` belong to no one. */
static inline void store16x2(uint16_t *y, __m256 lo, __m256 hi, int64_t n) {
    if (n <= 0) return;
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

/* 8 bf16 values -> 8 floats (exact). */
static inline __m256 f32x8(const void *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
