/* kernel_check.c - the kernel oracle of kernel_check.h: one layer class's
 * forward, vjp(_n), jvp(_n), hvp_extra(_n), per_sample, quad_extra, vjp_hvp
 * and gram_add checked against finite differences, the adjoint identity,
 * each other and their contracts, without the curvature driver. */
#include "kernel_check.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/rng.h"

#define KC_MAXIN CV_MAX_NODE_INPUTS
#define KC_GUARD 8
#define KC_SENTINEL 7777.25f
#define KC_MAXMEM 4096

/* A point or direction of the kernels' input space (k stacked vectors):
 * one array per input (NULL: zero / constant input) and the parameters. */
typedef struct {
    float *x[KC_MAXIN];
    float *t;
} kc_vec;

typedef struct {
    cv_layer *L;
    const cv_layer_ops *ops;
    kc_opts o;
    int n, nin;
    size_t lx[KC_MAXIN];   /* n * in_numel[i] */
    size_t ly, P, B;
    float *x[KC_MAXIN], *theta, *buf, *y;
    float *tx[KC_MAXIN], *tth, *ty; /* scratch for perturbed evaluations */
    cv_layer_ctx c;
    cv_rng r;
    char *why;
    size_t len;
    /* every allocation: guarded float arrays are checked at the end */
    void *mem[KC_MAXMEM];
    size_t memlen[KC_MAXMEM];
    const char *memlabel[KC_MAXMEM];
    int nmem;
} kc_env;

kc_opts kc_defaults(void)
{
    kc_opts o;
    memset(&o, 0, sizeof o);
    o.n = 3;
    o.seed = 1;
    o.fd_eps = 1e-2;
    o.fd_tol = 2e-3;
    o.tol = 1e-5;
    o.param_scale = 0.5;
    return o;
}

cv_shape kc_shape(int rank, ...)
{
    cv_shape s;
    memset(&s, 0, sizeof s);
    va_list ap;
    va_start(ap, rank);
    s.rank = rank < 0 ? 0 : rank > CV_MAX_RANK ? CV_MAX_RANK : rank;
    for (int i = 0; i < s.rank; i++)
        s.dim[i] = va_arg(ap, int);
    va_end(ap);
    return s;
}

int kc_layer(cv_layer *L, const char *name, int nin, const cv_shape *in)
{
    const cv_layer_class *cls = cv_layer_class_find(name);
    if (!cls)
        cls = cv_function_find(name);
    if (!cls || nin < 0 || nin > KC_MAXIN)
        return -1;
    cv_layer_init(L, cls);
    L->nin = nin;
    for (int i = 0; i < nin; i++) {
        L->in[i] = i;
        L->in_shapes[i] = in[i];
    }
    if (nin > 0)
        L->in_shape = in[0];
    return 0;
}

int kc_set(cv_layer *L, const char *field, double value)
{
    for (int i = 0; i < L->cls->nfields; i++) {
        const cv_field *f = &L->cls->fields[i];
        if (strcmp(f->name, field) != 0 || f->offset == CV_F_NOSTORE)
            continue;
        void *p = L->attr.bytes + f->offset;
        switch (f->kind) {
        case CV_F_INT:
        case CV_F_BOOL:
        case CV_F_ENUM:
        case CV_F_FIXED_BOOL:
            *(int *)p = (int)lround(value);
            return 0;
        case CV_F_PAIR:
            ((int *)p)[0] = ((int *)p)[1] = (int)lround(value);
            return 0;
        case CV_F_NUMBER:
            *(double *)p = value;
            return 0;
        default:
            return -1;
        }
    }
    return -1;
}

/* ---- bookkeeping ------------------------------------------------------------ */

static int fail(kc_env *E, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(E->why, E->len, fmt, ap);
    va_end(ap);
    return -1;
}

static void *track(kc_env *E, void *p, size_t len, const char *label)
{
    if (!p || E->nmem >= KC_MAXMEM) {
        free(p);
        fprintf(stderr, "kernel_check: out of memory (%s)\n", label);
        abort();
    }
    E->mem[E->nmem] = p;
    E->memlen[E->nmem] = len;
    E->memlabel[E->nmem++] = label;
    return p;
}

/* len floats (zero) followed by KC_GUARD sentinels. */
static float *fnew(kc_env *E, size_t len, const char *label)
{
    float *p = track(E, calloc(len + KC_GUARD, sizeof(float)), len, label);
    for (int g = 0; g < KC_GUARD; g++)
        p[len + g] = KC_SENTINEL;
    return p;
}

static double *dnew(kc_env *E, size_t len)
{
    return track(E, calloc(len ? len : 1, sizeof(double)), (size_t)-1, "double");
}

static int guards_ok(kc_env *E)
{
    for (int i = 0; i < E->nmem; i++) {
        if (E->memlen[i] == (size_t)-1)
            continue;
        const float *p = E->mem[i];
        for (int g = 0; g < KC_GUARD; g++)
            if (p[E->memlen[i] + g] != KC_SENTINEL)
                return fail(E, "a kernel wrote past the end of %s (%zu floats)",
                            E->memlabel[i], E->memlen[i]);
    }
    return 0;
}

