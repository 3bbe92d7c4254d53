/* ---- A whole decode step in one call, so that Python is not in the loop (native_step.py): one token of each of
 * B sequences (each with its own caches and position), dense layers and LFM2-MoE's sparse layers (routing and
 * the routed experts' products). Each op rounds to bf16 where the eager torch code does, in the same order as
 * NativeDecoder's per-op path, so both give the same numbers. The B rows share each weight read (one product of
 * B tokens per weight); everything else runs per row, the same code for one sequence or many, and the products'
 * kernels sum a row in the same order whatever the number of tokens: a sequence's logits are the same bits
 * alone or in a batch. */
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
    int64_t in_f, out_f, w13_f, w2_f, e_w13_f, e_w2_f; /* each weight's lfm2_format */
} lfm2_layer;

/* Python mirrors lfm2_layer (native.Layer) and checks its size against this when it loads the library. */
int64_t lfm2_layer_size(void) { return (int64_t)sizeof(lfm2_layer); }

#define LFM2_MAX_TOPK 64

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

/* The products of one kind of expert weight (w: per expert) for the slots of a batch's routed experts, grouped
 * by expert (expert e's slots start[e]..start[e+1]-1): x[s] slot s's input row, y [slots, out]. An expert with
 * several rows is one product over them (their inputs gathered into `xs` [slots, in]); the experts with one row
 * run together as a group of one-token products (one token: the k experts of its one row). */
static void expert_products(const void *const *w, int64_t E, const int64_t *start, const bf16_t *const *x,
                            bf16_t *xs, bf16_t *y, int64_t out, int64_t in, int fmt, int threads) {
    const int64_t slots = start[E];
    const void **gw = malloc(sizeof(void *) * slots);
    const uint16_t **gx = malloc(sizeof(uint16_t *) * slots);
    uint16_t **gy = malloc(sizeof(uint16_t *) * slots);
    int64_t n1 = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t s0 = start[e], rows = start[e + 1] - s0;
        if (rows == 1) {
            gw[n1] = w[e], gx[n1] = x[s0], gy[n1++] = y + s0 * out;
        } else if (rows > 1) {
            for (int64_t s = s0; s < s0 + rows; s++) memcpy(xs + s * in, x[s], sizeof(bf16_t) * in);
            lfm2_linear(w[e], xs + s0 * in, y + s0 * out, rows, out, in, fmt, threads);
        }
    }
    lfm2_linear_group(n1, gw, gx, gy, out, in, fmt, threads);
    free(gw); free(gx); free(gy);
}

/* y [B, hidden] = the sparse feed-forward of each row of h [B, hidden]: each routed expert's SwiGLU, weighted,
 * added up in bf16 in routing order. Each row is routed on its own; the rows that chose an expert share its
 * weights' read (expert_products). */
