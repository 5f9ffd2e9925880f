/* op_util.c - helpers shared by the op modules (see op_util.h). */
#include "api/op_util.h"

#include "api/op_kron.h"

void cv_op_linop(cv_op_ctx *c, const cv_block *b, cv_linop *op, cv_curv_linop_ctx *lctx)
{
    if (c->kron) /* a Kronecker curvature: the job's block-diagonal factored operator */
        cv_op_kron_linop(c, b, op);
    else
        cv_curv_linop(op, lctx, c->curv, c->kind, b, c->progress);
}

int cv_op_add_actual_change(cv_op_ctx *c, const cv_block *b, const double *step, int want,
                            cJSON *out, cv_err *e)
{
    if (!want)
        return 0;
    double after;
    if (cv_curv_loss_at(c->curv, b, step, &after, e))
        return -1;
    cJSON_AddNumberToObject(out, "actual_change", after - cv_curv_loss(c->curv));
    return 0;
}

cJSON *cv_json_doubles(const double *v, size_t n)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; i < n; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(v[i]));
    return a;
}

cJSON *cv_json_columns(const double *v, size_t n, int k)
{
    cJSON *a = cJSON_CreateArray();
    for (int j = 0; j < k; j++)
        cJSON_AddItemToArray(a, cv_json_doubles(v + (size_t)j * n, n));
    return a;
}

cJSON *cv_json_param_names(const cv_model *m, const cv_block *b)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < b->count; i++)
        cJSON_AddItemToArray(a, cJSON_CreateString(cv_model_param(m, b->idx[i])->name));
    return a;
}
