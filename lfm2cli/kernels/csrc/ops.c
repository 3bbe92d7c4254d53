/* ---- One decode step's small operations, bf16 in and out (portable C, vectorised by the compiler).
 * Each rounds to bf16 where the model's torch code does (an op's result is bf16), so both paths agree to
 * within the last bit of a rounding; at batch 1 torch spends ~10 us of dispatch on each of ~60 such ops per
 * layer, more than the layer's matrix products take at 350M. */

/* Sum of squares in 16 lanes (a vectorisable order; torch's mean also sums in vector lanes). */
static inline float sum_squares(const bf16_t *x, int64_t n) {
    float lane[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) lane[j] += f32(x[i + j]) * f32(x[i + j]);
    for (; i < n; i++) lane[0] += f32(x[i]) * f32(x[i]);
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += lane[j];
    return s;
}

/* RMSNorm of `rows` rows of `dim`: y = w * bf16(x / rms(x)), statistics in float32. */
static void norm_rows(const bf16_t *x, const bf16_t *w, bf16_t *y, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const bf16_t *xr = x + r * dim;
        const float s = 1.0f / sqrtf(sum_squares(xr, dim) / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) y[r * dim + i] = bf(rnd(f32(xr[i]) * s) * f32(w[i]));
    }
}

/* The residual stream step between sublayers: x += h (in place), y = RMSNorm(x). */
void lfm2_add_rmsnorm(bf16_t *x, const bf16_t *h, const bf16_t *w, bf16_t *y, int64_t dim, float eps) {
    if (h)
        for (int64_t i = 0; i < dim; i++) x[i] = bf(f32(x[i]) + f32(h[i]));
    norm_rows(x, w, y, 1, dim, eps);
}

/* SwiGLU's middle: gu = [gate | up] (w1 and w3 fused), out = silu(gate) * up. */
void lfm2_silu_mul(const bf16_t *gu, bf16_t *out, int64_t width) {
    for (int64_t i = 0; i < width; i++) {
        const float g = f32(gu[i]);
        out[i] = bf(rnd(g / (1.0f + exp_f(-g))) * f32(gu[width + i]));
    }
}

/* The short convolution for one new token: bcx = in_proj output [B | C | x], state [h][width-1] (the
 * previous inputs, oldest first; shifted in place), w [h][width], bias [h] or NULL; out = C * conv(B * x). */
void lfm2_conv_step(const bf16_t *bcx, bf16_t *state, const bf16_t *w, const bf16_t *bias, bf16_t *out,
                    int64_t h, int64_t width) {
    for (int64_t c = 0; c < h; c++) {
        bf16_t *s = state + c * (width - 1);
        const bf16_t *wc = w + c * width;
        const float bx = rnd(f32(bcx[c]) * f32(bcx[2 * h + c]));
        float y = 0.0f;
        for (int64_t k = 0; k < width - 1; k++) y += rnd(f32(s[k]) * f32(wc[k]));
        y = rnd(y + rnd(bx * f32(wc[width - 1])));
        if (bias) y = rnd(y + f32(bias[c]));
        out[c] = bf(f32(bcx[h + c]) * y);
        for (int64_t k = 0; k + 1 < width - 1; k++) s[k] = s[k + 1];
        s[width - 2] = bf(bx);
    }
}

/* Rotate-half RoPE of one head in place: x * cos + rotate_half(x) * sin. */
static void rope_head(bf16_t *x, const bf16_t *cos, const bf16_t *sin, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = f32(x[i]), b = f32(x[i + half]);
        x[i] = bf(rnd(a * f32(cos[i])) + rnd(-b * f32(sin[i])));
        x[i + half] = bf(rnd(b * f32(cos[i + half])) + rnd(a * f32(sin[i + half])));
    }
}

/* dot_bf16(a, b, d), the attention's dot product, is the level's (level.h). */

/* Grouped-query attention for one new token at position `pos`: qkv = the fused projection's output, q and k
 * normed per head and rotated, k and v written into the caches kc/vc [kv_heads][cap][d], then each query head
 * attends over positions 0..pos (scores rounded to bf16 as a bf16 matmul does, softmax in float32). */
void lfm2_attention_step(const bf16_t *qkv, const bf16_t *qw, const bf16_t *kw, const bf16_t *cos,
                         const bf16_t *sin, bf16_t *kc, bf16_t *vc, int64_t pos, int64_t cap, int64_t heads,
                         int64_t kv_heads, int64_t d, float eps, bf16_t *out, int threads) {
    bf16_t *q = malloc(sizeof(bf16_t) * heads * d);
    norm_rows(qkv, qw, q, heads, d, eps);
    for (int64_t hh = 0; hh < heads; hh++) rope_head(q + hh * d, cos, sin, d);
    for (int64_t g = 0; g < kv_heads; g++) {
        bf16_t *k = kc + (g * cap + pos) * d;
        norm_rows(qkv + (heads + g) * d, kw, k, 1, d, eps);
        rope_head(k, cos, sin, d);
        memcpy(vc + (g * cap + pos) * d, qkv + (heads + kv_heads + g) * d, sizeof(bf16_t) * d);
    }
    const int64_t n = pos + 1, group = heads / kv_heads;
    const float scale = 1.0f / sqrtf((float)d);
    #pragma omp parallel for num_threads(threads) schedule(static) if (n * heads * d > 65536)
    for (int64_t hh = 0; hh < heads; hh++) {
        const bf16_t *qh = q + hh * d, *kh = kc + (hh / group) * cap * d, *vh = vc + (hh / group) * cap * d;
        float *p = malloc(sizeof(float) * n), *acc = calloc(d, sizeof(float)), top = -INFINITY, sum = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            p[j] = rnd(dot_bf16(qh, kh + j * d, d)) * scale;
            top = p[j] > top ? p[j] : top;
        }
        for (int64_t j = 0; j < n; j++) { p[j] = exp_f(p[j] - top); sum += p[j]; }
        for (int64_t j = 0; j < n; j++) {
            const float pj = rnd(p[j] / sum);
            for (int64_t i = 0; i < d; i++) acc[i] += pj * f32(vh[j * d + i]);
        }
        for (int64_t i = 0; i < d; i++) out[hh * d + i] = bf(acc[i]);
        free(p); free(acc);
    }
    free(q);
}

