/* A GPT-2 decode step for up to a few rows: embedding, every layer (layer norms, attention over the KV
 * cache, tanh-GELU MLP, residuals) and the logits, inside one OpenMP parallel region. Weights are fp32 or
 * bf16 (activations fp32), or int8 with a scale per row, multiplied by activations quantized to 8 bits
 * per row with VNNI dot products, as fbgemm and llama.cpp do (built only where the CPU has VNNI).
 *
 * Why: at small batch a step costs reading the weights once. torch's kernels for these matrix-vector
 * products (MKL's sgemv, oneDNN) read ruGPT-3 small's layer shapes at 20-26 GB/s on a 2-core machine
 * that sums memory at 32+ GB/s, and the ~170 small ops around them cost 3-4 ms a step in dispatch.
 * Here rows of a weight are read in blocks of 8, each row its own stream, against up to 3 input rows
 * at a time; the small ops cost nothing but their arithmetic. GCC vector extensions keep it portable:
 * -march=native makes them AVX-512, AVX2 or NEON (int8 needs AVX-512 VNNI). It runs in the caller's
 * OpenMP runtime (torch's), so it shares torch's threads instead of competing with them. */
#include <math.h>
#include <stddef.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define LANES 16 /* floats per vector */
#define ROWS 8   /* weight rows per tile: each its own stream, which keeps enough reads in flight */
#define COLS 3   /* input rows per tile: ROWS * COLS accumulators (measured best of 4x4, 8x2, 6x4, 8x3 ...) */
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef unsigned short u16s __attribute__((vector_size(LANES * 2)));
typedef unsigned int u32s __attribute__((vector_size(LANES * 4)));
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_VNNI 1
#define QLANES 64 /* int8 products per VNNI instruction */
#else
#define HAVE_VNNI 0
#endif

enum { F32, BF16, I8 };       /* weight element types (the order native.py names them in) */
enum { STORE, ADD, GELU };    /* what a product does with its output: y = Wx+b, y += Wx+b, y = gelu(Wx+b) */
enum {                        /* pointers per layer (the order native.py passes them in) */
    LN1_W, LN1_B, QKV_W, QKV_S, QKV_Z, QKV_B, PROJ_W, PROJ_S, PROJ_Z, PROJ_B,
    LN2_W, LN2_B, FC_W, FC_S, FC_Z, FC_B, OUT_W, OUT_S, OUT_Z, OUT_B, PER_LAYER
};

typedef struct {
    int n_layer, d, n_head, d_ff, vocab, ctx, wtype;
    float eps;
    const float *wte, *wpe, *lnf_w, *lnf_b;
    const void *lm_w;           /* the output projection [vocab, d] in wtype (int8: tiles) */
    const float *lm_s;          /* int8 only (else NULL): its row scales... */
    const int *lm_z;            /* ...and row sums */
    const void **layer;         /* PER_LAYER pointers per layer: weights [out, in] in wtype (int8: tiles, see
                                   tile_q8); scales and row sums NULL unless int8 */
    float **k_cache, **v_cache; /* per layer: [rows, n_head, ctx, d / n_head] */
    float *h, *a, *qkv, *att, *f, *scores; /* scratch per row: d, d, 3d, d, d_ff, n_head * ctx */
    unsigned char *xq;          /* scratch per row, int8 only: the quantized input of a product (d_ff)... */
    float *xs;                  /* ...and its scale (1) */
} Model;

int rugpt_has_vnni(void) { return HAVE_VNNI; }

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vec as_floats(u32s bits) {
    vec v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static inline u32s widen_16(const unsigned short *p) {
    u16s half;
    memcpy(&half, p, sizeof half);
    return __builtin_convertvector(half, u32s);
}

/* LANES weights from element i on, widened to floats */
static inline __attribute__((always_inline)) vec load_w(const void *w, size_t i, int type) {
    if (type == BF16) return as_floats(widen_16((const unsigned short *)w + i) << 16); /* the top half of a float */
    return load((const float *)w + i);
}

static inline __attribute__((always_inline)) float weight_at(const void *w, size_t i, int type) {
    if (type == F32) return ((const float *)w)[i];
    u32s bits = {((const unsigned short *)w)[i]};
    return as_floats(bits << 16)[0];
}

/* the sum of a vector's lanes as a tree of halves: 4 dependent adds instead of 16 in a row */
static inline float hsum(vec v) {
    typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
    typedef float v4 __attribute__((vector_size(4 * sizeof(float))));
    v8 lo8, hi8;
    memcpy(&lo8, &v, sizeof lo8);
    memcpy(&hi8, (const char *)&v + sizeof lo8, sizeof hi8);
    v8 s8 = lo8 + hi8;
    v4 lo4, hi4;
    memcpy(&lo4, &s8, sizeof lo4);
    memcpy(&hi4, (const char *)&s8 + sizeof lo4, sizeof hi4);
    v4 s4 = lo4 + hi4;
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* tanh-GELU, as 0.5 (1 + tanh z) = sigmoid(2z): one expf costs a fraction of a tanhf */
static inline float gelu(float x) {
    return x / (1.0f + expf(-1.5957691216057308f * (x + 0.044715f * x * x * x)));
}

/* sums in vector lanes: a plain float loop is one dependent add after another (C keeps their order) */
static float dot(const float *a, const float *b, int n) {
    vec acc = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES) acc += load(a + i) * load(b + i);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static float sum(const float *a, int n) {
    vec acc = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES) acc += load(a + i);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i];
    return s;
}

