/* curvd_mpi.c - the MPI transport plugin (build/curvd-mpi.so; its table and
 * contract: server/mpi_plugin.h): non-blocking MPI collectives polled with
 * loss detection (local peers' pids, the rank timeout, a loss notice from
 * another rank), large buffers split below MPI's int counts.  A wait spins
 * for the first ~2000 tests (collectives of a product answer in
 * microseconds), then naps 20 us, 0.2 ms after 10 ms and 2 ms after 1 s.
 *
 * After a loss the pending request is left as it is (a collective cannot be
 * cancelled) and the caller frees its buffers: safe because nothing calls
 * into MPI again on a broken transport (every function returns at once), and
 * OpenMPI 4's shared-memory and TCP transports progress only inside MPI
 * calls, so no late completion can write into a freed buffer. */
#include <errno.h>
#include <limits.h>
#include <mpi.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "server/mpi_plugin.h"

/* The loss notice one rank sends every live rank on the command communicator. */
#define TAG_LOST 7
/* The most elements of one MPI call (counts are ints). */
#define CHUNK ((size_t)1 << 28)

typedef struct {
    int32_t pid;
    uint32_t host; /* hash of the host name */
} peer;

static MPI_Comm data_comm = MPI_COMM_NULL, ctl_comm = MPI_COMM_NULL;
static int my_rank, world_size, is_broken, lost_rank = -1;
static double rank_timeout;
static peer *peers;
static int32_t lost_note; /* the notice's payload (our rank) */
static cv_comm_stats totals; /* the data collectives' */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int set_err(cv_err *e, cv_status st, const char *code, const char *fmt, ...)
{
    if (!e)
        return -1;
    e->status = st;
    snprintf(e->code, sizeof e->code, "%s", code);
    e->field[0] = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

static uint32_t host_hash(void)
{
    char h[256] = {0};
    gethostname(h, sizeof h - 1);
    uint32_t x = 2166136261u;
    for (const char *p = h; *p; p++)
        x = (x ^ (uint8_t)*p) * 16777619u;
    return x;
}

/* A peer on this host whose process is gone (or a zombie). */
static int peer_dead(int r)
{
    if (r == my_rank || peers[r].host != peers[my_rank].host || peers[r].pid <= 0)
        return 0;
    if (kill(peers[r].pid, 0) != 0 && errno == ESRCH)
        return 1;
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)peers[r].pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    const char *close = strrchr(buf, ')');
    return close && (close[2] == 'Z' || close[2] == 'X');
}

/* Marks the transport broken and tells every live rank (never waited for). */
static int lose(int who, cv_err *e, const char *why)
{
    if (!is_broken) {
        is_broken = 1;
        lost_rank = who;
        lost_note = my_rank;
        for (int r = 0; r < world_size; r++) {
            if (r == my_rank || r == who || peer_dead(r))
                continue;
            MPI_Request q;
            if (MPI_Isend(&lost_note, 1, MPI_INT32_T, r, TAG_LOST, ctl_comm, &q) == MPI_SUCCESS)
                MPI_Request_free(&q);
        }
    }
    if (who >= 0)
        return set_err(e, CV_EUNAVAILABLE, "rank_lost", "rank %d of %d was lost: %s", who,
                       world_size, why);
    return set_err(e, CV_EUNAVAILABLE, "rank_lost", "a rank of %d was lost: %s", world_size,
                   why);
}

static int broken_err(cv_err *e)
{
    return set_err(e, CV_EUNAVAILABLE, "rank_lost",
                   "the ranks are no longer complete (rank %d was lost); the data-parallel "
                   "transport is closed", lost_rank);
}

/* Polls for a loss: a dead local peer, a notice from another rank. */
static int check_loss(cv_err *e)
{
    for (int r = 0; r < world_size; r++)
        if (peer_dead(r))
            return lose(r, e, "its process is gone");
    int flag = 0;
    MPI_Status st;
    if (MPI_Iprobe(MPI_ANY_SOURCE, TAG_LOST, ctl_comm, &flag, &st) == MPI_SUCCESS && flag) {
        int32_t who;
        MPI_Recv(&who, 1, MPI_INT32_T, st.MPI_SOURCE, TAG_LOST, ctl_comm, MPI_STATUS_IGNORE);
        return lose(-1, e, "another rank reported a loss");
    }
    return 0;
}

/* Waits for request q: spins briefly (latency), then sleeps; checks for
 * losses every 20 ms; timeout (0: none) bounds the wait. */
