/* What a level's kernel file (LFM2_LEVEL_SOURCE: arch/x86/avx512.c, arch/x86/avx2.c, arch/arm/neon.c, or the
 * scalar reference.c) defines, for the shared code around it:
 *   dot_bf16             a . b over d bf16 values (the attention's scores, ops.c)
 *   linear_bf16_tokens   y[T, out] = x[T, in] W^T for bf16 weights and T >= 2 (prefill)
 *   gq_prepare           one token's int8 groups (gq_act in common.h) from its bf16 values
 *   gq_block_tokens      one 16-row int8 / int4 block against T tokens (drivers.c shares the blocks out)
 *   quantize_int4_group  one group of 32 weights -> 16 bytes of nibbles and the bf16 scale (quantize.c)
 *   GROUP_KERNELS        per format, how n one-token products run (the tile and its scheduling; drivers.c)
 * Everything else (packing, the quantizers' loops, the thread drivers, the small ops, the whole step) is shared. */

/* n one-token products of one shape (a MoE layer's routed experts; one token is n = 1): matrix i's weights w[i],
 * its prepared input act[i] (see group_kernel.prepare), its output y[i]. The outputs of each matrix are cut in
 * `units` units of the kernel's `rows` rows; unit u of the call is unit u % units of matrix u / units. */
typedef struct {
    const void *const *w; const void *const *act; uint16_t *const *y;
    int64_t out, in, units; int fmt;
} group_job;

typedef struct {
    /* bytes of one token's prepared input (0: the kernel reads the bf16 token as it is), and how to make it */
    size_t (*act_bytes)(int64_t in);
    void (*prepare)(const uint16_t *x, int64_t in, void *act);
    int64_t rows;                                           /* outputs per unit: a tile (64) or a block (16) */
    void (*unit)(const group_job *J, int64_t i, int64_t u); /* unit u of matrix i */
    void (*span)(const group_job *J, int64_t u0, int64_t u1); /* units u0..u1-1 of the call; NULL: unit by unit */
    int64_t part_units; /* units per part the threads take in turn; 0: about GROUP_PART_BYTES of weights */
} group_kernel;

static inline float dot_bf16(const bf16_t *a, const bf16_t *b, int64_t d);
static void linear_bf16_tokens(const void *w, const uint16_t *x, uint16_t *y, int64_t T, int64_t out, int64_t in,
                               int threads);
static void gq_prepare(const uint16_t *x, int64_t in, int8_t *q, float *d, int32_t *c);
#define GQ_SCRATCH 64 /* bytes of one token's partial sums for a 16-row block (16 floats), in gq_block_tokens */
#define GQ_CHUNK 32          /* groups per pass for several tokens: a block's chunk (9-17 KB) stays in L1/L2 */
static void gq_block_tokens(const uint8_t *w, int64_t groups, int fmt, const gq_act *a, int64_t T, void *scratch,
                            uint16_t *y, int64_t out, int64_t n);
static inline bf16_t quantize_int4_group(const uint16_t *src, uint8_t *nib);
/* and static const group_kernel GROUP_KERNELS[LFM2_FORMATS], indexed by lfm2_format */
