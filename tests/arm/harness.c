/* Checks every kernel of lfm2's native code (lfm2cli/kernels/csrc, included whole) at the level this build's
 * flags select (native.LEVEL_FLAGS; none: the scalar reference kernels) against plain-C references on seeded
 * random inputs: bf16 products within the error of a float sum rounded to bf16, int8 / int4 products and the quantizers bit-exact against a scalar version of the
 * same integer math, the decode step's small ops and a whole decode step (dense and MoE layers, every weight
 * format) within bf16 tolerances. Built for AArch64 and run under qemu-user by tests/test_arm.py at each level,
 * and natively on x86 so that both families meet the same reference; the digest of every exact output is
 * printed, and must be one value on every level of both families.
 *
 * Usage: harness [threads]   (prints one line per check, then PASS or FAIL; exit status 1 on a failure) */
#include "native.c"

#include <stdio.h>

static int failures, checks;
static uint64_t digest = 1469598103934665603ull; /* FNV-1a over every bit-exact output */

static void mix(const void *p, size_t n) {
    for (size_t i = 0; i < n; i++) digest = (digest ^ ((const uint8_t *)p)[i]) * 1099511628211ull;
}

#define CHECK(cond, ...) do { checks++; if (!(cond)) { if (failures++ < 20) { printf("FAIL "); printf(__VA_ARGS__); printf("\n"); } } } while (0)

static uint64_t state = 88172645463325252ull;
static uint32_t next(void) { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return (uint32_t)(state >> 32); }
static float uniform(void) { return (float)next() / 4294967296.0f * 2.0f - 1.0f; } /* [-1, 1) */
static float gauss(void) { return (uniform() + uniform() + uniform()) * 1.2f; }
static void fill(bf16_t *p, int64_t n, float scale) { for (int64_t i = 0; i < n; i++) p[i] = bf(gauss() * scale); }
static void *alloc(size_t n) { void *p = calloc(n ? n : 1, 1); if (!p) abort(); return p; }

/* The weight format of the reference's bit width (8 or 4). */
static int fmt_of(int bits) { return bits == 8 ? LFM2_INT8 : LFM2_INT4; }

/* ---- references */

/* bf16 products: exact (double) sums and the sum of |terms| (the scale of a float sum's rounding error). */
static void ref_bf16(const bf16_t *w, const bf16_t *x, double *y, double *mag, int64_t T, int64_t out, int64_t in) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t r = 0; r < out; r++) {
            double s = 0, m = 0;
            for (int64_t i = 0; i < in; i++) {
                const double p = (double)f32(w[r * in + i]) * f32(x[t * in + i]);
                s += p, m += fabs(p);
            }
            y[t * out + r] = s, mag[t * out + r] = m;
        }
}

/* A float sum in some order, rounded to bf16, is within one bf16 step of the exact value plus the float error. */
static int bf16_close(bf16_t got, double exact, double mag) {
    const double step = (fabs(exact) > 1e-3 ? fabs(exact) : 1e-3) * (1.0 / 128) + mag * 1e-6;
    return fabs(f32(got) - exact) <= step;
}

/* The token's int8 groups as the kernels make them: m = max|x|, q = nearest-even(x * (127 / m)), d = m / 127. */
static void ref_prepare(const bf16_t *x, int64_t in, int8_t *q, float *d) {
    for (int64_t g = 0; g < in / 32; g++) {
        float m = 0.0f;
        for (int i = 0; i < 32; i++) m = fabsf(f32(x[g * 32 + i])) > m ? fabsf(f32(x[g * 32 + i])) : m;
        const float inv = m > 0.0f ? 127.0f / m : 0.0f;
        d[g] = m / 127.0f;
        for (int i = 0; i < 32; i++) {
            const float v = f32(x[g * 32 + i]) * inv;
            q[g * 32 + i] = (int8_t)nearbyintf(v);
        }
    }
}

static float half_to_float(uint16_t h) { /* IEEE fp16 -> float (exact) */
    const uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023;
    float f;
    if (e == 0) f = ldexpf((float)m, -24);
    else if (e == 31) { uint32_t u = s | 0x7f800000u | (m << 13); memcpy(&f, &u, 4); return f; }
    else f = ldexpf((float)(m | 1024), (int)e - 25);
    return s ? -f : f;
}

