/* lfm2's native CPU code, loaded by lfm2cli/kernels/native.py with ctypes and compiled as this one file (the
 * parts are included, so the compiler sees and inlines across all of them). In order:
 *   common.h          bf16 helpers, and LFM2_ISA: the level the -march flags of this build allow
 *   pack.c            W [out, in] into the kernels' layout, into new memory or in place
 *   simd256.h         256-bit helpers of the AVX2 level and the grouped kernels
 *   linear_avx*.c     y[T, out] = x[T, in] W^T for bf16 activations and bf16 weights, one file per ISA
 *                     level (only the one matching LFM2_ISA compiles), plus the attention dot product
 *   linear_grouped.c  the same for int8 and int4 weights (groups of 32), 256-bit code for both levels
 *   linear_neon.c, linear_grouped_neon.c   the same for AArch64 (NEON, dotprod, bf16 levels) in the same layouts
 *   ops.c             one decode step's norms, SwiGLU, short conv and attention, rounding to bf16 where the torch
 *                     code does (portable C)
 *   step.c            a whole one-token decode step in one call (dense layers and MoE layers)
 *
 * Built on the user's machine for the best level its CPU has (or the one LFM2_NATIVE_ISA names). Batch-1 decode
 * is bound by reading weights: torch's bf16 linear streams them at ~60 % of the memory bandwidth on a 2-core
 * Zen 4, these kernels at ~95 % on a large matrix. Threads: torch's own OpenMP runtime (the same libgomp.so.1 is
 * already loaded, so there is one thread pool; on macOS torch's libomp.dylib, or one thread without OpenMP). */
#include "common.h"
#include "pack.c"
#include "simd256.h"
#include "linear_avx512.c"
#include "linear_avx2.c"
#include "linear_none.c"
#include "linear_grouped.c"
#include "linear_neon.c"
#include "linear_grouped_neon.c"
#include "ops.c"
#include "step.c"