static void moe_rows(const lfm2_layer *L, const bf16_t *h, bf16_t *y, int64_t B, int64_t hidden, int threads) {
    const int64_t E = L->experts, K = L->top_k < LFM2_MAX_TOPK ? L->top_k : LFM2_MAX_TOPK, ff = L->e_ff;
    bf16_t *logits = malloc(sizeof(bf16_t) * B * E);
    lfm2_linear(L->gate, h, logits, B, E, hidden, LFM2_BF16, threads);
    int64_t *ids = malloc(sizeof(int64_t) * B * K), *slot = malloc(sizeof(int64_t) * B * K);
    int64_t *start = calloc(E + 1, sizeof(int64_t)), *fill = calloc(E, sizeof(int64_t));
    float *weights = malloc(sizeof(float) * B * K);
    for (int64_t r = 0; r < B; r++) moe_route(L, logits + r * E, ids + r * K, weights + r * K); /* K each */
    for (int64_t rj = 0; rj < B * K; rj++) start[ids[rj] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    const int64_t S = start[E];
    const bf16_t **x13 = malloc(sizeof(bf16_t *) * S), **x2 = malloc(sizeof(bf16_t *) * S);
    for (int64_t rj = 0; rj < B * K; rj++) { /* an expert's rows in row order */
        const int64_t e = ids[rj], s = start[e] + fill[e]++;
        slot[rj] = s, x13[s] = h + rj / K * hidden;
    }
    bf16_t *a = malloc(sizeof(bf16_t) * S * 2 * ff), *b = malloc(sizeof(bf16_t) * S * ff);
    bf16_t *t = malloc(sizeof(bf16_t) * S * hidden);
    bf16_t *xs = malloc(sizeof(bf16_t) * S * (hidden > ff ? hidden : ff));
    expert_products(L->e_w13, E, start, x13, xs, a, 2 * ff, hidden, (int)L->e_w13_f, threads);
    for (int64_t s = 0; s < S; s++) {
        lfm2_silu_mul(a + s * 2 * ff, b + s * ff, ff);
        x2[s] = b + s * ff;
    }
    expert_products(L->e_w2, E, start, x2, xs, t, hidden, ff, (int)L->e_w2_f, threads);
    for (int64_t r = 0; r < B; r++) {
        bf16_t *yr = y + r * hidden;
        memset(yr, 0, sizeof(bf16_t) * hidden);
        for (int64_t j = 0; j < K; j++) {
            const bf16_t *tj = t + slot[r * K + j] * hidden;
            const float wj = weights[r * K + j];
            for (int64_t i = 0; i < hidden; i++) yr[i] = bf(f32(yr[i]) + rnd(f32(tj[i]) * wj));
        }
    }
    free(logits); free(ids); free(slot); free(start); free(fill); free(weights);
    free(x13); free(x2); free(a); free(b); free(t); free(xs);
}

/* One sequence's place in a batched step: its position, its caches' capacity, and per layer its caches (an
 * attention layer's k and v caches [kv_heads][cap][d], a conv layer's state and NULL): caches[2 * layer]. */
typedef struct { int64_t pos, cap; bf16_t *const *caches; const bf16_t *cos, *sin; } lfm2_row;

/* The operator of layer L (attention or short conv) for each row: a [B, in_rows] its input projections, b its
 * outputs [B, heads * d] or [B, hidden]. */
static void operator_rows(const lfm2_layer *L, int64_t i, const lfm2_row *rows, int64_t B, const bf16_t *a,
                          bf16_t *b, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t d, int64_t width,
                          float eps, int threads) {
    for (int64_t r = 0; r < B; r++) {
        bf16_t *const *c = rows[r].caches + 2 * i;
        if (L->attention)
            lfm2_attention_step(a + r * L->in_rows, L->q_norm, L->k_norm, rows[r].cos, rows[r].sin, c[0], c[1],
                                rows[r].pos, rows[r].cap, heads, kv_heads, d, eps, b + r * heads * d, threads);
        else
            lfm2_conv_step(a + r * L->in_rows, c[0], L->conv_w, L->conv_b, b + r * hidden, hidden, width);
    }
}

/* Every layer for B rows: x [B, hidden] their embeddings, updated in place as the residual streams; out
 * [B, hidden] the final norm of the last layer's output, ready for the LM head. */
static void decode_rows(const lfm2_layer *layers, int64_t n, const lfm2_row *rows, int64_t B, bf16_t *x,
                        const bf16_t *final_norm, bf16_t *out, int64_t hidden, int64_t heads, int64_t kv_heads,
                        int64_t d, int64_t width, float eps, int threads) {
    int64_t big = hidden > heads * d ? hidden : heads * d;
    for (int64_t i = 0; i < n; i++) {
        big = layers[i].in_rows > big ? layers[i].in_rows : big;
        big = 2 * layers[i].ff > big ? 2 * layers[i].ff : big;
    }
    bf16_t *h = malloc(sizeof(bf16_t) * B * hidden), *y = malloc(sizeof(bf16_t) * B * hidden);
    bf16_t *a = malloc(sizeof(bf16_t) * B * big), *b = malloc(sizeof(bf16_t) * B * big);
    for (int64_t r = 0; r < B; r++) lfm2_add_rmsnorm(x + r * hidden, 0, layers[0].op_norm, h + r * hidden, hidden, eps);
    for (int64_t i = 0; i < n; i++) {
        const lfm2_layer *L = layers + i;
        const int64_t op_out = L->attention ? heads * d : hidden;
        lfm2_linear(L->in_w, h, a, B, L->in_rows, hidden, (int)L->in_f, threads);
        operator_rows(L, i, rows, B, a, b, hidden, heads, kv_heads, d, width, eps, threads);
        lfm2_linear(L->out_w, b, y, B, hidden, op_out, (int)L->out_f, threads);
        for (int64_t r = 0; r < B; r++)
            lfm2_add_rmsnorm(x + r * hidden, y + r * hidden, L->ffn_norm, h + r * hidden, hidden, eps);
        if (L->experts) {
            moe_rows(L, h, y, B, hidden, threads);
        } else {
            lfm2_linear(L->w13, h, a, B, 2 * L->ff, hidden, (int)L->w13_f, threads);
            for (int64_t r = 0; r < B; r++) lfm2_silu_mul(a + r * 2 * L->ff, b + r * L->ff, L->ff);
            lfm2_linear(L->w2, b, y, B, hidden, L->ff, (int)L->w2_f, threads);
        }
        const bf16_t *norm = i + 1 < n ? layers[i + 1].op_norm : final_norm;
        for (int64_t r = 0; r < B; r++)
            lfm2_add_rmsnorm(x + r * hidden, y + r * hidden, norm, (i + 1 < n ? h : out) + r * hidden, hidden, eps);
    }
    free(h); free(y); free(a); free(b);
}

/* One token of one sequence, its caches in the layer table (k_cache, v_cache, state): x [hidden] its embedding,
 * updated in place; out [hidden] the final norm's output. The same code as a batch of one. */
void lfm2_decode_step(const lfm2_layer *layers, int64_t n, bf16_t *x, const bf16_t *final_norm, bf16_t *out,
                      int64_t hidden, int64_t heads, int64_t kv_heads, int64_t d, int64_t width, int64_t pos,
                      int64_t cap, const bf16_t *cos, const bf16_t *sin, float eps, int threads) {
    bf16_t **caches = malloc(sizeof(bf16_t *) * 2 * n);
    for (int64_t i = 0; i < n; i++) {
        caches[2 * i] = layers[i].attention ? layers[i].k_cache : layers[i].state;
        caches[2 * i + 1] = layers[i].attention ? layers[i].v_cache : 0;
    }
    const lfm2_row row = {pos, cap, caches, cos, sin};
    decode_rows(layers, n, &row, 1, x, final_norm, out, hidden, heads, kv_heads, d, width, eps, threads);
    free(caches);
}

/* One token of each of B sequences: x [B, hidden] their embeddings (updated in place), out [B, hidden]; row r at
 * position pos[r] with capacity cap[r], its caches caches[r * 2 * n ..] (two per layer, as lfm2_row), its RoPE
 * cos[r * d ..] and sin[r * d ..]. The layer table's cache fields are not read. */
void lfm2_decode_batch(const lfm2_layer *layers, int64_t n, int64_t B, bf16_t *x, const bf16_t *final_norm,
                       bf16_t *out, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t d, int64_t width,
                       const int64_t *pos, const int64_t *cap, bf16_t *const *caches, const bf16_t *cos,
                       const bf16_t *sin, float eps, int threads) {
    if (B <= 0) return;
    lfm2_row *rows = malloc(sizeof(lfm2_row) * B);
    for (int64_t r = 0; r < B; r++) {
        const lfm2_row row = {pos[r], cap[r], caches + r * 2 * n, cos + r * d, sin + r * d};
        rows[r] = row;
    }
    decode_rows(layers, n, rows, B, x, final_norm, out, hidden, heads, kv_heads, d, width, eps, threads);
    free(rows);
}