static void fill_normal(kc_env *E, float *p, size_t len)
{
    for (size_t i = 0; i < len; i++)
        p[i] = (float)cv_rng_normal(&E->r);
}

static void fill_value(float *p, size_t len, float v)
{
    for (size_t i = 0; i < len; i++)
        p[i] = v;
}

/* A random vector of the input space, k stacked (constant inputs: NULL;
 * no_x / no_t: leave those parts NULL). */
static kc_vec rand_vec(kc_env *E, int k, int no_x, int no_t, const char *label)
{
    kc_vec v;
    memset(&v, 0, sizeof v);
    for (int i = 0; i < E->nin && !no_x; i++)
        if (!E->o.constant[i]) {
            v.x[i] = fnew(E, (size_t)k * E->lx[i], label);
            fill_normal(E, v.x[i], (size_t)k * E->lx[i]);
        }
    if (E->P && !no_t) {
        v.t = fnew(E, (size_t)k * E->P, label);
        fill_normal(E, v.t, (size_t)k * E->P);
    }
    return v;
}

/* Output space of vjp/hvp_extra: arrays for the non-constant inputs and the
 * parameters, filled with `fillv`. */
static kc_vec out_vec(kc_env *E, int k, float fillv, const char *label)
{
    kc_vec v;
    memset(&v, 0, sizeof v);
    for (int i = 0; i < E->nin; i++)
        if (!E->o.constant[i]) {
            v.x[i] = fnew(E, (size_t)k * E->lx[i], label);
            fill_value(v.x[i], (size_t)k * E->lx[i], fillv);
        }
    if (E->P) {
        v.t = fnew(E, (size_t)k * E->P, label);
        fill_value(v.t, (size_t)k * E->P, fillv);
    }
    return v;
}

/* Vector j of a k-stack, as a k = 1 view. */
static kc_vec slice(const kc_env *E, const kc_vec *v, int j)
{
    kc_vec s;
    memset(&s, 0, sizeof s);
    for (int i = 0; i < E->nin; i++)
        s.x[i] = v->x[i] ? v->x[i] + (size_t)j * E->lx[i] : NULL;
    s.t = v->t ? v->t + (size_t)j * E->P : NULL;
    return s;
}

static double dot_f(const float *a, const float *b, size_t len)
{
    double s = 0;
    if (a && b)
        for (size_t i = 0; i < len; i++)
            s += (double)a[i] * b[i];
    return s;
}

static double nrm_f(const float *a, size_t len) { return sqrt(dot_f(a, a, len)); }

/* the norm of the finite entries (a forward output may hold -inf: masked_fill) */
static double nrm_finite(const float *a, size_t len)
{
    double s = 0;
    for (size_t i = 0; i < len; i++)
        if (isfinite(a[i]))
            s += (double)a[i] * a[i];
    return sqrt(s);
}

/* <a, b> over the input space (k = 1) */
static double vdot(const kc_env *E, const kc_vec *a, const kc_vec *b)
{
    double s = dot_f(a->t, b->t, E->P);
    for (int i = 0; i < E->nin; i++)
        s += dot_f(a->x[i], b->x[i], E->lx[i]);
    return s;
}

static double vnrm(const kc_env *E, const kc_vec *a) { return sqrt(vdot(E, a, a)); }

/* ---- kernels through the single- or multi-input pointers ------------------------ */

static void k_vjp(const kc_env *E, const cv_layer_ctx *c, int k, const float *gy, const kc_vec *g)
{
    if (E->ops->vjp_n)
        E->ops->vjp_n(c, k, gy, (float *const *)g->x, g->t);
    else
        E->ops->vjp(c, k, gy, g->x[0], g->t);
}

static void k_jvp(const kc_env *E, const cv_layer_ctx *c, int k, const kc_vec *d, float *ry)
{
    if (E->ops->jvp_n)
        E->ops->jvp_n(c, k, (const float *const *)d->x, d->t, ry);
    else
        E->ops->jvp(c, k, d->x[0], d->t, ry);
}

static void k_hvp(const kc_env *E, const cv_layer_ctx *c, int k, const float *gy,
                  const kc_vec *d, const kc_vec *g)
{
    if (E->ops->hvp_extra_n)
        E->ops->hvp_extra_n(c, k, gy, (const float *const *)d->x, d->t, (float *const *)g->x,
                            g->t);
    else if (E->ops->hvp_extra)
        E->ops->hvp_extra(c, k, gy, d->x[0], d->t, g->x[0], g->t);
}

/* ---- comparisons ------------------------------------------------------------- */

/* got (float, minus base when base is set) vs ref (double): passes when
 * ||got - ref|| <= tol * max(||got||, ||ref||) + floor. */
static int cmp(kc_env *E, const char *what, const float *got, const float *base,
               const double *ref, size_t len, double tol, double floor)
{
    double d2 = 0, g2 = 0, r2 = 0, worst = -1;
    size_t wi = 0;
    for (size_t i = 0; i < len; i++) {
        double g = (double)got[i] - (base ? (double)base[i] : 0.0);
        double d = g - ref[i];
        if (isnan(d) || fabs(d) > worst) { /* NaN counts as worst */
            if (worst < INFINITY) {
                worst = isnan(d) ? INFINITY : fabs(d);
                wi = i;
            }
        }
        d2 += d * d;
        g2 += g * g;
        r2 += ref[i] * ref[i];
    }
    double err = sqrt(d2), scale = sqrt(g2 > r2 ? g2 : r2);
    if (err <= tol * scale + floor)
        return 0;
    double gw = (double)got[wi] - (base ? (double)base[wi] : 0.0);
    return fail(E, "%s: |got - ref| %.3g > %.3g * %.3g + %.3g (worst entry %zu: got %.9g, ref %.9g)",
                what, err, tol, scale, floor, wi, gw, ref[wi]);
}

