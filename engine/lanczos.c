/* lanczos.c - the Lanczos process with full or partial reorthogonalization
 * (fixed number of steps: cv_lanczos) and Lanczos top-k / bottom-k /
 * magnitude-k eigenpairs with a Ritz-residual stopping test
 * (cv_eigen_lanczos). */
#include <cblas.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "bigmem.h"
#include "est_util.h"
#include "names.h"
#include "reorth.h"

/* From this dimension on, the full reorthogonalization reads a float32
 * shadow of the basis (reorth.h): half the memory traffic of the dominant
 * cost, orthogonality at the float32 operator's own precision.  Smaller
 * problems keep the double pass (exact-arithmetic tests, no memory bound). */
#define CV_LANCZOS_SHADOW_MIN ((size_t)1 << 16)

/* index = cv_which */
static const char *const which_names[] = {"largest", "smallest", "magnitude"};

int cv_which_from_name(const char *name) { return cv_name_index(name, which_names, 3); }

const char *cv_which_name(cv_which w) { return cv_name_or(which_names, 3, (int)w, "largest"); }

void cv_lanczos_options_default(cv_lanczos_options *o)
{
    memset(o, 0, sizeof *o);
    o->steps = 100;
}

void cv_lanczos_result_free(cv_lanczos_result *r)
{
    if (!r)
        return;
    free(r->alpha);
    free(r->beta);
    free(r->basis);
    memset(r, 0, sizeof *r);
}

void cv_eigen_options_default(cv_eigen_options *o)
{
    memset(o, 0, sizeof *o);
    o->k = 1;
    o->which = CV_WHICH_LARGEST;
    o->tol = 1e-6;
}

void cv_eigen_result_free(cv_eigen_result *r)
{
    if (!r)
        return;
    free(r->eigenvalues);
    free(r->residuals);
    free(r->eigenvectors);
    memset(r, 0, sizeof *r);
}

/* ------------------------------------------------------- Lanczos process */

/* A Lanczos run: basis V (n x cap, grown up to max_cap columns), T's
 * diagonal alpha and off-diagonal beta, and the last residual w with
 * ||w|| = beta[steps-1]. */
typedef struct {
    const cv_linop *op;
    size_t n;
    cv_rng *rng;
    int cap, max_cap, steps, restarts;
    int block_start;        /* first vector of the current Krylov block (last restart) */
    double *V, *alpha, *beta, *w, *h, *tmp;
    float *Vf;              /* float32 shadow of V for the reorthogonalization, or NULL */
    float *fwork;           /* cv_reorth_cgs workspace */
    int shadowed;           /* columns of Vf written (lz_next_vector writes its own) */
    double tnorm;           /* running estimate of ||T|| */
    long matvecs;
    int reorths;            /* steps that reorthogonalized */
    /* V holds only the last two vectors and the basis lives in Vf alone, a
     * mapping of cap columns (lz_prefaulted, lz_remap) */
    int ring;
    /* partial reorthogonalization: omega[k] ~ v_j . v_k, omega_prev[k] ~
     * v_(j-1) . v_k (k <= j), omega_next the update's output; force:
     * reorthogonalize the next step too */
    int partial, force;
    double *omega, *omega_prev, *omega_next;
} lz_state;

static size_t lz_vf_bytes(const lz_state *s, int cols)
{
    return sizeof(float) * s->n * (size_t)cols;
}

static void lz_free(lz_state *s)
{
    free(s->V);
    free(s->alpha);
    free(s->beta);
    free(s->w);
    free(s->h);
    free(s->tmp);
    if (s->ring && s->Vf)
        munmap(s->Vf, lz_vf_bytes(s, s->cap));
    else
        free(s->Vf);
    free(s->fwork);
    free(s->omega);
    free(s->omega_prev);
    free(s->omega_next);
    memset(s, 0, sizeof *s);
}

