/* test_comm.c - the data-parallel engine without MPI: R threads of this
 * process are R ranks, each with its own cv_comm over an in-process
 * transport (shared slots and a barrier; reductions in rank order, so every
 * rank gets the same bits).  Covers cv_comm_share; cv_comm_agree / reduce /
 * gather_rows / bcast (values, the lowest failing rank's error everywhere
 * with no data moved, rank 0's cancel flag and deadline as the only ones
 * sampled); every cv_curv quantity over 2 and 3 ranks (uneven shards, a
 * rank without samples, micro-batches within a shard) against the
 * one-process engine, rank 0's cancel flag stopping a product everywhere,
 * wrong or empty shards refused on every rank; trace jobs bound and run per
 * shard against cv_job_run, a bad label in one shard failing every rank.
 *
 * Tolerance: one process sums a quantity over all N samples in float32
 * (GEMMs over the batch), R ranks sum their shards in float32 and add the
 * shards in double, so the two differ by float32 summation order only
 * (measured: at most 1.0e-7 relative, about one float32 ulp).  1e-5 relative
 * (in norm) on doubles leaves a 100x margin, while a wrong row offset, loss
 * scale or missing shard shows as 0.1 to 1. */
#include "testutil.h"

#include <errno.h>
#include <pthread.h>
#include <time.h>

#include "api/arch.h"
#include "api/job.h"
#include "engine/comm.h"
#include "engine/kron.h"

void openblas_set_num_threads(int);

#define MAXR 3
#define WAIT_S 60 /* a rank that does not reach a collective: rank_lost */
#define TOL 1e-5

/* ---- the in-process transport --------------------------------------------- */

typedef struct {
    int size;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int waiting, broken;
    unsigned gen;
    void *slot[MAXR];          /* each rank's contribution to the running collective */
} world;

typedef struct {
    world *w;
    int rank;
    cv_comm_stats st;
} fake;

/* Every rank reaches this point (or, after WAIT_S, "rank_lost" on all). */
static int wait_all(world *w, cv_err *e)
{
    pthread_mutex_lock(&w->mu);
    unsigned g = w->gen;
    if (!w->broken && ++w->waiting == w->size) {
        w->waiting = 0;
        w->gen++;
        pthread_cond_broadcast(&w->cv);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += WAIT_S;
        while (g == w->gen && !w->broken)
            if (pthread_cond_timedwait(&w->cv, &w->mu, &ts) == ETIMEDOUT) {
                w->broken = 1;
                pthread_cond_broadcast(&w->cv);
            }
    }
    int broken = w->broken;
    pthread_mutex_unlock(&w->mu);
    return broken ? cv_err_set(e, CV_EUNAVAILABLE, "rank_lost", "", "a rank did not answer")
                  : 0;
}

#define FOLD(T)                                                                            \
    for (size_t i = 0; i < n; i++) {                                                       \
        T a = ((T *)dst)[i], b = ((const T *)src)[i];                                      \
        ((T *)dst)[i] = op == CV_COMM_SUM ? (T)(a + b) : op == CV_COMM_MIN ? (a < b ? a : b) \
                                                                            : (a > b ? a : b); \
    }

/* dst := dst op src, n elements of type t. */
static void fold(void *dst, const void *src, size_t n, cv_comm_type t, cv_comm_op op)
{
    switch (t) {
    case CV_COMM_F64: FOLD(double) break;
    case CV_COMM_F32: FOLD(float) break;
    case CV_COMM_I64: FOLD(int64_t) break;
    case CV_COMM_I32: FOLD(int32_t) break;
    default: FOLD(uint8_t) break;
    }
}

static void count(fake *f, size_t bytes, double t0)
{
    f->st.collectives++;
    f->st.bytes += bytes;
    f->st.seconds += cv_now_s() - t0;
}

/* Each rank's buffer copied into its slot; every rank folds the slots in
 * rank order (the same sum on every rank). */
static int fake_allreduce(void *ctx, void *buf, size_t n, cv_comm_type t, cv_comm_op op,
                          cv_err *e)
{
    fake *f = ctx;
    world *w = f->w;
    double t0 = cv_now_s();
    size_t bytes = n * cv_comm_type_size(t);
    void *mine = malloc(bytes ? bytes : 1);
    if (!mine)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "allreduce");
    memcpy(mine, buf, bytes);
    w->slot[f->rank] = mine;
    int rc = wait_all(w, e);
    if (!rc) {
        memcpy(buf, w->slot[0], bytes);
        for (int r = 1; r < w->size; r++)
            fold(buf, w->slot[r], n, t, op);
        rc = wait_all(w, e);
    }
    free(mine);
    count(f, bytes, t0);
    return rc;
}

/* In place: rank r's rows read from its buffer by every other rank. */
static int fake_allgather_rows(void *ctx, void *buf, size_t row_len, const size_t *rows,
                               const size_t *first, cv_comm_type t, cv_err *e)
{
    fake *f = ctx;
    world *w = f->w;
    double t0 = cv_now_s();
    size_t es = cv_comm_type_size(t) * row_len, bytes = 0;
    w->slot[f->rank] = buf;
    int rc = wait_all(w, e);
    for (int r = 0; r < w->size && !rc; r++) {
        bytes += rows[r] * es;
        if (r != f->rank && rows[r])
            memcpy((char *)buf + first[r] * es, (char *)w->slot[r] + first[r] * es,
                   rows[r] * es);
    }
    if (!rc)
        rc = wait_all(w, e);
    count(f, bytes, t0);
    return rc;
}

static int fake_bcast(void *ctx, void *buf, size_t n, cv_comm_type t, int root, cv_err *e)
{
    fake *f = ctx;
    world *w = f->w;
    double t0 = cv_now_s();
    size_t bytes = n * cv_comm_type_size(t);
    w->slot[f->rank] = buf;
    int rc = wait_all(w, e);
    if (!rc && f->rank != root)
        memcpy(buf, w->slot[root], bytes);
    if (!rc)
        rc = wait_all(w, e);
    count(f, bytes, t0);
    return rc;
}

static void fake_stats(void *ctx, cv_comm_stats *out) { *out = ((fake *)ctx)->st; }

