/* The ctx2 network and decoding loop in C: the same integers as ctx2.py's numpy path, one call per
 * latent (the encoder, which knows every symbol, runs the same network on all of them in one call).
 *
 * Why: a 768x512 latent is 1,392 wavefronts of 8-24 symbols, decoded one after another; in numpy each
 * wavefront costs about 100 us of call overhead on top of its arithmetic. Here the whole loop runs
 * in C, and it skips the work numpy cannot: zero inputs and zero activations (most of them: symbols
 * of 0, and the clamp at 0) contribute nothing, and a symbol's table is searched for the slot its
 * lane holds instead of being written out in full.
 *
 * Exactness (FORMAT.md "ctx2"): every value is an integer, or an integer times 2**-10 held in a
 * double or float. Doubles hold every such value the network can reach (ctx2.py checks the bound
 * when the weights load). The hidden layers multiply in float, over runs of inputs whose bounds
 * (|input| times the largest |weight| of its row) sum below 2**24 units, so that every product and
 * partial sum of a run is exact in any order, and add the runs up in double; a row with one input
 * too large for float runs in double. So the result does not depend on the compiler, the vector
 * width, the summation order or FMA contraction. Signed shifts and divisions round toward minus
 * infinity, as numpy's do.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__unix__) || defined(__APPLE__)) && !defined(__STDC_NO_ATOMICS__)
/* a second thread takes half of each wavefront's rows (see Helper) */
#define THREADS 1
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#else
#define THREADS 0
#endif

/* ctx2.py's fixed-point layout; the golden streams in the tests hold both paths to it */
#define ACT_LIMIT 65535.0
#define INPUT_LIMIT 4096        /* network inputs: latent units * 2**8, clamped */
#define FEATURE_SHIFT 8         /* STEP_BITS - INPUT_BITS */
#define WINDOW_CHANNELS 3       /* a channel reads windows of the first min(channel, 3) channels */
#define MU_SHIFT 6              /* STEP_BITS + MU_BITS - ACC_BITS */
#define MU_LIMIT (32767 * 256)  /* MAX_SYMBOL << MU_BITS */
#define LOG_SCALE_SHIFT 14      /* ACC_BITS - log2(LOG_SCALE_STEPS) */
#define SIG_SHIFT 19            /* MU_BITS + INV_SCALE_BITS - log2(SIG_RES) */
#define SIG_HALF 512
#define PROB_SCALE 65536
#define RANS_LOW 65536
#define ESCAPE_FREQ 32
#define ESC_NBITS_BITS 5
#define MAX_ESC_NBITS 16
#define MAX_SYMBOL 32767
#define SINGLE_EXACT (16777216.0 / 1024.0) /* 2**24 units of 2**-10 */
#define MAX_MIXTURES 16
#define MAX_LANES 128
#define BLOCK 64 /* columns of a hidden layer computed together, in registers, for every row of a wavefront */
#define OUT_PAD 16 /* the output layer's columns, padded */

#if defined(_MSC_VER)
#define restrict __restrict
#endif

enum { DONE = 0, TRUNCATED = 1, OUT_OF_RANGE = 2, OVERSIZED_ESCAPE = 3, NO_MEMORY = -1 };

#if defined(__GNUC__)
/* GCC and Clang vector types of 32 bytes (one AVX register, two SSE ones): accumulators that stay in
 * registers whatever the vector width the compiler targets */
#define VECTORS 1
#define LANES 8 /* floats per vector */
typedef float floats __attribute__((vector_size(32)));
typedef double doubles __attribute__((vector_size(32)));
static inline floats load_floats(const float *p) {
    floats v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline doubles load_doubles(const double *p) {
    doubles v;
    memcpy(&v, p, sizeof v);
    return v;
}
#else
#define VECTORS 0
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* one build runs the widest vectors the CPU has; results are the same on each (see above) */
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

static inline int64_t floor_shift(int64_t a, int s) { return a >= 0 ? a >> s : ~((~a) >> s); }

static inline int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

static inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

typedef struct {
    Py_ssize_t hidden, mixtures, channels, n_same, n_window, n_inv, n_exp, n_sig;
    int64_t step_fx, log_scale_min, radius, lanes, plane;
    const int64_t *same_taps, *window_taps; /* flat offsets: own-channel taps, one earlier channel's window */
    const float *w1_single, *w2_single;     /* the two hidden layers' weights as floats, for the float runs */
    const double *w1, *w1_row_max, *bias1;  /* (n_same + WINDOW_CHANNELS n_window) x hidden, its rows' max |w|,
                                               channels x hidden */
    const double *w2, *w2_row_max, *b2;     /* hidden x hidden, its rows' max |w|, hidden */
    double *w3;                             /* hidden x OUT_PAD, padded with zeros */
    const double *b3;
    const int64_t *inv_scale, *exp_table, *sigmoid;
} Net;

/* Per row, a layer's nonzero inputs and the weight rows they go with, cut into runs whose bounds
 * (|input| times the largest |weight| of its row) sum below SINGLE_EXACT: a run's products and
 * partial sums are then exact in float. A row with one input too large for that is `wide`. */
typedef struct {
    int32_t *index;
    float *value;
    Py_ssize_t *run_end; /* per row (stride + 1 reserved): where each run ends */
    Py_ssize_t *runs;    /* per row */
    unsigned char *wide; /* per row */
    Py_ssize_t stride;   /* entries reserved per row */
} Sparse;

/* How many inputs row r keeps */
static inline Py_ssize_t entries(const Sparse *s, Py_ssize_t r) {
    return s->run_end[r * (s->stride + 1) + s->runs[r] - 1];
}

/* Row r of `s` from the n candidate inputs x[k], which go with weight rows row_of[k] (k where row_of
 * is NULL): the nonzero ones, kept without a branch per input, as one run (see cut_runs) */
static void keep_nonzero(Sparse *s, Py_ssize_t r, const float *x, const int32_t *row_of, Py_ssize_t n) {
    int32_t *index = s->index + r * s->stride;
    float *value = s->value + r * s->stride;
    Py_ssize_t count = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        uint32_t bits; /* tested as an integer: a float compare also has to rule out NaN, which never comes */
        memcpy(&bits, &x[k], sizeof bits);
        index[count] = row_of ? row_of[k] : (int32_t)k;
        value[count] = x[k];
        count += (bits << 1) != 0;
    }
    s->run_end[r * (s->stride + 1)] = count;
    s->runs[r] = 1;
    s->wide[r] = 0;
}