static int cmp_ff(kc_env *E, const char *what, const float *got, const float *ref, size_t len,
                  double tol)
{
    double *r = dnew(E, len);
    for (size_t i = 0; i < len; i++)
        r[i] = ref[i];
    return cmp(E, what, got, NULL, r, len, tol, 1e-30);
}

/* Each part of the output-space vectors got and ref (k = 1). */
static int cmp_vec(kc_env *E, const char *what, const kc_vec *got, const kc_vec *ref,
                   double tol)
{
    char w[160];
    for (int i = 0; i < E->nin; i++)
        if (got->x[i] && ref->x[i]) {
            snprintf(w, sizeof w, "%s, input %d", what, i);
            if (cmp_ff(E, w, got->x[i], ref->x[i], E->lx[i], tol))
                return -1;
        }
    if (got->t && ref->t) {
        snprintf(w, sizeof w, "%s, parameters", what);
        if (cmp_ff(E, w, got->t, ref->t, E->P, tol))
            return -1;
    }
    return 0;
}

/* ---- perturbed evaluations (finite differences) ------------------------------------ */

/* A copy of the base context at (x + h dx, theta + h dt), forward run into
 * E->ty.  The caller releases it. */
static int ctx_at(kc_env *E, const kc_vec *d, double h, cv_layer_ctx *c)
{
    *c = E->c;
    c->d1 = c->d2 = NULL;
    c->idx = NULL;
    for (int i = 0; i < E->nin; i++)
        if (d->x[i]) {
            for (size_t q = 0; q < E->lx[i]; q++)
                E->tx[i][q] = (float)(E->x[i][q] + h * d->x[i][q]);
            c->xs[i] = E->tx[i];
        }
    c->x = E->nin ? c->xs[0] : NULL;
    if (d->t) {
        for (size_t q = 0; q < E->P; q++)
            E->tth[q] = (float)(E->theta[q] + h * d->t[q]);
        c->theta = E->tth;
    }
    c->y = E->ty;
    cv_err e;
    if (E->ops->forward(c, E->ty, &e)) {
        cv_layer_ctx_release(c);
        return fail(E, "forward at a perturbed point: %s", e.message);
    }
    return 0;
}

static double diff(float a, float b) { return a == b ? 0.0 : (double)a - (double)b; }

/* Fourth-order central differences along d of forward (which = 0, into
 * out[ly]) or of vjp(gy) (which = 1, into out[i] per input and out_t). */
static int fd(kc_env *E, const kc_vec *d, int which, const float *gy, double **out,
              double *out_t)
{
    static const double hs[4] = {1, -1, 2, -2};
    double h = E->o.fd_eps;
    kc_vec g[4];
    float *yv[4];
    for (int s = 0; s < 4; s++) {
        cv_layer_ctx c;
        if (ctx_at(E, d, hs[s] * h, &c))
            return -1;
        if (which == 0) {
            yv[s] = fnew(E, E->ly, "fd forward");
            memcpy(yv[s], E->ty, sizeof(float) * E->ly);
        } else {
            g[s] = out_vec(E, 1, NAN, "fd vjp");
            k_vjp(E, &c, 1, gy, &g[s]);
        }
        cv_layer_ctx_release(&c);
    }
    if (which == 0) {
        for (size_t q = 0; q < E->ly; q++)
            out[0][q] = (8 * diff(yv[0][q], yv[1][q]) - diff(yv[2][q], yv[3][q])) / (12 * h);
        return 0;
    }
    for (int i = 0; i < E->nin; i++)
        if (out[i])
            for (size_t q = 0; q < E->lx[i]; q++)
                out[i][q] = (8 * diff(g[0].x[i][q], g[1].x[i][q]) -
                             diff(g[2].x[i][q], g[3].x[i][q])) / (12 * h);
    if (out_t)
        for (size_t q = 0; q < E->P; q++)
            out_t[q] = (8 * diff(g[0].t[q], g[1].t[q]) - diff(g[2].t[q], g[3].t[q])) / (12 * h);
    return 0;
}

/* ---- setup -------------------------------------------------------------------------- */

