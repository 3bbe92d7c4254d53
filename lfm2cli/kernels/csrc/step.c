/* ---- A whole one-token decode step in one call, so that Python is not in the loop (native_step.py): dense
 * layers and LFM2-MoE's sparse layers (routing and the routed experts' products). Each op rounds to bf16 where
 * the eager torch code does, in the same order as NativeDecoder's per-op path, so both give the same numbers. */
typedef struct {
    int64_t attention;                                   /* 1: attention layer, 0: short-conv layer */
    const bf16_t *op_norm, *ffn_norm;
    const void *in_w; int64_t in_rows;                   /* conv in_proj (3h rows) or fused q/k/v */
    const void *out_w;                                   /* out_proj */
    const void *w13; const void *w2; int64_t ff;         /* dense feed-forward */
    const bf16_t *conv_w, *conv_b; bf16_t *state;        /* conv: weight [h][width], bias or NULL, state */
    const bf16_t *q_norm, *k_norm; bf16_t *k_cache, *v_cache; /* attention: caches [kv_heads][cap][d] */
    /* MoE feed-forward (experts > 0; then w13 .. ff above are unused): the router `gate` [experts, hidden]
     * (bf16, packed), expert_bias [experts] float32 or NULL, and per expert its packed w13 and w2 of width
     * e_ff. */
    int64_t experts, top_k, norm_topk; float scaling;
    const void *gate; const float *expert_bias;
    const void *const *e_w13; const void *const *e_w2;
    int64_t e_ff;
    int64_t in_f, out_f, w13_f, w2_f, e_w13_f, e_w2_f; /* each weight's format: 0 bf16, 1 int8, 2 int4 */
} lfm2_layer;

#define LFM2_MAX_TOPK 64

#if LFM2_ISA >= 1
#ifndef LFM2_HAVE_GROUP
/* A level whose file defines LFM2_HAVE_GROUP shares the blocks of all n bf16 matrices among the threads in one
 * parallel region (one fork and join); elsewhere they run one after the other. */
static void linear_group_packed(int64_t n, const void *const *w, const uint16_t *const *x, uint16_t *const *y,
                                int64_t out, int64_t in, int threads) {
    for (int64_t i = 0; i < n; i++) linear_packed(w[i], x[i], y[i], 1, out, in, threads);
}
#endif

/* y[T, out] = x[T, in] W^T, W in the format `fmt` names (LFM2_BF16, LFM2_INT8, LFM2_INT4): the one place that
 * picks the code; int8 and int4 run linear_grouped.c at every level. */
void lfm2_linear(const void *w, const uint16_t *x, uint16_t *y, int64_t T, int64_t out, int64_t in, int fmt,
                 int threads) {
    if (fmt == LFM2_BF16) linear_packed(w, x, y, T, out, in, threads);
    else linear_grouped(w, x, y, T, out, in, fmt == LFM2_INT4 ? 4 : 8, threads);
}

/* n one-token products of one shape (a MoE layer's routed experts): y[i] = x[i] W[i]^T. */
void lfm2_linear_group(int64_t n, const void *const *w, const uint16_t *const *x, uint16_t *const *y, int64_t out,
                       int64_t in, int fmt, int threads) {
    if (fmt == LFM2_BF16) linear_group_packed(n, w, x, y, out, in, threads);
    else linear_group_grouped(n, w, x, y, out, in, fmt == LFM2_INT4 ? 4 : 8, threads);
}
#else
void lfm2_linear_group(int64_t n, const void *const *w, const uint16_t *const *x, uint16_t *const *y, int64_t out,
                       int64_t in, int fmt, int threads) {
    for (int64_t i = 0; i < n; i++) lfm2_linear(w[i], x[i], y[i], 1, out, in, fmt, threads);
}
#endif

/* The experts a token goes to and their mixing weights, as SparseMoE.route does in bf16: sigmoid scores; the
 * k best of score + expert_bias (the bias only chooses); the unbiased scores, normalised to sum 1 and scaled. */
static int64_t moe_route(const lfm2_layer *L, const bf16_t *logits, int64_t *ids, float *weights) {
    const int64_t E = L->experts, k = L->top_k < LFM2_MAX_TOPK ? L->top_k : LFM2_MAX_TOPK;
    float score[E], chosen[E];
    for (int64_t e = 0; e < E; e++) {
        const float s = f32(logits[e]);
        score[e] = rnd(1.0f / (1.0f + exp_f(-s)));
        chosen[e] = L->expert_bias ? score[e] + L->expert_bias[e] : score[e];
    }
    for (int64_t j = 0; j < k; j++) { /* k small: k passes, the first of equal values wins (as torch.topk) */
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (chosen[e] > -INFINITY && (best < 0 || chosen[e] > chosen[best])) best = e;
        if (best < 0) best = 0;
        ids[j] = best, weights[j] = score[best], chosen[best] = -INFINITY;
    }
    if (L->norm_topk) {
        float sum = 0.0f;
        for (int64_t j = 0; j < k; j++) sum += weights[j];
        const float denom = rnd(rnd(sum) + 1e-6f);
        for (int64_t j = 0; j < k; j++) weights[j] = rnd(weights[j] / denom);
    }
    for (int64_t j = 0; j < k; j++) weights[j] = rnd(weights[j] * L->scaling);
    return k;
}