/* Row r of `s` cut into runs where the inputs' bounds (|input| times their weight row's largest |w|)
 * need it, and marked `wide` where one input alone is too large for float */
static void cut_runs(Sparse *s, Py_ssize_t r, const double *row_max) {
    const int32_t *index = s->index + r * s->stride;
    const float *value = s->value + r * s->stride;
    Py_ssize_t *run_end = s->run_end + r * (s->stride + 1), count = run_end[0], runs = 0, t = 0;
    /* exact in any order (integers times 2**-10); four sums and maxima for four independent chains */
    double total[4] = {0.0, 0.0, 0.0, 0.0}, largest[4] = {0.0, 0.0, 0.0, 0.0};
    for (; t + 3 < count; t += 4) {
        for (int u = 0; u < 4; u++) {
            double bound = fabs((double)value[t + u]) * row_max[index[t + u]];
            total[u] += bound;
            largest[u] = bound > largest[u] ? bound : largest[u];
        }
    }
    for (; t < count; t++) {
        double bound = fabs((double)value[t]) * row_max[index[t]];
        total[0] += bound;
        largest[0] = bound > largest[0] ? bound : largest[0];
    }
    double widest = largest[0];
    for (int u = 1; u < 4; u++) widest = largest[u] > widest ? largest[u] : widest;
    if (total[0] + total[1] + total[2] + total[3] >= SINGLE_EXACT) {
        double run = 0.0;
        for (t = 0; t < count; t++) {
            double bound = fabs((double)value[t]) * row_max[index[t]];
            if (run + bound >= SINGLE_EXACT && t > 0) {
                run_end[runs++] = t;
                run = 0.0;
            }
            run += bound;
        }
    }
    run_end[runs++] = count;
    s->runs[r] = runs;
    s->wide[r] = widest >= SINGLE_EXACT;
}

typedef struct {
    uint32_t *state;
    const uint16_t *words;
    Py_ssize_t n_words, pos;
} Stream;

/* out[r] = bias + the nonzero inputs of row r times their rows of w, for the rows of one wavefront that
 * are not wide: float within a run, double across runs */
VECTOR_CLONES static void product_single(Py_ssize_t rows, Py_ssize_t hidden, const float *restrict w,
                                         const double *restrict bias, const Sparse *in, double *restrict out) {
    for (Py_ssize_t jb = 0; jb < hidden; jb += BLOCK) {
        for (Py_ssize_t r = 0; r < rows; r++) {
            if (in->wide[r]) continue;
            const int32_t *restrict index = in->index + r * in->stride;
            const float *restrict value = in->value + r * in->stride;
            const Py_ssize_t *restrict run_end = in->run_end + r * (in->stride + 1);
            double *restrict total = out + r * hidden + jb;
            for (int j = 0; j < BLOCK; j++) total[j] = bias[jb + j];
            for (Py_ssize_t k = 0, t = 0; k < in->runs[r]; k++) {
                float part[BLOCK];
#if VECTORS
                /* BLOCK / LANES independent accumulators keep both FMA pipes busy, and with AVX2's 16
                 * registers still leave room for the weights */
                floats a[BLOCK / LANES] = {{0}};
                for (; t < run_end[k]; t++) {
                    const float *row = w + (Py_ssize_t)index[t] * hidden + jb;
                    for (int v = 0; v < BLOCK / LANES; v++) a[v] += value[t] * load_floats(row + LANES * v);
                }
                memcpy(part, a, sizeof a);
#else
                for (int j = 0; j < BLOCK; j++) part[j] = 0.0f;
                for (; t < run_end[k]; t++)
                    for (int j = 0; j < BLOCK; j++) part[j] += value[t] * w[(Py_ssize_t)index[t] * hidden + jb + j];
#endif
                for (int j = 0; j < BLOCK; j++) total[j] += part[j];
            }
        }
    }
}

/* out = bias + the nonzero inputs of row r times their rows of w, in double: a `wide` row */
VECTOR_CLONES static void product_double(Py_ssize_t hidden, const double *restrict w, const double *restrict bias,
                                         const Sparse *in, Py_ssize_t r, double *restrict out) {
    const int32_t *restrict index = in->index + r * in->stride;
    const float *restrict value = in->value + r * in->stride;
    memcpy(out, bias, (size_t)hidden * sizeof(double));
    for (Py_ssize_t t = 0; t < entries(in, r); t++) {
        const double *restrict row = w + (Py_ssize_t)index[t] * hidden;
        double x = value[t];
        for (Py_ssize_t j = 0; j < hidden; j++) out[j] += x * row[j];
    }
}

/* h = clamp(floor(a), 0, ACT_LIMIT) */
VECTOR_CLONES static void activate(Py_ssize_t n, const double *restrict a, float *restrict h) {
    for (Py_ssize_t j = 0; j < n; j++) {
        double v = floor(a[j]);
        v = v > 0.0 ? v : 0.0; /* written so that it compiles to max and min instructions */
        h[j] = (float)(v < ACT_LIMIT ? v : ACT_LIMIT);
    }
}