static uint16_t float_to_half(float f) { /* nearest even; normal and subnormal range (enough here) */
    uint16_t best = 0;
    float err = INFINITY;
    const int neg = f < 0;
    const float a = fabsf(f);
    int lo = 0, hi = 0x7bff; /* binary search on the ordered positive codes */
    while (lo < hi) { const int mid = (lo + hi + 1) / 2; if (half_to_float((uint16_t)mid) <= a) lo = mid; else hi = mid - 1; }
    for (int c = lo; c <= lo + 1 && c <= 0x7bff; c++) {
        const float e = fabsf(half_to_float((uint16_t)c) - a);
        if (e < err || (e == err && (c & 1) == 0)) err = e, best = (uint16_t)c;
    }
    return (uint16_t)(best | (neg ? 0x8000 : 0));
}

/* quantize.py's rules (see lfm2_quantize_int8 / _int4), scalar: q [rows, in] signed for both formats. */
static void ref_quantize(const bf16_t *w, int64_t rows, int64_t in, int bits, int8_t *q, uint16_t *scales) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < in / 32; g++) {
            const bf16_t *s = w + r * in + g * 32;
            float d;
            if (bits == 8) {
                float m = 0.0f;
                for (int i = 0; i < 32; i++) m = fabsf(f32(s[i])) > m ? fabsf(f32(s[i])) : m;
                scales[r * (in / 32) + g] = float_to_half(m / 127.0f);
                d = half_to_float(scales[r * (in / 32) + g]);
            } else {
                float mx = -INFINITY, mn = INFINITY; /* (not fmaxf: Debian's aarch64 gcc 12 crashes vectorising it) */
                for (int i = 0; i < 32; i++) mx = mx > f32(s[i]) ? mx : f32(s[i]), mn = mn < f32(s[i]) ? mn : f32(s[i]);
                scales[r * (in / 32) + g] = bf((mx >= -mn ? mx : mn) / -8.0f);
                d = f32(scales[r * (in / 32) + g]);
            }
            const float lim = bits == 8 ? 127.0f : 7.0f, low = bits == 8 ? -127.0f : -8.0f;
            for (int i = 0; i < 32; i++) {
                const float v = d != 0.0f ? nearbyintf(f32(s[i]) / d) : 0.0f;
                q[r * in + g * 32 + i] = (int8_t)(v < low ? low : v > lim ? lim : v);
            }
        }
}

/* The grouped product: per row, group after group, s = fma(exact integer sum, d_w * d_x, s); bf16 at the end. */
static void ref_grouped(const int8_t *q, const uint16_t *scales, int bits, const bf16_t *x, bf16_t *y, int64_t T,
                        int64_t out, int64_t in) {
    int8_t *xq = alloc((size_t)in);
    float *xd = alloc(sizeof(float) * (size_t)(in / 32));
    for (int64_t t = 0; t < T; t++) {
        ref_prepare(x + t * in, in, xq, xd);
        for (int64_t r = 0; r < out; r++) {
            float s = 0.0f;
            for (int64_t g = 0; g < in / 32; g++) {
                int32_t isum = 0;
                for (int i = 0; i < 32; i++) isum += (int32_t)q[r * in + g * 32 + i] * xq[g * 32 + i];
                const uint16_t h = scales[r * (in / 32) + g];
                const float dw = bits == 8 ? half_to_float(h) : f32(h);
                s = fmaf((float)isum, dw * xd[g], s);
            }
            y[t * out + r] = bf(s);
        }
    }
    free(xq); free(xd);
}

/* ---- kernels against references */

static double worst_bf16; /* the largest |error| / tolerance seen */

static void *pack_bf16(const bf16_t *w, int64_t out, int64_t in) {
    const int64_t padded = (out + 63) / 64 * 64;
    void *p = alloc(sizeof(bf16_t) * (size_t)(padded * in));
    lfm2_pack(w, p, out, padded, in, 1);
    return p;
}

