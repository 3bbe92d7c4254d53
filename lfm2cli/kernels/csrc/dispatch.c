/* ---- The dispatcher, the one place that picks the code for a product: the weight format and the number of
 * tokens choose among the level's kernels (level.h), which drivers.c shares out among the threads. */

/* The level this library was built for: its id in lfm2cli/system/cpu.py's NATIVE_LEVELS, 0 for none. */
int lfm2_native_isa(void) { return LFM2_LEVEL; }

/* The bytes of one 16-row block's group in format `fmt` and the inputs of a group (0 for no such format), so
 * that the Python side checks its table of formats against this one when it loads the library. */
int64_t lfm2_format_bytes(int fmt, int64_t *group) {
    if (fmt < 0 || fmt >= LFM2_FORMATS) return 0;
    *group = FORMATS[fmt].group;
    return FORMATS[fmt].block_bytes;
}

/* The decode kernels' tuning (common.h's lfm2_tuning): set from `t` when every field is in range (returns 1),
 * else left as it is (returns 0); `t` NULL restores the compiled defaults. Set once at load, before any product
 * runs: the kernels read it unguarded. */
int lfm2_set_tuning(const lfm2_tuning *t) {
    static const lfm2_tuning defaults = LFM2_TUNING_DEFAULT;
    if (!t) {
        TUNING = defaults;
        return 1;
    }
    if ((t->streams != 1 && t->streams != 2 && t->streams != 4) || t->ahead < 0 || t->ahead > (1 << 16)
        || t->ahead % 64 || t->part_kb < 16 || t->part_kb > (1 << 16)) return 0;
    TUNING = *t;
    return 1;
}

void lfm2_get_tuning(lfm2_tuning *now) { *now = TUNING; }

/* The team size of the parallel regions the calling thread starts from now on, torch's included (one OpenMP
 * runtime): OpenMP keeps it per thread, where torch.set_num_threads changes it for every thread. */
void lfm2_set_thread_team(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n > 0 ? n : 1);
#else
    (void)n;
#endif
}

/* Bytes of lfm2_tuning, so that the Python side checks its struct against this one. */
int64_t lfm2_tuning_size(void) { return (int64_t)sizeof(lfm2_tuning); }

/* y[T, out] = x[T, in] W^T, W packed in format `fmt` (lfm2_pack, lfm2_pack_grouped): one token runs as a group of
 * one, several as the level's many-token kernels. */
void lfm2_linear(const void *w, const uint16_t *x, uint16_t *y, int64_t T, int64_t out, int64_t in, int fmt,
                 int threads) {
    if (T <= 0 || out <= 0 || fmt < 0 || fmt >= LFM2_FORMATS) return;
    if (T == 1) group_run(&GROUP_KERNELS[fmt], 1, &w, &x, &y, out, in, fmt, threads);
    else if (fmt == LFM2_BF16) linear_bf16_tokens(w, x, y, T, out, in, threads);
    else linear_quant_tokens(w, x, y, T, out, in, fmt, threads);
}

/* n one-token products of one shape (a MoE layer's routed experts): y[i] = x[i] W[i]^T. */
void lfm2_linear_group(int64_t n, const void *const *w, const uint16_t *const *x, uint16_t *const *y, int64_t out,
                       int64_t in, int fmt, int threads) {
    if (fmt < 0 || fmt >= LFM2_FORMATS) return;
    group_run(&GROUP_KERNELS[fmt], n, w, x, y, out, in, fmt, threads);
}
