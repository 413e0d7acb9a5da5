/* Day 1's training augmentation in one pass per image (extras/vit_augment.py compiles this file with the machine's
 * C compiler and loads it with ctypes).
 *
 * It computes exactly what transformer.normalize(transformer.augment_images(...)) computes for 'light' and
 * 'strong', read straight from the uint8 cache: for each output pixel, the affine map theta (the crop, flip and
 * rotation) gives a point of the source image (F.affine_grid, align_corners=False); the point is reflected back
 * into the image (F.grid_sample's padding_mode="reflection") and read bilinearly from the four pixels around it.
 * Then, with the warped image still in the cache, the colour jitter (one 3x3 matrix and offset, from the image's
 * mean grey, summed as the pixels are made; as transformer.jitter_colors), the clamp to [0, 255] and the
 * per-channel standardisation.
 *
 * PyTorch's version makes seven passes over the batch in memory (the float copy of the cache rows, the grid, the
 * sampling, the mean, the colour matrix, the clamp, the standardisation); this makes one, so on a machine whose
 * training step is fast it gives that time back to training. Sums run in a different order than PyTorch's:
 * results agree to float32 rounding, not bit for bit.
 */
#include <math.h>
#include <stdint.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Floating-point exceptions are never looked at here: without this, GCC may not turn the comparisons of
 * clampf into vector min and max (a comparison could raise one), and the loops over points stay scalar. */
#pragma GCC optimize("no-trapping-math")

#define CHUNK 64  /* output pixels whose source points are found together */

/* min and max as comparisons, which compile to vector instructions (fminf and fmaxf are calls, for NaN's sake) */
static inline float clampf(float x, float lo, float hi) { return x < lo ? lo : x > hi ? hi : x; }

/* F.grid_sample's reflection for align_corners=False: reflect about the edges -0.5 and size - 0.5 until the point
 * is inside, then clip to [0, size - 1]. Reflections repeat every 2 size: fold the distance from -0.5 into one
 * period, then reflect about size - 0.5 once. No branch, so the compiler vectorizes it. */
static inline float reflect(float x, long size) {
    const float span = (float)size;
    float a = fabsf(x + 0.5f);
    a -= 2 * span * floorf(a / (2 * span));
    a = span - fabsf(span - a) - 0.5f;
    return clampf(a, 0.0f, span - 1.0f);
}

/* images: the cache (N, S, S, 3) uint8, channels last (each pixel's three values side by side), with one byte
 * readable after its last pixel (the vector loads read four bytes a pixel); rows: the B cache
 * rows of the batch; theta (B, 2, 3); jitter (B, 3) the brightness, contrast and saturation factors, or NULL for
 * none; luma (3); scale, shift (3): standardised = pixel * scale + shift; out (B, 3, size, size) float32. */
