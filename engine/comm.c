/* comm.c - agreement on errors and the checked collectives over a cv_comm
 * (the transport's table); the share of a batch each rank holds. */
#include "comm.h"

#include <stdlib.h>
#include <string.h>

int cv_comm_active(const cv_comm *comm) { return comm && comm->size > 1; }
int cv_comm_rank(const cv_comm *comm) { return cv_comm_active(comm) ? comm->rank : 0; }
int cv_comm_size(const cv_comm *comm) { return cv_comm_active(comm) ? comm->size : 1; }

void cv_comm_share(size_t n, int size, int r, size_t *first, size_t *count)
{
    size_t R = size > 0 ? (size_t)size : 1, base = n / R, extra = n % R, ur = (size_t)r;
    *count = base + (ur < extra);
    *first = ur * base + (ur < extra ? ur : extra);
}

size_t cv_comm_type_size(cv_comm_type t)
{
    switch (t) {
    case CV_COMM_F64:
    case CV_COMM_I64: return 8;
    case CV_COMM_F32:
    case CV_COMM_I32: return 4;
    default: return 1;
    }
}

/* All ranks learn the lowest failing rank and take its error. */
static int take_error(const cv_comm *comm, int rc, cv_err *e)
{
    int32_t who = rc ? comm->rank : comm->size;
    cv_err mine = rc ? *e : (cv_err){0};
    if (comm->allreduce(comm->ctx, &who, 1, CV_COMM_I32, CV_COMM_MIN, e))
        return -1;
    if (who >= comm->size || who < 0)
        return cv_err_set(e, CV_EINTERNAL, "internal", "", "ranks disagree on a failure");
    if (comm->bcast(comm->ctx, &mine, sizeof mine, CV_COMM_BYTE, who, e))
        return -1;
    mine.code[sizeof mine.code - 1] = 0;
    mine.field[sizeof mine.field - 1] = 0;
    mine.message[sizeof mine.message - 1] = 0;
    *e = mine;
    return -1;
}

int cv_comm_agree(const cv_comm *comm, int rc, cv_progress *p, cv_err *e)
{
    if (!rc && cv_comm_rank(comm) == 0 && cv_progress_check_now(p, e))
        rc = -1;
    if (!cv_comm_active(comm))
        return rc ? -1 : 0;
    int32_t failed = rc ? 1 : 0;
    cv_err mine = rc ? *e : (cv_err){0};
    if (comm->allreduce(comm->ctx, &failed, 1, CV_COMM_I32, CV_COMM_MAX, e))
        return -1;
    if (!failed)
        return 0;
    *e = mine;
    return take_error(comm, rc, e);
}

int cv_comm_reduce(const cv_comm *comm, int rc, void *buf, size_t count, cv_comm_type t,
                   cv_comm_op op, cv_progress *p, cv_err *e)
{
    if (cv_comm_agree(comm, rc, p, e))
        return -1;
    if (!cv_comm_active(comm) || !count)
        return 0;
    return comm->allreduce(comm->ctx, buf, count, t, op, e);
}

int cv_comm_sum(const cv_comm *comm, int rc, double *buf, size_t count, cv_progress *p,
                cv_err *e)
{
    return cv_comm_reduce(comm, rc, buf, count, CV_COMM_F64, CV_COMM_SUM, p, e);
}

int cv_comm_gather_rows(const cv_comm *comm, int rc, void *buf, size_t n, size_t row_len,
                        int k, cv_comm_type t, cv_progress *p, cv_err *e)
{
    size_t R = (size_t)cv_comm_size(comm);
    size_t *rows = R > 1 ? malloc(sizeof(size_t) * 2 * R) : NULL;
    if (!rc && R > 1 && !rows)
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "gather counts");
    int agreed = cv_comm_agree(comm, rc, p, e);
    if (agreed || R == 1 || !n || !row_len) {
        free(rows);
        return agreed;
    }
    size_t *first = rows + R;
    for (int r = 0; r < comm->size; r++)
        cv_comm_share(n, comm->size, r, &first[r], &rows[r]);
    size_t es = cv_comm_type_size(t);
    for (int j = 0; j < k && !rc; j++)
        rc = comm->allgather_rows(comm->ctx, (char *)buf + (size_t)j * n * row_len * es,
                                  row_len, rows, first, t, e);
    free(rows);
    return rc;
}

int cv_comm_bcast(const cv_comm *comm, int rc, void *buf, size_t count, cv_comm_type t,
                  int root, cv_progress *p, cv_err *e)
{
    if (cv_comm_agree(comm, rc, p, e))
        return -1;
    if (!cv_comm_active(comm) || !count)
        return 0;
    return comm->bcast(comm->ctx, buf, count, t, root, e);
}

void cv_comm_get_stats(const cv_comm *comm, cv_comm_stats *out)
{
    *out = (cv_comm_stats){0};
    if (cv_comm_active(comm) && comm->stats)
        comm->stats(comm->ctx, out);
}