static void check_bf16(int64_t out, int64_t in, int64_t T, int threads) {
    bf16_t *w = alloc(sizeof(bf16_t) * (size_t)(out * in)), *x = alloc(sizeof(bf16_t) * (size_t)(T * in));
    bf16_t *y = alloc(sizeof(bf16_t) * (size_t)(T * out));
    double *e = alloc(sizeof(double) * (size_t)(T * out)), *m = alloc(sizeof(double) * (size_t)(T * out));
    fill(w, out * in, 1.0f), fill(x, T * in, 1.0f);
    void *p = pack_bf16(w, out, in);
    lfm2_linear(p, x, y, T, out, in, LFM2_BF16, threads);
    ref_bf16(w, x, e, m, T, out, in);
    int bad = 0;
    for (int64_t i = 0; i < T * out; i++) {
        const double tol = (fabs(e[i]) > 1e-3 ? fabs(e[i]) : 1e-3) * (1.0 / 128) + m[i] * 1e-6;
        const double r = fabs(f32(y[i]) - e[i]) / tol;
        worst_bf16 = r > worst_bf16 ? r : worst_bf16;
        bad += !bf16_close(y[i], e[i], m[i]);
    }
    CHECK(!bad, "bf16 product %ldx%ld, %ld tokens, %d threads: %d of %ld outputs off", (long)out, (long)in, (long)T,
          threads, bad, (long)(T * out));
    bf16_t *y1 = alloc(sizeof(bf16_t) * (size_t)out);
    int apart = 0; /* a token's row is summed in the same order alone (decode) as among others (a batch) */
    for (int64_t t = 0; t < T && T > 1; t++) {
        lfm2_linear(p, x + t * in, y1, 1, out, in, LFM2_BF16, threads);
        apart += memcmp(y1, y + t * out, sizeof(bf16_t) * (size_t)out) != 0;
    }
    CHECK(!apart, "bf16 product %ldx%ld, %ld tokens: %d tokens differ from the token alone", (long)out, (long)in,
          (long)T, apart);
    free(w); free(x); free(y); free(e); free(m); free(p); free(y1);
}

static void check_bf16_group(int threads) { /* the MoE experts' group: bit-equal to one product at a time */
    const int64_t n = 4, out = 136, in = 96;
    bf16_t *w[4], *x[4];
    void *p[4];
    bf16_t *yg[4], *y1 = alloc(sizeof(bf16_t) * out);
    for (int i = 0; i < n; i++) {
        w[i] = alloc(sizeof(bf16_t) * out * in), fill(w[i], out * in, 1.0f), p[i] = pack_bf16(w[i], out, in);
        x[i] = alloc(sizeof(bf16_t) * in), fill(x[i], in, 1.0f), yg[i] = alloc(sizeof(bf16_t) * out);
    }
    const uint16_t *xs[4] = {x[0], x[1], x[0], x[3]}; /* two share a token, as a MoE layer's w13 products */
    lfm2_linear_group(n, (const void *const *)p, xs, yg, out, in, LFM2_BF16, threads);
    for (int i = 0; i < n; i++) {
        lfm2_linear(p[i], xs[i], y1, 1, out, in, LFM2_BF16, threads);
        CHECK(!memcmp(y1, yg[i], sizeof(bf16_t) * out), "bf16 group product %d differs from the single product", i);
    }
    for (int i = 0; i < n; i++) free(w[i]), free(x[i]), free(p[i]), free(yg[i]);
    free(y1);
}

static void check_pack_inplace(void) {
    const int64_t out = 128, in = 96;
    bf16_t *w = alloc(sizeof(bf16_t) * out * in);
    fill(w, out * in, 1.0f);
    void *p = pack_bf16(w, out, in);
    lfm2_pack_inplace(w, out, in, 2);
    CHECK(!memcmp(p, w, sizeof(bf16_t) * out * in), "packing in place differs from packing a copy");
    free(w); free(p);
}

/* Quantizes a random W with the kernels' quantizer (checked against ref_quantize), packs it, and returns it. */
static void *quantized(const bf16_t *w, int64_t out, int64_t in, int bits, int8_t *q, uint16_t *scales) {
    const int64_t groups = in / 32, padded = (out + 63) / 64 * 64;
    uint16_t *ks = alloc(sizeof(uint16_t) * (size_t)(out * groups));
    uint8_t *kq = alloc((size_t)(out * in));
    if (bits == 8) lfm2_quantize_int8(w, out, in, (int8_t *)kq, ks, 2);
    else lfm2_quantize_int4(w, out, in, kq, ks, 2);
    ref_quantize(w, out, in, bits, q, scales);
    int same = !memcmp(ks, scales, sizeof(uint16_t) * (size_t)(out * groups));
    if (bits == 8) same &= !memcmp(kq, q, (size_t)(out * in));
    else
        for (int64_t i = 0; i < out * in; i++)
            if (((kq[i / 2] >> (4 * (i % 2))) & 15) != q[i] + 8) { same = 0; break; }
    CHECK(same, "lfm2_quantize_int%d %ldx%ld differs from the reference", bits, (long)out, (long)in);
    mix(kq, (size_t)(bits == 8 ? out * in : out * in / 2)), mix(ks, sizeof(uint16_t) * (size_t)(out * groups));
    uint8_t *p = alloc((size_t)((padded / 16) * block_bytes(fmt_of(bits), in)));
    lfm2_pack_grouped(kq, ks, p, out, padded, in, fmt_of(bits), 2);
    free(ks); free(kq);
    return p;
}