/* Pages of [p, p + bytes) advised huge (MADV_HUGEPAGE) and then populated
 * in one call.  Populated 4 KiB pages are not enough: on the VMs this is
 * measured on, the first user-space store to each still costs ~5 us (3 ms a
 * 2.7 MB basis vector of the bench MLP, a third of a Lanczos step's vector
 * work); with huge pages the store runs at cache speed.  Where either advice
 * is unknown, a no-op (pages then fault in on first touch). */
static void lz_populate(void *p, size_t bytes)
{
#ifdef MADV_HUGEPAGE
    (void)madvise(p, bytes, MADV_HUGEPAGE);
#endif
#ifdef MADV_POPULATE_WRITE
    (void)madvise(p, bytes, MADV_POPULATE_WRITE);
#endif
}

/* The ring mode's float32 basis, mapped with its pages populated in one
 * call (lz_populate): on virtual machines, faulting in hundreds of MB page
 * by page as the basis grows costs seconds.  Grown with lz_remap. */
static float *lz_prefaulted(lz_state *s, int cols, cv_err *e)
{
    void *p = mmap(NULL, lz_vf_bytes(s, cols), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED)
        lz_populate(p, lz_vf_bytes(s, cols));
    if (p == MAP_FAILED) {
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                   "Lanczos basis of %d vectors of %zu floats: out of memory", cols, s->n);
        return NULL;
    }
    return p;
}

/* count x size bytes for vectors that are written before they are read
 * (basis, residual, float32 work): populated, huge-page advised pages
 * (bigmem.h) without CV_EST_ALLOC's zeroing pass over tens of MB. */
static void *lz_vectors(size_t count, size_t size, cv_err *e)
{
    if (count > SIZE_MAX / size) {
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "allocation of %zu x %zu bytes overflows",
                   count, size);
        return NULL;
    }
    size_t bytes = count * size;
    void *p = cv_big_malloc_populated(bytes > 0 ? bytes : 1);
    if (!p)
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "could not allocate %zu bytes", bytes);
    return p;
}

/* ring (only with the float32 shadow, when the basis is not returned): V
 * keeps the two vectors the recurrence needs and the basis lives in Vf
 * alone, a third of the memory (and of the first-touch page faults). */
static int lz_init(lz_state *s, const cv_linop *op, int cap, int max_cap, int ring, cv_rng *rng,
                   cv_err *e)
{
    memset(s, 0, sizeof *s);
    s->op = op;
    s->n = op->n;
    s->rng = rng;
    s->cap = cap;
    s->max_cap = max_cap;
    s->ring = ring && s->n >= CV_LANCZOS_SHADOW_MIN;
    s->V = lz_vectors(s->n * (size_t)(s->ring ? 2 : cap), sizeof(double), e);
    s->alpha = s->V ? CV_EST_ALLOC((size_t)max_cap, double, e) : NULL;
    s->beta = s->alpha ? CV_EST_ALLOC((size_t)max_cap, double, e) : NULL;
    s->h = s->beta ? CV_EST_ALLOC((size_t)max_cap, double, e) : NULL;
    s->tmp = s->h ? CV_EST_ALLOC((size_t)max_cap, double, e) : NULL;
    s->w = s->tmp ? lz_vectors(s->n, sizeof(double), e) : NULL;
    int ok = s->w != NULL;
    if (ok && s->n >= CV_LANCZOS_SHADOW_MIN) {
        s->Vf = s->ring ? lz_prefaulted(s, cap, e) : CV_EST_ALLOC(s->n * (size_t)cap, float, e);
        s->fwork = s->Vf ? lz_vectors(CV_REORTH_WORK(s->n, max_cap), sizeof(float), e) : NULL;
        ok = s->fwork != NULL;
        if (ok) /* sgemv's outputs (beta 0): no NaN from stale bytes, whatever BLAS does */
            memset(s->fwork + s->n, 0, sizeof(float) * (CV_REORTH_WORK(s->n, max_cap) - s->n));
    }
    if (!ok) {
        lz_free(s);
        return -1;
    }
    return 0;
}

