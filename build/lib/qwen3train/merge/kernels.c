/* Fused merge kernels: the Gram pass and the combination pass of gram.py in one sweep each.
 *
 * Built on first use by native.py (cc -O3 -march=native -fopenmp-simd) and called through ctypes,
 * which releases the GIL: native.py runs pieces of one call in several Python threads, and the
 * output writer's thread runs alongside. Inputs are flat contiguous arrays of one dtype (0 = float32,
 * 1 = bfloat16, 2 = float16). Work is cut into blocks of BLOCK elements whose fp32 copies stay in the
 * L1/L2 cache; the arithmetic per element is a few fused multiply-adds with LANES independent partial
 * sums, so both passes run at the speed of reading the inputs from memory.
 *
 * Gram (see gram.py for why the frame of the first input): per block, in fp32,
 *   n = <x_0, x_0>, c_i = <x_0, d_i>, D_ij = <d_i, d_j>,  d_i = x_i - x_0,
 * each block's sums added in float64 to the partial of its super-block (SUPER blocks).
 * Combine: out = sum_i c_i x_i in fp32 (c_i rounded to fp32, fused multiply-adds in input order),
 * rounded to the output dtype (round to nearest even; NaN -> canonical NaN, as torch does).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 4096
#define SUPER 64
#define MAXN 16

typedef union { float f; uint32_t u; } bits32;

static inline float bf16_f32(uint16_t h) {
    bits32 b;
    b.u = (uint32_t)h << 16;
    return b.f;
}

static inline uint16_t f32_bf16(float f) {
    bits32 b;
    b.f = f;
    uint32_t u = b.u;
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return ((u & 0x7fffffffu) > 0x7f800000u) ? (uint16_t)0x7fc0u : (uint16_t)r;
}

/* dst[j] = float(src[off + j]) - (sub ? sub[j] : 0), for j < m, in one vectorised loop per dtype */
static inline void load_block(const void *src, int dt, int64_t off, int m, const float *sub, float *dst) {
#define LOAD_LOOP(EXPR)                                                   \
    if (sub) {                                                            \
        _Pragma("omp simd") for (int j = 0; j < m; j++) dst[j] = (EXPR)-sub[j]; \
    } else {                                                              \
        _Pragma("omp simd") for (int j = 0; j < m; j++) dst[j] = (EXPR);  \
    }
    if (dt == 0) {
        const float *p = (const float *)src + off;
        LOAD_LOOP(p[j])
    } else if (dt == 1) {
        const uint16_t *p = (const uint16_t *)src + off;
        LOAD_LOOP(bf16_f32(p[j]))
    } else {
        const _Float16 *p = (const _Float16 *)src + off;
        LOAD_LOOP((float)p[j])
    }
#undef LOAD_LOOP
}

/* acc[j] = fma(c, float(src[off + j]), acc[j]) */
static inline void fma_block(const void *src, int dt, int64_t off, int m, float c, float *acc) {
    if (dt == 0) {
        const float *p = (const float *)src + off;
#pragma omp simd
        for (int j = 0; j < m; j++) acc[j] = __builtin_fmaf(c, p[j], acc[j]);
    } else if (dt == 1) {
        const uint16_t *p = (const uint16_t *)src + off;
#pragma omp simd
        for (int j = 0; j < m; j++) acc[j] = __builtin_fmaf(c, bf16_f32(p[j]), acc[j]);
    } else {
        const _Float16 *p = (const _Float16 *)src + off;
#pragma omp simd
        for (int j = 0; j < m; j++) acc[j] = __builtin_fmaf(c, (float)p[j], acc[j]);
    }
}

#define LANES 64 /* independent partial sums per dot product: no add waits on the one before */

static inline double dot(const float *a, const float *b, int m) {
    float part[LANES] = {0};
    int j = 0;
    for (; j + LANES <= m; j += LANES) {
#pragma omp simd
        for (int k = 0; k < LANES; k++) part[k] = __builtin_fmaf(a[j + k], b[j + k], part[k]);
    }
    double s = 0.0;
    for (; j < m; j++) s += (double)a[j] * b[j];
    for (int k = 0; k < LANES; k++) s += part[k];
    return s;
}

/* Specialised kernels for 1 to SMALLN inputs of one dtype: the inputs are read once per pass and
 * everything else stays in registers (W lanes of partial sums per pair, N known at compile time). */
