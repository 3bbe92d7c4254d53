/* Shared by every part of lfm2's native CPU code: the bf16 helpers and the ISA level this build targets.
 * LFM2_ISA: 2 = AVX512-BF16 + AVX512-VNNI, 1 = x86-64-v3 (AVX2 + FMA + F16C); on AArch64 12 = dotprod + bf16
 * (BFDOT), 11 = dotprod (sdot), 10 = NEON alone (ARMv8.0); 0 = no matrix kernel (the small ops still build).
 * LFM2_X86 / LFM2_ARM say which family's kernel files compile. native.py picks the level and passes the matching
 * -march flags. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__) \
    && defined(__AVX512VNNI__)
#include <immintrin.h>
#define LFM2_ISA 2
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LFM2_ISA 1
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD) && defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
#include <arm_neon.h>
#define LFM2_ISA 12
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define LFM2_ISA 11
#elif defined(__aarch64__)
#include <arm_neon.h>
#define LFM2_ISA 10
#else
#define LFM2_ISA 0
#endif
#define LFM2_X86 (LFM2_ISA == 1 || LFM2_ISA == 2)
#define LFM2_ARM (LFM2_ISA >= 10)

int lfm2_native_isa(void) { return LFM2_ISA; }

/* The weight formats lfm2_linear takes: bf16 pairs (linear_avx512.c / linear_avx2.c), int8 and int4 in groups
 * of 32 with their scales inside the packed weights (linear_grouped.c). */
#define LFM2_BF16 0
#define LFM2_INT8 1
#define LFM2_INT4 2

typedef uint16_t bf16_t;

static inline float f32(bf16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static inline bf16_t bf(float f) { /* round to nearest even, as torch converts */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    return (bf16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static inline float rnd(float f) { return f32(bf(f)); } /* a bf16 op's result, back in float */

static inline float exp_f(float x) { /* expf to ~2 ulp, branch-free so loops over it vectorise */
    x = x < -87.3f ? -87.3f : x > 88.7f ? 88.7f : x;
    const float t = x * 1.44269504f, n = (t + 12582912.0f) - 12582912.0f; /* round to nearest integer */
    const float f = (t - n) * 0.69314718f;
    const float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.6666667e-1f + f * (4.1666667e-2f + f * (8.3333333e-3f
                    + f * (1.3888889e-3f + f * 1.9841270e-4f))))));
    union { int32_t i; float f; } e = {((int32_t)n + 127) << 23};
    return p * e.f;
}

/* The distinct inputs of n products (a MoE layer's w13 products all read one token): u[i] = which distinct input
 * x[i] is, first[k] = the first product with input k. Returns how many there are. */
static inline int64_t distinct_inputs(int64_t n, const uint16_t *const *x, int64_t *u, int64_t *first) {
    int64_t nu = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t j = 0;
        while (j < nu && x[first[j]] != x[i]) j++;
        if (j == nu) first[nu++] = i;
        u[i] = j;
    }
    return nu;
}
