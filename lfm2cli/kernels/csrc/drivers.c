/* ---- How the products' work is shared among the threads, for every level: the kernels (tiles, blocks) come from
 * the level's file. Threads: torch's own OpenMP runtime (one pool); without OpenMP the pragmas are ignored and
 * everything runs on one thread. */

/* weights per part the threads take in turn, for kernels that ask by size (TUNING: 512 KB unless tuned) */
#define GROUP_PART_BYTES ((int64_t)TUNING.part_kb << 10)
#define GROUP_STACK 64             /* products a call keeps its bookkeeping for on the stack (LFM2_MAX_TOPK) */

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

static void group_units(const group_kernel *K, const group_job *J, int64_t u0, int64_t u1) {
    if (K->span) {
        K->span(J, u0, u1);
        return;
    }
    for (int64_t u = u0; u < u1; u++) K->unit(J, u / J->units, u % J->units);
}

/* n one-token products of one shape, y[i] = x[i] W[i]^T, in one parallel region (one fork and join): each
 * distinct input is prepared once, here (a few microseconds, less than a barrier costs), then the units of all n
 * matrices, as one sequence cut in parts (a multiple of `threads` of them), are taken dynamically, so a core
 * slowed by other work does not hold up the rest. */
static void group_run(const group_kernel *K, int64_t n, const void *const *w, const uint16_t *const *x,
                      uint16_t *const *y, int64_t out, int64_t in, int fmt, int threads) {
    if (n <= 0 || out <= 0) return;
    int64_t stack[3 * GROUP_STACK];
    const void *acts[GROUP_STACK];
    int64_t *u = n <= GROUP_STACK ? stack : (int64_t *)malloc(sizeof(int64_t) * (size_t)(3 * n)), *first = u + n;
    const void **act = n <= GROUP_STACK ? acts : (const void **)(u + 2 * n);
    const int64_t nu = distinct_inputs(n, x, u, first);
    const size_t stride = K->act_bytes ? K->act_bytes(in) : 0;
    char *prepared = stride ? (char *)malloc(stride * (size_t)nu) : 0;
    for (int64_t k = 0; k < nu && prepared; k++) K->prepare(x[first[k]], in, prepared + stride * (size_t)k);
    for (int64_t i = 0; i < n; i++) act[i] = prepared ? (const void *)(prepared + stride * (size_t)u[i]) : x[i];
    const group_job J = {w, act, y, out, in, (out + K->rows - 1) / K->rows, fmt};
    const int64_t total = n * J.units, nt = threads > 1 ? threads : 1;
    const int64_t unit_bytes = K->rows / 16 * block_bytes(fmt, in);
    const int64_t by_size = GROUP_PART_BYTES / unit_bytes > 1 ? GROUP_PART_BYTES / unit_bytes : 1;
    const int64_t per = K->part_units ? K->part_units : by_size;
    const int64_t parts = ((total + per - 1) / per + nt - 1) / nt * nt;
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t p = 0; p < parts; p++) group_units(K, &J, total * p / parts, total * (p + 1) / parts);
    free(prepared);
    if (n > GROUP_STACK) free(u);
}

/* bf16 [n] -> float [n]; vectorised by the compiler (a zero extend and a shift). */
static void bf16_to_f32(const uint16_t *x, float *xf, int64_t n) {
    for (int64_t i = 0; i < n; i++) xf[i] = f32(x[i]);
}

/* group_kernel.act_bytes and .prepare of the bf16 kernels that take the token as floats. */
static inline size_t f32_act_bytes(int64_t in) { return sizeof(float) * (size_t)in; }
static inline void f32_act(const uint16_t *x, int64_t in, void *act) { bf16_to_f32(x, (float *)act, in); }

/* group_kernel.prepare of the int8 / int4 kernels: a token's int8 groups in one gq_act_bytes piece (gq_view). */
static void gq_prepare_act(const uint16_t *x, int64_t in, void *act) {
    char *p = (char *)act;
    gq_prepare(x, in, (int8_t *)p, (float *)(p + in), (int32_t *)(p + in + 4 * (in / GQ_G)));
}

/* group_kernel.unit of an int8 / int4 kernel that walks one 16-row block for one token (gq_block_tokens). */
static inline void gq_block_unit(const group_job *J, int64_t i, int64_t b) {
    const int64_t groups = J->in / GQ_G;
    const gq_act a = gq_view(J->act[i], J->in);
    _Alignas(64) float part[16];
    gq_block_tokens((const uint8_t *)J->w[i] + b * block_bytes(J->fmt, J->in), groups, J->fmt, &a, 1, part,
                    J->y[i] + 16 * b, J->out, J->out - 16 * b);
}

#define GQ_TILE 32           /* tokens that meet each block in turn (many tokens): their int8 rows stay in L2 */

/* Several tokens (decode of a few, and prefill) against int8 / int4 weights: x [T, in] bf16, y [T, out] bf16,
 * `in` a multiple of 32. The tokens are prepared in parallel, then the 16-row blocks, met by GQ_TILE tokens at a
 * time, are taken dynamically in runs of about GROUP_PART_BYTES (a multiple of `threads` of them), so a thread
 * reads on through memory it is about to use, as the kernels' prefetch expects. */
static void linear_quant_tokens(const void *w, const uint16_t *x, uint16_t *y, int64_t T, int64_t out, int64_t in,
                                int fmt, int threads) {
    const int64_t groups = in / GQ_G, blocks = (out + 15) / 16, block = block_bytes(fmt, in);
    const int64_t nt = threads > 1 ? threads : 1, per = GROUP_PART_BYTES / block > 1 ? GROUP_PART_BYTES / block : 1;
    const int64_t parts = ((blocks + per - 1) / per + nt - 1) / nt * nt;
    const size_t stride = gq_act_bytes(in);
    char *prepared = (char *)malloc(stride * (size_t)T);
    gq_act *a = (gq_act *)malloc(sizeof(gq_act) * (size_t)T);
    #pragma omp parallel num_threads(threads)
    {
        void *part = malloc(GQ_SCRATCH * GQ_TILE);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            gq_prepare_act(x + t * in, in, prepared + stride * (size_t)t);
            a[t] = gq_view(prepared + stride * (size_t)t, in);
        }
        for (int64_t t0 = 0; t0 < T; t0 += GQ_TILE) { /* tiles are independent: no barrier between them */
            const int64_t n = T - t0 < GQ_TILE ? T - t0 : GQ_TILE;
            #pragma omp for schedule(dynamic, 1) nowait
            for (int64_t p = 0; p < parts; p++)
                for (int64_t b = blocks * p / parts; b < blocks * (p + 1) / parts; b++)
                    gq_block_tokens((const uint8_t *)w + b * block, groups, fmt, a + t0, n, part,
                                    y + t0 * out + 16 * b, out, out - 16 * b);
        }
        free(part);
    }
    free(prepared); free(a);
}
