/* lfm2's native CPU code, loaded by lfm2cli/kernels/native.py with ctypes and compiled as this one file (the
 * parts are included, so the compiler sees and inlines across all of them). Shared code first, then the level's
 * kernels, then what runs on them:
 *   common.h     the level's id, the weight formats, bf16 helpers
 *   level.h      what a level's kernel file defines for the rest
 *   pack.c       the packed layouts every level reads: W [out, in] into them, into new memory or in place
 *   quantize.c   bf16 weights to int8 / int4 groups, as lfm2cli/kernels/quantize.py does
 *   drivers.c    how products are shared among the threads: n one-token products (decode, a MoE layer's
 *                experts) and many-token int8 / int4 products, for any level's kernels
 *   the level's kernel file (LFM2_LEVEL_SOURCE, from lfm2cli/system/cpu.py's NATIVE_LEVELS):
 *     arch/x86/avx512.c, arch/x86/avx2.c   bf16 kernels; both use arch/x86/quant.c (int8 / int4)
 *     arch/arm/neon.c                      bf16 kernels of the three AArch64 levels; arch/arm/quant.c
 *     reference.c                          scalar C, a build without a level (LFM2_LEVEL 0)
 *   ops.c        one decode step's norms, SwiGLU, short conv and attention, rounding to bf16 where the torch code
 *                does (portable C)
 *   dispatch.c   lfm2_linear and lfm2_linear_group: format and token count pick the kernel
 *   step.c       a whole decode step in one call, one token of one sequence or of several (a batch that reads
 *                each weight once), dense layers and MoE layers
 *
 * Built on the user's machine for the best level its CPU has (or the one LFM2_NATIVE_ISA names). Batch-1 decode
 * is bound by reading weights: torch's bf16 linear streams them at ~60 % of the memory bandwidth on a 2-core
 * Zen 4, these kernels at ~95 % on a large matrix. Threads: torch's own OpenMP runtime (the same libgomp.so.1 is
 * already loaded, so there is one thread pool; on macOS torch's libomp.dylib, or one thread without OpenMP). */
#include "common.h"
#include "level.h"
#include "pack.c"
#include "quantize.c"
#include "drivers.c"
#ifdef LFM2_LEVEL_SOURCE
#include LFM2_LEVEL_SOURCE
#else
#include "reference.c"
#endif
#include "ops.c"
#include "dispatch.c"
#include "step.c"