void augment(const uint8_t *images, const int64_t *rows, long B, long S, const float *theta, const float *jitter,
             const float *luma, const float *scale, const float *shift, long size, float *out, int threads) {
    const long plane = size * size;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < B; i++) {
        const uint8_t *src = images + rows[i] * 3 * S * S;
        const float *t = theta + 6 * i;
        float *dst = out + i * 3 * plane;
        /* The rotation reads the source all over: ask for the thread's next image a share of it per output row,
         * so it is in the cache when its turn comes (a batch of 64 random rows: 2.8 ms -> 2.2 ms on a 2-core Xeon). */
        const uint8_t *next = i + 1 < B ? images + rows[i + 1] * 3 * S * S : src;
        const long lines = (3 * S * S + 63) / 64, per_row = (lines + size - 1) / size;  /* 64-byte cache lines */
        float grey = 0.0f;  /* sum of luma . rgb over the image, added up as its pixels are made */
        for (long y = 0; y < size; y++) {
            for (long l = y * per_row; l < (y + 1) * per_row && l < lines; l++) __builtin_prefetch(next + 64 * l);
            const float ys = (2.0f * y + 1.0f) / size - 1.0f;
            for (long x0 = 0; x0 < size; x0 += CHUNK) {  /* CHUNK points at a time: fixed arrays vectorize */
                const long n = size - x0 < CHUNK ? size - x0 : CHUNK;
                float ix[CHUNK], iy[CHUNK];
#pragma omp simd
                for (long k = 0; k < CHUNK; k++) {  /* the grid point in [-1, 1], then in source pixels */
                    const float xs = (2.0f * (x0 + k) + 1.0f) / size - 1.0f;
                    const float gx = t[0] * xs + t[1] * ys + t[2], gy = t[3] * xs + t[4] * ys + t[5];
                    ix[k] = reflect(((gx + 1.0f) * S - 1.0f) * 0.5f, S);
                    iy[k] = reflect(((gy + 1.0f) * S - 1.0f) * 0.5f, S);
                }
                float *o = dst + y * size + x0;
                long k = 0;
#if defined(__AVX512F__)
                /* 16 points at a time: each corner's three values are one 4-byte gather (the fourth byte, the next
                 * pixel's, is dropped), so a point costs 4 loads instead of 12 */
                const __m512i last = _mm512_set1_epi32((int)S - 1), byte = _mm512_set1_epi32(255);
                __m512 grey16 = _mm512_setzero_ps();
                for (; k + 16 <= n; k += 16) {
                    const __m512 fx = _mm512_loadu_ps(ix + k), fy = _mm512_loadu_ps(iy + k);
                    const __m512i sx = _mm512_cvttps_epi32(fx), sy = _mm512_cvttps_epi32(fy);
                    const __m512 wx = fx - _mm512_cvtepi32_ps(sx), wy = fy - _mm512_cvtepi32_ps(sy);
                    const __m512i dx = _mm512_maskz_mov_epi32(_mm512_cmpgt_epi32_mask(last, sx), _mm512_set1_epi32(3));
                    const __m512i dy = _mm512_maskz_mov_epi32(_mm512_cmpgt_epi32_mask(last, sy),
                                                              _mm512_set1_epi32(3 * (int)S));
                    const __m512i at = _mm512_mullo_epi32(_mm512_set1_epi32(3),
                                                          _mm512_add_epi32(_mm512_mullo_epi32(sy, _mm512_set1_epi32((int)S)), sx));
                    const __m512i g00 = _mm512_i32gather_epi32(at, (const int *)src, 1);
                    const __m512i g01 = _mm512_i32gather_epi32(_mm512_add_epi32(at, dx), (const int *)src, 1);
                    const __m512i g10 = _mm512_i32gather_epi32(_mm512_add_epi32(at, dy), (const int *)src, 1);
                    const __m512i g11 = _mm512_i32gather_epi32(_mm512_add_epi32(at, _mm512_add_epi32(dx, dy)),
                                                               (const int *)src, 1);
                    const __m512 one = _mm512_set1_ps(1.0f);
                    const __m512 w00 = (one - wx) * (one - wy), w01 = wx * (one - wy), w10 = (one - wx) * wy,
                                 w11 = wx * wy;
                    for (int c = 0; c < 3; c++) {
#define CHANNEL(g) _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(g, 8 * c), byte))
                        const __m512 v = w00 * CHANNEL(g00) + w01 * CHANNEL(g01) + w10 * CHANNEL(g10) +
                                          w11 * CHANNEL(g11);
#undef CHANNEL
                        _mm512_storeu_ps(o + c * plane + k, v);
                        grey16 += _mm512_set1_ps(luma[c]) * v;
                    }
                }
                grey += _mm512_reduce_add_ps(grey16);
#elif defined(__AVX2__)
                /* the same, 8 points at a time */
                const __m256i last = _mm256_set1_epi32((int)S - 1), byte = _mm256_set1_epi32(255);
                __m256 grey8 = _mm256_setzero_ps();
                for (; k + 8 <= n; k += 8) {
                    const __m256 fx = _mm256_loadu_ps(ix + k), fy = _mm256_loadu_ps(iy + k);
                    const __m256i sx = _mm256_cvttps_epi32(fx), sy = _mm256_cvttps_epi32(fy);
                    const __m256 wx = fx - _mm256_cvtepi32_ps(sx), wy = fy - _mm256_cvtepi32_ps(sy);
                    const __m256i dx = _mm256_and_si256(_mm256_cmpgt_epi32(last, sx), _mm256_set1_epi32(3));
                    const __m256i dy = _mm256_and_si256(_mm256_cmpgt_epi32(last, sy), _mm256_set1_epi32(3 * (int)S));
                    const __m256i at = _mm256_mullo_epi32(_mm256_set1_epi32(3),
                                                          _mm256_add_epi32(_mm256_mullo_epi32(sy, _mm256_set1_epi32((int)S)), sx));
                    const __m256i g00 = _mm256_i32gather_epi32((const int *)src, at, 1);
                    const __m256i g01 = _mm256_i32gather_epi32((const int *)src, _mm256_add_epi32(at, dx), 1);
                    const __m256i g10 = _mm256_i32gather_epi32((const int *)src, _mm256_add_epi32(at, dy), 1);
                    const __m256i g11 = _mm256_i32gather_epi32((const int *)src,
                                                               _mm256_add_epi32(at, _mm256_add_epi32(dx, dy)), 1);
                    const __m256 one = _mm256_set1_ps(1.0f);
                    const __m256 w00 = (one - wx) * (one - wy), w01 = wx * (one - wy), w10 = (one - wx) * wy,
                                 w11 = wx * wy;
                    for (int c = 0; c < 3; c++) {
#define CHANNEL(g) _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(g, 8 * c), byte))
                        const __m256 v = w00 * CHANNEL(g00) + w01 * CHANNEL(g01) + w10 * CHANNEL(g10) +
                                          w11 * CHANNEL(g11);
#undef CHANNEL
                        _mm256_storeu_ps(o + c * plane + k, v);
                        grey8 += _mm256_set1_ps(luma[c]) * v;
                    }
                }
                float lanes[8];  /* AVX2 has no one-instruction sum of a vector's lanes */
                _mm256_storeu_ps(lanes, grey8);
                for (int l = 0; l < 8; l++) grey += lanes[l];
#endif
                for (; k < n; k++) {  /* bilinear: the four pixels around the point */
                    const long sx = (long)ix[k], sy = (long)iy[k];  /* floor: both are >= 0 */
                    const long dx = sx + 1 < S ? 3 : 0, dy = sy + 1 < S ? 3 * S : 0;  /* weight 0 past the edge */
                    const float wx = ix[k] - sx, wy = iy[k] - sy;
                    const float w00 = (1 - wx) * (1 - wy), w01 = wx * (1 - wy), w10 = (1 - wx) * wy, w11 = wx * wy;
                    const uint8_t *p = src + 3 * (sy * S + sx);
                    for (int c = 0; c < 3; c++) {
                        o[c * plane + k] = w00 * p[c] + w01 * p[dx + c] + w10 * p[dy + c] + w11 * p[dy + dx + c];
                        grey += luma[c] * o[c * plane + k];
                    }
                }
            }
        }
        /* the colour matrix A = b c (s I + (1 - s) 1 luma^T) and offset b (1 - c) m, m the mean grey */
        float A[3][3] = {{1, 0, 0}, {0, 1, 0}, {0, 0, 1}}, offset = 0.0f;
        if (jitter) {
            const float b = jitter[3 * i], c = jitter[3 * i + 1], s = jitter[3 * i + 2];
            for (int r = 0; r < 3; r++)
                for (int k = 0; k < 3; k++) A[r][k] = b * c * ((r == k ? s : 0.0f) + (1 - s) * luma[k]);
            offset = b * (1 - c) * grey / plane;
        }
#pragma omp simd
        for (long p = 0; p < plane; p++) {
            const float v0 = dst[p], v1 = dst[plane + p], v2 = dst[2 * plane + p];
            const float o0 = clampf(A[0][0] * v0 + A[0][1] * v1 + A[0][2] * v2 + offset, 0.0f, 255.0f);
            const float o1 = clampf(A[1][0] * v0 + A[1][1] * v1 + A[1][2] * v2 + offset, 0.0f, 255.0f);
            const float o2 = clampf(A[2][0] * v0 + A[2][1] * v1 + A[2][2] * v2 + offset, 0.0f, 255.0f);
            dst[p] = o0 * scale[0] + shift[0];
            dst[plane + p] = o1 * scale[1] + shift[1];
            dst[2 * plane + p] = o2 * scale[2] + shift[2];
        }
    }
}