/* y = the sparse feed-forward of h: each routed expert's SwiGLU, weighted, added up in bf16 in routing order.
 * The k experts' w13 products run as one group, then their w2 products. a: scratch of k * 2 * e_ff values,
 * b: k * e_ff, t: k * hidden. */
static void moe_step(const lfm2_layer *L, const bf16_t *h, bf16_t *y, bf16_t *a, bf16_t *b, bf16_t *t,
                     int64_t hidden, int threads) {
    bf16_t logits[L->experts];
    lfm2_linear(L->gate, h, logits, 1, L->experts, hidden, LFM2_BF16, threads);
    int64_t ids[LFM2_MAX_TOPK];
    float weights[LFM2_MAX_TOPK];
    const int64_t k = moe_route(L, logits, ids, weights), ff = L->e_ff;
    const int f13 = (int)L->e_w13_f, f2 = (int)L->e_w2_f;
    const void *w13[LFM2_MAX_TOPK], *w2[LFM2_MAX_TOPK];
    const uint16_t *x13[LFM2_MAX_TOPK], *x2[LFM2_MAX_TOPK];
    uint16_t *y13[LFM2_MAX_TOPK], *y2[LFM2_MAX_TOPK];
    for (int64_t j = 0; j < k; j++) {
        w13[j] = L->e_w13[ids[j]], w2[j] = L->e_w2[ids[j]];
        x13[j] = h, y13[j] = a + j * 2 * ff, x2[j] = b + j * ff, y2[j] = t + j * hidden;
    }
    lfm2_linear_group(k, w13, x13, y13, 2 * ff, hidden, f13, threads);
    for (int64_t j = 0; j < k; j++) lfm2_silu_mul(a + j * 2 * ff, b + j * ff, ff);
    lfm2_linear_group(k, w2, x2, y2, hidden, ff, f2, threads);
    memset(y, 0, sizeof(bf16_t) * hidden);
    for (int64_t j = 0; j < k; j++)
        for (int64_t i = 0; i < hidden; i++) y[i] = bf(f32(y[i]) + rnd(f32(t[j * hidden + i]) * weights[j]));
}

/* x [hidden]: the token's embedding, updated in place as the residual stream; out [hidden]: the final norm of
 * the last layer's output, ready for the LM head. */
void lfm2_decode_step(const lfm2_layer *layers, int64_t n, bf16_t *x, const bf16_t *final_norm, bf16_t *out,
                      int64_t hidden, int64_t heads, int64_t kv_heads, int64_t d, int64_t width, int64_t pos,
                      int64_t cap, const bf16_t *cos, const bf16_t *sin, float eps, int threads) {
    int64_t big = hidden > heads * d ? hidden : heads * d, topk = 1;
    for (int64_t i = 0; i < n; i++) {
        const int64_t k = layers[i].top_k < LFM2_MAX_TOPK ? layers[i].top_k : LFM2_MAX_TOPK;
        topk = layers[i].experts && k > topk ? k : topk;
        big = layers[i].in_rows > big ? layers[i].in_rows : big;
        big = 2 * layers[i].ff > big ? 2 * layers[i].ff : big;
        big = 2 * k * layers[i].e_ff > big ? 2 * k * layers[i].e_ff : big;
    }
    bf16_t *h = malloc(sizeof(bf16_t) * hidden), *y = malloc(sizeof(bf16_t) * hidden);
    bf16_t *t = malloc(sizeof(bf16_t) * hidden * topk);
    bf16_t *a = malloc(sizeof(bf16_t) * big), *b = malloc(sizeof(bf16_t) * big);
    lfm2_add_rmsnorm(x, 0, layers[0].op_norm, h, hidden, eps);
    for (int64_t i = 0; i < n; i++) {
        const lfm2_layer *L = layers + i;
        lfm2_linear(L->in_w, h, a, 1, L->in_rows, hidden, (int)L->in_f, threads);
        if (L->attention)
            lfm2_attention_step(a, L->q_norm, L->k_norm, cos, sin, L->k_cache, L->v_cache, pos, cap, heads,
                                kv_heads, d, eps, b, threads);
        else
            lfm2_conv_step(a, L->state, L->conv_w, L->conv_b, b, hidden, width);
        lfm2_linear(L->out_w, b, y, 1, hidden, L->attention ? heads * d : hidden, (int)L->out_f, threads);
        lfm2_add_rmsnorm(x, y, L->ffn_norm, h, hidden, eps);
        if (L->experts) {
            moe_step(L, h, y, a, b, t, hidden, threads);
        } else {
            lfm2_linear(L->w13, h, a, 1, 2 * L->ff, hidden, (int)L->w13_f, threads);
            lfm2_silu_mul(a, b, L->ff);
            lfm2_linear(L->w2, b, y, 1, hidden, L->ff, (int)L->w2_f, threads);
        }
        lfm2_add_rmsnorm(x, y, i + 1 < n ? layers[i + 1].op_norm : final_norm, i + 1 < n ? h : out, hidden, eps);
    }
    free(h); free(y); free(t); free(a); free(b);
}