/* ---- ranks as threads ----------------------------------------------------- */

typedef void (*rank_fn)(const cv_comm *comm, void *arg);

typedef struct {
    fake f;
    cv_comm comm;
    rank_fn fn;
    void *arg;
} rank_thread;

static void *rank_main(void *p)
{
    rank_thread *t = p;
    t->fn(&t->comm, t->arg);
    return NULL;
}

/* Runs fn on R ranks (threads), each with its own comm, and joins them.  fn
 * records what it saw in arg (Check's asserts stay in the main thread). */
static void run_ranks(int R, rank_fn fn, void *arg)
{
    ck_assert_int_le(R, MAXR);
    world w = {.size = R};
    pthread_mutex_init(&w.mu, NULL);
    pthread_cond_init(&w.cv, NULL);
    rank_thread t[MAXR];
    pthread_t th[MAXR];
    for (int r = 0; r < R; r++) {
        t[r] = (rank_thread){.f = {&w, r, {0}}, .fn = fn, .arg = arg};
        t[r].comm = (cv_comm){r, R, &t[r].f, fake_allreduce, fake_allgather_rows, fake_bcast,
                              fake_stats};
        ck_assert_int_eq(pthread_create(&th[r], NULL, rank_main, &t[r]), 0);
    }
    for (int r = 0; r < R; r++)
        pthread_join(th[r], NULL);
    ck_assert_msg(!w.broken, "a rank did not reach a collective within %d s", WAIT_S);
    pthread_mutex_destroy(&w.mu);
    pthread_cond_destroy(&w.cv);
}

/* ---- 1. shares ------------------------------------------------------------ */

START_TEST(shares_cover_the_batch_in_order)
{
    const size_t ns[] = {0, 1, 2, 3, 7, 10, 101};
    const int rs[] = {1, 2, 3, 4, 8};
    for (size_t a = 0; a < sizeof ns / sizeof *ns; a++)
        for (size_t b = 0; b < sizeof rs / sizeof *rs; b++) {
            size_t n = ns[a], next = 0, prev_count = (size_t)-1;
            int R = rs[b];
            for (int r = 0; r < R; r++) {
                size_t first, cnt;
                cv_comm_share(n, R, r, &first, &cnt);
                ck_assert_msg(first == next, "n %zu R %d rank %d: first %zu, want %zu", n, R,
                              r, first, next);
                ck_assert_msg(cnt == n / (size_t)R + ((size_t)r < n % (size_t)R),
                              "n %zu R %d rank %d: %zu samples", n, R, r, cnt);
                ck_assert(cnt <= prev_count); /* the larger shares first */
                prev_count = cnt;
                next = first + cnt;
            }
            ck_assert_msg(next == n, "n %zu R %d: shares end at %zu", n, R, next);
        }
}
END_TEST

/* ---- 2. agreement and the checked collectives ------------------------------ */

/* What rank r of a collectives test saw. */
typedef struct {
    int rc[MAXR][16];
    cv_err e[MAXR][16];
    double f64[MAXR][4];
    float f32[MAXR][3];
    int64_t i64[MAXR][2];
    int32_t i32[MAXR][2];
    double rows[MAXR][2 * 5 * 3]; /* k = 2 blocks of n = 5 rows of 3 */
    double rows2[MAXR][2];        /* n = 2 rows of 1 on 3 ranks */
    double bc[MAXR][3];
    cv_comm_stats stats[MAXR];
} coll;

static void set_err(cv_err *e, int r)
{
    cv_err_set(e, CV_EINVAL, r == 1 ? "first_bad" : "second_bad", r == 1 ? "x.one" : "x.two",
               "rank %d failed", r);
}

static void fill_rows(double *buf, size_t n, size_t len, int k, int r, int R)
{
    size_t first, cnt;
    cv_comm_share(n, R, r, &first, &cnt);
    for (size_t i = 0; i < (size_t)k * n * len; i++)
        buf[i] = -1; /* not this rank's: must be overwritten */
    for (int j = 0; j < k; j++)
        for (size_t s = first; s < first + cnt; s++)
            for (size_t q = 0; q < len; q++)
                buf[((size_t)j * n + s) * len + q] = 1000.0 * j + 10.0 * s + (double)q;
}

