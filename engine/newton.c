/* newton.c - damped Newton step s = -(A + damping I)^-1 g through CG or
 * MINRES, with the quadratic model's predicted change 1/2 s^T A s + g^T s. */
#include <stdlib.h>
#include <string.h>

#include "est_util.h"

void cv_newton_result_free(cv_newton_result *r)
{
    if (!r)
        return;
    free(r->step);
    memset(r, 0, sizeof *r);
}

int cv_newton_step(const cv_linop *op, const double *g, const cv_solve_options *opt,
                   cv_newton_result *out, cv_err *e)
{
    memset(out, 0, sizeof *out);
    if (cv_est_check_op(op, e))
        return -1;
    if (!g)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "gradient", "no gradient given");
    size_t n = op->n;
    double *b = CV_EST_ALLOC(n, double, e);
    double *as = b ? CV_EST_ALLOC(n, double, e) : NULL;
    if (!as) {
        free(b);
        return -1;
    }
    for (size_t i = 0; i < n; i++)
        b[i] = -g[i];
    cv_solve_result sr;
    int rc = cv_solve(op, b, opt, &sr, as, e);
    if (rc == 0) {
        out->n = n;
        out->step = sr.x;
        out->predicted_change = 0.5 * cv_est_dot(n, sr.x, as) + cv_est_dot(n, g, sr.x);
        out->residual = sr.residual;
        out->iterations = sr.iterations;
        out->converged = sr.converged;
        out->matvecs = sr.matvecs;
    }
    free(b);
    free(as);
    return rc;
}