/* Grows the mapped float32 basis from s->cap to cap columns (the kernel
 * moves the pages; the new ones are populated too); NULL if it cannot. */
static float *lz_remap(lz_state *s, int cap)
{
    size_t old = lz_vf_bytes(s, s->cap), bytes = lz_vf_bytes(s, cap);
    void *p = mremap(s->Vf, old, bytes, MREMAP_MAYMOVE);
    if (p == MAP_FAILED)
        return NULL;
    /* madvise wants a page-aligned start: the new pages after old's page
     * (the partial page there is populated already) */
    size_t from = (old + 4095) & ~(size_t)4095;
    if (from < bytes)
        lz_populate((char *)p + from, bytes - from);
    return p;
}

/* Makes room for `need` basis vectors. */
static int lz_grow(lz_state *s, int need, cv_err *e)
{
    if (need <= s->cap)
        return 0;
    int cap = 2 * s->cap > need ? 2 * s->cap : need;
    cap = cap > s->max_cap ? s->max_cap : cap;
    double *V = s->ring ? s->V : realloc(s->V, sizeof(double) * s->n * (size_t)cap);
    if (!V)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                          "Lanczos basis of %d vectors of %zu doubles: out of memory", cap,
                          s->n);
    s->V = V;
    if (s->Vf) {
        float *Vf = s->ring ? lz_remap(s, cap) : realloc(s->Vf, lz_vf_bytes(s, cap));
        if (!Vf)
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                              "Lanczos basis shadow of %d vectors of %zu floats: out of memory",
                              cap, s->n);
        s->Vf = Vf;
    }
    s->cap = cap;
    return 0;
}

/* First basis vector: v0 normalized, or a Rademacher vector from rng. */
static int lz_start(lz_state *s, const double *v0, cv_err *e)
{
    double *v = s->V;
    if (v0)
        memcpy(v, v0, sizeof(double) * s->n);
    else if (s->rng)
        cv_rng_rademacher(s->rng, v, s->n);
    else
        return cv_err_set(e, CV_EINVAL, "invalid_option", "v0",
                          "Lanczos needs a start vector or a random generator");
    double nv = cv_est_norm(s->n, v);
    if (!(nv > 0) || !isfinite(nv))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "v0",
                          "Lanczos start vector must be finite and non-zero");
    cblas_dscal((int)s->n, 1.0 / nv, v, 1);
    return 0;
}

/* Basis vector j in double (in ring mode only the last two are kept). */
static double *lz_vec(const lz_state *s, int j)
{
    return s->V + (size_t)(s->ring ? j % 2 : j) * s->n;
}

/* A random unit vector orthogonal to the j basis vectors into v; 1 if the
 * basis (numerically) spans the space or there is no generator. */
static int lz_restart_vector(lz_state *s, int j, double *v)
{
    if (!s->rng)
        return 1;
    for (int attempt = 0; attempt < 3; attempt++) {
        cv_rng_gaussian(s->rng, v, s->n);
        double before = cv_est_norm(s->n, v);
        double after = s->ring ? cv_reorth_cgs(s->n, j, s->Vf, v, NULL, s->fwork)
                               : cv_est_cgs2(s->n, j, s->V, v, NULL, s->tmp);
        if (after > 1e-6 * before) {
            cblas_dscal((int)s->n, 1.0 / after, v, 1);
            return 0;
        }
    }
    return 1;
}

/* Non-zero if the last step ended in an invariant subspace (beta ~ 0). */
static int lz_invariant(const lz_state *s)
{
    return s->steps > 0 && s->beta[s->steps - 1] <= 1e-10 * s->tnorm;
}

/* Basis vector `steps` from the last residual, or a restart when the
 * Krylov space became invariant (beta ~ 0).  1: no further vector. */