static void collectives_rank(const cv_comm *cm, void *arg)
{
    coll *o = arg;
    int r = cm->rank, R = cm->size, i = 0;
    cv_err *e = o->e[r];
    /* 0: all succeed */
    o->rc[r][i] = cv_comm_agree(cm, 0, NULL, &e[i]);
    i++;
    /* 1: ranks 1 and 2 fail: rank 1's error everywhere */
    if (r >= 1)
        set_err(&e[i], r);
    o->rc[r][i] = cv_comm_agree(cm, r >= 1 ? -1 : 0, NULL, &e[i]);
    i++;
    /* 2..5: values */
    o->f64[r][0] = 0.5 + r;
    o->f64[r][1] = -1.25 * r;
    o->f64[r][2] = 1e300 * (r == 0);
    o->f64[r][3] = r;
    o->rc[r][i++] = cv_comm_sum(cm, 0, o->f64[r], 4, NULL, &e[2]);
    o->f32[r][0] = 1.5f * (float)(r + 1);
    o->f32[r][1] = (float)r;
    o->f32[r][2] = -(float)r;
    o->rc[r][i++] = cv_comm_reduce(cm, 0, o->f32[r], 3, CV_COMM_F32, CV_COMM_MAX, NULL, &e[3]);
    o->i64[r][0] = 10 - r;
    o->i64[r][1] = (int64_t)1 << (40 + r);
    o->rc[r][i++] = cv_comm_reduce(cm, 0, o->i64[r], 2, CV_COMM_I64, CV_COMM_MIN, NULL, &e[4]);
    o->i32[r][0] = 7 * r;
    o->i32[r][1] = -r;
    o->rc[r][i++] = cv_comm_reduce(cm, 0, o->i32[r], 2, CV_COMM_I32, CV_COMM_SUM, NULL, &e[5]);
    /* 6: gather 2 blocks of 5 rows; 7: 2 rows on 3 ranks (rank 2 owns none) */
    fill_rows(o->rows[r], 5, 3, 2, r, R);
    o->rc[r][i++] = cv_comm_gather_rows(cm, 0, o->rows[r], 5, 3, 2, CV_COMM_F64, NULL, &e[6]);
    fill_rows(o->rows2[r], 2, 1, 1, r, R);
    o->rc[r][i++] = cv_comm_gather_rows(cm, 0, o->rows2[r], 2, 1, 1, CV_COMM_F64, NULL, &e[7]);
    /* 8: broadcast from the last rank */
    for (int q = 0; q < 3; q++)
        o->bc[r][q] = 100.0 * r + q;
    o->rc[r][i++] = cv_comm_bcast(cm, 0, o->bc[r], 3, CV_COMM_F64, R - 1, NULL, &e[8]);
    /* 9..11: a failure on ranks >= 1 moves no data */
    double keep[4] = {1, 2, 3, 4}, rowsx[2 * 5 * 3];
    for (int q = 9; q <= 11; q++)
        if (r >= 1)
            set_err(&e[q], r);
    o->rc[r][9] = cv_comm_sum(cm, r >= 1 ? -1 : 0, keep, 4, NULL, &e[9]);
    fill_rows(rowsx, 5, 3, 2, r, R);
    o->rc[r][10] = cv_comm_gather_rows(cm, r >= 1 ? -1 : 0, rowsx, 5, 3, 2, CV_COMM_F64, NULL,
                                       &e[10]);
    double bx[3] = {r, r, r};
    o->rc[r][11] = cv_comm_bcast(cm, r >= 1 ? -1 : 0, bx, 3, CV_COMM_F64, 0, NULL, &e[11]);
    double want[2 * 5 * 3];
    fill_rows(want, 5, 3, 2, r, R);
    if (memcmp(keep, (double[4]){1, 2, 3, 4}, sizeof keep) || memcmp(rowsx, want, sizeof want) ||
        bx[0] != r || bx[1] != r || bx[2] != r)
        o->rc[r][9] = 99; /* data moved */
    /* 12: rank 0's cancel flag, set on rank 0 only; 13: another rank's flag is
     * not sampled; 14: rank 0's deadline has passed */
    atomic_int on = 1;
    cv_progress p;
    cv_progress_init(&p);
    p.collective = 1;
    p.cancel = r == 0 ? &on : NULL;
    double v = 1;
    o->rc[r][12] = cv_comm_sum(cm, 0, &v, 1, &p, &e[12]);
    o->rc[r][15] = v != 1; /* no data moved */
    cv_progress_init(&p);
    p.collective = 1;
    p.cancel = r != 0 ? &on : NULL;
    o->rc[r][13] = cv_comm_agree(cm, 0, &p, &e[13]);
    cv_progress_init(&p);
    p.collective = 1;
    p.deadline = r == 0 ? cv_now_s() - 1 : 0;
    o->rc[r][14] = cv_comm_bcast(cm, 0, &v, 1, CV_COMM_F64, 0, &p, &e[14]);
    cv_comm_get_stats(cm, &o->stats[r]);
}

static void want_error(const coll *o, int r, int i, const char *code, const char *field,
                       const char *msg)
{
    ck_assert_msg(o->rc[r][i] == -1, "rank %d step %d: rc %d", r, i, o->rc[r][i]);
    ck_assert_msg(strcmp(o->e[r][i].code, code) == 0 && strcmp(o->e[r][i].field, field) == 0 &&
                      strstr(o->e[r][i].message, msg) != NULL,
                  "rank %d step %d: %s (%s) %s, want %s (%s) %s", r, i, o->e[r][i].code,
                  o->e[r][i].field, o->e[r][i].message, code, field, msg);
}

START_TEST(collectives_agree_and_move_data)
{
    int R = _i;
    coll *o = calloc(1, sizeof *o);
    run_ranks(R, collectives_rank, o);
    double r_sum = R * (R - 1) / 2.0;
    for (int r = 0; r < R; r++) {
        for (int i = 0; i <= 8; i++)
            if (i != 1)
                ck_assert_msg(o->rc[r][i] == 0, "rank %d step %d: %s", r, i, o->e[r][i].message);
        want_error(o, r, 1, "first_bad", "x.one", "rank 1 failed");
        ck_assert_int_eq(o->e[r][1].status, CV_EINVAL);
        ck_assert_double_eq(o->f64[r][0], 0.5 * R + r_sum);
        ck_assert_double_eq(o->f64[r][1], -1.25 * r_sum);
        ck_assert_double_eq(o->f64[r][2], 1e300);
        ck_assert_double_eq(o->f64[r][3], r_sum);
        ck_assert_float_eq(o->f32[r][0], 1.5f * (float)R);
        ck_assert_float_eq(o->f32[r][1], (float)(R - 1));
        ck_assert_float_eq(o->f32[r][2], 0.0f);
        ck_assert_int_eq(o->i64[r][0], 10 - (R - 1));
        ck_assert_int_eq(o->i64[r][1], (int64_t)1 << 40);
        ck_assert_int_eq(o->i32[r][0], 7 * (int)r_sum);
        ck_assert_int_eq(o->i32[r][1], -(int)r_sum);
        for (int j = 0; j < 2; j++)
            for (size_t s = 0; s < 5; s++)
                for (size_t q = 0; q < 3; q++)
                    ck_assert_double_eq(o->rows[r][(j * 5 + s) * 3 + q],
                                        1000.0 * j + 10.0 * s + (double)q);
        ck_assert_double_eq(o->rows2[r][0], 0);
        ck_assert_double_eq(o->rows2[r][1], 10);
        for (int q = 0; q < 3; q++)
            ck_assert_double_eq(o->bc[r][q], 100.0 * (R - 1) + q);
        for (int i = 9; i <= 11; i++)
            want_error(o, r, i, "first_bad", "x.one", "rank 1 failed");
        want_error(o, r, 12, "cancelled", "", "cancelled");
        ck_assert_int_eq(o->e[r][12].status, CV_ECANCELLED);
        ck_assert_msg(o->rc[r][13] == 0, "rank %d: a cancel flag of rank 1 or 2 was sampled: %s",
                      r, o->e[r][13].code);
        want_error(o, r, 14, "job_timeout", "", "time limit");
        ck_assert_int_eq(o->e[r][14].status, CV_ETIMEOUT);
        ck_assert_msg(o->rc[r][15] == 0, "rank %d: a cancelled sum moved data", r);
        ck_assert(o->stats[r].collectives > 0 && o->stats[r].bytes > 0);
    }
    free(o);
}
END_TEST