static int setup(kc_env *E, cv_layer *L)
{
    const cv_layer_class *cls = L->cls;
    if (!cls || !cls->ops)
        return fail(E, "the layer has no class or no kernels");
    E->ops = cls->ops;
    /* arity (0, 0) means exactly one input, except for a class with only the
     * multi-input kernels: no input (get_attr) */
    int lo = cls->min_inputs, hi = cls->max_inputs;
    if (lo == 0 && hi == 0)
        lo = hi = E->ops->vjp_n && !E->ops->vjp ? 0 : 1;
    if (L->nin < lo || L->nin > hi)
        return fail(E, "nin %d outside the class's [%d, %d]", L->nin, lo, hi);
    if (L->nin != 1 && (!E->ops->vjp_n || !E->ops->jvp_n || !E->ops->hvp_extra_n))
        return fail(E, "a class with %d inputs needs vjp_n, jvp_n and hvp_extra_n", L->nin);
    if (!E->ops->vjp_n && (!E->ops->vjp || !E->ops->jvp || !E->ops->hvp_extra))
        return fail(E, "missing vjp, jvp or hvp_extra");
    if (!E->ops->forward || !E->ops->work_size)
        return fail(E, "missing forward or work_size");
    E->nin = L->nin;
    if (E->nin > 0)
        L->in_shape = L->in_shapes[0];
    else
        memset(&L->in_shape, 0, sizeof L->in_shape);
    cv_err e;
    memset(&e, 0, sizeof e);
    if (cls->check && cls->check(L, &e))
        return fail(E, "check: %s", e.message);
    if (cls->infer) {
        if (cls->infer(L, &L->in_shape, &e))
            return fail(E, "infer: %s", e.message);
    } else {
        L->out_shape = L->in_shape;
    }
    L->nparams = L->nbuffers = 0;
    if (cls->layout && cls->layout(L))
        return fail(E, "layout failed");
    for (int p = 0; p < L->nparams; p++) {
        L->params[p].offset = E->P;
        E->P += L->params[p].numel;
    }
    for (int b = 0; b < L->nbuffers; b++) {
        L->buffers[b].offset = E->B;
        E->B += L->buffers[b].numel;
    }
    return 0;
}

static void make_ctx(kc_env *E)
{
    const cv_layer *L = E->L;
    cv_layer_ctx *c = &E->c;
    memset(c, 0, sizeof *c);
    c->L = L;
    c->n = E->n;
    c->nin = E->nin;
    for (int i = 0; i < E->nin; i++) {
        c->in_numels[i] = cv_shape_numel(&L->in_shapes[i]);
        E->lx[i] = (size_t)E->n * c->in_numels[i];
        c->xs[i] = E->x[i] = fnew(E, E->lx[i], "input");
        if (E->o.inputs[i])
            memcpy(E->x[i], E->o.inputs[i], sizeof(float) * E->lx[i]);
        else
            fill_normal(E, E->x[i], E->lx[i]);
        E->tx[i] = fnew(E, E->lx[i], "perturbed input");
    }
    c->x = E->nin ? c->xs[0] : NULL;
    c->in_numel = E->nin ? c->in_numels[0] : 0;
    c->out_numel = cv_shape_numel(&L->out_shape);
    E->ly = (size_t)E->n * c->out_numel;
    c->nparam = E->P;
    if (E->P) {
        E->theta = fnew(E, E->P, "theta");
        E->tth = fnew(E, E->P, "perturbed theta");
        for (size_t q = 0; q < E->P; q++)
            E->theta[q] = E->o.params ? E->o.params[q]
                                      : (float)(E->o.param_scale * cv_rng_normal(&E->r));
        c->theta = E->theta;
    }
    if (E->B) {
        E->buf = fnew(E, E->B, "buffers");
        for (size_t q = 0; q < E->B; q++)
            E->buf[q] = E->o.buffers ? E->o.buffers[q] : (float)(0.5 + cv_rng_uniform(&E->r));
        c->buffers = E->buf;
    }
    E->y = fnew(E, E->ly, "y");
    E->ty = fnew(E, E->ly, "perturbed y");
    size_t w1 = E->ops->work_size(c, 1), w2 = E->ops->work_size(c, 2);
    c->work_floats = w1 > w2 ? w1 : w2;
    c->work = c->work_floats ? fnew(E, c->work_floats, "work") : NULL;
}

/* ---- the checks -------------------------------------------------------------------- */

/* (a) jvp vs differences of forward along d (k = 1) */
static int check_jvp_fd(kc_env *E, const kc_vec *d, const char *what)
{
    float *ry = fnew(E, E->ly, "jvp out");
    fill_value(ry, E->ly, NAN);
    k_jvp(E, &E->c, 1, d, ry);
    double *ref = dnew(E, E->ly);
    if (fd(E, d, 0, NULL, &ref, NULL))
        return -1;
    char w[96];
    snprintf(w, sizeof w, "jvp vs finite differences of forward (%s)", what);
    double floor = 1e-6 / E->o.fd_eps * nrm_finite(E->y, E->ly) + 1e-7;
    return cmp(E, w, ry, NULL, ref, E->ly, E->o.fd_tol, floor);
}