static void check_grouped(int64_t out, int64_t in, int64_t T, int bits, int threads) {
    bf16_t *w = alloc(sizeof(bf16_t) * (size_t)(out * in)), *x = alloc(sizeof(bf16_t) * (size_t)(T * in));
    bf16_t *y = alloc(sizeof(bf16_t) * (size_t)(T * out)), *r = alloc(sizeof(bf16_t) * (size_t)(T * out));
    int8_t *q = alloc((size_t)(out * in));
    uint16_t *s = alloc(sizeof(uint16_t) * (size_t)(out * in / 32));
    fill(w, out * in, 0.05f), fill(x, T * in, 1.0f);
    for (int64_t i = 0; i < T * in; i += 37) x[i] = bf(f32(x[i]) * 40.0f); /* outliers: small scales elsewhere */
    void *p = quantized(w, out, in, bits, q, s);
    lfm2_linear(p, x, y, T, out, in, fmt_of(bits), threads);
    ref_grouped(q, s, bits, x, r, T, out, in);
    int64_t bad = 0;
    for (int64_t i = 0; i < T * out; i++) bad += y[i] != r[i];
    CHECK(!bad, "int%d product %ldx%ld, %ld tokens, %d threads: %ld of %ld outputs not bit-exact", bits, (long)out,
          (long)in, (long)T, threads, (long)bad, (long)(T * out));
    mix(y, sizeof(bf16_t) * (size_t)(T * out));
    free(w); free(x); free(y); free(r); free(q); free(s); free(p);
}

static void check_grouped_group(int bits, int threads) {
    const int64_t n = 3, out = 80, in = 128;
    bf16_t *w = alloc(sizeof(bf16_t) * out * in), *x = alloc(sizeof(bf16_t) * 2 * in);
    bf16_t *yg[3], *y1 = alloc(sizeof(bf16_t) * out);
    int8_t *q = alloc(out * in);
    uint16_t *s = alloc(sizeof(uint16_t) * out * in / 32);
    void *p[3];
    fill(x, 2 * in, 1.0f);
    for (int i = 0; i < n; i++) {
        fill(w, out * in, 0.05f), p[i] = quantized(w, out, in, bits, q, s), yg[i] = alloc(sizeof(bf16_t) * out);
    }
    const uint16_t *xs[3] = {x, x + in, x};
    lfm2_linear_group(n, (const void *const *)p, xs, yg, out, in, fmt_of(bits), threads);
    for (int i = 0; i < n; i++) {
        lfm2_linear(p[i], xs[i], y1, 1, out, in, fmt_of(bits), threads);
        CHECK(!memcmp(y1, yg[i], sizeof(bf16_t) * out), "int%d group product %d differs from the single product",
              bits, i);
        mix(yg[i], sizeof(bf16_t) * out);
        free(p[i]); free(yg[i]);
    }
    free(w); free(x); free(y1); free(q); free(s);
}

/* ---- the decode step's small ops, against double-precision versions (bf16 in and out) */

static int close_to(float got, double want, double rel, double abs_tol) {
    return fabs(got - want) <= rel * fabs(want) + abs_tol;
}