/* One process (no comm, or a comm of one rank) is the plain path: rc, with
 * the progress record checked. */
START_TEST(one_process_is_the_plain_path)
{
    cv_comm one = {0, 1, NULL, NULL, NULL, NULL, NULL};
    const cv_comm *cms[] = {NULL, &one};
    for (int i = 0; i < 2; i++) {
        cv_err e;
        ck_assert(!cv_comm_active(cms[i]));
        ck_assert_int_eq(cv_comm_size(cms[i]), 1);
        ck_assert_int_eq(cv_comm_agree(cms[i], 0, NULL, &e), 0);
        set_err(&e, 1);
        ck_assert_int_eq(cv_comm_agree(cms[i], -1, NULL, &e), -1);
        ck_assert_str_eq(e.code, "first_bad");
        double v[2] = {1, 2};
        ck_assert_int_eq(cv_comm_sum(cms[i], 0, v, 2, NULL, &e), 0);
        ck_assert(v[0] == 1 && v[1] == 2);
        ck_assert_int_eq(cv_comm_gather_rows(cms[i], 0, v, 2, 1, 1, CV_COMM_F64, NULL, &e), 0);
        ck_assert(v[0] == 1 && v[1] == 2);
        atomic_int on = 1;
        cv_progress p;
        cv_progress_init(&p);
        p.cancel = &on;
        ck_assert_int_eq(cv_comm_bcast(cms[i], 0, v, 2, CV_COMM_F64, 0, &p, &e), -1);
        ck_assert_str_eq(e.code, "cancelled");
        cv_comm_stats st;
        cv_comm_get_stats(cms[i], &st);
        ck_assert_uint_eq(st.collectives, 0);
    }
}
END_TEST

/* ---- 3. the engine over ranks ---------------------------------------------- */

#define K 2 /* vectors per product */

static const char *CNN =
    "{\"input_shape\": [2, 5, 5], \"layers\": ["
    "{\"type\": \"Conv2d\", \"in_channels\": 2, \"out_channels\": 3, \"kernel_size\": 3,"
    " \"padding\": 1},"
    "{\"type\": \"BatchNorm2d\", \"num_features\": 3},"
    "{\"type\": \"ReLU\"},"
    "{\"type\": \"MaxPool2d\", \"kernel_size\": 2},"
    "{\"type\": \"Flatten\"},"
    "{\"type\": \"Linear\", \"in_features\": 12, \"out_features\": 3}],"
    "\"loss\": {\"type\": \"MSELoss\"}}";

/* Model 0: an MLP with CrossEntropy (mean over the targets not ignored in
 * the whole batch); 1: a CNN
 * with BatchNorm, max pooling and MSELoss (mean over N*C). */
static void build(int which, cv_model *m, cv_dataset *d, size_t n)
{
    if (which == 0) {
        const tu_layer net[] = {{&cv_linear_class, 6}, {&cv_tanh_class, 0},
                                {&cv_linear_class, 4}};
        tu_model(m, 5, net, 3, CV_LOSS_CE, CV_RED_MEAN, 21);
    } else {
        cv_err e;
        memset(m, 0, sizeof *m);
        ck_assert_msg(cv_arch_parse(CNN, strlen(CNN), m, &e) == 0, "parse: %s", e.message);
        ck_assert_int_eq(cv_model_alloc(m), 0);
        cv_rng r;
        cv_rng_seed(&r, 12);
        for (size_t q = 0; q < m->nparams_total; q++)
            m->params[q] = (float)(0.8 * (2 * cv_rng_uniform(&r) - 1));
        for (size_t q = 0; q < m->nbuffers_total; q++)
            m->buffers[q] = (float)(0.5 + cv_rng_uniform(&r));
    }
    tu_data(d, m, n, 50 + (uint64_t)which);
    if (which == 0) /* ignored targets: the mean's 1/N counts the whole batch's */
        for (size_t i = 1; i < n; i += 4)
            d->labels[i] = -100;
}

/* The inputs every rank (and the one-process reference) gets. */
typedef struct {
    const cv_model *m;
    const cv_dataset *d;
    size_t N, D, C, mb;
    double *X, *step;
    float *cot;
    size_t gidx[4];
} inputs;

/* Everything one engine returned. */
typedef struct {
    int rc;
    char what[32];
    cv_err e;
    size_t n;
    double loss, loss_at, scale; /* scale: the loss state's c */
    float *outputs, *jvp, *sgrad; /* sgrad: the loss state's d l_n / dh (N x C) */
    double *grad, *mv[CV_CURV_EXACT_COUNT], *q[CV_CURV_EXACT_COUNT], *psg, *vjp, *gram;
    double *kron[3];   /* cv_curv_kron's A and B of every factor, per fisher type */
    size_t kron_len;
    double *ekfac[3];  /* cv_curv_ekfac's values of every factor, concatenated */
    size_t ekfac_len;
    double *kfra;      /* cv_curv_kfra's factors (the MLP; the CNN is refused: kfra_rc) */
    double *acp;       /* cv_curv_kron's with acp (A, alpha I: the max over the ranks) */
    int kfra_rc;
    cv_batch gathered;
} quantities;

static void q_alloc(quantities *r, const inputs *in)
{
    memset(r, 0, sizeof *r);
    size_t D = in->D, N = in->N, C = in->C;
    r->outputs = malloc(sizeof(float) * N * C);
    r->sgrad = malloc(sizeof(float) * N * C);
    r->jvp = malloc(sizeof(float) * K * N * C);
    r->grad = malloc(sizeof(double) * D);
    for (int k = 0; k < CV_CURV_EXACT_COUNT; k++) {
        r->mv[k] = malloc(sizeof(double) * K * D);
        r->q[k] = malloc(sizeof(double) * K);
    }
    r->psg = malloc(sizeof(double) * N * D);
    r->vjp = malloc(sizeof(double) * K * D);
    r->gram = malloc(sizeof(double) * K * N * K * N);
}