#define SMALLN 4
#define W 32
#define F32_IN(v) (v)
#define BF16_IN(v) bf16_f32(v)
#define F16_IN(v) ((float)(v))
#define F32_OUT(a) (a)
#define BF16_OUT(a) f32_bf16(a)
#define F16_OUT(a) ((_Float16)(a))

#define DEF_GRAM(N, NAME, T, IN)                                                                   \
    static void NAME(const void *const *xs, int64_t s, int m, double *p) {                         \
        enum { Q = N * (N + 1) / 2 };                                                              \
        const T *x[N];                                                                             \
        for (int i = 0; i < N; i++) x[i] = (const T *)xs[i] + s;                                   \
        float acc[Q][W];                                                                           \
        memset(acc, 0, sizeof acc);                                                                \
        double tail[Q] = {0};                                                                      \
        int j = 0;                                                                                 \
        for (; j + W <= m; j += W) {                                                               \
            float v[N][W];                                                                         \
            _Pragma("omp simd") for (int k = 0; k < W; k++) v[0][k] = IN(x[0][j + k]);             \
            _Pragma("GCC unroll 4") for (int i = 1; i < N; i++)                                    \
                _Pragma("omp simd") for (int k = 0; k < W; k++) v[i][k] = IN(x[i][j + k]) - v[0][k]; \
            int q = 0;                                                                             \
            _Pragma("GCC unroll 4") for (int i = 0; i < N; i++)                                    \
                _Pragma("GCC unroll 4") for (int l = i; l < N; l++, q++)                           \
                    _Pragma("omp simd") for (int k = 0; k < W; k++)                                \
                        acc[q][k] = __builtin_fmaf(v[i][k], v[l][k], acc[q][k]);                   \
        }                                                                                          \
        for (; j < m; j++) {                                                                       \
            double v[N];                                                                           \
            v[0] = IN(x[0][j]);                                                                    \
            for (int i = 1; i < N; i++) v[i] = (double)(float)(IN(x[i][j]) - (float)v[0]);         \
            int q = 0;                                                                             \
            for (int i = 0; i < N; i++)                                                            \
                for (int l = i; l < N; l++, q++) tail[q] += v[i] * v[l];                           \
        }                                                                                          \
        int q = 0;                                                                                 \
        for (int i = 0; i < N; i++)                                                                \
            for (int l = i; l < N; l++, q++) {                                                     \
                double t = tail[q];                                                                \
                for (int k = 0; k < W; k++) t += acc[q][k];                                        \
                p[i * N + l] += t;                                                                 \
            }                                                                                      \
    }

#define DEF_COMBINE(N, NAME, T, IN, OUT)                                                           \
    static void NAME(const void *const *xs, const float *c, int64_t s, int64_t m, void *out) {     \
        const T *x[N];                                                                             \
        for (int i = 0; i < N; i++) x[i] = (const T *)xs[i] + s;                                   \
        T *o = (T *)out;                                                                           \
        _Pragma("omp simd") for (int64_t j = 0; j < m; j++) {                                      \
            float a = c[0] * IN(x[0][j]);                                                          \
            _Pragma("GCC unroll 4") for (int i = 1; i < N; i++) a = __builtin_fmaf(c[i], IN(x[i][j]), a); \
            o[j] = OUT(a);                                                                         \
        }                                                                                          \
    }