/* (c) hvp_extra vs differences of vjp(gy) along d (k = 1) */
static int check_hvp_fd(kc_env *E, const float *gy, const kc_vec *d, const char *what)
{
    kc_vec base = out_vec(E, 1, 0, "hvp base"), got = out_vec(E, 1, 0, "hvp out");
    for (int i = 0; i < E->nin; i++)
        if (got.x[i]) {
            fill_normal(E, got.x[i], E->lx[i]);
            memcpy(base.x[i], got.x[i], sizeof(float) * E->lx[i]);
        }
    if (got.t) {
        fill_normal(E, got.t, E->P);
        memcpy(base.t, got.t, sizeof(float) * E->P);
    }
    k_hvp(E, &E->c, 1, gy, d, &got);
    double *ref[KC_MAXIN] = {NULL}, *ref_t = E->P ? dnew(E, E->P) : NULL;
    for (int i = 0; i < E->nin; i++)
        if (got.x[i])
            ref[i] = dnew(E, E->lx[i]);
    if (fd(E, d, 1, gy, ref, ref_t))
        return -1;
    kc_vec g0 = out_vec(E, 1, NAN, "vjp");
    k_vjp(E, &E->c, 1, gy, &g0);
    double floor = 1e-6 / E->o.fd_eps * vnrm(E, &g0) + 1e-7;
    char w[128];
    for (int i = 0; i < E->nin; i++)
        if (got.x[i]) {
            snprintf(w, sizeof w, "hvp_extra vs differences of vjp (%s), input %d", what, i);
            if (cmp(E, w, got.x[i], base.x[i], ref[i], E->lx[i], E->o.fd_tol, floor))
                return -1;
        }
    if (got.t) {
        snprintf(w, sizeof w, "hvp_extra vs differences of vjp (%s), parameters", what);
        if (cmp(E, w, got.t, base.t, ref_t, E->P, E->o.fd_tol, floor))
            return -1;
    }
    return 0;
}

static int any_input_direction(const kc_env *E)
{
    for (int i = 0; i < E->nin; i++)
        if (!E->o.constant[i])
            return 1;
    return 0;
}

static int check_fd(kc_env *E, const float *gy)
{
    if (E->o.kinks)
        return 0;
    if (any_input_direction(E)) {
        kc_vec d = rand_vec(E, 1, 0, 1, "input direction");
        if (check_jvp_fd(E, &d, "input direction") ||
            check_hvp_fd(E, gy, &d, "input direction"))
            return -1;
    }
    if (E->P) {
        kc_vec d = rand_vec(E, 1, 1, 0, "parameter direction");
        if (check_jvp_fd(E, &d, "parameter direction") ||
            check_hvp_fd(E, gy, &d, "parameter direction"))
            return -1;
    }
    return 0;
}

/* (b) <vjp(gy), d> = <gy, jvp(d)>, and vjp/jvp write every entry */
static int check_adjoint(kc_env *E, const float *gy, const kc_vec *d)
{
    float *ry = fnew(E, E->ly, "jvp out");
    fill_value(ry, E->ly, NAN);
    k_jvp(E, &E->c, 1, d, ry);
    kc_vec g = out_vec(E, 1, NAN, "vjp out");
    k_vjp(E, &E->c, 1, gy, &g);
    for (size_t q = 0; q < E->ly; q++)
        if (isnan(ry[q]))
            return fail(E, "jvp left entry %zu unwritten (or NaN)", q);
    for (int i = 0; i < E->nin; i++)
        for (size_t q = 0; g.x[i] && q < E->lx[i]; q++)
            if (isnan(g.x[i][q]))
                return fail(E, "vjp left entry %zu of input %d unwritten (or NaN)", q, i);
    for (size_t q = 0; g.t && q < E->P; q++)
        if (isnan(g.t[q]))
            return fail(E, "vjp left parameter entry %zu unwritten (or NaN)", q);
    double lhs = dot_f(gy, ry, E->ly), rhs = vdot(E, &g, d);
    double scale = nrm_f(gy, E->ly) * nrm_f(ry, E->ly) + vnrm(E, &g) * vnrm(E, d);
    if (!(fabs(lhs - rhs) <= E->o.tol * scale + 1e-30))
        return fail(E, "adjoint identity: <gy, jvp(d)> = %.9g, <vjp(gy), d> = %.9g (scale %.3g)",
                    lhs, rhs, scale);
    return 0;
}

/* hvp_extra(gy) is symmetric: <d2, hvp(d1)> = <d1, hvp(d2)> */
static int check_hvp_symmetric(kc_env *E, const float *gy, const kc_vec *d1, const kc_vec *d2)
{
    kc_vec h1 = out_vec(E, 1, 0, "hvp out"), h2 = out_vec(E, 1, 0, "hvp out");
    k_hvp(E, &E->c, 1, gy, d1, &h1);
    k_hvp(E, &E->c, 1, gy, d2, &h2);
    double a = vdot(E, d2, &h1), b = vdot(E, d1, &h2);
    double scale = vnrm(E, d2) * vnrm(E, &h1) + vnrm(E, d1) * vnrm(E, &h2);
    if (!(fabs(a - b) <= E->o.tol * scale + 1e-30))
        return fail(E, "hvp_extra not symmetric: <d2, hvp(d1)> = %.9g, <d1, hvp(d2)> = %.9g",
                    a, b);
    return 0;
}

