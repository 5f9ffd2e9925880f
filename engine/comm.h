/* comm.h - the ranks of a data-parallel job and the collectives the engine
 * reduces with.
 *
 * A job's batch is split into R contiguous shards, one per rank
 * (cv_comm_share); every rank runs the same job on its shard in lockstep:
 * the same estimator code from the same seed, with each product, quadratic
 * form, gradient and per-sample quantity reduced across ranks, so every rank
 * holds the same numbers after each collective.  A cv_comm is a table of
 * three collectives (allreduce, allgather of rows, broadcast) that a
 * transport fills in: server/cluster_mpi.c over MPI; NULL (or size 1) is one
 * process and costs nothing.  The engine never names MPI.
 *
 * Lockstep needs every rank to take the same branch after each collective.
 * So errors are agreed on: cv_comm_agree is called by every rank with its
 * own rc; if any rank failed, all return -1 with the error of the lowest
 * failing rank.  Cancellation and the job's time limit are sampled by rank 0
 * at each agreement (its progress record); other ranks never stop on their
 * own (cv_progress.collective makes cv_progress_check a no-op between
 * collectives).  A transport failure (a rank died, or did not answer within
 * the transport's timeout) is CV_EUNAVAILABLE "rank_lost".
 */
#ifndef CV_COMM_H
#define CV_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "linop.h"

typedef enum { CV_COMM_F64, CV_COMM_F32, CV_COMM_I64, CV_COMM_I32, CV_COMM_BYTE } cv_comm_type;
typedef enum { CV_COMM_SUM, CV_COMM_MIN, CV_COMM_MAX } cv_comm_op;

/* What this rank's collectives moved and waited (data collectives only). */
typedef struct {
    uint64_t collectives;     /* calls */
    uint64_t bytes;           /* bytes of the buffers reduced, gathered, broadcast */
    double seconds;           /* wall time inside them (transfer plus waiting for others) */
} cv_comm_stats;

typedef struct cv_comm {
    int rank, size;
    void *ctx;
    /* buf (count elements) := op over ranks of every rank's buf. */
    int (*allreduce)(void *ctx, void *buf, size_t count, cv_comm_type t, cv_comm_op op,
                     cv_err *e);
    /* In place: rank r's rows[r] rows of row_len elements at row first[r]
     * of buf are copied to every rank (first ascending, no overlap). */
    int (*allgather_rows)(void *ctx, void *buf, size_t row_len, const size_t *rows,
                          const size_t *first, cv_comm_type t, cv_err *e);
    /* buf (count elements) := root's buf. */
    int (*bcast)(void *ctx, void *buf, size_t count, cv_comm_type t, int root, cv_err *e);
    /* Totals since start-up (may be NULL). */
    void (*stats)(void *ctx, cv_comm_stats *out);
} cv_comm;

/* Non-zero when comm spans more than one rank. */
int cv_comm_active(const cv_comm *comm);
int cv_comm_rank(const cv_comm *comm);
int cv_comm_size(const cv_comm *comm);

/* The contiguous share of n items of rank r of size ranks: items
 * [*first, *first + *count); the first n % size ranks get one more. */
void cv_comm_share(size_t n, int size, int r, size_t *first, size_t *count);

/* Every rank passes its own rc (0 or -1 with e filled); rank 0 also samples
 * p's cancel flag and deadline (p may be NULL).  Returns 0 when all ranks
 * succeeded, else -1 on every rank with e the lowest failing rank's error.
 * Without an active comm: rc, with p checked. */
int cv_comm_agree(const cv_comm *comm, int rc, cv_progress *p, cv_err *e);

/* cv_comm_agree, then (all succeeded) buf := op over ranks; when a rank
 * failed no data moves and every rank returns -1. */
int cv_comm_reduce(const cv_comm *comm, int rc, void *buf, size_t count, cv_comm_type t,
                   cv_comm_op op, cv_progress *p, cv_err *e);
/* cv_comm_reduce of doubles with CV_COMM_SUM. */
int cv_comm_sum(const cv_comm *comm, int rc, double *buf, size_t count, cv_progress *p,
                cv_err *e);

/* cv_comm_agree, then rows gathered: buf holds k blocks of n rows of row_len
 * elements (block j at + j*n*row_len); rank r owns rows [first_r, first_r +
 * count_r) of each block (cv_comm_share of n). */
int cv_comm_gather_rows(const cv_comm *comm, int rc, void *buf, size_t n, size_t row_len,
                        int k, cv_comm_type t, cv_progress *p, cv_err *e);

/* cv_comm_agree, then buf (count elements) := root's. */
int cv_comm_bcast(const cv_comm *comm, int rc, void *buf, size_t count, cv_comm_type t,
                  int root, cv_progress *p, cv_err *e);

size_t cv_comm_type_size(cv_comm_type t);

/* comm's totals so far (zeros without an active comm or stats). */
void cv_comm_get_stats(const cv_comm *comm, cv_comm_stats *out);

#endif