/* out = h2 @ w3 (columns padded to OUT_PAD) from the nonzero activations of row r */
VECTOR_CLONES static void output_layer(const double *restrict w3, const Sparse *act, Py_ssize_t r,
                                       double *restrict out) {
    const int32_t *restrict index = act->index + r * act->stride;
    const float *restrict value = act->value + r * act->stride;
#if VECTORS
    doubles a[OUT_PAD / 4] = {{0}};
    for (Py_ssize_t k = 0; k < entries(act, r); k++) {
        const double *row = w3 + (Py_ssize_t)index[k] * OUT_PAD;
        for (int v = 0; v < OUT_PAD / 4; v++) a[v] += (double)value[k] * load_doubles(row + 4 * v);
    }
    memcpy(out, a, sizeof a);
#else
    for (int t = 0; t < OUT_PAD; t++) out[t] = 0.0;
    for (Py_ssize_t k = 0; k < entries(act, r); k++)
        for (int t = 0; t < OUT_PAD; t++) out[t] += value[k] * w3[(Py_ssize_t)index[k] * OUT_PAD + t];
#endif
}

/* Per symbol: K means, K inverse scales, K weights; returns the window centre */
static int64_t mixture(const Net *net, const double *out_float, int64_t *mix) {
    Py_ssize_t K = net->mixtures;
    int64_t out[3 * MAX_MIXTURES];
    for (Py_ssize_t t = 0; t < 3 * K; t++) out[t] = (int64_t)(out_float[t] + net->b3[t]);
    int64_t *mu = mix, *inv = mix + K, *weight = mix + 2 * K;
    int64_t top = out[2 * K];
    for (Py_ssize_t m = 1; m < K; m++) top = out[2 * K + m] > top ? out[2 * K + m] : top;
    int64_t num = 0, den = 0;
    for (Py_ssize_t m = 0; m < K; m++) {
        mu[m] = clamp64(floor_div(out[m] * ((int64_t)1 << MU_SHIFT), net->step_fx), -MU_LIMIT, MU_LIMIT);
        int64_t li = floor_shift(out[K + m] + ((int64_t)1 << (LOG_SCALE_SHIFT - 1))
                                 - net->log_scale_min * ((int64_t)1 << LOG_SCALE_SHIFT), LOG_SCALE_SHIFT);
        inv[m] = net->inv_scale[clamp64(li, 0, net->n_inv - 1)];
        int64_t below = floor_shift(top + ((int64_t)1 << (LOG_SCALE_SHIFT - 1)) - out[2 * K + m], LOG_SCALE_SHIFT);
        weight[m] = net->exp_table[clamp64(below, 0, net->n_exp - 1)];
        num += mu[m] * weight[m];
        den += weight[m];
    }
    return floor_shift(floor_div(num, den) + 128, 8);
}

/* The unnormalised mixture CDF at the lower edge of value `edge` */
static int64_t cdf(const Net *net, const int64_t *mix, int64_t edge) {
    Py_ssize_t K = net->mixtures;
    int64_t total = 0;
    for (Py_ssize_t m = 0; m < K; m++) {
        int64_t z = (edge * 256 - 128 - mix[m]) * mix[K + m];
        int64_t idx = floor_shift(z + ((int64_t)1 << (SIG_SHIFT - 1)) + ((int64_t)SIG_HALF << SIG_SHIFT), SIG_SHIFT);
        total += net->sigmoid[clamp64(idx, 0, net->n_sig - 1)] * mix[2 * K + m];
    }
    return total;
}

/* One symbol's table (FORMAT.md "Distribution"): entry boundaries 0, the window's 2R+2 starts, PROB_SCALE */
typedef struct {
    const Net *net;
    const int64_t *mix;
    int64_t lowest, at_lowest, span, budget;
} Table;

static Table table(const Net *net, const int64_t *mix, int64_t centre) {
    int64_t R = net->radius, lowest = centre - R, at_lowest = cdf(net, mix, lowest);
    Table t = {net, mix, lowest, at_lowest, cdf(net, mix, lowest + 2 * R + 1) - at_lowest + 2 * R + 1,
               PROB_SCALE - 2 * ESCAPE_FREQ - (2 * R + 1)};
    return t;
}

static int64_t boundary(const Table *t, Py_ssize_t j) {
    if (j == 0) return 0;
    if (j == 2 * t->net->radius + 3) return PROB_SCALE;
    int64_t e = j - 1;
    return ESCAPE_FREQ + e + (cdf(t->net, t->mix, t->lowest + e) - t->at_lowest + e) * t->budget / t->span;
}

/* One uniform step of `nbits` on `lane`; -1 when the stream runs out */
static int64_t uniform(Stream *s, Py_ssize_t lane, int nbits) {
    int shift = 16 - nbits;
    uint64_t x = s->state[lane], slot = x & (PROB_SCALE - 1), value = slot >> shift;
    x = ((x >> 16) << shift) + slot - (value << shift);
    if (x < RANS_LOW) {
        if (s->pos == s->n_words) return -1;
        x = x << 16 | s->words[s->pos++];
    }
    s->state[lane] = (uint32_t)x;
    return (int64_t)value;
}

/* The excess of a piece's escaped lanes (increasing), as rans.py's RansDecoder._excess */
static int escape_excess(Stream *s, const Py_ssize_t *lanes, Py_ssize_t n, int64_t *v) {
    int nb[MAX_LANES];
    for (Py_ssize_t t = 0; t < n; t++) {
        int64_t got = uniform(s, lanes[t], ESC_NBITS_BITS);
        if (got < 0) return TRUNCATED;
        nb[t] = (int)got;
    }
    for (Py_ssize_t t = 0; t < n; t++)
        if (nb[t] > MAX_ESC_NBITS) return OVERSIZED_ESCAPE;
    for (Py_ssize_t t = 0; t < n; t++) v[t] = (int64_t)1 << nb[t];
    for (Py_ssize_t t = 0; t < n; t++) {
        if (nb[t] == 0) continue;
        int64_t got = uniform(s, lanes[t], nb[t] < 8 ? nb[t] : 8);
        if (got < 0) return TRUNCATED;
        v[t] |= got;
    }
    for (Py_ssize_t t = 0; t < n; t++) {
        if (nb[t] <= 8) continue;
        int64_t got = uniform(s, lanes[t], nb[t] - 8);
        if (got < 0) return TRUNCATED;
        v[t] |= got << 8;
    }
    return DONE;
}

