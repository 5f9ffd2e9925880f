/* ops_newton_kron.c - newton's Kronecker methods kfac, ekfac, kfra, acp (issue 22):
 * the natural-gradient / Kronecker Newton step s = -(F~ + damping I)^-1 g per
 * layer block (api/op_kron.h cv_op_kron_newton), its predicted change
 * g^T s + 1/2 s^T F~ s (the definition of cg/minres with F~ for A; s^T F~ s
 * from the step's own eigen coordinates, no product with F~), and
 * Botev's rescaling alpha* = -s^T g / s^T G s with the exact curvature G the
 * engine is built for (ggn for type-2; fisher_mc / ef for mc / empirical).
 *
 * The job's curvature (resolve, at parse time): these methods build their own
 * factors.  "curvature" may be omitted (then it is the method's: kfac, ekfac
 * or kfra); if given it must be the method's own Kronecker curvature (kfac
 * also accepts kflr), or the exact curvature the factors approximate (ggn,
 * fisher_mc, ef: fisher_type follows from it, and a contradicting
 * fisher_type is refused).  Anything else is a 400 invalid_curvature.  The
 * result's "curvature" names the Kronecker curvature used.
 *
 * acp (George's amortized covariance preconditioner): the same step with the
 * factors A (KFAC's) and B = alpha I (engine/kron.h options acp; alpha from
 * acp_alpha, a number > 0 or "max"), so s = -[(A + damping/alpha I)^-1 (x)
 * (1/alpha) I] g per Kronecker layer, exact damping only; it resolves its
 * curvature as kfac (the result says "kfac") and reports "acp_alpha" per
 * Kronecker layer of the block. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "api/op_args.h"
#include "api/op_kron.h"
#include "api/op_util.h"
#include "api/ops.h"
#include "engine/est_util.h"

/* ---- parse time ---------------------------------------------------------------- */

static int fisher_of_exact(cv_curvature k)
{
    return k == CV_CURV_GGN ? CV_KRON_TYPE2 : k == CV_CURV_FISHER_MC ? CV_KRON_MC
                                          : k == CV_CURV_EF          ? CV_KRON_EMPIRICAL
                                                                     : -1;
}

static int resolve(cv_opts *o, int given, cv_curvature *kind, cv_curvature own, cv_err *e)
{
    cv_op_base *b = o->args;
    if (!given || *kind == own || (own == CV_CURV_KFAC && *kind == CV_CURV_KFLR)) {
        if (!given)
            *kind = own;
        return 0;
    }
    int ft = fisher_of_exact(*kind);
    if (ft < 0)
        return cv_err_set(e, CV_EINVAL, "invalid_curvature", "curvature",
                          "newton method %s builds its own Kronecker factors: curvature may be "
                          "omitted, %s%s, or the exact curvature they approximate (ggn, "
                          "fisher_mc, ef), not %s",
                          cv_curvature_name(own), cv_curvature_name(own),
                          own == CV_CURV_KFAC ? " or kflr" : "", cv_curvature_name(*kind));
    if (cv_opts_given(o, "fisher_type") && b->fisher_type != ft)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.fisher_type",
                          "curvature %s is approximated by fisher_type \"%s\", not \"%s\"",
                          cv_curvature_name(*kind), cv_kron_fisher_name((cv_kron_fisher)ft),
                          cv_kron_fisher_name((cv_kron_fisher)b->fisher_type));
    b->fisher_type = ft;
    *kind = own;
    return 0;
}

static int resolve_kfac(cv_opts *o, int given, cv_curvature *kind, cv_err *e)
{
    return resolve(o, given, kind, CV_CURV_KFAC, e);
}

static int resolve_ekfac(cv_opts *o, int given, cv_curvature *kind, cv_err *e)
{
    return resolve(o, given, kind, CV_CURV_EKFAC, e);
}

static int resolve_kfra(cv_opts *o, int given, cv_curvature *kind, cv_err *e)
{
    return resolve(o, given, kind, CV_CURV_KFRA, e);
}

static int check_kron_newton(const cv_opts *opts, cv_curvature kind, cv_err *e)
{
    const cv_newton_args *a = opts->args;
    if (a->damping_mode == CV_NEWTON_DAMP_FACTORED && kind == CV_CURV_EKFAC)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.damping_mode",
                          "damping_mode \"factored\" damps KFAC's factors A and B; ekfac's "
                          "eigenvalues are not a Kronecker product: use \"exact\"");
    if (a->damping_mode == CV_NEWTON_DAMP_FACTORED && a->damping.num < 0)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.damping",
                          "damping_mode \"factored\" adds sqrt(damping) to the factors: damping "
                          "must be >= 0 (it is %g)",
                          a->damping.num);
    return 0;
}