static int wait_req(MPI_Request *q, double timeout, cv_err *e)
{
    double t0 = now_s(), next = t0 + 0.02;
    for (long spin = 0;; spin++) {
        int flag = 0;
        int rc = MPI_Test(q, &flag, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
            char msg[MPI_MAX_ERROR_STRING];
            int len = 0;
            MPI_Error_string(rc, msg, &len);
            return lose(-1, e, msg);
        }
        if (flag)
            return 0;
        if (spin < 2000)
            continue;
        /* the longer the wait, the longer the naps: idle ranks stay near 0% CPU */
        double t = now_s();
        struct timespec ts = {0, t - t0 < 0.01 ? 20000 : t - t0 < 1 ? 200000 : 2000000};
        nanosleep(&ts, NULL);
        t = now_s();
        if (t < next)
            continue;
        next = t + 0.02;
        if (check_loss(e))
            return -1;
        if (timeout > 0 && t - t0 > timeout) {
            char why[96];
            snprintf(why, sizeof why, "no answer within %.0f s (--rank-timeout)", timeout);
            return lose(-1, e, why);
        }
    }
}

static MPI_Datatype mpi_type(cv_comm_type t)
{
    switch (t) {
    case CV_COMM_F64: return MPI_DOUBLE;
    case CV_COMM_F32: return MPI_FLOAT;
    case CV_COMM_I64: return MPI_INT64_T;
    case CV_COMM_I32: return MPI_INT32_T;
    default: return MPI_BYTE;
    }
}

static MPI_Op mpi_op(cv_comm_op op)
{
    return op == CV_COMM_MIN ? MPI_MIN : op == CV_COMM_MAX ? MPI_MAX : MPI_SUM;
}

static size_t type_size(cv_comm_type t)
{
    return t == CV_COMM_F64 || t == CV_COMM_I64 ? 8 : t == CV_COMM_BYTE ? 1 : 4;
}

/* Counts one data collective of bytes started at t0. */
static void tally(size_t bytes, double t0)
{
    totals.collectives++;
    totals.bytes += bytes;
    totals.seconds += now_s() - t0;
}

static void p_stats(void *ctx, cv_comm_stats *out)
{
    (void)ctx;
    *out = totals;
}

static int p_allreduce(void *ctx, void *buf, size_t count_, cv_comm_type t, cv_comm_op op,
                       cv_err *e)
{
    (void)ctx;
    if (is_broken)
        return broken_err(e);
    double t0 = now_s();
    size_t count = count_;
    for (size_t o = 0; o < count; o += CHUNK) {
        int n = (int)(count - o < CHUNK ? count - o : CHUNK);
        MPI_Request q;
        if (MPI_Iallreduce(MPI_IN_PLACE, (char *)buf + o * type_size(t), n, mpi_type(t),
                           mpi_op(op), data_comm, &q) != MPI_SUCCESS)
            return lose(-1, e, "MPI_Iallreduce failed");
        if (wait_req(&q, rank_timeout, e))
            return -1;
    }
    tally(count_ * type_size(t), t0);
    return 0;
}

static int p_bcast_on(MPI_Comm comm, void *buf, size_t count, cv_comm_type t, int root,
                      double timeout, cv_err *e)
{
    if (is_broken)
        return broken_err(e);
    for (size_t o = 0; o < count; o += CHUNK) {
        int n = (int)(count - o < CHUNK ? count - o : CHUNK);
        MPI_Request q;
        if (MPI_Ibcast((char *)buf + o * type_size(t), n, mpi_type(t), root, comm, &q) !=
            MPI_SUCCESS)
            return lose(-1, e, "MPI_Ibcast failed");
        if (wait_req(&q, timeout, e))
            return -1;
    }
    return 0;
}

static int p_bcast(void *ctx, void *buf, size_t n, cv_comm_type t, int root, cv_err *e)
{
    (void)ctx;
    double t0 = now_s();
    int rc = p_bcast_on(data_comm, buf, n, t, root, rank_timeout, e);
    if (!rc)
        tally(n * type_size(t), t0);
    return rc;
}

static int p_allgather_rows(void *ctx, void *buf, size_t row_len, const size_t *rows,
                            const size_t *first, cv_comm_type t, cv_err *e)
{
    (void)ctx;
    if (is_broken)
        return broken_err(e);
    if (row_len > INT_MAX || first[world_size - 1] + rows[world_size - 1] > INT_MAX)
        return set_err(e, CV_ETOOLARGE, "too_large", "gather of %zu rows of %zu: over MPI's "
                       "int counts", first[world_size - 1] + rows[world_size - 1], row_len);
    int *cnt = malloc(sizeof(int) * 2 * (size_t)world_size);
    if (!cnt) /* the others are in the collective already: this rank cannot follow */
        return lose(my_rank, e, "out of memory for the gather's counts");
    for (int r = 0; r < world_size; r++) {
        cnt[r] = (int)rows[r];
        cnt[world_size + r] = (int)first[r];
    }
    double t0 = now_s();
    MPI_Datatype row;
    MPI_Type_contiguous((int)row_len, mpi_type(t), &row);
    MPI_Type_commit(&row);
    MPI_Request q;
    int rc = MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, cnt, cnt + world_size,
                             row, data_comm, &q) == MPI_SUCCESS
                 ? wait_req(&q, rank_timeout, e)
                 : lose(-1, e, "MPI_Iallgatherv failed");
    MPI_Type_free(&row);
    if (!rc)
        tally((size_t)(first[world_size - 1] + rows[world_size - 1]) * row_len * type_size(t),
              t0);
    free(cnt);
    return rc;
}