/* A wavefront's symbols (rans.py's RansDecoder.wave): each lane finds the entry whose interval holds
 * its slot, by bisection over boundaries computed as needed; then the escapes, piece by piece */
static int read_wave(const Net *net, Stream *s, Py_ssize_t n, const int64_t *mix, const int64_t *centre,
                     int64_t *symbol, Py_ssize_t *escaped, int64_t *excess) {
    Py_ssize_t k3 = 3 * net->mixtures, n_escaped = 0, last = 2 * net->radius + 3;
    for (Py_ssize_t i = 0; i < n; i++) {
        Table t = table(net, mix + i * k3, centre[i]);
        Py_ssize_t lane = i % net->lanes;
        uint64_t x = s->state[lane], slot = x & (PROB_SCALE - 1);
        Py_ssize_t lo_j = 0, hi_j = last; /* boundary(lo_j) <= slot < boundary(hi_j) */
        int64_t lo = 0, hi = PROB_SCALE;
        while (hi_j - lo_j > 1) {
            Py_ssize_t mid = (lo_j + hi_j) / 2;
            int64_t b = boundary(&t, mid);
            if ((uint64_t)b <= slot) {
                lo_j = mid;
                lo = b;
            } else {
                hi_j = mid;
                hi = b;
            }
        }
        x = (uint64_t)(hi - lo) * (x >> 16) + slot - (uint64_t)lo;
        if (x < RANS_LOW) {
            if (s->pos == s->n_words) return TRUNCATED;
            x = x << 16 | s->words[s->pos++];
        }
        s->state[lane] = (uint32_t)x;
        symbol[i] = t.lowest + lo_j - 1;
        if (lo_j == 0 || hi_j == last) escaped[n_escaped++] = i;
    }
    for (Py_ssize_t first = 0; first < n_escaped;) {
        Py_ssize_t k = escaped[first] - escaped[first] % net->lanes, end = first, piece[MAX_LANES];
        while (end < n_escaped && escaped[end] < k + net->lanes) {
            piece[end - first] = escaped[end] - k;
            end++;
        }
        int status = escape_excess(s, piece, end - first, excess);
        if (status != DONE) return status;
        for (Py_ssize_t t = first; t < end; t++) {
            Py_ssize_t i = escaped[t];
            int64_t lowest = centre[i] - net->radius;
            symbol[i] = symbol[i] < lowest ? lowest - excess[t - first] : centre[i] + net->radius + excess[t - first];
        }
        first = end;
    }
    return DONE;
}

typedef struct {
    const int64_t *steps, *pos, *chan;
    Py_ssize_t n_waves;
    int64_t *sym;
    double *features;
} Latent;

/* Row r of `in`: the nonzero network inputs of the symbol at `pos` of channel `ch`, own-channel taps
 * first, then the windows of the first min(ch, WINDOW_CHANNELS) channels */
static void gather_inputs(const Net *net, const double *features, int64_t pos, int64_t ch, Sparse *in, Py_ssize_t r,
                          float *x, int32_t *row_of) {
    Py_ssize_t n = 0;
    for (Py_ssize_t t = 0; t < net->n_same; t++, n++) {
        x[n] = (float)features[pos + net->same_taps[t]];
        row_of[n] = (int32_t)t;
    }
    for (int64_t p = 0; p < ch && p < WINDOW_CHANNELS; p++) {
        const double *window = features + pos + (p - ch) * net->plane;
        int32_t first = (int32_t)(net->n_same + p * net->n_window);
        for (Py_ssize_t t = 0; t < net->n_window; t++, n++) {
            x[n] = (float)window[net->window_taps[t]];
            row_of[n] = first + (int32_t)t;
        }
    }
    keep_nonzero(in, r, x, row_of, n);
    cut_runs(in, r, net->w1_row_max);
}

/* h[r] = one hidden layer's activations for the rows of one wavefront, exact (see the top) */
static void hidden_layer(Py_ssize_t rows, Py_ssize_t hidden, const float *w_single, const double *w,
                         const double *bias, const Sparse *in, double *a, float *h) {
    product_single(rows, hidden, w_single, bias, in, a);
    for (Py_ssize_t r = 0; r < rows; r++)
        if (in->wide[r]) product_double(hidden, w, bias, in, r, a + r * hidden);
    activate(rows * hidden, a, h);
}

static Sparse sparse(Py_ssize_t rows, Py_ssize_t stride) {
    Sparse s = {malloc((size_t)(rows * stride) * sizeof(int32_t)), malloc((size_t)(rows * stride) * sizeof(float)),
                malloc((size_t)(rows * (stride + 1)) * sizeof(Py_ssize_t)), malloc((size_t)rows * sizeof(Py_ssize_t)),
                malloc((size_t)rows), stride};
    return s;
}

static int allocated(const Sparse *s) { return s->index && s->value && s->run_end && s->runs && s->wide; }

static void release(Sparse *s) {
    free(s->index);
    free(s->value);
    free(s->run_end);
    free(s->runs);
    free(s->wide);
}

/* Scratch space for the network on up to `rows` symbols at once */
typedef struct {
    Py_ssize_t rows;
    Sparse in, act, act2;
    float *h, *x;
    double *a;
    int32_t *row_of;
    int64_t *mix, *centre; /* per row: 3K mixture parameters (means, inverse scales, weights), window centre */
} Work;