static int lz_next_vector(lz_state *s, cv_err *e)
{
    int j = s->steps;
    if ((size_t)j >= s->n)
        return 1;
    if (lz_grow(s, j + 1, e))
        return -1;
    double *v = lz_vec(s, j);
    if (!lz_invariant(s)) {
        double b = s->beta[j - 1];
        if (s->Vf) { /* its float32 shadow in the same pass */
            float *vf = s->Vf + (size_t)j * s->n;
            for (size_t i = 0; i < s->n; i++) {
                v[i] = s->w[i] / b;
                vf[i] = (float)v[i];
            }
            s->shadowed = j + 1;
        } else {
            for (size_t i = 0; i < s->n; i++)
                v[i] = s->w[i] / b;
        }
        return 0;
    }
    if (lz_restart_vector(s, j, v))
        return 1;
    s->beta[j - 1] = 0.0;
    s->restarts++;
    s->block_start = j;
    return 0;
}

/* The three-term recurrence on w = A v_j: w -= alpha v_j + beta_{j-1} v_{j-1}
 * (beta is 0 after a restart); returns alpha.  Full reorthogonalization then
 * only removes round-off, so its DGKS test rarely asks for a second pass over
 * the basis (the dominant memory traffic for large n). */
static double lz_three_term(lz_state *s, int j)
{
    const double *v = lz_vec(s, j);
    double a = cv_est_dot(s->n, v, s->w);
    cblas_daxpy((int)s->n, -a, v, 1, s->w, 1);
    if (j > s->block_start && s->beta[j - 1] != 0.0)
        cblas_daxpy((int)s->n, -s->beta[j - 1], lz_vec(s, j - 1), 1, s->w, 1);
    return a;
}

/* lz_three_term and the first pass of lz_reorth's Gram-Schmidt in one
 * (full reorthogonalization against the float32 shadow): the update of w,
 * its float32 copy for the projection and ||w||, one pass over w instead of
 * four.  Returns alpha, *norm = ||w||. */
static double lz_three_term_shadow(lz_state *s, int j, double *norm)
{
    const double *v = lz_vec(s, j);
    double a = cv_est_dot(s->n, v, s->w), b = 0.0;
    const double *u = v; /* v_(j-1) where the recurrence has one */
    if (j > s->block_start && s->beta[j - 1] != 0.0) {
        b = s->beta[j - 1];
        u = lz_vec(s, j - 1);
    }
    double *w = s->w, s0 = 0, s1 = 0;
    float *wf = s->fwork;
    size_t i = 0, n = s->n;
    for (; i + 2 <= n; i += 2) {
        double t0 = (w[i] - a * v[i]) - b * u[i], t1 = (w[i + 1] - a * v[i + 1]) - b * u[i + 1];
        w[i] = t0, w[i + 1] = t1;
        wf[i] = (float)t0, wf[i + 1] = (float)t1;
        s0 += t0 * t0, s1 += t1 * t1;
    }
    for (; i < n; i++) {
        w[i] = (w[i] - a * v[i]) - b * u[i];
        wf[i] = (float)w[i];
        s0 += w[i] * w[i];
    }
    double ss = s0 + s1;
    *norm = ss > 1e-280 && ss < 1e280 ? sqrt(ss) : cv_est_norm(n, w);
    return a;
}

/* Reorthogonalizes w against basis vectors 0..j (h gets the coefficients);
 * returns ||w||. */
static double lz_reorth(lz_state *s, int j)
{
    s->reorths++;
    if (s->Vf)
        return cv_reorth_cgs(s->n, j + 1, s->Vf, s->w, s->h, s->fwork);
    return cv_est_cgs2(s->n, j + 1, s->V, s->w, s->h, s->tmp);
}

/* Precision of the products (float32 networks) behind the omega model. */
#define CV_PRO_EPS ((double)FLT_EPSILON)