static void check_ops(int threads) {
    enum { D = 200, H = 48, W = 3 };
    bf16_t x[D], h[D], nw[D], y[D], x0[D];
    fill(x, D, 1.0f), fill(h, D, 1.0f), fill(nw, D, 1.0f);
    memcpy(x0, x, sizeof x);
    lfm2_add_rmsnorm(x, h, nw, y, D, 1e-5f);
    double ss = 0;
    for (int i = 0; i < D; i++) ss += (double)f32(x[i]) * f32(x[i]);
    int bad = 0;
    for (int i = 0; i < D; i++) {
        bad += !close_to(f32(x[i]), (double)f32(x0[i]) + f32(h[i]), 1.0 / 128, 0);
        bad += !close_to(f32(y[i]), f32(x[i]) / sqrt(ss / D + 1e-5) * f32(nw[i]), 1.0 / 64, 1e-6);
    }
    CHECK(!bad, "lfm2_add_rmsnorm: %d values off", bad);

    bf16_t gu[2 * D], o[D];
    fill(gu, 2 * D, 2.0f);
    lfm2_silu_mul(gu, o, D);
    bad = 0;
    for (int i = 0; i < D; i++) {
        const double g = f32(gu[i]);
        bad += !close_to(f32(o[i]), g / (1 + exp(-g)) * f32(gu[D + i]), 1.0 / 64, 1e-6);
    }
    CHECK(!bad, "lfm2_silu_mul: %d values off", bad);

    bf16_t bcx[3 * H], st[H * (W - 1)], st0[H * (W - 1)], cw[H * W], cb[H], co[H];
    fill(bcx, 3 * H, 1.0f), fill(st, H * (W - 1), 1.0f), fill(cw, H * W, 0.5f), fill(cb, H, 0.2f);
    memcpy(st0, st, sizeof st);
    lfm2_conv_step(bcx, st, cw, cb, co, H, W);
    bad = 0;
    for (int c = 0; c < H; c++) {
        const double bx = (double)f32(bcx[c]) * f32(bcx[2 * H + c]);
        double s = bx * f32(cw[c * W + W - 1]) + f32(cb[c]);
        for (int k = 0; k < W - 1; k++) s += (double)f32(st0[c * (W - 1) + k]) * f32(cw[c * W + k]);
        bad += !close_to(f32(co[c]), s * f32(bcx[H + c]), 1.0 / 32, 0.02);
        bad += !close_to(f32(st[c * (W - 1) + W - 2]), bx, 1.0 / 128, 0);
        bad += st[c * (W - 1)] != st0[c * (W - 1) + 1];
    }
    CHECK(!bad, "lfm2_conv_step: %d values off", bad);

    /* attention at position 20 over a cache of 24, 4 query heads on 2 key/value heads of 64 */
    enum { HD = 64, NH = 4, KV = 2, CAP = 24, POS = 20 };
    bf16_t qkv[(NH + 2 * KV) * HD], qn[HD], kn[HD], cs[HD], sn[HD], out[NH * HD];
    bf16_t *kc = alloc(sizeof(bf16_t) * KV * CAP * HD), *vc = alloc(sizeof(bf16_t) * KV * CAP * HD);
    fill(qkv, (NH + 2 * KV) * HD, 1.0f), fill(qn, HD, 1.0f), fill(kn, HD, 1.0f), fill(kc, KV * CAP * HD, 1.0f);
    fill(vc, KV * CAP * HD, 1.0f);
    for (int i = 0; i < HD; i++) cs[i] = bf(cosf(0.1f * (float)(i % (HD / 2)))), sn[i] = bf(sinf(0.1f * (float)(i % (HD / 2))));
    lfm2_attention_step(qkv, qn, kn, cs, sn, kc, vc, POS, CAP, NH, KV, HD, 1e-5f, out, threads);
    bad = 0;
    for (int hh = 0; hh < NH; hh++) {
        /* q: normed, rotated (as bf16 values, recomputed in double) */
        double q[HD], qq = 0;
        for (int i = 0; i < HD; i++) qq += (double)f32(qkv[hh * HD + i]) * f32(qkv[hh * HD + i]);
        for (int i = 0; i < HD; i++) q[i] = f32(qkv[hh * HD + i]) / sqrt(qq / HD + 1e-5) * f32(qn[i]);
        double qr[HD];
        for (int i = 0; i < HD / 2; i++) {
            qr[i] = q[i] * f32(cs[i]) - q[i + HD / 2] * f32(sn[i]);
            qr[i + HD / 2] = q[i + HD / 2] * f32(cs[i + HD / 2]) + q[i] * f32(sn[i + HD / 2]);
        }
        const bf16_t *k = kc + (hh / (NH / KV)) * CAP * HD, *v = vc + (hh / (NH / KV)) * CAP * HD;
        double p[POS + 1], top = -INFINITY, sum = 0;
        for (int j = 0; j <= POS; j++) {
            double s = 0;
            for (int i = 0; i < HD; i++) s += qr[i] * f32(k[j * HD + i]); /* the new key is in the cache now */
            p[j] = s / sqrt(HD), top = p[j] > top ? p[j] : top;
        }
        for (int j = 0; j <= POS; j++) p[j] = exp(p[j] - top), sum += p[j];
        for (int i = 0; i < HD; i++) {
            double o2 = 0;
            for (int j = 0; j <= POS; j++) o2 += p[j] / sum * f32(v[j * HD + i]);
            bad += !close_to(f32(out[hh * HD + i]), o2, 0.03, 0.03);
        }
    }
    CHECK(!bad, "lfm2_attention_step: %d values off", bad);
    bf16_t dv[300], dw2[300];
    fill(dv, 300, 1.0f), fill(dw2, 300, 1.0f);
    for (int n = 1; n <= 300; n += 37) {
        double s = 0, m = 0;
        for (int i = 0; i < n; i++) s += (double)f32(dv[i]) * f32(dw2[i]), m += fabs((double)f32(dv[i]) * f32(dw2[i]));
        CHECK(fabs(dot_bf16(dv, dw2, n) - s) <= 1e-5 * m + 1e-6, "dot_bf16 over %d values off", n);
    }
    free(kc); free(vc);
}