static int work(Work *w, const Net *net, Py_ssize_t rows) {
    Py_ssize_t hidden = net->hidden, n_inputs = net->n_same + WINDOW_CHANNELS * net->n_window;
    w->rows = rows;
    w->in = sparse(rows, n_inputs);
    w->act = sparse(rows, hidden);
    w->act2 = sparse(rows, hidden);
    w->h = malloc((size_t)(rows * hidden) * sizeof(float));
    w->x = malloc((size_t)n_inputs * sizeof(float));
    w->a = malloc((size_t)(rows * hidden) * sizeof(double));
    w->row_of = malloc((size_t)n_inputs * sizeof(int32_t));
    w->mix = malloc((size_t)(rows * 3 * net->mixtures) * sizeof(int64_t));
    w->centre = malloc((size_t)rows * sizeof(int64_t));
    return allocated(&w->in) && allocated(&w->act) && allocated(&w->act2) && w->h && w->x && w->a && w->row_of
           && w->mix && w->centre;
}

static void release_work(Work *w) {
    release(&w->in);
    release(&w->act);
    release(&w->act2);
    free(w->h); free(w->x); free(w->a); free(w->row_of); free(w->mix); free(w->centre);
}

/* The distributions of the n symbols at `pos` of channel `ch` (all of their inputs known): 3K mixture
 * parameters per symbol into `mix`, the window centres into `centre` */
static void network(const Net *net, Work *w, const double *features, const int64_t *pos, Py_ssize_t n, int64_t ch,
                    int64_t *mix, int64_t *centre) {
    Py_ssize_t hidden = net->hidden, k3 = 3 * net->mixtures;
    double out[OUT_PAD] = {0};
    for (Py_ssize_t r = 0; r < n; r++) gather_inputs(net, features, pos[r], ch, &w->in, r, w->x, w->row_of);
    hidden_layer(n, hidden, net->w1_single, net->w1, net->bias1 + ch * hidden, &w->in, w->a, w->h);
    for (Py_ssize_t r = 0; r < n; r++) {
        keep_nonzero(&w->act, r, w->h + r * hidden, NULL, hidden);
        cut_runs(&w->act, r, net->w2_row_max);
    }
    hidden_layer(n, hidden, net->w2_single, net->w2, net->b2, &w->act, w->a, w->h);
    for (Py_ssize_t r = 0; r < n; r++) {
        keep_nonzero(&w->act2, r, w->h + r * hidden, NULL, hidden); /* the output layer runs in double */
        output_layer(net->w3, &w->act2, r, out);
        centre[r] = mixture(net, out, mix + r * k3);
    }
}


#define SPLIT_ROWS 4 /* a wavefront is split between two threads from this many rows on */
#define SPINS 4096   /* a waiting thread spins this many times, then yields its core on each try */
#define LATE_WAVES 16 /* the decoder stops splitting after this many waits for a helper that was not running */

#if THREADS
/* A second thread that runs the network on the later rows of each wavefront while the decoding thread
 * runs the earlier ones. The rows of a wavefront are independent and each is computed the same way
 * whoever runs it, so the symbols do not depend on the split. The two meet twice per wavefront (a
 * 768x512 latent has 1,392), so they spin rather than sleep, yielding the core after SPINS tries in
 * case the other is not running. Where the helper keeps losing its core to other processes, waiting
 * for it costs more than it saves, and the decoder goes on alone (LATE_WAVES). */
typedef struct {
    const Net *net;
    Work work;
    const double *features;
    const int64_t *pos;
    Py_ssize_t n;
    int64_t ch, *mix, *centre;
    atomic_long posted, finished; /* jobs handed over, jobs done; posted < 0: stop */
    pthread_t thread;
} Helper;

static void relax(int *spins) {
    if (++*spins <= SPINS) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    } else {
        sched_yield();
    }
}

static void *helper_main(void *arg) {
    Helper *h = arg;
    for (long seen = 0;;) {
        long job;
        for (int spins = 0; (job = atomic_load_explicit(&h->posted, memory_order_acquire)) == seen;) relax(&spins);
        if (job < 0) return NULL;
        network(h->net, &h->work, h->features, h->pos, h->n, h->ch, h->mix, h->centre);
        atomic_store_explicit(&h->finished, job, memory_order_release);
        seen = job;
    }
}

/* Start the helper (0 where it cannot start: the caller then runs every row itself) */
static int start_helper(Helper *h, const Net *net, const double *features, Py_ssize_t rows) {
    memset(h, 0, sizeof *h);
    h->net = net;
    h->features = features;
    atomic_init(&h->posted, 0);
    atomic_init(&h->finished, 0);
    if (!work(&h->work, net, rows)) {
        release_work(&h->work);
        return 0;
    }
    if (pthread_create(&h->thread, NULL, helper_main, h) != 0) {
        release_work(&h->work);
        return 0;
    }
    return 1;
}

static void stop_helper(Helper *h) {
    atomic_store_explicit(&h->posted, -1, memory_order_release);
    pthread_join(h->thread, NULL);
    release_work(&h->work);
}

/* network() on the n rows at `pos`, the later half by the helper; returns 1 where the caller had to
 * yield its core while waiting for the helper (the helper was not running) */
static int network_split(Helper *h, const Net *net, Work *w, const double *features, const int64_t *pos,
                          Py_ssize_t n, int64_t ch, int64_t *mix, int64_t *centre) {
    Py_ssize_t half = n / 2, k3 = 3 * net->mixtures;
    long job = atomic_load_explicit(&h->finished, memory_order_relaxed) + 1;
    h->pos = pos + half;
    h->n = n - half;
    h->ch = ch;
    h->mix = mix + half * k3;
    h->centre = centre + half;
    atomic_store_explicit(&h->posted, job, memory_order_release);
    network(net, w, features, pos, half, ch, mix, centre);
    int spins = 0;
    while (atomic_load_explicit(&h->finished, memory_order_acquire) != job) relax(&spins);
    return spins > SPINS;
}
#endif

