/* Shared by every part of lfm2's native CPU code: the level this build is for, the weight formats, and the bf16
 * helpers.
 *
 * The level comes from the build (lfm2cli/system/cpu.py's NATIVE_LEVELS makes the flags): LFM2_LEVEL its id,
 * LFM2_LEVEL_NAME its name, LFM2_LEVEL_SOURCE its kernel file under arch/. A build without them is level 0: the
 * scalar reference kernels (reference.c), every function still exported. Inside a kernel file, what a level's
 * -march flags add (AVX512-VNNI, dotprod, BF16) is read from the compiler's own feature macros. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef LFM2_LEVEL
#define LFM2_LEVEL 0
#define LFM2_LEVEL_NAME "none"
#endif

typedef uint16_t bf16_t;

/* The weight formats lfm2_linear takes. A format is read in 16-row blocks, `group` inputs at a time: a group of
 * a block is `block_bytes` bytes, so a block of `in` inputs is in / group * block_bytes (pack.c lays them out).
 * A format with another block layout (a super-block of several groups) is a new entry and its kernels. */
typedef enum { LFM2_BF16, LFM2_INT8, LFM2_INT4, LFM2_FORMATS } lfm2_format;

typedef struct { int group; int block_bytes; } lfm2_format_info;

static const lfm2_format_info FORMATS[LFM2_FORMATS] = {
    [LFM2_BF16] = {2, 64},   /* pairs of inputs: 16 rows x 2 bf16 */
    [LFM2_INT8] = {32, 544}, /* 16 fp16 scales (32 bytes), then 16 rows x 32 int8 */
    [LFM2_INT4] = {32, 288}, /* 16 bf16 scales (32 bytes), then 16 rows x 32 nibbles */
};

/* Bytes of one 16-row block of `in` inputs in format `fmt`. */
static inline int64_t block_bytes(int fmt, int64_t in) { return in / FORMATS[fmt].group * FORMATS[fmt].block_bytes; }

#define GQ_G 32              /* inputs per int8 / int4 group */

/* The decode kernels' choices that depend on the CPU more than on the level, set once at load (lfm2_set_tuning,
 * measured by lfm2cli/kernels/tuning.py). None changes a result's bits: they pick which rows a thread reads side
 * by side, how far ahead it prefetches and how the work is cut, never the order of a row's sum. A level reads
 * the fields it has a use for (the ARM levels and the reference: part_kb only). */
typedef struct {
    int32_t streams; /* 16-row blocks of a 64-row bf16 tile a thread reads side by side: 1, 2 or 4 */
    int32_t ahead;   /* bytes each bf16 decode stream prefetches ahead (a multiple of 64; 0: none) */
    int32_t part_kb; /* KB of weights per part the threads take in turn, for kernels that ask by size */
} lfm2_tuning;

#define LFM2_TUNING_DEFAULT {4, 0, 512}
static lfm2_tuning TUNING = LFM2_TUNING_DEFAULT;

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

/* One token's int8 activations, group by group (the int8 / int4 kernels' input): q [in], scale d [in / 32],
 * c = 8 * sum q [in / 32]. Stored one token after another, gq_act_bytes apart. */
typedef struct { const int8_t *q; const float *d; const int32_t *c; } gq_act;

static inline size_t gq_act_bytes(int64_t in) { return ((size_t)in + 8 * (size_t)(in / GQ_G) + 63) / 64 * 64; }

static inline gq_act gq_view(const void *p, int64_t in) {
    const gq_act a = {(const int8_t *)p, (const float *)((const char *)p + in),
                      (const int32_t *)((const char *)p + in + 4 * (in / GQ_G))};
    return a;
}
