/* No matrix kernel at this level (LFM2_ISA 0): the small ops still build, and models run on torch's kernels. */
#if LFM2_ISA == 0

static inline float dot_bf16(const bf16_t *a, const bf16_t *b, int64_t d) {
    float s = 0.0f;
    for (int64_t i = 0; i < d; i++) s += f32(a[i]) * f32(b[i]);
    return s;
}

void lfm2_linear(const void *w, const uint16_t *x, uint16_t *y, int64_t T, int64_t out, int64_t in, int fmt,
                 int threads) {
    (void)w; (void)x; (void)y; (void)T; (void)out; (void)in; (void)fmt; (void)threads;
}
#endif /* LFM2_ISA == 0 */