static int decode_latent(const Net *net, Latent *lat, Stream *s, int threads) {
    Py_ssize_t widest = 1;
    for (Py_ssize_t i = 0; i < lat->n_waves; i++)
        if (lat->steps[2 * i + 1] - lat->steps[2 * i] > widest) widest = lat->steps[2 * i + 1] - lat->steps[2 * i];
    Work w;
    int status = NO_MEMORY;
    int64_t *symbol = malloc((size_t)widest * sizeof(int64_t)), *excess = malloc((size_t)widest * sizeof(int64_t));
    Py_ssize_t *escaped = malloc((size_t)widest * sizeof(Py_ssize_t));
    if (!work(&w, net, widest) || !symbol || !excess || !escaped) goto done;
    status = DONE;
#if THREADS
    Helper helper;
    int split = threads > 1 && widest >= SPLIT_ROWS && start_helper(&helper, net, lat->features, widest), late = 0;
#else
    (void)threads;
#endif
    for (Py_ssize_t wave = 0; wave < lat->n_waves; wave++) {
        Py_ssize_t begin = lat->steps[2 * wave], n = lat->steps[2 * wave + 1] - begin;
        const int64_t *pos = lat->pos + begin;
        int64_t ch = lat->chan[begin]; /* a wavefront lies inside one channel */
#if THREADS
        if (split && n >= SPLIT_ROWS) {
            late += network_split(&helper, net, &w, lat->features, pos, n, ch, w.mix, w.centre);
            if (late == LATE_WAVES) {
                stop_helper(&helper);
                split = 0;
            }
        } else
#endif
            network(net, &w, lat->features, pos, n, ch, w.mix, w.centre);
        status = read_wave(net, s, n, w.mix, w.centre, symbol, escaped, excess);
        if (status != DONE) break;
        for (Py_ssize_t r = 0; r < n && status == DONE; r++)
            if (symbol[r] < -MAX_SYMBOL - 1 || symbol[r] > MAX_SYMBOL) status = OUT_OF_RANGE;
        if (status != DONE) break;
        for (Py_ssize_t r = 0; r < n; r++) {
            lat->sym[pos[r]] = symbol[r];
            lat->features[pos[r]] = (double)clamp64(floor_shift(symbol[r] * net->step_fx, FEATURE_SHIFT),
                                                    -INPUT_LIMIT, INPUT_LIMIT);
        }
    }
#if THREADS
    if (split) stop_helper(&helper);
#endif
done:
    release_work(&w);
    free(symbol); free(excess); free(escaped);
    return status;
}

static int sized(const Py_buffer *view, Py_ssize_t count, Py_ssize_t item, const char *name) {
    if (view->len != count * item) {
        PyErr_Format(PyExc_ValueError, "ctx2 native decoder: %s has %zd bytes, expected %zd", name, view->len,
                     count * item);
        return 0;
    }
    return 1;
}

/* Every position and its gathers inside the flat arrays; with `lat->steps`, every wavefront inside the
 * coding order and inside one channel */
static int checked_layout(const Net *net, const Latent *lat, Py_ssize_t n_pos, Py_ssize_t n_flat) {
    int64_t lo = 0, hi = 0;
    for (Py_ssize_t t = 0; t < net->n_same; t++) {
        lo = net->same_taps[t] < lo ? net->same_taps[t] : lo;
        hi = net->same_taps[t] > hi ? net->same_taps[t] : hi;
    }
    int64_t window_lo = 0, window_hi = 0;
    for (Py_ssize_t t = 0; t < net->n_window; t++) {
        window_lo = net->window_taps[t] < window_lo ? net->window_taps[t] : window_lo;
        window_hi = net->window_taps[t] > window_hi ? net->window_taps[t] : window_hi;
    }
    for (Py_ssize_t i = 0; i < n_pos; i++) {
        int64_t p = lat->pos[i], ch = lat->chan[i];
        if (ch < 0 || ch >= net->channels || p + lo < 0 || p + hi >= n_flat
            || (ch > 0 && p - ch * net->plane + window_lo < 0) || (ch > 0 && p - net->plane + window_hi >= n_flat))
            return 0;
    }
    for (Py_ssize_t w = 0, end = 0; lat->steps && w < lat->n_waves; w++) {
        int64_t b = lat->steps[2 * w], e = lat->steps[2 * w + 1];
        if (b != end || e <= b || e > n_pos || lat->chan[b] != lat->chan[e - 1]) return 0;
        end = e;
    }
    return 1;
}

static void release_views(Py_buffer *views, int n) {
    for (int i = 0; i < n; i++)
        if (views[i].obj) PyBuffer_Release(&views[i]);
}

/* The network's data for one image, from the tuple ctx2.py's _Model.native_net builds */
enum { SAME, WINDOW, W1S, W1, W1MAX, BIAS1, W2S, W2, W2MAX, B2, W3, B3, INV, EXP, SIG, NET_BUFFERS };

typedef struct {
    Py_buffer v[NET_BUFFERS];
    double *w3; /* padded to OUT_PAD columns */
} NetData;

static void release_net(NetData *d) {
    free(d->w3);
    release_views(d->v, NET_BUFFERS);
}