/* Partial mode only where the basis is float32 anyway (the float32 shadow
 * size); smaller problems keep full reorthogonalization in double. */
static int lz_partial_init(lz_state *s, cv_err *e)
{
    if (!s->Vf)
        return 0;
    s->partial = 1;
    size_t len = (size_t)s->max_cap + 2;
    s->omega = CV_EST_ALLOC(len, double, e);
    s->omega_prev = s->omega ? CV_EST_ALLOC(len, double, e) : NULL;
    s->omega_next = s->omega_prev ? CV_EST_ALLOC(len, double, e) : NULL;
    if (!s->omega_next)
        return -1;
    s->omega[0] = 1.0;
    return 0;
}

/* Simon's recurrence for omega_(j+1,k) ~ v_(j+1) . v_k from the step's
 * alpha a and beta b, with his rounding term eps (beta_k + beta_j) at the
 * products' precision pushing each estimate away from zero (on the MLP
 * benchmark the estimates stay 10-100x above the measured inner products);
 * rotates the estimates so omega describes v_(j+1).  Returns
 * max_k<=j |omega_(j+1,k)|. */
static double lz_omega_update(lz_state *s, int j, double a, double b)
{
    double *cur = s->omega, *prev = s->omega_prev, *next = s->omega_next, mx = 0;
    for (int k = 0; k < j; k++) {
        double t = s->beta[k] * cur[k + 1] + (s->alpha[k] - a) * cur[k] -
                   s->beta[j - 1] * prev[k];
        if (k > 0)
            t += s->beta[k - 1] * cur[k - 1];
        t = (t + copysign(CV_PRO_EPS * (s->beta[k] + b), t)) / b;
        next[k] = t;
        mx = fmax(mx, fabs(t));
    }
    next[j] = CV_PRO_EPS;
    next[j + 1] = 1.0;
    memcpy(prev, cur, sizeof(double) * (size_t)(j + 1));
    memcpy(cur, next, sizeof(double) * (size_t)(j + 2));
    return fmax(mx, CV_PRO_EPS);
}

/* Vector `top` is orthogonal to vectors 0..top-1 to the products'
 * precision (after a reorthogonalization or a restart); with `both`, its
 * predecessor is too. */
static void lz_omega_fresh(lz_state *s, int top, int both)
{
    for (int k = 0; k < top; k++) {
        s->omega[k] = CV_PRO_EPS;
        if (both)
            s->omega_prev[k] = CV_PRO_EPS;
    }
    s->omega[top] = 1.0;
}

/* Orthogonality of w against the basis after the three-term recurrence:
 * a full pass every step, or (partial) only when the omega estimates reach
 * sqrt(eps), plus the step after; a restart starts orthogonal.  h[j] gets
 * the correction to alpha; returns ||w||. */
static double lz_orthogonalize(lz_state *s, int j, double a)
{
    if (!s->partial)
        return lz_reorth(s, j);
    s->h[j] = 0.0;
    if (j > 0 && j == s->block_start) { /* restart vector: orthogonal to the basis */
        lz_omega_fresh(s, j, 1);
        s->force = 1;
    }
    double b = cv_est_norm(s->n, s->w);
    if (!(b > 1e-10 * s->tnorm) || !isfinite(b)) { /* near breakdown: a full pass decides */
        lz_omega_fresh(s, j + 1, 1);
        return lz_reorth(s, j);
    }
    double worst = lz_omega_update(s, j, a, b);
    if (!s->force && worst < sqrt(CV_PRO_EPS))
        return b;
    s->force = !s->force; /* a triggered pass forces the next step's too */
    lz_omega_fresh(s, j + 1, 0);
    return lz_reorth(s, j);
}

