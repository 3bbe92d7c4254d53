/* ---- Quantizing bf16 weights to int8 and int4 groups exactly as lfm2cli/kernels/quantize.py does (the torch code
 * is the definition: float32 arithmetic, true divisions, round half to even), at memory speed for loading. */

/* float -> IEEE fp16 bits, rounded to nearest even as torch (and F16C's vcvtps2ph, AArch64's FCVT) round. */
static inline uint16_t half_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((a >> 13) & 0x3ffu); /* NaN, kept quiet */
    if (a >= 0x47800000u) return sign | 0x7c00u;                                  /* 2^16 and up: infinity */
    if (a < 0x38800000u) { /* below 2^-14: a subnormal, rounded by the float add to a multiple of 2^-24 */
        float t;
        memcpy(&t, &a, 4);
        t += 0.5f;
        memcpy(&u, &t, 4);
        return sign | (uint16_t)(u - 0x3f000000u);
    }
    const uint32_t r = a - 0x38000000u + 0xfffu + ((a >> 13) & 1u); /* rebias 127 -> 15, round to 10 bits */
    return sign | (uint16_t)(r >> 13);
}

/* IEEE fp16 bits -> float (exact). */
static inline float half_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 0x3ffu;
    uint32_t u;
    if (e == 0) {
        const float f = (float)m * 5.9604645e-08f; /* m * 2^-24 */
        memcpy(&u, &f, 4);
    } else {
        u = e == 31 ? (m ? 0x7fc00000u : 0x7f800000u) | (m << 13) : ((e + 112u) << 23) | (m << 13); /* NaN quiet */
    }
    u |= sign;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* W [rows, in] bf16 -> int8 q and fp16 scales: per group, d = fp16(max|w| / 127), q = round(w / d) clamped to
 * -127..127, 0 where d = 0. */
void lfm2_quantize_int8(const uint16_t *w, int64_t rows, int64_t in, int8_t *q, uint16_t *scales, int threads) {
    const int64_t groups = in / GQ_G;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *src = w + r * in + g * GQ_G;
            uint16_t top = 0; /* max |w| on the bits: without the sign, bf16 bits order as the values do */
            for (int i = 0; i < GQ_G; i++) {
                const uint16_t a = src[i] & 0x7fffu;
                top = a > top ? a : top;
            }
            const uint16_t h = half_bits(f32(top) / 127.0f);
            scales[r * groups + g] = h;
            const float d = half_f32(h);
            int8_t *dst = q + r * in + g * GQ_G;
            for (int i = 0; i < GQ_G; i++) {
                const float v = d != 0.0f ? nearbyintf(f32(src[i]) / d) : 0.0f;
                dst[i] = (int8_t)(v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v);
            }
        }
}

/* One int4 group, in scalar C (the levels without a vector version use it): m = the value of largest magnitude
 * (the positive one on a tie), d = bf16(m / -8), q = round(w / d) (a true division, half to even) clamped to
 * -8..7, stored as q + 8, two to a byte (the first input low); 0 where d = 0. Returns d. */
static inline bf16_t quantize_int4_scalar(const uint16_t *src, uint8_t *o) {
    float mx = -INFINITY, mn = INFINITY;
    for (int i = 0; i < GQ_G; i++) {
        const float f = f32(src[i]);
        mx = mx > f ? mx : f, mn = mn < f ? mn : f; /* as maxps / minps */
    }
    const bf16_t d = bf((mx >= -mn ? mx : mn) / -8.0f);
    if (f32(d) == 0.0f) {
        memset(o, 0x88, GQ_G / 2);
        return d;
    }
    for (int i = 0; i < GQ_G; i += 2) {
        uint8_t b[2];
        for (int j = 0; j < 2; j++) {
            const float v = nearbyintf(f32(src[i + j]) / f32(d));
            b[j] = (uint8_t)((v < -8.0f ? -8.0f : v > 7.0f ? 7.0f : v) + 8.0f);
        }
        o[i / 2] = (uint8_t)(b[0] | (b[1] << 4));
    }
    return d;
}

/* W [rows, in] bf16 -> nibbles [rows, in / 2] and bf16 scales [rows, in / 32], group by group (the level's
 * quantize_int4_group: the rule of quantize_int4_scalar). */
void lfm2_quantize_int4(const uint16_t *w, int64_t rows, int64_t in, uint8_t *nib, uint16_t *scales, int threads) {
    const int64_t groups = in / GQ_G;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < groups; g++)
            scales[r * groups + g] = quantize_int4_group(w + r * in + g * GQ_G, nib + r * (in / 2) + g * (GQ_G / 2));
}