static int parse_net(PyObject *tuple, Net *net, NetData *d) {
    Py_buffer *v = d->v;
    Py_ssize_t plane;
    long long step_fx, log_scale_min;
    memset(d, 0, sizeof *d);
    if (!PyTuple_Check(tuple)) {
        PyErr_SetString(PyExc_TypeError, "ctx2 native decoder: net must be a tuple");
        return 0;
    }
    if (!PyArg_ParseTuple(tuple, "y*y*ny*y*y*y*y*y*y*y*y*y*y*y*y*LL", &v[SAME], &v[WINDOW], &plane, &v[W1S],
                          &v[W1], &v[W1MAX], &v[BIAS1], &v[W2S], &v[W2], &v[W2MAX], &v[B2], &v[W3], &v[B3],
                          &v[INV], &v[EXP], &v[SIG], &step_fx, &log_scale_min))
        return 0;
    memset(net, 0, sizeof *net);
    net->hidden = v[B2].len / (Py_ssize_t)sizeof(double);
    net->mixtures = v[B3].len / (Py_ssize_t)sizeof(double) / 3;
    net->n_same = v[SAME].len / (Py_ssize_t)sizeof(int64_t);
    net->n_window = v[WINDOW].len / (Py_ssize_t)sizeof(int64_t);
    net->n_inv = v[INV].len / (Py_ssize_t)sizeof(int64_t);
    net->n_exp = v[EXP].len / (Py_ssize_t)sizeof(int64_t);
    net->n_sig = v[SIG].len / (Py_ssize_t)sizeof(int64_t);
    net->step_fx = step_fx;
    net->log_scale_min = log_scale_min;
    net->plane = plane;
    Py_ssize_t hidden = net->hidden, n_inputs = net->n_same + WINDOW_CHANNELS * net->n_window;
    net->channels = hidden ? v[BIAS1].len / (Py_ssize_t)sizeof(double) / hidden : 0;
    if (!(sized(&v[W1S], n_inputs * hidden, sizeof(float), "w1_single")
          && sized(&v[W1], n_inputs * hidden, sizeof(double), "w1")
          && sized(&v[W1MAX], n_inputs, sizeof(double), "w1_row_max")
          && net->channels >= 1 && sized(&v[BIAS1], net->channels * hidden, sizeof(double), "bias1")
          && sized(&v[W2S], hidden * hidden, sizeof(float), "w2_single")
          && sized(&v[W2], hidden * hidden, sizeof(double), "w2")
          && sized(&v[W2MAX], hidden, sizeof(double), "w2_row_max")
          && sized(&v[W3], hidden * 3 * net->mixtures, sizeof(double), "w3")))
        return 0;
    if (hidden < BLOCK || hidden % BLOCK || hidden > INT32_MAX || net->mixtures < 1 || 3 * net->mixtures > OUT_PAD
        || net->n_inv < 1 || net->n_exp < 1 || net->n_sig < 1 || step_fx <= 0 || plane < 0) {
        PyErr_SetString(PyExc_ValueError, "ctx2 native decoder: bad network");
        return 0;
    }
    d->w3 = calloc((size_t)(hidden * OUT_PAD), sizeof(double));
    if (!d->w3) {
        PyErr_NoMemory();
        return 0;
    }
    const double *w3_rows = v[W3].buf;
    for (Py_ssize_t k = 0; k < hidden; k++)
        for (Py_ssize_t t = 0; t < 3 * net->mixtures; t++) d->w3[k * OUT_PAD + t] = w3_rows[k * 3 * net->mixtures + t];
    net->w3 = d->w3;
    net->same_taps = v[SAME].buf;
    net->window_taps = v[WINDOW].buf;
    net->w1_single = v[W1S].buf;
    net->w1 = v[W1].buf;
    net->w1_row_max = v[W1MAX].buf;
    net->bias1 = v[BIAS1].buf;
    net->w2_single = v[W2S].buf;
    net->w2 = v[W2].buf;
    net->w2_row_max = v[W2MAX].buf;
    net->b2 = v[B2].buf;
    net->b3 = v[B3].buf;
    net->inv_scale = v[INV].buf;
    net->exp_table = v[EXP].buf;
    net->sigmoid = v[SIG].buf;
    return 1;
}

PyDoc_STRVAR(decode_doc,
"decode(steps, pos, chan, sym, features, state, words, net, radius, lanes, threads) -> (words_read, status)\n\n"
"Decode the wavefronts ``steps`` of a latent, writing symbols and network inputs into ``sym`` and\n"
"``features`` (flat, padded) and advancing the lane states ``state`` in place. status: 0 done,\n"
"1 stream truncated, 2 out-of-range symbol, 3 oversized escape; the failing wavefront is left\n"
"unwritten. ``threads`` (1 or 2): threads that run the network; the symbols are the same for either.\n"
"ctx2.py's _Decoding.decode_native says what each argument is.");

static PyObject *decode(PyObject *self, PyObject *args) {
    (void)self;
    enum { STEPS, POS, CHAN, SYM, FEATURES, STATE, WORDS, N_BUFFERS };
    Py_buffer v[N_BUFFERS];
    memset(v, 0, sizeof(v));
    PyObject *net_tuple, *result = NULL;
    long long radius, lanes;
    int threads;
    Net net;
    NetData data;
    memset(&data, 0, sizeof data);
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*w*y*OLLi", &v[STEPS], &v[POS], &v[CHAN], &v[SYM], &v[FEATURES],
                          &v[STATE], &v[WORDS], &net_tuple, &radius, &lanes, &threads))
        return NULL;
    if (!parse_net(net_tuple, &net, &data)) goto release;
    net.radius = radius;
    net.lanes = lanes;
    Py_ssize_t n_pos = v[POS].len / (Py_ssize_t)sizeof(int64_t), n_flat = v[SYM].len / (Py_ssize_t)sizeof(int64_t);
    if (!(sized(&v[CHAN], n_pos, sizeof(int64_t), "chan") && sized(&v[FEATURES], n_flat, sizeof(double), "features")
          && sized(&v[STATE], lanes, sizeof(uint32_t), "state")))
        goto release;
    Latent lat = {v[STEPS].buf, v[POS].buf, v[CHAN].buf, v[STEPS].len / (2 * (Py_ssize_t)sizeof(int64_t)),
                  v[SYM].buf, v[FEATURES].buf};
    if (radius < 1 || radius > 64 || lanes < 1 || lanes > MAX_LANES || !checked_layout(&net, &lat, n_pos, n_flat)) {
        PyErr_SetString(PyExc_ValueError, "ctx2 native decoder: bad arguments");
        goto release;
    }
    Stream stream = {v[STATE].buf, v[WORDS].buf, v[WORDS].len / 2, 0};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = decode_latent(&net, &lat, &stream, threads);
    Py_END_ALLOW_THREADS
    if (status == NO_MEMORY) {
        PyErr_NoMemory();
        goto release;
    }
    result = Py_BuildValue("ni", stream.pos, status);
