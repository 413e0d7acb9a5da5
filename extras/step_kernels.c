/* The matrix-vector products of a decoding step, written for memory speed (extras/step_kernels.py compiles this file
 * with the machine's C compiler, -O3 -march=native -fopenmp, and loads it with ctypes).
 *
 * A decoding step multiplies a few rows x (m, k) by every weight matrix W (n, k): it reads each weight once and
 * does two flops with it, so the time is the time to read W. Three things make that so here:
 *   - bfloat16 weights are widened to float32 in registers (a bfloat16 is the top half of a float32: shift
 *     left by 16), 16 at a time; PyTorch on a CPU without bf16 instructions converts them far slower.
 *   - BLOCK rows of W are read side by side, each with its own accumulator, and the block after is prefetched,
 *     so the memory system always has several streams in flight.
 *   - what surrounds a product in the step is done in the same pass over x or y:
 *       eps >= 0     x is RMS-normalized first: W (x / rms(x)) = (W x) / rms(x), one scale per row of x
 *       accumulate   y += W x (the residual add)
 *       gated        W holds 2n rows, gate then up (w1|w3): y = silu(W_gate x) * (W_up x)
 * Vectors are GCC/Clang vector extensions, so the compiler emits AVX-512, AVX2 or NEON code for the machine.
 * Sums run in float32 in a different order than PyTorch's: results agree to float32 rounding, not bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16
#define BLOCK 8

typedef float vfloat __attribute__((vector_size(4 * LANES)));
typedef uint16_t vhalf __attribute__((vector_size(2 * LANES)));
typedef uint32_t vword __attribute__((vector_size(4 * LANES)));

static inline vfloat load_f32(const float *p) { vfloat v; memcpy(&v, p, sizeof v); return v; }

static inline vfloat load_bf16(const uint16_t *p) {
    vhalf h; memcpy(&h, p, sizeof h);
    vword u = __builtin_convertvector(h, vword) << 16;
    vfloat f; memcpy(&f, &u, sizeof f); return f;
}

static inline float scalar_f32(float w) { return w; }

static inline float scalar_bf16(uint16_t w) { uint32_t u = (uint32_t)w << 16; float f; memcpy(&f, &u, 4); return f; }

static inline float lane_sum(vfloat v) { float s = 0.0f; for (int i = 0; i < LANES; i++) s += v[i]; return s; }

static inline float silu(float a) { return a / (1.0f + expf(-a)); }

/* out[r] = W[r] . x for the `rows` (<= BLOCK) consecutive rows of W starting at w, each of length k. */
#define DOT_BLOCK(T)                                                                                       \
    static void dot_block_##T(const T##_t *w, long rows, long k, const float *x, float *out) {             \
        vfloat acc[BLOCK] = {0};                                                                           \
        long kv = k - k % LANES;                                                                           \
        for (long t = 0; t < kv; t += LANES) {                                                             \
            vfloat xv = load_f32(x + t);                                                                   \
            if (rows == BLOCK) {                                                                           \
                for (int r = 0; r < BLOCK; r++) {                                                          \
                    __builtin_prefetch(w + (r + BLOCK) * k + t); /* the next block's rows */               \
                    acc[r] += load_##T(w + r * k + t) * xv;                                                \
                }                                                                                          \
            } else {                                                                                       \
                for (int r = 0; r < rows; r++) acc[r] += load_##T(w + r * k + t) * xv;                     \
            }                                                                                              \
        }                                                                                                  \
        for (int r = 0; r < rows; r++) {                                                                   \
            float s = lane_sum(acc[r]);                                                                    \
            for (long t = kv; t < k; t++) s += scalar_##T(w[r * k + t]) * x[t];                           \
            out[r] = s;                                                                                    \
        }                                                                                                  \
    }

/* y (m, n) = [silu gate *] scale_i * W x_i [+ y], as the header says (eps < 0: no normalization). W is (n, k),
 * or (2n, k) when gated. */