/* ---- a whole decode step: 3 layers (short conv, attention, short conv with a MoE feed-forward) against the
 * same step composed of reference products, the ops above and a double-precision attention; several positions */

enum { HID = 64, NHEADS = 4, KVH = 2, HDIM = 16, FF = 96, WIDTH = 3, EXPERTS = 4, TOPK = 2, EFF = 64, CAPY = 8,
       NL = 3 };

typedef struct { bf16_t *w; void *packed; int fmt; int8_t *q; uint16_t *s; int64_t out, in; } weight;

static weight make_weight(int64_t out, int64_t in, int fmt) {
    weight m = {alloc(sizeof(bf16_t) * (size_t)(out * in)), 0, fmt, 0, 0, out, in};
    fill(m.w, out * in, 1.0f / sqrtf((float)in));
    if (fmt == LFM2_BF16) {
        m.packed = pack_bf16(m.w, out, in);
    } else {
        m.q = alloc((size_t)(out * in)), m.s = alloc(sizeof(uint16_t) * (size_t)(out * in / 32));
        m.packed = quantized(m.w, out, in, fmt == LFM2_INT8 ? 8 : 4, m.q, m.s);
    }
    return m;
}

static void ref_linear(const weight *m, const bf16_t *x, bf16_t *y) { /* one token */
    if (m->fmt == LFM2_BF16) {
        for (int64_t r = 0; r < m->out; r++) {
            double s = 0;
            for (int64_t i = 0; i < m->in; i++) s += (double)f32(m->w[r * m->in + i]) * f32(x[i]);
            y[r] = bf((float)s);
        }
    } else {
        ref_grouped(m->q, m->s, m->fmt == LFM2_INT8 ? 8 : 4, x, y, 1, m->out, m->in);
    }
}