release:
    release_net(&data);
    release_views(v, N_BUFFERS);
    return result;
}

#define MIXTURE_BLOCK 64 /* symbols the encoder's network runs on at once */

/* The encoder's share of mixtures(): positions [begin, end), in blocks inside one channel */
typedef struct {
    const Net *net;
    const int64_t *pos, *chan;
    const double *features;
    int64_t *mu, *inv, *weight, *centre;
    Py_ssize_t begin, end;
    int ok;
} MixtureRange;

static void *mixture_range(void *arg) {
    MixtureRange *m = arg;
    Py_ssize_t K = m->net->mixtures;
    Work w;
    m->ok = work(&w, m->net, MIXTURE_BLOCK);
    for (Py_ssize_t begin = m->begin; m->ok && begin < m->end;) {
        Py_ssize_t end = begin + 1;
        while (end < m->end && end - begin < MIXTURE_BLOCK && m->chan[end] == m->chan[begin]) end++;
        network(m->net, &w, m->features, m->pos + begin, end - begin, m->chan[begin], w.mix, m->centre + begin);
        for (Py_ssize_t r = 0; r < end - begin; r++) {
            for (Py_ssize_t k = 0; k < K; k++) {
                m->mu[(begin + r) * K + k] = w.mix[r * 3 * K + k];
                m->inv[(begin + r) * K + k] = w.mix[r * 3 * K + K + k];
                m->weight[(begin + r) * K + k] = w.mix[r * 3 * K + 2 * K + k];
            }
        }
        begin = end;
    }
    release_work(&w);
    return NULL;
}

PyDoc_STRVAR(mixtures_doc,
"mixtures(pos, chan, features, net, mu, inv, weight, centre, threads) -> None\n\n"
"The distributions of the symbols at ``pos`` (channels ``chan``), all of whose inputs ``features``\n"
"holds (the encoder's case), into the int64 arrays mu, inv, weight (N x K) and centre (N), on up\n"
"to ``threads`` (1 or 2) threads.");

static PyObject *mixtures(PyObject *self, PyObject *args) {
    (void)self;
    enum { POS, CHAN, FEATURES, MU, INV, WEIGHT, CENTRE, N_BUFFERS };
    Py_buffer v[N_BUFFERS];
    memset(v, 0, sizeof(v));
    PyObject *net_tuple, *result = NULL;
    int threads;
    Net net;
    NetData data;
    memset(&data, 0, sizeof data);
    if (!PyArg_ParseTuple(args, "y*y*y*Ow*w*w*w*i", &v[POS], &v[CHAN], &v[FEATURES], &net_tuple, &v[MU], &v[INV],
                          &v[WEIGHT], &v[CENTRE], &threads))
        return NULL;
    if (!parse_net(net_tuple, &net, &data)) goto release;
    Py_ssize_t n = v[POS].len / (Py_ssize_t)sizeof(int64_t), K = net.mixtures;
    Py_ssize_t n_flat = v[FEATURES].len / (Py_ssize_t)sizeof(double);
    if (!(sized(&v[CHAN], n, sizeof(int64_t), "chan") && sized(&v[MU], n * K, sizeof(int64_t), "mu")
          && sized(&v[INV], n * K, sizeof(int64_t), "inv") && sized(&v[WEIGHT], n * K, sizeof(int64_t), "weight")
          && sized(&v[CENTRE], n, sizeof(int64_t), "centre")))
        goto release;
    Latent lat = {NULL, v[POS].buf, v[CHAN].buf, 0, NULL, NULL};
    if (!checked_layout(&net, &lat, n, n_flat)) {
        PyErr_SetString(PyExc_ValueError, "ctx2 native decoder: a position lies outside the latent");
        goto release;
    }
    MixtureRange part = {&net, v[POS].buf, v[CHAN].buf, v[FEATURES].buf, v[MU].buf, v[INV].buf, v[WEIGHT].buf,
                         v[CENTRE].buf, 0, n, 0};
    int ok;
    Py_BEGIN_ALLOW_THREADS
#if THREADS
    /* every symbol's inputs are known: the second thread takes the later half, with no meeting on the way */
    MixtureRange later = part;
    pthread_t thread;
    int started = threads > 1 && n >= 2 * MIXTURE_BLOCK;
    if (started) {
        later.begin = part.end = n / 2;
        started = pthread_create(&thread, NULL, mixture_range, &later) == 0;
        if (!started) part.end = n;
    }
    mixture_range(&part);
    if (started) pthread_join(thread, NULL);
    ok = part.ok && (!started || later.ok);
#else
    (void)threads;
    mixture_range(&part);
    ok = part.ok;
#endif
    Py_END_ALLOW_THREADS
    if (!ok) {
        PyErr_NoMemory();
        goto release;
    }
    result = Py_None;
    Py_INCREF(result);
release:
    release_net(&data);
    release_views(v, N_BUFFERS);
    return result;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, decode_doc},
    {"mixtures", mixtures, METH_VARARGS, mixtures_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_ctx2_native",
    .m_doc = "The ctx2 network and decoder in C (the same integers as ctx2.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__ctx2_native(void) { return PyModule_Create(&module); }
