/* One batch-1 GPT-2 decode step in fp32: embedding, every layer (layer norms, attention over the KV
 * cache, tanh-GELU MLP, residuals) and the logits, inside one OpenMP parallel region.
 *
 * Why: at batch 1 a step costs reading the weights once. torch's kernels for these matrix-vector
 * products (MKL's sgemv, oneDNN) read ruGPT-3 small's layer shapes at 20-26 GB/s on a 2-core machine
 * that sums memory at 32+ GB/s, and the ~170 small ops around them cost 3-4 ms a step in dispatch.
 * Here rows of a weight are read in blocks of 8, each row its own stream, against up to 3 input rows
 * at a time (at batch 1: 35 GB/s here), and the small ops cost nothing but their arithmetic. GCC vector
 * extensions keep it portable: -march=native makes them AVX-512, AVX2 or NEON. It runs in the
 * caller's OpenMP runtime (torch's), so it shares torch's threads instead of competing with them. */
#include <math.h>
#include <stddef.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 16 /* floats per vector */
#define ROWS 8    /* weight rows per tile: each its own stream, which keeps enough reads in flight */
#define COLS 3    /* input rows per tile: ROWS * COLS accumulators (measured best of 4x4, 8x2, 6x4, 8x3 ...) */
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

enum { STORE, ADD, GELU }; /* what a product does with its output: y = Wx+b, y += Wx+b, y = gelu(Wx+b) */
enum { LN1_W, LN1_B, QKV_W, QKV_B, PROJ_W, PROJ_B, LN2_W, LN2_B, FC_W, FC_B, OUT_W, OUT_B, PER_LAYER };

typedef struct {
    int n_layer, d, n_head, d_ff, vocab, ctx;
    float eps;
    const float *wte, *wpe, *lnf_w, *lnf_b;
    const float **layer;     /* PER_LAYER pointers per layer; weights laid out [out, in] */
    float **k_cache, **v_cache; /* per layer: [rows, n_head, ctx, d / n_head] */
    float *h, *a, *qkv, *att, *f, *scores; /* scratch per row: d, d, 3d, d, d_ff, n_head * ctx */
} Model;

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
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

static inline float gelu(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

static inline void put(float *y, float value, int mode) {
    if (mode == ADD) *y += value;
    else *y = mode == GELU ? gelu(value) : value;
}

/* y[c][r + k] for k < R, c < C: R rows of W against C rows of x, R * C vector accumulators. Inlined with
 * constant R and C, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(const float *x, const float *w, const float *b, float *y,
                                                       int in, int out, int r, int R, int C, int mode) {
    vec acc[ROWS][COLS];
    for (int k = 0; k < R; k++)
        for (int c = 0; c < C; c++) acc[k][c] = (vec){0};
    const float *wr = w + (size_t)r * in;
    int main_in = in - in % LANES;
    for (int i = 0; i < main_in; i += LANES) {
        vec wv[ROWS];
        for (int k = 0; k < R; k++) wv[k] = load(wr + (size_t)k * in + i);
        for (int c = 0; c < C; c++) {
            vec xv = load(x + (size_t)c * in + i);
            for (int k = 0; k < R; k++) acc[k][c] += wv[k] * xv;
        }
    }
    for (int c = 0; c < C; c++)
        for (int k = 0; k < R; k++) {
            float s = hsum(acc[k][c]);
            for (int i = main_in; i < in; i++) s += wr[(size_t)k * in + i] * x[(size_t)c * in + i];
            put(y + (size_t)c * out + r + k, s + (b ? b[r + k] : 0.0f), mode);
        }
}

/* rows [r0, r1) of y = x W^T + b for the n rows of x (y is [n, out]) */
static void rows(const float *x, const float *w, const float *b, float *y, int n, int in, int out, int r0, int r1,
                 int mode) {
    int r = r0;
    for (; r + ROWS <= r1; r += ROWS)
        for (int c = 0; c < n; c += COLS) {
            const float *xc = x + (size_t)c * in;
            float *yc = y + (size_t)c * out;
            switch (n - c) { /* constant tile widths, so each is its own inlined loop */
            case 1: tile(xc, w, b, yc, in, out, r, ROWS, 1, mode); break;
            case 2: tile(xc, w, b, yc, in, out, r, ROWS, 2, mode); break;
            default: tile(xc, w, b, yc, in, out, r, ROWS, COLS, mode);
            }
        }
    for (; r < r1; r++)
        for (int c = 0; c < n; c++) tile(x + (size_t)c * in, w, b, y + (size_t)c * out, in, out, r, 1, 1, mode);
}

/* this thread's share of y = x W^T + b (x [n, in], y [n, out]); the caller puts a barrier after it */
static void product(const float *x, const float *w, const float *b, float *y, int n, int in, int out, int mode) {
#ifdef _OPENMP
    int team = omp_get_num_threads(), id = omp_get_thread_num();
#else
    int team = 1, id = 0;
#endif
    int share = ((out + team - 1) / team + ROWS - 1) / ROWS * ROWS;
    int r0 = id * share, r1 = r0 + share < out ? r0 + share : out;
    if (r0 < r1) rows(x, w, b, y, n, in, out, r0, r1, mode);
}

static void layer_norm(const float *x, const float *w, const float *b, float *y, int d, float eps) {
    float mean = 0.0f, var = 0.0f;
    for (int i = 0; i < d; i++) mean += x[i];
    mean /= d;
    for (int i = 0; i < d; i++) var += (x[i] - mean) * (x[i] - mean);
    float inv = 1.0f / sqrtf(var / d + eps);
    for (int i = 0; i < d; i++) y[i] = (x[i] - mean) * inv * w[i] + b[i];
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
        const float *k = keys + (size_t)t * hd;
        float s = 0.0f;
        for (int i = 0; i < hd; i++) s += q[i] * k[i];
        score[t] = s * scale;
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
            const float **w = m->layer + (size_t)l * PER_LAYER;
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++)
                layer_norm(m->h + (size_t)r * d, w[LN1_W], w[LN1_B], m->a + (size_t)r * d, d, m->eps);
            product(m->a, w[QKV_W], w[QKV_B], m->qkv, n, d, 3 * d, STORE);
#pragma omp barrier
#pragma omp for schedule(static) collapse(2)
            for (int r = 0; r < n; r++)
                for (int head = 0; head < m->n_head; head++) attend(m, l, r, head, slots[r], positions[r]);
            product(m->att, w[PROJ_W], w[PROJ_B], m->h, n, d, d, ADD);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++)
                layer_norm(m->h + (size_t)r * d, w[LN2_W], w[LN2_B], m->a + (size_t)r * d, d, m->eps);
            product(m->a, w[FC_W], w[FC_B], m->f, n, d, m->d_ff, GELU);
#pragma omp barrier
            product(m->f, w[OUT_W], w[OUT_B], m->h, n, m->d_ff, d, ADD);
#pragma omp barrier
        }
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++)
            layer_norm(m->h + (size_t)r * d, m->lnf_w, m->lnf_b, m->a + (size_t)r * d, d, m->eps);
        product(m->a, m->wte, NULL, logits, n, d, m->vocab, STORE);
    }
}