static void q_free(quantities *r)
{
    free(r->outputs), free(r->sgrad), free(r->jvp), free(r->grad), free(r->psg), free(r->vjp), free(r->gram);
    for (int k = 0; k < CV_CURV_EXACT_COUNT; k++)
        free(r->mv[k]), free(r->q[k]);
    for (int k = 0; k < 3; k++)
        free(r->kron[k]), free(r->ekfac[k]);
    free(r->kfra);
    free(r->acp);
    cv_dataset_free(&r->gathered);
}

/* Every quantity of an engine on batch b (a rank's shard with comm, else the
 * whole batch); stops at the first failure (agreed: the same on every rank). */
static void evaluate(const inputs *in, const cv_batch *b, const cv_comm *comm, quantities *r)
{
    cv_curv_options o = {.mc_samples = 2, .seed = 77, .micro_batch = in->mb, .max_vectors = K,
                         .kind = CV_CURV_HESSIAN, .pairs = 1, .comm = comm};
    cv_block blk;
    cv_block_full(in->m, &blk);
    cv_err *e = &r->e;
    size_t N = in->N;
#define STEP(name, call)                                                                   \
    do {                                                                                   \
        snprintf(r->what, sizeof r->what, "%s", name);                                     \
        if ((r->rc = (call)) != 0)                                                         \
            goto out;                                                                      \
    } while (0)
    cv_curv *c = cv_curv_new(in->m, b, &o, e);
    STEP("cv_curv_new", c ? 0 : -1);
    r->n = cv_curv_batch_size(c);
    r->loss = cv_curv_loss(c);
    memcpy(r->outputs, cv_curv_outputs(c), sizeof(float) * N * in->C);
    cv_loss_sample_grad(cv_curv_loss_state(c), r->sgrad); /* over the whole batch's targets */
    r->scale = cv_curv_loss_state(c)->scale;
    STEP("gradient", cv_curv_gradient(c, &blk, r->grad, e));
    for (int k = 0; k < CV_CURV_EXACT_COUNT; k++) {
        STEP(cv_curvature_name(k), cv_curv_matvec(c, k, &blk, K, in->X, r->mv[k], e));
        STEP("quadform", cv_curv_quadform(c, k, &blk, K, in->X, r->q[k], e));
    }
    STEP("per_sample_gradients", cv_curv_per_sample_gradients(c, &blk, r->psg, e));
    STEP("jvp", cv_curv_jvp(c, &blk, K, in->X, r->jvp, e));
    STEP("vjp", cv_curv_vjp(c, &blk, K, in->cot, r->vjp, e));
    STEP("gram", cv_curv_gram(c, &blk, K, in->cot, r->gram, e));
    STEP("loss_at", cv_curv_loss_at(c, &blk, in->step, &r->loss_at, e));
    STEP("gather_samples", cv_curv_gather_samples(c, in->gidx, 4, &r->gathered, e));
    for (int ft = 0; ft < 3; ft++) { /* mc with reduce, the others expand */
        cv_kron kr;
        cv_kron_options ko = {(cv_kron_fisher)ft, ft == 1 ? CV_KRON_REDUCE : CV_KRON_EXPAND, 0, 0};
        int rc = cv_curv_kron(c, &ko, &kr, e);
        r->kron_len = 0;
        for (int i = 0; i < kr.nfactors; i++)
            r->kron_len += (size_t)kr.factors[i].dim_a * kr.factors[i].dim_a +
                           (size_t)kr.factors[i].dim_b * kr.factors[i].dim_b;
        double **s = NULL;
        if (!rc) {
            rc = cv_curv_ekfac(c, &ko, &kr, &s, e);
            r->ekfac_len = 0;
            for (int i = 0; i < kr.nfactors; i++)
                r->ekfac_len += (size_t)kr.factors[i].dim_a * kr.factors[i].dim_b;
            r->ekfac[ft] = malloc(sizeof(double) * (r->ekfac_len + 1));
            for (int i = 0, at = 0; !rc && i < kr.nfactors; i++) {
                size_t d = (size_t)kr.factors[i].dim_a * kr.factors[i].dim_b;
                memcpy(r->ekfac[ft] + at, s[i], sizeof(double) * d);
                at += (int)d;
            }
            for (int i = 0; s && i < kr.nfactors; i++)
                free(s[i]);
            free(s);
        }
        r->kron[ft] = kr.data;
        kr.data = NULL;
        cv_kron_free(&kr);
        STEP("kron / ekfac", rc);
    }
    {
        cv_kron kr;
        cv_kron_options ko = {CV_KRON_TYPE2, CV_KRON_EXPAND, 1, 0}; /* ACP, alpha "max" */
        int rc = cv_curv_kron(c, &ko, &kr, e);
        r->acp = kr.data;
        kr.data = NULL;
        for (int i = 0; !rc && i < kr.nfactors; i++)
            rc = kr.factors[i].alpha > 0 ? 0 : -1;
        cv_kron_free(&kr);
        STEP("acp", rc);
    }
    {
        cv_kron kr;
        cv_err ke;
        r->kfra_rc = cv_curv_kfra(c, NULL, &kr, &ke);
        r->kfra = kr.data; /* the same layout as kron's */
        kr.data = NULL;
        cv_kron_free(&kr);
    }
    snprintf(r->what, sizeof r->what, "done");
out:
    cv_curv_free(c);
#undef STEP
}

typedef struct {
    const inputs *in;
    quantities res[MAXR];
} ranks_job;

static void engine_rank(const cv_comm *cm, void *arg)
{
    ranks_job *j = arg;
    size_t first, n;
    cv_comm_share(j->in->N, cm->size, cm->rank, &first, &n);
    cv_batch shard;
    cv_batch_view(j->in->d, first, n, &shard);
    evaluate(j->in, &shard, cm, &j->res[cm->rank]);
}

static void near(const double *a, const double *b, size_t n, const char *what, const char *tag)
{
    double r = tu_relerr(a, b, n, 1e-12);
    ck_assert_msg(r <= TOL, "%s %s: relative difference %.3g", tag, what, r);
}

