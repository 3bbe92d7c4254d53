/* int8 quantisation at load time, one row per task: the same bytes as lfm2cli.quantize.quantize_int8 (the torch
 * code is the definition: float32 arithmetic, a true division, round half to even), at memory speed instead of
 * ~20 M weights/s. Portable C: the compiler vectorises it at every level. */
#include <math.h>

void lfm2_quantize_int8(const uint16_t *w, int64_t rows, int64_t in, int8_t *q, float *scales, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *src = w + r * in;
        uint16_t top = 0; /* max |w| on the bits: without the sign, bf16 bits order as the values do */
        for (int64_t i = 0; i < in; i++) {
            const uint16_t a = src[i] & 0x7fffu;
            top = a > top ? a : top;
        }
        const float s = f32(bf(fmaxf(f32(top), 1e-12f) / 127.0f)); /* the scale as stored (bf16), as torch */
        scales[r] = s;
        int8_t *dst = q + r * in;
        for (int64_t i = 0; i < in; i++) {
            const float v = nearbyintf(f32(src[i]) / s);
            dst[i] = (int8_t)(v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v);
        }
    }
}