static void check_decode_step(int fmt_a, int fmt_b, int threads) {
    lfm2_layer L[NL];
    memset(L, 0, sizeof L);
    weight in_w[NL], out_w[NL], w13[NL], w2[NL], gate, ew13[EXPERTS], ew2[EXPERTS];
    bf16_t *norms = alloc(sizeof(bf16_t) * (2 * NL + 1) * HID), *conv = alloc(sizeof(bf16_t) * NL * HID * WIDTH);
    bf16_t *qn = alloc(sizeof(bf16_t) * HDIM), *kn = alloc(sizeof(bf16_t) * HDIM);
    fill(norms, (2 * NL + 1) * HID, 0.3f), fill(conv, NL * HID * WIDTH, 0.5f), fill(qn, HDIM, 0.3f), fill(kn, HDIM, 0.3f);
    for (int i = 0; i < (2 * NL + 1) * HID; i++) norms[i] = bf(1.0f + f32(norms[i]));
    /* two copies of every state: the kernel's (L) and the reference's */
    bf16_t *state = alloc(sizeof(bf16_t) * 2 * NL * HID * (WIDTH - 1));
    bf16_t *kcache = alloc(sizeof(bf16_t) * 2 * KVH * CAPY * HDIM), *vcache = alloc(sizeof(bf16_t) * 2 * KVH * CAPY * HDIM);
    float ebias[EXPERTS] = {0.0f, 0.1f, -0.1f, 0.05f};
    gate = make_weight(EXPERTS, HID, LFM2_BF16);
    const void *e13[EXPERTS], *e2[EXPERTS];
    for (int e = 0; e < EXPERTS; e++) {
        ew13[e] = make_weight(2 * EFF, HID, fmt_b), ew2[e] = make_weight(HID, EFF, fmt_a);
        e13[e] = ew13[e].packed, e2[e] = ew2[e].packed;
    }
    for (int i = 0; i < NL; i++) {
        const int att = i == 1, moe = i == 2;
        in_w[i] = make_weight(att ? (NHEADS + 2 * KVH) * HDIM : 3 * HID, HID, fmt_a);
        out_w[i] = make_weight(HID, att ? NHEADS * HDIM : HID, fmt_b);
        w13[i] = make_weight(2 * FF, HID, fmt_b), w2[i] = make_weight(HID, FF, fmt_a);
        lfm2_layer *l = L + i;
        l->attention = att, l->op_norm = norms + 2 * i * HID, l->ffn_norm = norms + (2 * i + 1) * HID;
        l->in_w = in_w[i].packed, l->in_rows = in_w[i].out, l->out_w = out_w[i].packed;
        l->w13 = w13[i].packed, l->w2 = w2[i].packed, l->ff = FF;
        l->conv_w = conv + i * HID * WIDTH, l->conv_b = 0, l->state = state + i * HID * (WIDTH - 1);
        l->q_norm = qn, l->k_norm = kn, l->k_cache = kcache, l->v_cache = vcache;
        l->in_f = fmt_a, l->out_f = fmt_b, l->w13_f = fmt_b, l->w2_f = fmt_a;
        if (moe) {
            l->experts = EXPERTS, l->top_k = TOPK, l->norm_topk = 1, l->scaling = 1.0f, l->gate = gate.packed;
            l->expert_bias = ebias, l->e_w13 = e13, l->e_w2 = e2, l->e_ff = EFF, l->e_w13_f = fmt_b, l->e_w2_f = fmt_a;
        }
    }
    bf16_t cs[HDIM], sn[HDIM], x[HID], xr[HID], out[HID], outr[HID];
    bf16_t h[HID], a[4 * FF], b[4 * FF], yv[HID], t2[TOPK * HID];
    double worst = 0, size = 0;
    int bad = 0, apart = 0;
    /* the same sequence as row 0 of a batched step of BR sequences, each with its own states and caches */
    enum { BR = 3 };
    bf16_t *bstate = alloc(sizeof(bf16_t) * BR * NL * HID * (WIDTH - 1));
    bf16_t *bk = alloc(sizeof(bf16_t) * BR * KVH * CAPY * HDIM), *bv = alloc(sizeof(bf16_t) * BR * KVH * CAPY * HDIM);
    bf16_t *bcaches[BR * 2 * NL], xb[BR * HID], ob[BR * HID], cb[BR * HDIM], sb[BR * HDIM];
    const int64_t bpos_cap[BR] = {CAPY, CAPY, CAPY};
    for (int r = 0; r < BR; r++)
        for (int i = 0; i < NL; i++) {
            bcaches[(r * NL + i) * 2] = L[i].attention ? bk + r * KVH * CAPY * HDIM : bstate + (r * NL + i) * HID * (WIDTH - 1);
            bcaches[(r * NL + i) * 2 + 1] = L[i].attention ? bv + r * KVH * CAPY * HDIM : 0;
        }
    for (int pos = 0; pos < 4; pos++) {
        for (int i = 0; i < HDIM; i++)
            cs[i] = bf(cosf((float)pos * 0.3f * (float)(i % 8))), sn[i] = bf(sinf((float)pos * 0.3f * (float)(i % 8)));
        fill(x, HID, 1.0f);
        memcpy(xr, x, sizeof x);
        memcpy(xb, x, sizeof x), fill(xb + HID, (BR - 1) * HID, 1.0f);
        const int64_t bpos[BR] = {pos, pos, pos};
        for (int r = 0; r < BR; r++) memcpy(cb + r * HDIM, cs, sizeof cs), memcpy(sb + r * HDIM, sn, sizeof sn);
        lfm2_decode_batch(L, NL, BR, xb, norms + 2 * NL * HID, ob, HID, NHEADS, KVH, HDIM, WIDTH, bpos, bpos_cap,
                          bcaches, cb, sb, 1e-5f, threads);
        lfm2_decode_step(L, NL, x, norms + 2 * NL * HID, out, HID, NHEADS, KVH, HDIM, WIDTH, pos, CAPY, cs, sn, 1e-5f,
                         threads);
        /* the reference: the same sequence with reference products, its own caches and states */
        lfm2_add_rmsnorm(xr, 0, L[0].op_norm, h, HID, 1e-5f);
        for (int i = 0; i < NL; i++) {
            const lfm2_layer *l = L + i;
            ref_linear(&in_w[i], h, a);
            if (l->attention)
                lfm2_attention_step(a, qn, kn, cs, sn, kcache + KVH * CAPY * HDIM, vcache + KVH * CAPY * HDIM, pos,
                                    CAPY, NHEADS, KVH, HDIM, 1e-5f, b, 1);
            else
                lfm2_conv_step(a, state + (NL + i) * HID * (WIDTH - 1), l->conv_w, 0, b, HID, WIDTH);
            ref_linear(&out_w[i], b, yv);
            lfm2_add_rmsnorm(xr, yv, l->ffn_norm, h, HID, 1e-5f);
            if (l->experts) {
                bf16_t logits[EXPERTS];
                int64_t ids[TOPK];
                float wts[TOPK];
                ref_linear(&gate, h, logits);
                moe_route(l, logits, ids, wts);
                memset(yv, 0, sizeof yv);
                for (int j = 0; j < TOPK; j++) {
                    ref_linear(&ew13[ids[j]], h, a);
                    lfm2_silu_mul(a, b, EFF);
                    ref_linear(&ew2[ids[j]], b, t2);
                    for (int k = 0; k < HID; k++) yv[k] = bf(f32(yv[k]) + rnd(f32(t2[k]) * wts[j]));
                }
            } else {
                ref_linear(&w13[i], h, a);
                lfm2_silu_mul(a, b, FF);
                ref_linear(&w2[i], b, yv);
            }
            lfm2_add_rmsnorm(xr, yv, i + 1 < NL ? L[i + 1].op_norm : norms + 2 * NL * HID, i + 1 < NL ? h : outr,
                             HID, 1e-5f);
        }
        apart += memcmp(ob, out, sizeof out) != 0;
        for (int k = 0; k < HID; k++) {
            const double e = fabs(f32(out[k]) - f32(outr[k])) / (0.03 * fabs(f32(outr[k])) + 0.03);
            worst = e > worst ? e : worst, size = fabs(f32(outr[k])) > size ? fabs(f32(outr[k])) : size;
            bad += e > 1.0 || isnan(f32(out[k]));
        }
    }
    const char *names[] = {"bf16", "int8", "int4"};
    printf("decode step (%s/%s weights, 4 positions): largest output %.2f, worst error %.3f of the tolerance\n",
           names[fmt_a], names[fmt_b], size, worst);
    CHECK(size > 0.1, "lfm2_decode_step with %s/%s weights: outputs near zero", names[fmt_a], names[fmt_b]);
    CHECK(!bad, "lfm2_decode_step with %s/%s weights: %d values off", names[fmt_a], names[fmt_b], bad);
    CHECK(!apart, "lfm2_decode_batch with %s/%s weights: row 0 differs from the single step at %d positions",
          names[fmt_a], names[fmt_b], apart);
    weight *all[] = {in_w, out_w, w13, w2, ew13, ew2};
    for (int k = 0; k < 6; k++)
        for (int i = 0; i < (k >= 4 ? EXPERTS : NL); i++) free(all[k][i].w), free(all[k][i].packed), free(all[k][i].q), free(all[k][i].s);
    free(gate.w); free(gate.packed);
    free(norms); free(conv); free(qn); free(kn); free(state); free(kcache); free(vcache);
    free(bstate); free(bk); free(bv);
}