static void near_f(const float *a, const float *b, size_t n, const char *what, const char *tag)
{
    double *x = malloc(sizeof(double) * n), *y = malloc(sizeof(double) * n);
    for (size_t i = 0; i < n; i++) {
        x[i] = a[i];
        y[i] = b[i];
    }
    near(x, y, n, what, tag);
    free(x);
    free(y);
}

/* A rank's quantities against the one-process engine's. */
static void compare(const quantities *g, const quantities *w, const inputs *in, const char *tag)
{
    size_t D = in->D, N = in->N, C = in->C;
    ck_assert_uint_eq(g->n, N);
    ck_assert_msg(fabs(g->loss - w->loss) <= TOL * fabs(w->loss), "%s loss %.10g vs %.10g", tag,
                  g->loss, w->loss);
    near_f(g->outputs, w->outputs, N * C, "outputs", tag);
    near_f(g->sgrad, w->sgrad, N * C, "loss state's output gradients", tag);
    ck_assert_msg(g->scale == w->scale, "%s loss scale %g vs %g", tag, g->scale, w->scale);
    near(g->grad, w->grad, D, "gradient", tag);
    for (int k = 0; k < CV_CURV_EXACT_COUNT; k++) {
        near(g->mv[k], w->mv[k], K * D, cv_curvature_name(k), tag);
        near(g->q[k], w->q[k], K, "quadratic forms", tag);
    }
    near(g->psg, w->psg, N * D, "per-sample gradients", tag);
    near_f(g->jvp, w->jvp, K * N * C, "jvp", tag);
    near(g->vjp, w->vjp, K * D, "vjp", tag);
    near(g->gram, w->gram, K * N * K * N, "Gram matrix", tag);
    ck_assert_uint_eq(g->kron_len, w->kron_len);
    ck_assert_uint_gt(w->kron_len, 0);
    for (int k = 0; k < 3; k++)
        near(g->kron[k], w->kron[k], w->kron_len, "Kronecker factors", tag);
    ck_assert_uint_eq(g->ekfac_len, w->ekfac_len);
    ck_assert_uint_gt(w->ekfac_len, 0);
    /* not mc with reduce: A = mean of abar abar^T is singular (rank <= N), and the
     * per-position gradients that EKFAC rotates are not in its range, so the
     * values in A's null space depend on the (arbitrary) basis LAPACK picks
     * there; the ranks' bits still agree (same_bits) */
    for (int k = 0; k < 3; k += 2)
        near(g->ekfac[k], w->ekfac[k], w->ekfac_len, "EKFAC values", tag);
    ck_assert_int_eq(g->kfra_rc, w->kfra_rc);
    if (!w->kfra_rc) /* the MLP: KFRA's factors have the layout of type-2's */
        near(g->kfra, w->kfra, w->kron_len, "KFRA factors", tag);
    near(g->acp, w->acp, w->kron_len, "ACP factors (A, alpha I)", tag);
    ck_assert_msg(fabs(g->loss_at - w->loss_at) <= TOL * fabs(w->loss_at),
                  "%s loss at a step %.10g vs %.10g", tag, g->loss_at, w->loss_at);
    /* gathered samples: exactly the dataset's rows */
    const cv_batch *gb = &g->gathered;
    ck_assert_uint_eq(gb->n, 4);
    size_t sx = cv_shape_numel(&in->d->x_shape), sy = cv_shape_numel(&in->d->y_shape);
    for (int i = 0; i < 4; i++) {
        size_t s = in->gidx[i];
        ck_assert_msg(memcmp(gb->x + i * sx, in->d->x + s * sx, sizeof(float) * sx) == 0,
                      "%s gathered sample %zu: x differs", tag, s);
        ck_assert_msg(in->d->y_is_index
                          ? memcmp(gb->labels + i * sy, in->d->labels + s * sy, 8 * sy) == 0
                          : memcmp(gb->targets + i * sy, in->d->targets + s * sy, 4 * sy) == 0,
                      "%s gathered sample %zu: y differs", tag, s);
    }
}