/* ---- run ----------------------------------------------------------------------- */

static double dot(size_t n, const double *x, const double *y)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += x[i] * y[i];
    return s;
}

/* Botev's alpha* = -s^T g / s^T G s (G: the engine's exact curvature on b). */
static int rescale_alpha(cv_op_ctx *c, const cv_block *b, const double *s, double gs,
                         double *tmp, double *alpha, cv_err *e)
{
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_curvature k = cv_op_kron_engine_kind(c->kind, c->opts->args);
    cv_curv_linop(&op, &lc, c->curv, k, b, c->progress);
    if (op.apply(op.ctx, 1, s, tmp, e))
        return -1;
    double sgs = dot(b->dim, s, tmp);
    *alpha = 1;
    if (sgs > 0)
        *alpha = -gs / sgs;
    else if (dot(b->dim, s, s) > 0)
        return cv_err_set(e, CV_EINVAL, "not_positive_definite", "options.rescale",
                          "s^T G s = %g <= 0 for the step s (G: %s): alpha* = -s^T g / s^T G s "
                          "is undefined",
                          sgs, cv_curvature_name(k));
    return 0;
}

static int run_kron_newton(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const cv_newton_args *a = c->opts->args;
    size_t n = b->dim;
    double *g = CV_EST_ALLOC(n, double, e);
    double *s = g ? CV_EST_ALLOC(n, double, e) : NULL;
    double *tmp = s && a->rescale ? CV_EST_ALLOC(n, double, e) : NULL;
    if (!s || (a->rescale && !tmp)) {
        free(g);
        free(s);
        return -1;
    }
    int factored = a->damping_mode == CV_NEWTON_DAMP_FACTORED, its = 0, conv = 1, exact = 0;
    double lambda = a->damping.num, alpha = 1, sms = 0;
    int rc = cv_curv_gradient(c->curv, b, g, e);
    /* s^T F~ s from the step's eigen coordinates: no product with F~ */
    if (!rc)
        rc = cv_op_kron_newton(c, b, g, lambda, factored, &a->o, s, &its, &conv, &exact, &sms,
                               e);
    if (!rc && a->rescale)
        rc = rescale_alpha(c, b, s, dot(n, g, s), tmp, &alpha, e);
    for (size_t i = 0; !rc && a->rescale && i < n; i++)
        s[i] *= alpha;
    sms *= alpha * alpha;
    if (!rc) {
        cJSON_AddStringToObject(out, "method", c->method);
        cJSON_AddNumberToObject(out, "damping", lambda);
        cJSON_AddStringToObject(out, "damping_mode", factored ? "factored" : "exact");
        cJSON_AddItemToObject(out, "step", cv_json_doubles(s, n));
        cJSON_AddNumberToObject(out, "predicted_change", dot(n, g, s) + 0.5 * sms);
        if (a->rescale)
            cJSON_AddNumberToObject(out, "alpha", alpha);
        cJSON_AddNumberToObject(out, "iterations", its);
        cJSON_AddBoolToObject(out, "converged", conv);
        cJSON_AddBoolToObject(out, "exact", exact);
        rc = cv_op_add_actual_change(c, b, s, a->actual_change, out, e);
    }
    free(g);
    free(s);
    free(tmp);
    return rc;
}

/* ---- acp ------------------------------------------------------------------------ */

static int run_acp_newton(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    if (run_kron_newton(c, b, out, e))
        return -1;
    cv_op_kron_acp_alphas(c, b, out);
    return 0;
}

const cv_op_method cv_method_newton_kfac = {"kfac", run_kron_newton, check_kron_newton, NULL,
                                            resolve_kfac};
const cv_op_method cv_method_newton_ekfac = {"ekfac", run_kron_newton, check_kron_newton, NULL,
                                             resolve_ekfac};
const cv_op_method cv_method_newton_kfra = {"kfra", run_kron_newton, check_kron_newton, NULL,
                                            resolve_kfra};
/* acp: KFAC's A with B = alpha I (acp_alpha's range, 1e-300..1e300, is the
 * option table's); its curvature resolves as kfac's (the result's curvature is
 * "kfac"; fisher_type picks the exact curvature of the exact slots and of
 * rescale) */
const cv_op_method cv_method_newton_acp = {"acp", run_acp_newton, NULL, NULL, resolve_kfac};