#define DEF_N(N)                                                                                   \
    DEF_GRAM(N, gram_f32_##N, float, F32_IN)                                                       \
    DEF_GRAM(N, gram_bf16_##N, uint16_t, BF16_IN)                                                  \
    DEF_GRAM(N, gram_f16_##N, _Float16, F16_IN)                                                    \
    DEF_COMBINE(N, combine_f32_##N, float, F32_IN, F32_OUT)                                        \
    DEF_COMBINE(N, combine_bf16_##N, uint16_t, BF16_IN, BF16_OUT)                                  \
    DEF_COMBINE(N, combine_f16_##N, _Float16, F16_IN, F16_OUT)
DEF_N(1)
DEF_N(2)
DEF_N(3)
DEF_N(4)

typedef void (*gram_fn)(const void *const *, int64_t, int, double *);
typedef void (*combine_fn)(const void *const *, const float *, int64_t, int64_t, void *);
#define ROW(KIND, N) {KIND##_f32_##N, KIND##_bf16_##N, KIND##_f16_##N}
static const gram_fn GRAM_SMALL[SMALLN + 1][3] = {{0, 0, 0}, ROW(gram, 1), ROW(gram, 2), ROW(gram, 3), ROW(gram, 4)};
static const combine_fn COMBINE_SMALL[SMALLN + 1][3] = {
    {0, 0, 0}, ROW(combine, 1), ROW(combine, 2), ROW(combine, 3), ROW(combine, 4)};

int q3t_max_inputs(void) { return MAXN; }
int q3t_block(void) { return BLOCK * SUPER; }

/* Gram partials of super-blocks [sb0, sb1) (SUPER * BLOCK elements each; the last may be shorter):
 * part[(sb - sb0) * n * n + i * n + k] for k >= i, float64 sums of per-block fp32 dot products in the
 * frame of x_0: [0][0] = <x_0, x_0>, [0][k] = <x_0, d_k>, [i][k] = <d_i, d_k>, d_i = x_i - x_0.
 * The caller adds all super-blocks' partials exactly rounded (math.fsum): the result does not depend
 * on how the super-blocks were shared between threads. */
int q3t_gram_part(const void *const *xs, int n, int dt, int64_t size, int64_t sb0, int64_t sb1, double *part) {
    if (n < 1 || n > MAXN) return -1;
    int nn = n * n;
    float *buf = NULL; /* fp32 copies of one block of every input, for the general kernel */
    if (n > SMALLN && !(buf = (float *)aligned_alloc(64, (size_t)n * BLOCK * sizeof(float)))) return -2;
    for (int64_t sb = sb0; sb < sb1; sb++) {
        double *p = part + (sb - sb0) * nn;
        memset(p, 0, (size_t)nn * sizeof(double));
        int64_t end = (sb + 1) * SUPER * (int64_t)BLOCK;
        if (end > size) end = size;
        for (int64_t s = sb * SUPER * (int64_t)BLOCK; s < end; s += BLOCK) {
            int m = (int)((end - s) < BLOCK ? (end - s) : BLOCK);
            if (!buf) {
                GRAM_SMALL[n][dt](xs, s, m, p);
                continue;
            }
            load_block(xs[0], dt, s, m, NULL, buf);
            for (int i = 1; i < n; i++) /* d_i = x_i - x_0: exact for bf16 and fp16 inputs */
                load_block(xs[i], dt, s, m, buf, buf + (int64_t)i * BLOCK);
            for (int i = 0; i < n; i++)
                for (int k = i; k < n; k++)
                    p[i * n + k] += dot(buf + (int64_t)i * BLOCK, buf + (int64_t)k * BLOCK, m);
        }
    }
    free(buf);
    return 0;
}

/* out[0:numel] = sum_i c_i xs[i][start:start + numel], in dtype dt_out. */
int q3t_combine(const void *const *xs, const double *c, int n, int dt, int64_t start, int64_t numel,
                void *out, int dt_out) {
    if (n < 1 || n > MAXN) return -1;
    float cf[MAXN];
    for (int i = 0; i < n; i++) cf[i] = (float)c[i];
    if (n <= SMALLN && dt_out == dt) {
        COMBINE_SMALL[n][dt](xs, cf, start, numel, out);
        return 0;
    }
    float *acc = (float *)aligned_alloc(64, (size_t)BLOCK * sizeof(float));
    if (!acc) return -2;
    for (int64_t s = 0; s < numel; s += BLOCK) {
        int m = (int)((numel - s) < BLOCK ? (numel - s) : BLOCK);
        load_block(xs[0], dt, start + s, m, NULL, acc);
        float c0 = cf[0];
#pragma omp simd
        for (int j = 0; j < m; j++) acc[j] *= c0;
        for (int i = 1; i < n; i++) fma_block(xs[i], dt, start + s, m, cf[i], acc);
        if (dt_out == 0) {
            memcpy((float *)out + s, acc, (size_t)m * sizeof(float));
        } else if (dt_out == 1) {
            uint16_t *o = (uint16_t *)out + s;
#pragma omp simd
            for (int j = 0; j < m; j++) o[j] = f32_bf16(acc[j]);
        } else {
            _Float16 *o = (_Float16 *)out + s;
#pragma omp simd
            for (int j = 0; j < m; j++) o[j] = (_Float16)acc[j];
        }
    }
    free(acc);
    return 0;
}