#define SAME(field, bytes)                                                                 \
    ck_assert_msg(memcmp(g->field, z->field, bytes) == 0, "%s: %s differs from rank 0's", tag, \
                  #field)

/* Rank r's numbers are rank 0's, bit for bit (the reductions run in rank
 * order on every rank). */
static void same_bits(const quantities *g, const quantities *z, const inputs *in,
                      const char *tag)
{
    size_t D = in->D, N = in->N, C = in->C;
    ck_assert_msg(g->loss == z->loss && g->loss_at == z->loss_at, "%s: losses differ", tag);
    SAME(outputs, sizeof(float) * N * C);
    SAME(sgrad, sizeof(float) * N * C);
    SAME(grad, sizeof(double) * D);
    for (int k = 0; k < CV_CURV_EXACT_COUNT; k++) {
        SAME(mv[k], sizeof(double) * K * D);
        SAME(q[k], sizeof(double) * K);
    }
    SAME(psg, sizeof(double) * N * D);
    SAME(jvp, sizeof(float) * K * N * C);
    SAME(vjp, sizeof(double) * K * D);
    SAME(gram, sizeof(double) * K * N * K * N);
    for (int k = 0; k < 3; k++) {
        SAME(kron[k], sizeof(double) * z->kron_len);
        SAME(ekfac[k], sizeof(double) * z->ekfac_len);
    }
    ck_assert_int_eq(g->kfra_rc, z->kfra_rc);
    if (!z->kfra_rc)
        SAME(kfra, sizeof(double) * z->kron_len);
    SAME(acp, sizeof(double) * z->kron_len);
}

/* Variant v: model v / 6; ranks and batch (R, N) = (2, 7), (3, 7), (3, 2) by
 * (v / 2) % 3; micro_batch 0 (one per shard) or 2 by v % 2. */
START_TEST(engine_over_ranks_matches_one_process)
{
    int model = _i / 6, R = (_i / 2) % 3 == 0 ? 2 : 3;
    size_t N = (_i / 2) % 3 == 2 ? 2 : 7, mb = _i % 2 ? 2 : 0;
    openblas_set_num_threads(1);
    cv_model m;
    cv_dataset d;
    build(model, &m, &d, N + 3); /* the batch is the first N samples of a larger set */
    inputs in = {.m = &m, .d = &d, .N = N, .D = m.nparams_total,
                 .C = (size_t)cv_model_output_dim(&m), .mb = mb,
                 .gidx = {N - 1, 0, N / 2, N - 1}};
    in.X = malloc(sizeof(double) * K * in.D);
    in.step = malloc(sizeof(double) * in.D);
    in.cot = malloc(sizeof(float) * K * N * in.C);
    cv_rng rng;
    cv_rng_seed(&rng, 5);
    cv_rng_gaussian(&rng, in.X, K * in.D);
    for (size_t i = 0; i < in.D; i++)
        in.step[i] = 1e-2 * in.X[i];
    for (size_t i = 0; i < K * N * in.C; i++)
        in.cot[i] = (float)cv_rng_normal(&rng);
    char tag[96];
    snprintf(tag, sizeof tag, "%s R %d N %zu micro_batch %zu", model ? "cnn" : "mlp", R, N,
             mb);

    quantities want;
    q_alloc(&want, &in);
    cv_batch whole;
    cv_batch_view(&d, 0, N, &whole);
    inputs one = in;
    one.mb = 0;
    evaluate(&one, &whole, NULL, &want);
    ck_assert_msg(want.rc == 0, "%s one process, %s: %s", tag, want.what, want.e.message);

    ranks_job *j = calloc(1, sizeof *j);
    j->in = &in;
    for (int r = 0; r < R; r++)
        q_alloc(&j->res[r], &in);
    run_ranks(R, engine_rank, j);
    for (int r = 0; r < R; r++) {
        char rt[128];
        snprintf(rt, sizeof rt, "%s rank %d", tag, r);
        ck_assert_msg(j->res[r].rc == 0, "%s, %s: %s (%s)", rt, j->res[r].what,
                      j->res[r].e.message, j->res[r].e.code);
        compare(&j->res[r], &want, &in, rt);
        if (r)
            same_bits(&j->res[r], &j->res[0], &in, rt);
    }
    for (int r = 0; r < R; r++)
        q_free(&j->res[r]);
    free(j);
    q_free(&want);
    free(in.X), free(in.step), free(in.cot);
    cv_model_free(&m);
    tu_data_free(&d);
}
END_TEST

/* Rank 0's cancel flag (set after the engine was built, on rank 0 only)
 * stops a product on every rank; another rank's flag is never sampled. */
typedef struct {
    const inputs *in;
    int cancel_rank;
    int rc[MAXR];
    cv_err e[MAXR];
} cancel_job;

static void cancel_rank(const cv_comm *cm, void *arg)
{
    cancel_job *j = arg;
    int r = cm->rank;
    size_t first, n;
    cv_comm_share(j->in->N, cm->size, r, &first, &n);
    cv_batch shard;
    cv_batch_view(j->in->d, first, n, &shard);
    atomic_int cancel = 0;
    cv_progress p;
    cv_progress_init(&p);
    p.collective = 1;
    p.cancel = &cancel;
    cv_curv_options o = {.mc_samples = 1, .micro_batch = 2, .kind = CV_CURV_GGN,
                         .progress = &p, .comm = cm};
    cv_curv *c = cv_curv_new(j->in->m, &shard, &o, &j->e[r]);
    j->rc[r] = c ? 0 : 100;
    if (!c)
        return;
    cv_block blk;
    cv_block_full(j->in->m, &blk);
    double *Y = malloc(sizeof(double) * j->in->D);
    atomic_store(&cancel, r == j->cancel_rank);
    j->rc[r] = cv_curv_matvec(c, CV_CURV_GGN, &blk, 1, j->in->X, Y, &j->e[r]);
    free(Y);
    cv_curv_free(c);
}

START_TEST(rank0_cancel_stops_every_rank)
{
    openblas_set_num_threads(1);
    cv_model m;
    cv_dataset d;
    build(0, &m, &d, 7);
    inputs in = {.m = &m, .d = &d, .N = 7, .D = m.nparams_total};
    in.X = calloc(in.D, sizeof(double));
    for (int who = 0; who < 3; who++) {
        cancel_job j = {.in = &in, .cancel_rank = who};
        run_ranks(3, cancel_rank, &j);
        for (int r = 0; r < 3; r++) {
            if (who == 0) {
                ck_assert_msg(j.rc[r] == -1 && strcmp(j.e[r].code, "cancelled") == 0,
                              "rank %d: rc %d (%s)", r, j.rc[r], j.e[r].code);
                ck_assert_int_eq(j.e[r].status, CV_ECANCELLED);
            } else {
                ck_assert_msg(j.rc[r] == 0, "rank %d's cancel flag stopped rank %d: %s", who,
                              r, j.e[r].message);
            }
        }
    }
    free(in.X);
    cv_model_free(&m);
    tu_data_free(&d);
}
END_TEST

/* Shards that are not the ranks' cv_comm_share of the batch (or an empty
 * batch on every rank) fail cv_curv_new on every rank with one error. */
typedef struct {
    const cv_model *m;
    const cv_dataset *d;
    size_t first[MAXR], n[MAXR];
    int ok[MAXR];
    cv_err e[MAXR];
} shard_job;

static void shard_rank(const cv_comm *cm, void *arg)
{
    shard_job *j = arg;
    int r = cm->rank;
    cv_batch shard;
    cv_batch_view(j->d, j->first[r], j->n[r], &shard);
    cv_curv_options o = {.comm = cm};
    cv_curv *c = cv_curv_new(j->m, &shard, &o, &j->e[r]);
    j->ok[r] = c != NULL;
    cv_curv_free(c);
}

START_TEST(wrong_or_empty_shards_fail_every_rank)
{
    openblas_set_num_threads(1);
    cv_model m;
    cv_dataset d;
    build(0, &m, &d, 7);
    shard_job j = {.m = &m, .d = &d, .first = {0, 3}, .n = {3, 4}}; /* the share is 4, 3 */
    run_ranks(2, shard_rank, &j);
    for (int r = 0; r < 2; r++)
        ck_assert_msg(!j.ok[r] && strcmp(j.e[r].code, "internal") == 0 &&
                          strstr(j.e[r].message, "rank 0 holds 3 samples") != NULL,
                      "rank %d: %s (%s)", r, j.e[r].message, j.e[r].code);
    shard_job none = {.m = &m, .d = &d}; /* N = 0 */
    run_ranks(3, shard_rank, &none);
    for (int r = 0; r < 3; r++)
        ck_assert_msg(!none.ok[r] && strcmp(none.e[r].code, "empty_batch") == 0,
                      "rank %d: %s (%s)", r, none.e[r].message, none.e[r].code);
    cv_model_free(&m);
    tu_data_free(&d);
}
END_TEST

/* ---- 4. a job bound and run per shard ------------------------------------- */

typedef struct {
    const char *doc;
    const cv_model *m;
    const cv_dataset *d;
    cJSON *res[MAXR];
    cv_err e[MAXR];
} job_run;

static void job_rank(const cv_comm *cm, void *arg)
{
    job_run *j = arg;
    int r = cm->rank;
    cJSON *doc = cJSON_Parse(j->doc);
    cv_job_spec *spec = doc ? cv_job_parse(doc, &j->e[r]) : NULL;
    cJSON_Delete(doc);
    if (!spec) /* the same document on every rank: all fail here or none */
        return;
    cv_batch shard;
    if (cv_job_bind_shard(spec, j->m, j->d, cm, &shard, &j->e[r]) == 0) {
        size_t n = cv_job_batch_size(spec, j->d->n);
        cv_progress p;
        cv_progress_init(&p);
        j->res[r] = cv_job_exec_shard(spec, j->m, &shard, n, cm, NULL, &p, &j->e[r]);
        cv_dataset_free(&shard);
    }
    cv_job_spec_free(spec);
}

START_TEST(trace_job_over_ranks)
{
    static const char *const docs[] = {
        "{\"op\":\"trace\",\"curvature\":\"ggn\",\"seed\":4,\"batch\":{\"offset\":1,"
        "\"size\":7},\"options\":{\"method\":\"hutchinson\",\"max_probes\":12,\"tol\":0}}",
        "{\"op\":\"trace\",\"curvature\":\"hessian\",\"seed\":9,\"micro_batch\":2,"
        "\"options\":{\"method\":\"hutchinson\",\"max_probes\":8,\"tol\":0}}",
    };
    openblas_set_num_threads(1);
    cv_model m;
    cv_dataset d;
    build(_i % 2, &m, &d, 9);
    const char *doc = docs[_i % 2];
    int R = _i < 2 ? 2 : 3;
    cJSON *jd = cJSON_Parse(doc);
    cv_err e;
    cJSON *one = cv_job_run(jd, &m, &d, NULL, NULL, &e);
    cJSON_Delete(jd);
    ck_assert_msg(one != NULL, "one process: %s", e.message);
    double want = tu_num(one, "trace");
    job_run j = {.doc = doc, .m = &m, .d = &d};
    run_ranks(R, job_rank, &j);
    for (int r = 0; r < R; r++) {
        ck_assert_msg(j.res[r] != NULL, "R %d rank %d: %s (%s)", R, r, j.e[r].message,
                      j.e[r].code);
        double got = tu_num(j.res[r], "trace");
        ck_assert_msg(fabs(got - want) <= 1e-6 * fabs(want), "R %d rank %d: trace %.10g vs %.10g",
                      R, r, got, want);
        ck_assert_int_eq((int)tu_num(j.res[r], "ranks"), R);
        ck_assert_int_eq((int)tu_num(j.res[r], "batch_size"), (int)tu_num(one, "batch_size"));
        ck_assert_int_eq((int)tu_num(j.res[r], "probes"), (int)tu_num(one, "probes"));
        const cJSON *cs = cJSON_GetObjectItem(j.res[r], "communication");
        ck_assert_msg(cs && tu_num(cs, "collectives") > 0 && tu_num(cs, "bytes") > 0,
                      "rank %d: no communication reported", r);
        ck_assert_double_eq(got, tu_num(j.res[0], "trace"));
    }
    for (int r = 0; r < R; r++)
        cJSON_Delete(j.res[r]);
    ck_assert_ptr_null(cJSON_GetObjectItem(one, "ranks"));
    cJSON_Delete(one);
    cv_model_free(&m);
    tu_data_free(&d);
}
END_TEST

/* A shard with a bad label (on the last rank only) fails the bind on every
 * rank with that rank's error. */
START_TEST(bad_shard_fails_every_rank)
{
    openblas_set_num_threads(1);
    cv_model m;
    cv_dataset d;
    build(0, &m, &d, 7);
    d.labels[6] = 99; /* sample 6: the last rank's shard */
    job_run j = {.doc = "{\"op\":\"trace\",\"options\":{\"max_probes\":2}}", .m = &m, .d = &d};
    run_ranks(3, job_rank, &j);
    for (int r = 0; r < 3; r++) {
        ck_assert_msg(j.res[r] == NULL, "rank %d ran the job", r);
        ck_assert_msg(strstr(j.e[r].message, "rank 2's shard") != NULL, "rank %d: %s (%s)", r,
                      j.e[r].message, j.e[r].code);
    }
    cv_model_free(&m);
    tu_data_free(&d);
}
END_TEST

static Suite *comm_suite(void)
{
    Suite *s = suite_create("comm");
    TCase *t = tcase_create("collectives");
    tcase_add_test(t, shares_cover_the_batch_in_order);
    tcase_add_loop_test(t, collectives_agree_and_move_data, 2, 4);
    tcase_add_test(t, one_process_is_the_plain_path);
    suite_add_tcase(s, t);
    TCase *c = tcase_create("engine");
    tcase_add_loop_test(c, engine_over_ranks_matches_one_process, 0, 12);
    tcase_add_test(c, rank0_cancel_stops_every_rank);
    tcase_add_test(c, wrong_or_empty_shards_fail_every_rank);
    suite_add_tcase(s, c);
    TCase *j = tcase_create("job");
    tcase_add_loop_test(j, trace_job_over_ranks, 0, 4);
    tcase_add_test(j, bad_shard_fails_every_rank);
    suite_add_tcase(s, j);
    return s;
}

int main(void) { return tu_main(comm_suite); }