#define MATVEC(T)                                                                                          \
    void matvec_##T(const float *x, const T##_t *w, float *y, long m, long n, long k, float eps,           \
                    int accumulate, int gated, int threads) {                                              \
        float scale[m];                                                                                    \
        for (long i = 0; i < m; i++) {                                                                     \
            float ss = 0.0f;                                                                               \
            if (eps >= 0.0f) for (long t = 0; t < k; t++) ss += x[i * k + t] * x[i * k + t];                \
            scale[i] = eps >= 0.0f ? 1.0f / sqrtf(ss / (float)k + eps) : 1.0f;                              \
        }                                                                                                  \
        long blocks = (n + BLOCK - 1) / BLOCK;                                                             \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                  \
        for (long b = 0; b < blocks; b++) {                                                                \
            long j0 = b * BLOCK, rows = n - j0 < BLOCK ? n - j0 : BLOCK;                                   \
            for (long i = 0; i < m; i++) {                                                                 \
                float a[BLOCK], u[BLOCK];                                                                  \
                dot_block_##T(w + j0 * k, rows, k, x + i * k, a);                                          \
                if (gated) dot_block_##T(w + (n + j0) * k, rows, k, x + i * k, u);                         \
                float *yi = y + i * n + j0;                                                                \
                for (long r = 0; r < rows; r++) {                                                          \
                    float v = gated ? silu(scale[i] * a[r]) * scale[i] * u[r] : scale[i] * a[r];           \
                    yi[r] = accumulate ? yi[r] + v : v;                                                    \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }

typedef float f32_t;
typedef uint16_t bf16_t;
DOT_BLOCK(f32)
DOT_BLOCK(bf16)
MATVEC(f32)
MATVEC(bf16)

/* The attention of one new token per row at position pos, for the m rows of qkv (m, (n_heads + 2 n_kv) hd),
 * q|k|v as the fused product wrote them:
 *   rotary     q and k rotated in place: channel pairs (2j, 2j+1) times cos_sin[j] = (cos, sin) of pos
 *   cache      k and v stored at [row, kv head, pos] of the caches (m, n_kv, max_seq, hd), float32 or bfloat16
 *   attention  query head h reads kv head h / (n_heads / n_kv): softmax(q k_t / sqrt(hd)) over t <= pos,
 *              without the positions where pad[row, t] (left padding; pad may be NULL), times v_t
 * out (m, n_heads hd) float32. */
static inline uint16_t to_bf16(float f) {  /* round to nearest even, as PyTorch's .to(torch.bfloat16) */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline void store_f32(float *p, float v) { *p = v; }
static inline void store_bf16(uint16_t *p, float v) { *p = to_bf16(v); }

#define ATTEND(T)                                                                                          \
    void attend_##T(float *qkv, const float *cos_sin, T##_t *k_cache, T##_t *v_cache, const uint8_t *pad,  \
                    float *out, long m, long n_heads, long n_kv, long hd, long max_seq, long pos,         \
                    int threads) {                                                                         \
        long width = (n_heads + 2 * n_kv) * hd, group = n_heads / n_kv;                                    \
        for (long i = 0; i < m; i++) {                                                                     \
            float *row = qkv + i * width;                                                                  \
            for (long c = 0; c < (n_heads + n_kv) * hd; c += 2) {                                          \
                float co = cos_sin[c % hd], si = cos_sin[c % hd + 1], a = row[c], b = row[c + 1];          \
                row[c] = a * co - b * si;                                                                  \
                row[c + 1] = a * si + b * co;                                                              \
            }                                                                                              \
            for (long g = 0; g < n_kv; g++)                                                                \
                for (long d = 0; d < hd; d++) {                                                            \
                    long at = ((i * n_kv + g) * max_seq + pos) * hd + d;                                   \
                    store_##T(k_cache + at, row[(n_heads + g) * hd + d]);                                  \
                    store_##T(v_cache + at, row[(n_heads + n_kv + g) * hd + d]);                           \
                }                                                                                          \
        }                                                                                                  \
        float scale = 1.0f / sqrtf((float)hd);                                                             \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                  \
        for (long ih = 0; ih < m * n_heads; ih++) {                                                        \
            long i = ih / n_heads, h = ih % n_heads, g = h / group;                                        \
            const float *q = qkv + i * width + h * hd;                                                     \
            const T##_t *k = k_cache + (i * n_kv + g) * max_seq * hd, *v = v_cache + (i * n_kv + g) * max_seq * hd; \
            float score[pos + 1], top = -INFINITY, total = 0.0f;                                           \
            for (long t = 0; t <= pos; t++) {                                                              \
                if (pad && pad[i * max_seq + t]) { score[t] = -INFINITY; continue; }                       \
                float s = 0.0f;                                                                            \
                for (long d = 0; d < hd; d++) s += q[d] * scalar_##T(k[t * hd + d]);                      \
                score[t] = s * scale;                                                                      \
                top = score[t] > top ? score[t] : top;                                                     \
            }                                                                                              \
            float *o = out + i * n_heads * hd + h * hd;                                                    \
            for (long d = 0; d < hd; d++) o[d] = 0.0f;                                                     \
            for (long t = 0; t <= pos; t++) {                                                              \
                if (score[t] == -INFINITY) continue;                                                       \
                float p = expf(score[t] - top);                                                            \
                total += p;                                                                                \
                for (long d = 0; d < hd; d++) o[d] += p * scalar_##T(v[t * hd + d]);                      \
            }                                                                                              \
            for (long d = 0; d < hd; d++) o[d] /= total;                                                   \
        }                                                                                                  \
    }

ATTEND(f32)
ATTEND(bf16)