static inline void put(float *y, float value, int mode) {
    if (mode == ADD) *y += value;
    else *y = mode == GELU ? gelu(value) : value;
}

/* A weight [out, in] of `type`; int8 rows carry a scale (weight = q * s) and their sum z */
typedef struct {
    const void *w;
    const float *s;
    const int *z;
    int type;
} Weight;

/* An input [n, in]: floats, and for int8 weights the same rows quantized (x = (q - 128) * qs[row]) */
typedef struct {
    const float *x;
    const unsigned char *q;
    const float *qs;
} Input;

/* y[c][r + k] for k < R, c < C: R rows of W against C rows of x, R * C vector accumulators. Inlined with
 * constant R, C and type, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(const float *x, Weight W, const float *b, float *y, int in,
                                                       int out, int r, int R, int C, int mode, int type) {
    vec acc[ROWS][COLS];
    for (int k = 0; k < R; k++)
        for (int c = 0; c < C; c++) acc[k][c] = (vec){0};
    size_t first = (size_t)r * in;
    int main_in = in - in % LANES;
    for (int i = 0; i < main_in; i += LANES) {
        vec wv[ROWS];
        for (int k = 0; k < R; k++) wv[k] = load_w(W.w, first + (size_t)k * in + i, type);
        if (type == BF16) /* the next tile's rows, as for int8 (fp32 rows are long enough streams as they are) */
            for (int k = 0; k < R; k++) __builtin_prefetch((const unsigned short *)W.w + first + (size_t)(k + R) * in + i);
        for (int c = 0; c < C; c++) {
            vec xv = load(x + (size_t)c * in + i);
            for (int k = 0; k < R; k++) acc[k][c] += wv[k] * xv;
        }
    }
    for (int c = 0; c < C; c++)
        for (int k = 0; k < R; k++) {
            float s = hsum(acc[k][c]);
            for (int i = main_in; i < in; i++) s += weight_at(W.w, first + (size_t)k * in + i, type) * x[(size_t)c * in + i];
            put(y + (size_t)c * out + r + k, s + (b ? b[r + k] : 0.0f), mode);
        }
}

#if HAVE_VNNI
/* tile() for int8 weights and quantized inputs: 64 products per instruction into int32 lanes. The
 * inputs are stored +128 (VNNI multiplies unsigned by signed bytes), which adds 128 * z to each sum.
 * int8 weights are laid out in tiles, [out / 8][in / 64][8][64] (rows padded with zeros to a multiple
 * of 8; `in` a multiple of 64), so a tile reads one sequential stream: as 8 separate rows, 768-byte
 * streams left the hardware prefetcher behind (5.1 vs 3.3 ms for ruGPT-3 small's int8 weights). */
static inline __attribute__((always_inline)) void tile_q8(const unsigned char *xq, const float *qs, Weight W,
                                                          const float *b, float *y, int in, int out, int r, int C,
                                                          int mode) {
    __m512i acc[ROWS][COLS];
    for (int k = 0; k < ROWS; k++)
        for (int c = 0; c < C; c++) acc[k][c] = _mm512_setzero_si512();
    const signed char *tile = (const signed char *)W.w + (size_t)r * in;
    for (int i = 0; i < in; i += QLANES, tile += ROWS * QLANES) {
        for (int c = 0; c < C; c++) {
            __m512i xv = _mm512_loadu_si512(xq + (size_t)c * in + i);
            for (int k = 0; k < ROWS; k++)
                acc[k][c] = _mm512_dpbusd_epi32(acc[k][c], xv, _mm512_load_si512(tile + k * QLANES));
        }
    }
    for (int c = 0; c < C; c++)
        for (int k = 0; k < ROWS && r + k < out; k++) {
            int total = _mm512_reduce_add_epi32(acc[k][c]) - 128 * W.z[r + k];
            put(y + (size_t)c * out + r + k, (float)total * qs[c] * W.s[r + k] + (b ? b[r + k] : 0.0f), mode);
        }
}
#endif