/* One Lanczos step: -1 error, 0 done, 1 no step possible (basis complete). */
static int lz_step(lz_state *s, cv_err *e)
{
    if (s->steps > 0) {
        int r = lz_next_vector(s, e);
        if (r)
            return r;
    }
    int j = s->steps;
    const double *v = lz_vec(s, j);
    if (cv_linop_apply(s->op, 1, v, s->w, e))
        return -1;
    s->matvecs++;
    if (s->Vf && s->shadowed <= j) { /* v_0 or a restart vector */
        cv_reorth_shadow(s->n, v, s->Vf + (size_t)j * s->n);
        s->shadowed = j + 1;
    }
    double a, b;
    if (s->Vf && !s->partial) {
        double norm;
        a = lz_three_term_shadow(s, j, &norm);
        s->reorths++;
        b = cv_reorth_cgs_shadowed(s->n, j + 1, s->Vf, s->w, norm, s->h, s->fwork);
    } else {
        a = lz_three_term(s, j);
        b = lz_orthogonalize(s, j, a);
    }
    if (!isfinite(b) || !isfinite(a + s->h[j]))
        return cv_err_set(e, CV_EINVAL, "non_finite", "",
                          "the operator produced non-finite values (Lanczos step %d)", j + 1);
    s->alpha[j] = a + s->h[j];
    s->beta[j] = b;
    double t = fabs(s->alpha[j]) + b + (j > 0 ? s->beta[j - 1] : 0.0);
    s->tnorm = t > s->tnorm ? t : s->tnorm;
    s->steps++;
    return 0;
}

int cv_lanczos(const cv_linop *op, const double *v0, const cv_lanczos_options *opt,
               cv_rng *rng, cv_lanczos_result *out, cv_err *e)
{
    return cv_est_lanczos(op, v0, opt, rng, 1, out, e);
}

int cv_est_lanczos(const cv_linop *op, const double *v0, const cv_lanczos_options *opt,
                   cv_rng *rng, int plan, cv_lanczos_result *out, cv_err *e)
{
    cv_lanczos_options def;
    opt = CV_EST_OPTIONS(opt, &def, cv_lanczos_options_default);
    memset(out, 0, sizeof *out);
    if (cv_est_check_op(op, e))
        return -1;
    if (opt->steps < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.lanczos_steps",
                          "lanczos_steps must be >= 1, got %d", opt->steps);
    int m = (size_t)opt->steps > op->n ? (int)op->n : opt->steps;
    lz_state s;
    if (lz_init(&s, op, m, m, !opt->keep_basis, rng, e))
        return -1;
    if ((opt->partial_reorth && lz_partial_init(&s, e)) || lz_start(&s, v0, e))
        goto fail;
    if (plan)
        cv_progress_plan(op->progress, m);
    while (s.steps < m) {
        int r = lz_step(&s, e);
        if (r < 0)
            goto fail;
        if (r > 0)
            break;
    }
    out->n = op->n;
    out->steps = s.steps;
    out->restarts = s.restarts;
    out->matvecs = s.matvecs;
    out->reorths = s.reorths;
    out->alpha = s.alpha;
    out->beta = s.beta;
    s.alpha = s.beta = NULL;
    if (opt->keep_basis) {
        out->basis = s.V;
        s.V = NULL;
    }
    lz_free(&s);
    return 0;
fail:
    lz_free(&s);
    return -1;
}

/* ------------------------------------------------------------- eigenpairs */

/* Ritz values of the current T, the wanted ones and their residuals. */
typedef struct {
    int m;
    double *theta;          /* m, ascending */
    double *S;              /* m x m eigenvectors of T */
    int *idx;               /* k wanted, in output order */
    double *res;            /* k */
    int converged;
} ritz_t;