int main(int argc, char **argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 2;
    printf("level %s (LFM2_LEVEL %d), %d threads\n", LFM2_LEVEL_NAME, lfm2_native_isa(), threads);

    static const int64_t bshapes[][2] = {{64, 64}, {70, 38}, {8, 2}, {200, 130}, {136, 1040}};
    static const int64_t tokens[] = {1, 2, 3, 4, 5, 7, 9};
    int n = 0;
    for (size_t s = 0; s < sizeof bshapes / sizeof *bshapes; s++)
        for (size_t t = 0; t < sizeof tokens / sizeof *tokens; t++, n++)
            check_bf16(bshapes[s][0], bshapes[s][1], tokens[t], t % 2 ? threads : 1);
    check_bf16_group(threads);
    check_pack_inplace();
    printf("bf16 products: %d shapes x tokens, worst error %.2f of the tolerance; group and in-place packing\n", n,
           worst_bf16);

    static const int64_t gshapes[][2] = {{64, 64}, {70, 96}, {16, 32}, {136, 1088}};
    static const int64_t gtokens[] = {1, 2, 3, 4, 5, 9, 33};
    n = 0;
    for (int bits = 8; bits >= 4; bits -= 4)
        for (size_t s = 0; s < sizeof gshapes / sizeof *gshapes; s++)
            for (size_t t = 0; t < sizeof gtokens / sizeof *gtokens; t++, n++)
                check_grouped(gshapes[s][0], gshapes[s][1], gtokens[t], bits, t % 2 ? threads : 1);
    check_grouped_group(8, threads);
    check_grouped_group(4, threads);
    printf("int8/int4 products and quantizers: %d cases, bit-exact against the reference\n", n);

    check_ops(threads);
    printf("ops: rmsnorm, silu_mul, conv_step, attention_step, dot_bf16\n");
    check_decode_step(LFM2_BF16, LFM2_BF16, threads);
    check_decode_step(LFM2_INT8, LFM2_INT4, threads);
    check_decode_step(LFM2_INT4, LFM2_INT8, threads);

    printf("digest %016llx\n", (unsigned long long)digest);
    if (failures) { printf("FAIL: %d of %d checks\n", failures, checks); return 1; }
    printf("PASS: %d checks\n", checks);
    return 0;
}
