/* Level 0, a build without a level's flags: the kernels in plain scalar C, reading the layouts of pack.c. Models
 * do not use it (native.py reports the library as without its kernel); it keeps every exported function working
 * on any compiler, and states the arithmetic the SIMD kernels follow: int8 / int4 products here give their bits
 * exactly, bf16 ones the same sums in another order. */

static inline float dot_bf16(const bf16_t *a, const bf16_t *b, int64_t d) {
    float s = 0.0f;
    for (int64_t i = 0; i < d; i++) s += f32(a[i]) * f32(b[i]);
    return s;
}

/* One token x [in] against one 16-row bf16 block `w` (pairs layout): y[r] for r < n. */
static void ref_block_bf16(const uint16_t *w, const uint16_t *x, int64_t in, uint16_t *y, int64_t n) {
    for (int64_t r = 0; r < 16 && r < n; r++) {
        float s = 0.0f;
        for (int64_t p = 0; p < in / 2; p++)
            s += f32(w[p * 32 + 2 * r]) * f32(x[2 * p]) + f32(w[p * 32 + 2 * r + 1]) * f32(x[2 * p + 1]);
        y[r] = bf(s);
    }
}

static void linear_bf16_tokens(const void *w, const uint16_t *x, uint16_t *y, int64_t T, int64_t out, int64_t in,
                               int threads) {
    const int64_t blocks = (out + 15) / 16;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t t = 0; t < T; t++)
            ref_block_bf16((const uint16_t *)w + b * 16 * in, x + t * in, in, y + t * out + 16 * b, out - 16 * b);
}

/* x [in] bf16 -> its int8 groups: m = max|x|, q = nearest-even(x * (127 / m)), d = m / 127, c = 8 * sum q. */
static void gq_prepare(const uint16_t *x, int64_t in, int8_t *q, float *d, int32_t *c) {
    for (int64_t g = 0; g < in / GQ_G; g++) {
        float m = 0.0f;
        for (int i = 0; i < GQ_G; i++) m = fabsf(f32(x[g * GQ_G + i])) > m ? fabsf(f32(x[g * GQ_G + i])) : m;
        const float inv = m > 0.0f ? 127.0f / m : 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < GQ_G; i++) {
            q[g * GQ_G + i] = (int8_t)nearbyintf(f32(x[g * GQ_G + i]) * inv);
            sum += q[g * GQ_G + i];
        }
        d[g] = m / 127.0f, c[g] = 8 * sum;
    }
}

/* Row r's weight q of input i (< 32) in one group of a 16-row block (the layout of pack.c). */
static inline int32_t ref_weight(const uint8_t *p, int fmt, int64_t r, int i) {
    const uint8_t *lane = p + 32 + 32 * (r / 8) + 4 * (r % 8);
    if (fmt == LFM2_INT8) return (int8_t)lane[64 * (i / 4) + i % 4];
    const uint8_t byte = lane[64 * (i / 8) + i % 4];
    return (i % 8 < 4 ? byte & 0x0F : byte >> 4) - 8;
}

/* One 16-row int8 / int4 block against T tokens: per row and group the exact integer sum, then one fused
 * multiply-add with the product of the two scales, group after group in order. */
static void gq_block_tokens(const uint8_t *w, int64_t groups, int fmt, const gq_act *a, int64_t T, void *scratch,
                            uint16_t *y, int64_t out, int64_t n) {
    (void)scratch;
    const int64_t bytes = FORMATS[fmt].block_bytes;
    for (int64_t t = 0; t < T; t++)
        for (int64_t r = 0; r < 16 && r < n; r++) {
            float acc = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *p = w + g * bytes;
                int32_t s = 0;
                for (int i = 0; i < GQ_G; i++) s += ref_weight(p, fmt, r, i) * a[t].q[g * GQ_G + i];
                uint16_t h;
                memcpy(&h, p + 2 * r, 2);
                const float dw = fmt == LFM2_INT8 ? half_f32(h) : f32(h);
                acc = fmaf((float)s, dw * a[t].d[g], acc);
            }
            y[t * out + r] = bf(acc);
        }
}

static inline bf16_t quantize_int4_group(const uint16_t *src, uint8_t *o) { return quantize_int4_scalar(src, o); }

static void ref_block_unit(const group_job *J, int64_t i, int64_t b) {
    ref_block_bf16((const uint16_t *)J->w[i] + b * 16 * J->in, (const uint16_t *)J->act[i], J->in, J->y[i] + 16 * b,
                   J->out - 16 * b);
}

static const group_kernel GROUP_KERNELS[LFM2_FORMATS] = {
    [LFM2_BF16] = {0, 0, 16, ref_block_unit, 0, 1},
    [LFM2_INT8] = {gq_act_bytes, gq_prepare_act, 16, gq_block_unit, 0, 1},
    [LFM2_INT4] = {gq_act_bytes, gq_prepare_act, 16, gq_block_unit, 0, 1},
};