/* (f) k = 2 stacks give what k = 1 gives for each vector */
static int check_stacked(kc_env *E, const float *gy1, const float *gy2, const kc_vec *d2)
{
    char w[64];
    float *ry2 = fnew(E, 2 * E->ly, "jvp out k=2");
    fill_value(ry2, 2 * E->ly, NAN);
    k_jvp(E, &E->c, 2, d2, ry2);
    kc_vec g2 = out_vec(E, 2, NAN, "vjp out k=2"), h2 = out_vec(E, 2, 0, "hvp out k=2");
    k_vjp(E, &E->c, 2, gy2, &g2);
    k_hvp(E, &E->c, 2, gy1, d2, &h2);
    for (int j = 0; j < 2; j++) {
        kc_vec dj = slice(E, d2, j);
        float *ry = fnew(E, E->ly, "jvp out");
        k_jvp(E, &E->c, 1, &dj, ry);
        snprintf(w, sizeof w, "jvp k=2 vector %d vs k=1", j);
        if (cmp_ff(E, w, ry2 + (size_t)j * E->ly, ry, E->ly, E->o.tol))
            return -1;
        kc_vec g = out_vec(E, 1, NAN, "vjp out"), h = out_vec(E, 1, 0, "hvp out");
        k_vjp(E, &E->c, 1, gy2 + (size_t)j * E->ly, &g);
        k_hvp(E, &E->c, 1, gy1, &dj, &h);
        kc_vec gj = slice(E, &g2, j), hj = slice(E, &h2, j);
        snprintf(w, sizeof w, "vjp k=2 vector %d vs k=1", j);
        if (cmp_vec(E, w, &gj, &g, E->o.tol))
            return -1;
        snprintf(w, sizeof w, "hvp_extra k=2 vector %d vs k=1", j);
        if (cmp_vec(E, w, &hj, &h, E->o.tol))
            return -1;
    }
    return 0;
}

/* (g) NULL inputs equal zero inputs; NULL outputs leave the others unchanged */
static int check_nulls(kc_env *E, const float *gy, const kc_vec *d)
{
    char w[96];
    float *ry = fnew(E, E->ly, "jvp out"), *rz = fnew(E, E->ly, "jvp out");
    kc_vec g = out_vec(E, 1, NAN, "vjp out"), h = out_vec(E, 1, 0, "hvp out");
    k_jvp(E, &E->c, 1, d, ry);
    k_vjp(E, &E->c, 1, gy, &g);
    k_hvp(E, &E->c, 1, gy, d, &h);
    int nparts = E->nin + 1;
    for (int part = 0; part < nparts; part++) {
        float *src = part < E->nin ? d->x[part] : d->t;
        if (!src)
            continue;
        size_t len = part < E->nin ? E->lx[part] : E->P;
        /* direction without this part, once as NULL and once as zeros */
        kc_vec dn = *d, dz = *d;
        float *zero = fnew(E, len, "zero direction");
        if (part < E->nin) {
            dn.x[part] = NULL;
            dz.x[part] = zero;
        } else {
            dn.t = NULL;
            dz.t = zero;
        }
        k_jvp(E, &E->c, 1, &dn, ry);
        k_jvp(E, &E->c, 1, &dz, rz);
        snprintf(w, sizeof w, "jvp with a NULL %s%d vs zeros", part < E->nin ? "input " : "theta",
                 part < E->nin ? part : 0);
        if (cmp_ff(E, w, ry, rz, E->ly, E->o.tol))
            return -1;
        kc_vec hn = out_vec(E, 1, 0, "hvp out"), hz = out_vec(E, 1, 0, "hvp out");
        k_hvp(E, &E->c, 1, gy, &dn, &hn);
        k_hvp(E, &E->c, 1, gy, &dz, &hz);
        snprintf(w, sizeof w, "hvp_extra with a NULL %s%d vs zeros",
                 part < E->nin ? "input " : "theta", part < E->nin ? part : 0);
        if (cmp_vec(E, w, &hn, &hz, E->o.tol))
            return -1;
        /* only this output requested */
        kc_vec go, ho;
        memset(&go, 0, sizeof go);
        memset(&ho, 0, sizeof ho);
        kc_vec gfull = out_vec(E, 1, NAN, "vjp out"), hfull = out_vec(E, 1, 0, "hvp out");
        if (part < E->nin) {
            if (!gfull.x[part])
                continue;
            go.x[part] = gfull.x[part];
            ho.x[part] = hfull.x[part];
        } else {
            go.t = gfull.t;
            ho.t = hfull.t;
        }
        k_vjp(E, &E->c, 1, gy, &go);
        k_hvp(E, &E->c, 1, gy, d, &ho);
        snprintf(w, sizeof w, "vjp of one output only (part %d)", part);
        if (cmp_vec(E, w, &go, &g, E->o.tol))
            return -1;
        snprintf(w, sizeof w, "hvp_extra of one output only (part %d)", part);
        if (cmp_vec(E, w, &ho, &h, E->o.tol))
            return -1;
    }
    /* nothing requested at all: must not crash */
    kc_vec none;
    memset(&none, 0, sizeof none);
    k_vjp(E, &E->c, 1, gy, &none);
    k_hvp(E, &E->c, 1, gy, d, &none);
    return 0;
}

/* (d) per_sample rows sum to vjp's gtheta */
static int check_per_sample(kc_env *E, const float *gy)
{
    if (!E->P || !E->ops->per_sample)
        return 0;
    float *G = fnew(E, (size_t)E->n * E->P, "per_sample out");
    fill_value(G, (size_t)E->n * E->P, NAN);
    E->ops->per_sample(&E->c, gy, G);
    kc_vec g = out_vec(E, 1, NAN, "vjp out");
    k_vjp(E, &E->c, 1, gy, &g);
    double *sum = dnew(E, E->P);
    for (int i = 0; i < E->n; i++)
        for (size_t q = 0; q < E->P; q++)
            sum[q] += G[(size_t)i * E->P + q];
    return cmp(E, "per_sample rows summed vs vjp's gtheta", g.t, NULL, sum, E->P, E->o.tol,
               1e-30);
}