static int ritz_compute(const lz_state *s, int k, cv_which which, double tol, ritz_t *r,
                        cv_err *e)
{
    int m = s->steps;
    free(r->S);
    r->S = CV_EST_ALLOC((size_t)m * (size_t)m, double, e);
    if (!r->S || cv_est_tridiag_eig(m, s->alpha, s->beta, r->theta, r->S, e))
        return -1;
    r->m = m;
    cv_est_select(r->theta, m, k, which, r->idx);
    double thmax = fmax(fabs(r->theta[0]), fabs(r->theta[m - 1]));
    double floor_abs = 1e3 * DBL_EPSILON * s->tnorm;
    r->converged = 0;
    for (int i = 0; i < k; i++) {
        double th = r->theta[r->idx[i]];
        r->res[i] = fabs(s->beta[m - 1] * r->S[(size_t)(m - 1) + (size_t)r->idx[i] * m]);
        double scale = fmax(fabs(th), 1e-6 * thmax);
        if (r->res[i] <= tol * scale || r->res[i] <= floor_abs)
            r->converged++;
    }
    return 0;
}

static int eigen_check(const cv_linop *op, const cv_eigen_options *o, cv_err *e)
{
    if (cv_est_eigen_check(op, o, e))
        return -1;
    if (o->max_iter < 0)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.max_iter",
                          "max_iter must be >= 0 (0 = automatic), got %d", o->max_iter);
    if (!(o->tol >= 0) || !isfinite(o->tol))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.tol",
                          "tol must be a finite number >= 0");
    return 0;
}

/* Eigenvectors V_m S[:, idx] (n x k). */
static int ritz_vectors(const lz_state *s, const ritz_t *r, int k, double **out, cv_err *e)
{
    int m = r->m;
    double *Sk = CV_EST_ALLOC((size_t)m * k, double, e);
    double *X = Sk ? CV_EST_ALLOC(s->n * (size_t)k, double, e) : NULL;
    if (!X) {
        free(Sk);
        return -1;
    }
    for (int i = 0; i < k; i++)
        memcpy(Sk + (size_t)i * m, r->S + (size_t)r->idx[i] * m, sizeof(double) * m);
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, (int)s->n, k, m, 1.0, s->V,
                (int)s->n, Sk, m, 0.0, X, (int)s->n);
    free(Sk);
    *out = X;
    return 0;
}

/* Does Ritz value th of the current block beat tau, the k-th wanted value
 * of the earlier blocks, by more than the tolerance? */
static int beats(double th, double tau, cv_which which, double delta)
{
    if (which == CV_WHICH_LARGEST)
        return th > tau + delta;
    if (which == CV_WHICH_SMALLEST)
        return th < tau - delta;
    return fabs(th) > fabs(tau) + delta;
}

/* A converged wanted set is final unless Krylov blocks are involved: after
 * an invariant subspace each new block sees one more copy of every multiple
 * eigenvalue, so the set is final only once the current block is invariant
 * too and adds no wanted value beyond those of the earlier blocks (blocks
 * are no longer than the first one, so this costs little). */
static int blocks_settled(const lz_state *s, const cv_eigen_options *o, int *settled,
                          cv_err *e)
{
    int inv = lz_invariant(s), b0 = s->block_start, m = s->steps;
    *settled = s->restarts == 0 && !inv;
    if (*settled || !inv || b0 < o->k)
        return 0;
    double *th = CV_EST_ALLOC((size_t)m, double, e);
    int *idx = th ? CV_EST_ALLOC((size_t)o->k, int, e) : NULL;
    if (!idx || cv_est_tridiag_eig(b0, s->alpha, s->beta, th, NULL, e) ||
        cv_est_tridiag_eig(m - b0, s->alpha + b0, s->beta + b0, th + b0, NULL, e)) {
        free(th);
        free(idx);
        return -1;
    }
    cv_est_select(th, b0, o->k, o->which, idx);
    double tau = th[idx[o->k - 1]], thmax = fmax(fabs(th[0]), fabs(th[b0 - 1]));
    double delta = fmax(o->tol * fmax(fabs(tau), 1e-6 * thmax), 1e3 * DBL_EPSILON * s->tnorm);
    *settled = 1;
    for (int i = b0; i < m; i++)
        if (beats(th[i], tau, o->which, delta))
            *settled = 0;
    free(th);
    free(idx);
    return 0;
}