static inline __attribute__((always_inline)) void any_tile(Input x, Weight W, const float *b, float *y, int in,
                                                           int out, int r, int R, int C, int mode, int type) {
#if HAVE_VNNI
    if (type == I8) {
        tile_q8(x.q, x.qs, W, b, y, in, out, r, C, mode);
        return;
    }
#endif
    tile(x.x, W, b, y, in, out, r, R, C, mode, type);
}

static inline Input rows_from(Input x, int c, int in) {
    return (Input){x.x + (size_t)c * in, x.q ? x.q + (size_t)c * in : NULL, x.qs ? x.qs + c : NULL};
}

/* rows [r0, r1) of y = x W^T + b for the n rows of x (y is [n, out]) */
static inline __attribute__((always_inline)) void rows(Input x, Weight W, const float *b, float *y, int n, int in,
                                                       int out, int r0, int r1, int mode, int type) {
    int r = r0;
    for (; r + ROWS <= r1; r += ROWS)
        for (int c = 0; c < n; c += COLS) {
            Input xc = rows_from(x, c, in);
            float *yc = y + (size_t)c * out;
            switch (n - c) { /* constant tile widths, so each is its own inlined loop */
            case 1: any_tile(xc, W, b, yc, in, out, r, ROWS, 1, mode, type); break;
            case 2: any_tile(xc, W, b, yc, in, out, r, ROWS, 2, mode, type); break;
            default: any_tile(xc, W, b, yc, in, out, r, ROWS, COLS, mode, type);
            }
        }
    for (; r < r1; r++) /* float rows past the last whole block; int8 shares are whole (padded) tiles */
        for (int c = 0; c < n; c++) any_tile(rows_from(x, c, in), W, b, y + (size_t)c * out, in, out, r, 1, 1, mode, type);
}

/* x = (q - 128) * scale, q in [1, 255]: symmetric 8 bits for the row's largest magnitude. Written so
 * that GCC vectorises both loops (a max as a comparison; lrintf, rounding half to even, with
 * -fno-math-errno). */
static void quantize(const float *x, int in, unsigned char *q, float *scale) {
    float top = 0.0f;
    for (int i = 0; i < in; i++) {
        float a = fabsf(x[i]);
        top = a > top ? a : top;
    }
    *scale = top > 0.0f ? top / 127.0f : 1.0f;
    float inverse = 1.0f / *scale;
    for (int i = 0; i < in; i++) q[i] = (unsigned char)(128 + lrintf(x[i] * inverse));
}

/* this thread's share of y = x W^T + b (x [n, in], y [n, out]); every thread of the team calls it, and
 * the caller puts a barrier after it */
static void product(const float *x, Weight W, const float *b, float *y, int n, int in, int out, int mode,
                    unsigned char *xq, float *xs) {
    Input input = {x, NULL, NULL};
    if (W.type == I8) { /* xq [n, in], xs [n]: scratch for the quantized input */
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++) quantize(x + (size_t)r * in, in, xq + (size_t)r * in, xs + r);
        input = (Input){x, xq, xs};
    }
#ifdef _OPENMP
    int team = omp_get_num_threads(), id = omp_get_thread_num();
#else
    int team = 1, id = 0;
#endif
    int rows_out = W.type == I8 ? (out + ROWS - 1) / ROWS * ROWS : out; /* int8: whole (padded) tiles */
    int share = ((rows_out + team - 1) / team + ROWS - 1) / ROWS * ROWS;
    int r0 = id * share, r1 = r0 + share < rows_out ? r0 + share : rows_out;
    if (r0 >= r1) return;
    switch (W.type) { /* one specialised copy of the loops per type */
    case I8: rows(input, W, b, y, n, in, out, r0, r1, mode, I8); break;
    case BF16: rows(input, W, b, y, n, in, out, r0, r1, mode, BF16); break;
    default: rows(input, W, b, y, n, in, out, r0, r1, mode, F32);
    }
}

static void layer_norm(const float *x, const float *w, const float *b, float *y, int d, float eps) {
    float mean = sum(x, d) / d;
    for (int i = 0; i < d; i++) y[i] = x[i] - mean;
    float inv = 1.0f / sqrtf(dot(y, y, d) / d + eps);
    for (int i = 0; i < d; i++) y[i] = y[i] * inv * w[i] + b[i];
}