static int p_command(void *buf, size_t bytes, cv_err *e)
{
    return p_bcast_on(ctl_comm, buf, bytes, CV_COMM_BYTE, 0, my_rank == 0 ? rank_timeout : 0,
                      e);
}

/* Point to point between rank 0 and rank peer, in chunks below int counts. */
static int p2p(int peer_rank, void *buf, size_t bytes, int sending, cv_err *e)
{
    if (is_broken)
        return broken_err(e);
    for (size_t o = 0; o < bytes || (o == 0 && bytes == 0); o += CHUNK) {
        int n = (int)(bytes - o < CHUNK ? bytes - o : CHUNK);
        MPI_Request q;
        int rc = sending ? MPI_Isend((char *)buf + o, n, MPI_BYTE, peer_rank, 11, ctl_comm, &q)
                         : MPI_Irecv((char *)buf + o, n, MPI_BYTE, peer_rank, 11, ctl_comm, &q);
        if (rc != MPI_SUCCESS)
            return lose(peer_rank, e, sending ? "MPI_Isend failed" : "MPI_Irecv failed");
        if (wait_req(&q, rank_timeout, e))
            return -1;
        if (bytes == 0)
            break;
    }
    return 0;
}

static int p_send(int to, const void *buf, size_t bytes, cv_err *e)
{
    return p2p(to, (void *)buf, bytes, 1, e);
}

/* A follower waits for its bytes as long as rank 0 takes to send the
 * others theirs first (checking only for losses). */
static int p_recv(void *buf, size_t bytes, cv_err *e)
{
    double keep = rank_timeout;
    rank_timeout = 0;
    int rc = p2p(0, buf, bytes, 0, e);
    rank_timeout = keep;
    return rc;
}

static int p_init(double timeout_s, int *rank, int *size, cv_err *e)
{
    int provided = 0;
    if (MPI_Init_thread(NULL, NULL, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS)
        return set_err(e, CV_EINTERNAL, "mpi_init", "MPI_Init_thread failed");
    if (provided < MPI_THREAD_SERIALIZED)
        return set_err(e, CV_EINTERNAL, "mpi_init",
                       "this MPI gives thread level %d; curvd needs MPI_THREAD_SERIALIZED",
                       provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &my_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_dup(MPI_COMM_WORLD, &data_comm);
    MPI_Comm_dup(MPI_COMM_WORLD, &ctl_comm);
    MPI_Comm_set_errhandler(data_comm, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(ctl_comm, MPI_ERRORS_RETURN);
    rank_timeout = timeout_s;
    peers = calloc((size_t)world_size, sizeof *peers);
    if (!peers)
        return set_err(e, CV_ENOMEM, "out_of_memory", "rank table");
    peer me = {(int32_t)getpid(), host_hash()};
    MPI_Allgather(&me, (int)sizeof me, MPI_BYTE, peers, (int)sizeof me, MPI_BYTE,
                  MPI_COMM_WORLD);
    *rank = my_rank;
    *size = world_size;
    return 0;
}

static int p_broken(void) { return is_broken; }

static int p_alive(void)
{
    if (!is_broken)
        return world_size;
    int n = 0;
    for (int r = 0; r < world_size; r++)
        n += r != lost_rank && !peer_dead(r);
    return n;
}

static void p_finish(void)
{
    if (!is_broken) {
        MPI_Comm_free(&data_comm);
        MPI_Comm_free(&ctl_comm);
        MPI_Finalize();
    }
    free(peers);
    peers = NULL;
}

static const cv_mpi_plugin table = {
    .init = p_init,
    .allreduce = p_allreduce,
    .allgather_rows = p_allgather_rows,
    .bcast = p_bcast,
    .stats = p_stats,
    .command = p_command,
    .send = p_send,
    .recv = p_recv,
    .broken = p_broken,
    .alive = p_alive,
    .finish = p_finish,
};

const cv_mpi_plugin *cv_mpi_plugin_v1(void);
const cv_mpi_plugin *cv_mpi_plugin_v1(void) { return &table; }