/* Runs Lanczos steps until the k wanted Ritz pairs converge or m_max. */
static int eigen_iterate(lz_state *s, const cv_eigen_options *o, int m_max, ritz_t *r,
                         cv_err *e)
{
    int last_check = 0;
    for (;;) {
        int rc = lz_step(s, e);
        if (rc < 0)
            return -1;
        int m = s->steps, end = rc > 0 || m >= m_max;
        int every = m / 32 > 1 ? m / 32 : 1;
        if (m >= o->k && (end || m <= 64 || m - last_check >= every)) {
            if (ritz_compute(s, o->k, o->which, o->tol, r, e))
                return -1;
            /* the Ritz residual is no standard error: publish none */
            cv_progress_partial(s->op->progress, r->theta[r->idx[0]], 0.0, m);
            last_check = m;
            int settled = 0;
            if (r->converged == o->k && blocks_settled(s, o, &settled, e))
                return -1;
            if (settled)
                return 0;
        }
        if (end)
            break;
    }
    if (s->steps < o->k)
        return cv_err_set(e, CV_EINTERNAL, "lanczos_breakdown", "",
                          "Lanczos found only %d directions, fewer than k = %d", s->steps,
                          o->k);
    return 0;
}

static void ritz_free(ritz_t *r)
{
    free(r->theta);
    free(r->S);
    free(r->idx);
    free(r->res);
}

int cv_eigen_lanczos(const cv_linop *op, const cv_eigen_options *opt, cv_rng *rng,
                     cv_eigen_result *out, cv_err *e)
{
    cv_eigen_options def;
    opt = CV_EST_OPTIONS(opt, &def, cv_eigen_options_default);
    memset(out, 0, sizeof *out);
    if (eigen_check(op, opt, e))
        return -1;
    if (opt->max_iter > 0 && opt->max_iter < opt->k)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.max_iter",
                          "max_iter (%d Lanczos steps) must be >= k (%d)", opt->max_iter,
                          opt->k);
    long want = opt->max_iter > 0 ? opt->max_iter : (10L * opt->k > 100 ? 10L * opt->k : 100);
    int m_max = (size_t)want > op->n ? (int)op->n : (int)want;
    int k = opt->k, cap0 = 2 * k > 32 ? 2 * k : 32;
    lz_state s;
    ritz_t r = {0};
    /* Without eigenvectors to form, the double basis is not needed (ring mode). */
    if (lz_init(&s, op, cap0 < m_max ? cap0 : m_max, m_max, !opt->return_vectors, rng, e))
        return -1;
    r.theta = CV_EST_ALLOC((size_t)m_max, double, e);
    r.idx = r.theta ? CV_EST_ALLOC((size_t)k, int, e) : NULL;
    r.res = r.idx ? CV_EST_ALLOC((size_t)k, double, e) : NULL;
    if (!r.res || lz_start(&s, NULL, e))
        goto fail;
    cv_progress_plan(op->progress, m_max);
    if (eigen_iterate(&s, opt, m_max, &r, e))
        goto fail;
    if (opt->return_vectors && ritz_vectors(&s, &r, k, &out->eigenvectors, e))
        goto fail;
    out->eigenvalues = CV_EST_ALLOC((size_t)k, double, e);
    if (!out->eigenvalues)
        goto fail;
    for (int i = 0; i < k; i++)
        out->eigenvalues[i] = r.theta[r.idx[i]];
    out->n = op->n;
    out->k = k;
    out->residuals = r.res;
    r.res = NULL;
    out->iterations = s.steps;
    out->converged = r.converged;
    out->matvecs = s.matvecs;
    ritz_free(&r);
    lz_free(&s);
    return 0;
fail:
    ritz_free(&r);
    lz_free(&s);
    cv_eigen_result_free(out);
    return -1;
}