/* one head of input row `row` (cache slot `slot`, position `pos`): store its key and value, attend over 0..pos */
static void attend(const Model *m, int l, int row, int head, int slot, int pos) {
    int d = m->d, hd = d / m->n_head;
    size_t base = ((size_t)slot * m->n_head + head) * m->ctx * hd;
    float *keys = m->k_cache[l] + base, *values = m->v_cache[l] + base;
    const float *qkv = m->qkv + (size_t)row * 3 * d, *q = qkv + head * hd;
    memcpy(keys + (size_t)pos * hd, qkv + d + head * hd, hd * sizeof(float));
    memcpy(values + (size_t)pos * hd, qkv + 2 * d + head * hd, hd * sizeof(float));
    float *score = m->scores + ((size_t)row * m->n_head + head) * m->ctx;
    float scale = 1.0f / sqrtf((float)hd), top = -INFINITY;
    for (int t = 0; t <= pos; t++) {
        score[t] = dot(q, keys + (size_t)t * hd, hd) * scale;
        if (score[t] > top) top = score[t];
    }
    float total = 0.0f;
    for (int t = 0; t <= pos; t++) total += score[t] = expf(score[t] - top);
    float *out = m->att + (size_t)row * d + head * hd;
    memset(out, 0, hd * sizeof(float));
    for (int t = 0; t <= pos; t++) {
        const float *v = values + (size_t)t * hd;
        float p = score[t] / total;
        for (int i = 0; i < hd; i++) out[i] += p * v[i];
    }
}

static Weight weight(const Model *m, const void *const *w, int at) {
    return (Weight){w[at], (const float *)w[at + 1], (const int *)w[at + 2], m->wtype};
}

/* Append tokens[r] at positions[r] to the row in cache slot slots[r], for r < n (n <= the scratch's rows);
 * logits is [n, vocab]. Rows may sit at different positions. */
void rugpt_step(const Model *m, int n, const int *slots, const int *positions, const int *tokens, float *logits,
                int threads) {
    int d = m->d;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++)
            for (int i = 0; i < d; i++)
                m->h[(size_t)r * d + i] = m->wte[(size_t)tokens[r] * d + i] + m->wpe[(size_t)positions[r] * d + i];
        for (int l = 0; l < m->n_layer; l++) {
            const void *const *w = m->layer + (size_t)l * PER_LAYER;
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++)
                layer_norm(m->h + (size_t)r * d, w[LN1_W], w[LN1_B], m->a + (size_t)r * d, d, m->eps);
            product(m->a, weight(m, w, QKV_W), w[QKV_B], m->qkv, n, d, 3 * d, STORE, m->xq, m->xs);
#pragma omp barrier
#pragma omp for schedule(static) collapse(2)
            for (int r = 0; r < n; r++)
                for (int head = 0; head < m->n_head; head++) attend(m, l, r, head, slots[r], positions[r]);
            product(m->att, weight(m, w, PROJ_W), w[PROJ_B], m->h, n, d, d, ADD, m->xq, m->xs);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++)
                layer_norm(m->h + (size_t)r * d, w[LN2_W], w[LN2_B], m->a + (size_t)r * d, d, m->eps);
            product(m->a, weight(m, w, FC_W), w[FC_B], m->f, n, d, m->d_ff, GELU, m->xq, m->xs);
#pragma omp barrier
            product(m->f, weight(m, w, OUT_W), w[OUT_B], m->h, n, m->d_ff, d, ADD, m->xq, m->xs);
#pragma omp barrier
        }
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++)
            layer_norm(m->h + (size_t)r * d, m->lnf_w, m->lnf_b, m->a + (size_t)r * d, d, m->eps);
        product(m->a, (Weight){m->lm_w, m->lm_s, m->lm_z, m->wtype}, NULL, logits, n, d, m->vocab, STORE, m->xq, m->xs);
    }
}

/* y [n, out] = x [n, in] W^T + b on its own: the fast engine's prefill products for int8 weights, which
 * otherwise would need a second (fbgemm) copy of them; xq [n, in] and xs [n] are scratch */
void rugpt_linear(const float *x, const void *w, const float *s, const int *z, const float *b, int wtype, float *y,
                  int n, int in, int out, unsigned char *xq, float *xs, int threads) {
#pragma omp parallel num_threads(threads)
    product(x, (Weight){w, s, z, wtype}, b, y, n, in, out, STORE, xq, xs);
}