/* (e) quad_extra, vjp_hvp and gram_add against vjp, hvp_extra, per_sample */
static int check_extras(kc_env *E, const float *gy1, const float *gy2, const kc_vec *d2)
{
    if (E->ops->quad_extra && E->nin == 1) {
        double q[2] = {0.5, 0.5}, ref[2];
        E->ops->quad_extra(&E->c, 2, gy1, d2->x[0], d2->t, q);
        double scale = 0;
        for (int j = 0; j < 2; j++) {
            kc_vec dj = slice(E, d2, j), h = out_vec(E, 1, 0, "hvp out");
            k_hvp(E, &E->c, 1, gy1, &dj, &h);
            ref[j] = vdot(E, &dj, &h);
            scale += vnrm(E, &dj) * vnrm(E, &h);
        }
        for (int j = 0; j < 2; j++)
            if (!(fabs(q[j] - 0.5 - ref[j]) <= E->o.tol * scale + 1e-30))
                return fail(E, "quad_extra vector %d: %.9g (added to 0.5), <d, hvp_extra(d)> %.9g",
                            j, q[j] - 0.5, ref[j]);
    }
    if (E->ops->vjp_hvp && E->nin == 1) {
        kc_vec got = out_vec(E, 2, NAN, "vjp_hvp out");
        E->ops->vjp_hvp(&E->c, 2, gy2, gy1, d2->x[0], d2->t, got.x[0], got.t);
        kc_vec ref = out_vec(E, 2, NAN, "vjp out");
        k_vjp(E, &E->c, 2, gy2, &ref);
        k_hvp(E, &E->c, 2, gy1, d2, &ref);
        for (int j = 0; j < 2; j++) {
            kc_vec a = slice(E, &got, j), b = slice(E, &ref, j);
            if (cmp_vec(E, j ? "vjp_hvp vector 1 vs vjp + hvp_extra"
                             : "vjp_hvp vector 0 vs vjp + hvp_extra",
                        &a, &b, E->o.tol))
                return -1;
        }
    }
    if (E->ops->gram_add && E->P && E->ops->per_sample) {
        int n = E->n, R = 2 * n, nt = E->L->nparams;
        float *S = fnew(E, (size_t)R * E->P, "per_sample out");
        for (int j = 0; j < 2; j++)
            E->ops->per_sample(&E->c, gy2 + (size_t)j * E->ly, S + (size_t)j * n * E->P);
        for (int m = -1; m < nt; m++) {
            unsigned mask = m < 0 ? (1u << nt) - 1 : 1u << m;
            double *G = dnew(E, (size_t)R * R), *ref = dnew(E, (size_t)R * R);
            for (int a = 0; a < R * R; a++)
                G[a] = 0.25;
            E->ops->gram_add(&E->c, 2, gy2, mask, G);
            double mx = 0;
            for (int a = 0; a < R; a++)
                for (int b = 0; b < R; b++) {
                    double s = 0;
                    for (int t = 0; t < nt; t++)
                        if (mask & (1u << t)) {
                            const cv_tensor_info *ti = &E->L->params[t];
                            s += dot_f(S + (size_t)a * E->P + ti->offset,
                                       S + (size_t)b * E->P + ti->offset, ti->numel);
                        }
                    ref[(size_t)a * R + b] = s;
                    mx = fmax(mx, fabs(s));
                }
            for (int a = 0; a < R * R; a++)
                if (!(fabs(G[a] - 0.25 - ref[a]) <= E->o.tol * mx + 1e-30))
                    return fail(E, "gram_add mask %#x entry (%d, %d): %.9g (added to 0.25), "
                                   "per-sample gradients' %.9g",
                                mask, a / R, a % R, G[a] - 0.25, ref[a]);
        }
    }
    return 0;
}

/* a one-input node of a class with both kernel sets: vjp = vjp_n etc. */
static int check_both_entry_points(kc_env *E, const float *gy, const kc_vec *d)
{
    const cv_layer_ops *o = E->ops;
    if (E->nin != 1 || !o->vjp_n || !o->vjp || !o->jvp || !o->jvp_n || !o->hvp_extra ||
        !o->hvp_extra_n)
        return 0;
    float *r1 = fnew(E, E->ly, "jvp out"), *r2 = fnew(E, E->ly, "jvp out");
    o->jvp(&E->c, 1, d->x[0], d->t, r1);
    o->jvp_n(&E->c, 1, (const float *const *)d->x, d->t, r2);
    if (cmp_ff(E, "jvp vs jvp_n", r1, r2, E->ly, 0))
        return -1;
    kc_vec g1 = out_vec(E, 1, NAN, "vjp out"), g2 = out_vec(E, 1, NAN, "vjp out");
    o->vjp(&E->c, 1, gy, g1.x[0], g1.t);
    o->vjp_n(&E->c, 1, gy, (float *const *)g2.x, g2.t);
    if (cmp_vec(E, "vjp vs vjp_n", &g1, &g2, 0))
        return -1;
    kc_vec h1 = out_vec(E, 1, 0, "hvp out"), h2 = out_vec(E, 1, 0, "hvp out");
    o->hvp_extra(&E->c, 1, gy, d->x[0], d->t, h1.x[0], h1.t);
    o->hvp_extra_n(&E->c, 1, gy, (const float *const *)d->x, d->t, (float *const *)h2.x, h2.t);
    return cmp_vec(E, "hvp_extra vs hvp_extra_n", &h1, &h2, 0);
}

static int run_checks(kc_env *E)
{
    cv_err e;
    memset(&e, 0, sizeof e);
    E->c.y = E->y;
    fill_value(E->y, E->ly, NAN);
    if (E->ops->forward(&E->c, E->y, &e))
        return fail(E, "forward: %s", e.message);
    for (size_t q = 0; q < E->ly; q++)
        if (isnan(E->y[q]))
            return fail(E, "forward left output entry %zu unwritten (or NaN)", q);
    /* the inputs, parameters and buffers as they were: no kernel may change them */
    float *keep[KC_MAXIN + 2];
    for (int i = 0; i < E->nin; i++) {
        keep[i] = fnew(E, E->lx[i], "input copy");
        memcpy(keep[i], E->x[i], sizeof(float) * E->lx[i]);
    }
    keep[E->nin] = E->P ? fnew(E, E->P, "theta copy") : NULL;
    keep[E->nin + 1] = E->B ? fnew(E, E->B, "buffers copy") : NULL;
    if (E->P)
        memcpy(keep[E->nin], E->theta, sizeof(float) * E->P);
    if (E->B)
        memcpy(keep[E->nin + 1], E->buf, sizeof(float) * E->B);
    float *gy2 = fnew(E, 2 * E->ly, "gy"), *gy1 = gy2;
    fill_normal(E, gy2, 2 * E->ly);
    kc_vec d2 = rand_vec(E, 2, 0, 0, "direction"), d1 = slice(E, &d2, 0),
           db = slice(E, &d2, 1);
    if (check_adjoint(E, gy1, &d1) || check_fd(E, gy1) ||
        check_hvp_symmetric(E, gy1, &d1, &db) || check_stacked(E, gy1, gy2, &d2) ||
        check_nulls(E, gy1, &d1) || check_per_sample(E, gy1) ||
        check_extras(E, gy1, gy2, &d2) || check_both_entry_points(E, gy1, &d1))
        return -1;
    for (int i = 0; i < E->nin; i++)
        if (memcmp(keep[i], E->x[i], sizeof(float) * E->lx[i]) != 0)
            return fail(E, "a kernel changed input %d", i);
    if (E->P && memcmp(keep[E->nin], E->theta, sizeof(float) * E->P) != 0)
        return fail(E, "a kernel changed the parameters");
    if (E->B && memcmp(keep[E->nin + 1], E->buf, sizeof(float) * E->B) != 0)
        return fail(E, "a kernel changed the buffers");
    return guards_ok(E);
}

/* A check environment for L with options o and n samples, failures written
 * to why; NULL (said in why) when out of memory. */
static kc_env *env_new(cv_layer *L, const kc_opts *o, int n, char *why, size_t len)
{
    kc_env *E = calloc(1, sizeof *E);
    if (!E) {
        snprintf(why, len, "out of memory");
        return NULL;
    }
    E->L = L;
    E->o = *o;
    E->n = n;
    E->why = why;
    E->len = len;
    if (len)
        why[0] = '\0';
    cv_rng_seed(&E->r, E->o.seed);
    return E;
}

static void env_free(kc_env *E)
{
    for (int i = 0; i < E->nmem; i++)
        free(E->mem[i]);
    free(E);
}

int kc_forward(cv_layer *L, int n, const float *const *inputs, const float *params,
               const float *buffers, float *y, char *why, size_t len)
{
    kc_opts o = kc_defaults();
    for (int i = 0; i < KC_MAXIN; i++)
        o.inputs[i] = inputs ? inputs[i] : NULL;
    o.params = params;
    o.buffers = buffers;
    kc_env *E = env_new(L, &o, n > 0 ? n : 1, why, len);
    if (!E)
        return -1;
    int rc = setup(E, L);
    if (rc == 0) {
        make_ctx(E);
        cv_err e;
        memset(&e, 0, sizeof e);
        E->c.y = E->y;
        rc = E->ops->forward(&E->c, E->y, &e) ? fail(E, "forward: %s", e.message) : 0;
        if (rc == 0) {
            memcpy(y, E->y, sizeof(float) * E->ly);
            rc = guards_ok(E);
        }
        cv_layer_ctx_release(&E->c);
    }
    env_free(E);
    return rc;
}

int kc_check(cv_layer *L, const kc_opts *o, char *why, size_t len)
{
    kc_opts d = o ? *o : kc_defaults();
    kc_env *E = env_new(L, &d, d.n > 0 ? d.n : 3, why, len);
    if (!E)
        return -1;
    int rc = setup(E, L);
    if (rc == 0) {
        make_ctx(E);
        rc = run_checks(E);
        cv_layer_ctx_release(&E->c);
    }
    env_free(E);
    return rc;
}
