/* ranks.c - rank 0's commands to the other ranks of `curvd serve` and the
 * other ranks' loop (API and protocol in ranks.h). */
#include "server/ranks.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/arch.h"
#include "api/datafile.h"
#include "api/params.h"

enum { CMD_MODEL = 1, CMD_DATASET, CMD_JOB, CMD_STOP };

/* A snapshot as the ranks name it. */
typedef struct {
    char name[CV_REG_NAME_MAX + 1];
    uint64_t lineage, version;
} snap_key;

/* One command (fixed size, on the command channel); payloads follow. */
typedef struct {
    uint32_t op;
    uint32_t batch_all;       /* job: the batch is the whole dataset (shards held) */
    snap_key model, dataset;  /* CMD_MODEL: model; CMD_DATASET: dataset; CMD_JOB: both */
    uint64_t len[2];          /* payload bytes: model arch, params; job text */
    uint64_t n, dataset_n;    /* job: its batch's samples; the dataset's */
    uint64_t job_memory, dense_max, max_vector_dim;
} command;

struct cv_ranks {
    cv_cluster *cl;
    pthread_mutex_t mu;       /* one user of the ranks at a time */
    snap_key model, dataset;  /* what the other ranks hold (name "": nothing) */
    int lost;                 /* a rank was lost: rank 0 works alone */
};

static snap_key key_of(const cv_snap *s)
{
    snap_key k = {{0}, s->lineage, s->version};
    snprintf(k.name, sizeof k.name, "%s", s->name);
    return k;
}

static int key_eq(const snap_key *a, const snap_key *b)
{
    return a->name[0] && strcmp(a->name, b->name) == 0 && a->lineage == b->lineage &&
           a->version == b->version;
}

/* ---- shards of a dataset, as safetensors --------------------------------------- */

/* The count of a shard rank 0 could not make (the receiver fails the job). */
#define NO_SHARD UINT64_MAX

/* Samples [first, first + count) of d to rank `to`: {bytes, count} then the
 * export (sample 0 of whole, the dataset, when count is 0: the shapes).  A
 * shard that cannot be exported is sent as {0, NO_SHARD}: every rank gets
 * its header whatever happens here.  -1: e filled (the transport is broken
 * when cv_cluster_broken says so). */
static int send_shard(cv_cluster *cl, int to, const cv_dataset *d, size_t first, size_t count,
                      const cv_dataset *whole, cv_err *e)
{
    cv_batch v;
    if (count)
        cv_batch_view(d, first, count, &v);
    else
        cv_batch_view(whole, 0, 1, &v);
    void *buf = NULL;
    size_t len = 0;
    int made = cv_datafile_export(&v, &buf, &len, e) == 0;
    uint64_t head[2] = {made ? len : 0, made ? count : NO_SHARD};
    int rc = cv_cluster_send(cl, to, head, sizeof head, e) ||
             (made && cv_cluster_send(cl, to, buf, len, e));
    free(buf);
    return rc || !made ? -1 : 0;
}

/* The other side of send_shard: the shard into out.  A transport failure
 * returns -2 (the rank must leave); a shard that rank 0 could not send or
 * that does not parse -1. */
static int recv_shard(cv_cluster *cl, cv_dataset *out, cv_err *e)
{
    uint64_t head[2];
    if (cv_cluster_recv(cl, head, sizeof head, e))
        return -2;
    if (head[1] == NO_SHARD)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                          "rank 0 could not send rank %d its shard", cv_cluster_rank(cl));
    void *buf = malloc(head[0] ? head[0] : 1);
    if (!buf || cv_cluster_recv(cl, buf, head[0], e)) {
        free(buf);
        return -2;
    }
    memset(out, 0, sizeof *out);
    int rc = cv_datafile_parse(buf, head[0], out, e);
    free(buf);
    if (!rc && head[1] == 0)
        out->n = 0;
    return rc;
}

/* Rank 0: the shares of samples of each rank r > 0 (of the job's batch j, or
 * of the whole dataset when j is NULL).  Every rank gets its header even when
 * rank 0 fails to make a shard (then -1 with the first error); on a transport
 * failure -1 at once. */
static int scatter(cv_cluster *cl, const cv_job_spec *j, const cv_dataset *d, cv_err *e)
{
    int R = cv_cluster_size(cl), rc = 0;
    cv_err mine;
    for (int r = 1; r < R; r++) {
        size_t first, count;
        cv_batch b = {0};
        int made = 1;
        if (!j) {
            cv_comm_share(d->n, R, r, &first, &count);
            cv_batch_view(d, first, count, &b);
        } else {
            made = cv_job_shard(j, d, R, r, &b, &mine) == 0;
        }
        uint64_t none[2] = {0, NO_SHARD};
        int one = made ? send_shard(cl, r, &b, 0, b.n, d, &mine)
                       : cv_cluster_send(cl, r, none, sizeof none, &mine);
        if (made)
            cv_dataset_free(&b);
        if ((one || !made) && !rc) {
            *e = mine;
            rc = -1;
        }
        if (cv_cluster_broken(cl))
            return -1;
    }
    return rc;
}

/* ---- rank 0 ---------------------------------------------------------------------- */

cv_ranks *cv_ranks_lead(cv_cluster *cl, cv_err *e)
{
    cv_ranks *k = cv_err_calloc(sizeof *k, "ranks", e);
    if (!k)
        return NULL;
    k->cl = cl;
    pthread_mutex_init(&k->mu, NULL);
    return k;
}

int cv_ranks_size(const cv_ranks *k) { return k ? cv_cluster_size(k->cl) : 1; }

int cv_ranks_alive(const cv_ranks *k)
{
    if (!k)
        return 1;
    return k->lost || cv_cluster_broken(k->cl) ? 1 : cv_cluster_size(k->cl);
}

/* A transport failure: from now on rank 0 works alone. */
static void mark_lost(cv_ranks *k, const cv_err *e)
{
    if (!k->lost)
        fprintf(stderr, "curvd: %s; jobs run on rank 0 alone from now on\n", e->message);
    k->lost = 1;
}

static int send_model(cv_ranks *k, const cv_snap *s, cv_err *e)
{
    cJSON *a = cv_arch_to_json(s->model);
    char *text = a ? cJSON_PrintUnformatted(a) : NULL;
    cJSON_Delete(a);
    void *params = NULL;
    size_t plen = 0;
    if (!text || cv_params_export(s->model, &params, &plen, e)) {
        free(text);
        return text ? -1 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "model for the ranks");
    }
    command c = {.op = CMD_MODEL, .model = key_of(s), .len = {strlen(text), plen}};
    memset(&k->model, 0, sizeof k->model);
    int rc = cv_cluster_command(k->cl, &c, sizeof c, e) ||
             cv_cluster_command(k->cl, text, c.len[0], e) ||
             cv_cluster_command(k->cl, params, plen, e);
    free(text);
    free(params);
    if (rc)
        return -1;
    k->model = c.model;
    return 0;
}

static int send_dataset(cv_ranks *k, const cv_snap *s, cv_err *e)
{
    command c = {.op = CMD_DATASET, .dataset = key_of(s), .dataset_n = s->data->n};
    memset(&k->dataset, 0, sizeof k->dataset);
    if (cv_cluster_command(k->cl, &c, sizeof c, e) || scatter(k->cl, NULL, s->data, e))
        return -1;
    k->dataset = c.dataset;
    return 0;
}

void cv_ranks_offer(cv_ranks *k, const cv_snap *s)
{
    if (!k || pthread_mutex_trylock(&k->mu) != 0)
        return;
    cv_err e;
    snap_key key = key_of(s);
    if (!k->lost && !cv_cluster_broken(k->cl)) {
        int model = s->kind == CV_REG_MODEL;
        int rc = model ? (key_eq(&k->model, &key) ? 0 : send_model(k, s, &e))
                       : (key_eq(&k->dataset, &key) ? 0 : send_dataset(k, s, &e));
        if (rc && cv_cluster_broken(k->cl))
            mark_lost(k, &e);
    }
    pthread_mutex_unlock(&k->mu);
}

/* The model and (for a batch of the whole dataset) the dataset shards the
 * job needs, where the others lack them.  A failure leaves nothing pending. */
static int sync_job(cv_ranks *k, const cv_job_spec *j, const cv_snap *ms, const cv_snap *ds,
                    cv_err *e)
{
    snap_key mk = key_of(ms), dk = key_of(ds);
    if (!key_eq(&k->model, &mk) && send_model(k, ms, e))
        return -1;
    if (j->batch.kind == CV_JOB_BATCH_ALL && !key_eq(&k->dataset, &dk) && send_dataset(k, ds, e))
        return -1;
    return 0;
}

/* The job command and its document; then, for a batch other than the whole
 * dataset, each rank's shard of it and a go (the others wait for their
 * shards without a time limit, then for the go).  Returns 0, -1 before the
 * command went out (nothing pending), or 1 after it (the others expect the
 * agreement: e holds rank 0's failure). */
static int send_job(cv_ranks *k, const cv_job_spec *j, const char *text, const cv_snap *ms,
                    const cv_snap *ds, size_t n, const cv_job_limits *lim, cv_err *e)
{
    int all = j->batch.kind == CV_JOB_BATCH_ALL;
    command c = {.op = CMD_JOB, .batch_all = (uint32_t)all, .model = key_of(ms),
                 .dataset = key_of(ds), .len = {strlen(text), 0}, .n = n,
                 .dataset_n = ds->data->n, .job_memory = lim->job_memory,
                 .dense_max = lim->dense_max, .max_vector_dim = lim->max_vector_dim};
    if (sync_job(k, j, ms, ds, e) || cv_cluster_command(k->cl, &c, sizeof c, e) ||
        cv_cluster_command(k->cl, (void *)text, c.len[0], e))
        return -1;
    if (all)
        return 0;
    uint32_t go = 1;
    int rc = scatter(k->cl, j, ds->data, e);
    cv_err ignored;
    if (!cv_cluster_broken(k->cl) && cv_cluster_command(k->cl, &go, sizeof go, &ignored))
        *e = ignored;
    return rc ? 1 : 0;
}

/* The job on every rank: rank 0's shard, the agreement that every rank is
 * ready (rc: rank 0's failure so far), the memory check and the run. */
static cJSON *exec_all(cv_ranks *k, const cv_job_spec *j, const cv_snap *ms, const cv_snap *ds,
                       size_t n, int rc, const cv_job_limits *lim, cv_progress *p, cv_err *e)
{
    const cv_comm *comm = cv_cluster_comm(k->cl);
    cv_batch shard = {0};
    int have = !rc && !(rc = cv_job_shard(j, ds->data, comm->size, 0, &shard, e));
    cJSON *res = NULL;
    if (cv_comm_agree(comm, rc, NULL, e)) {
        /* a rank could not hold the model or the data: send both again next time */
        memset(&k->model, 0, sizeof k->model);
        memset(&k->dataset, 0, sizeof k->dataset);
    } else if (!cv_job_check_memory_shard(j, ms->model, &shard, n, comm, lim, NULL, e)) {
        res = cv_job_exec_shard(j, ms->model, &shard, n, comm, lim, p, e);
    }
    if (have)
        cv_dataset_free(&shard);
    return res;
}

cJSON *cv_ranks_exec(cv_ranks *k, const cv_job_spec *j, const char *text, const cv_snap *ms,
                     const cv_snap *ds, const cv_job_limits *lim, cv_progress *p, cv_err *e)
{
    pthread_mutex_lock(&k->mu);
    cJSON *res = NULL;
    if (k->lost || cv_cluster_broken(k->cl)) {
        k->lost = 1;
        pthread_mutex_unlock(&k->mu);
        return cv_job_exec(j, ms->model, ds->data, lim, p, e);
    }
    size_t n = cv_job_batch_size(j, ds->data->n);
    int sent = send_job(k, j, text, ms, ds, n, lim, e);
    if (sent >= 0)
        res = exec_all(k, j, ms, ds, n, sent, lim, p, e);
    if (!res && cv_cluster_broken(k->cl))
        mark_lost(k, e);
    pthread_mutex_unlock(&k->mu);
    return res;
}

void cv_ranks_stop(cv_cluster *cl)
{
    if (!cl || cv_cluster_broken(cl))
        return;
    command c = {.op = CMD_STOP};
    cv_err e;
    cv_cluster_command(cl, &c, sizeof c, &e);
}

void cv_ranks_free(cv_ranks *k)
{
    if (!k)
        return;
    pthread_mutex_lock(&k->mu);
    if (!k->lost)
        cv_ranks_stop(k->cl);
    pthread_mutex_unlock(&k->mu);
    pthread_mutex_destroy(&k->mu);
    free(k);
}

/* ---- the other ranks --------------------------------------------------------------- */

/* What a rank other than 0 holds. */
typedef struct {
    cv_cluster *cl;
    cv_model *model;
    snap_key mkey;
    cv_dataset shard;        /* its share of the dataset dkey */
    snap_key dkey;
    int have_shard;
    cv_err bad_model;        /* why the last model could not be taken (code "" if fine) */
    cv_err bad_shard;        /* why the last dataset shard could not be taken */
} follower;

/* Receives n bytes (+ NUL) of a payload; NULL on a transport failure. */
static char *recv_payload(follower *f, size_t n, cv_err *e)
{
    char *buf = malloc(n + 1);
    if (!buf || cv_cluster_command(f->cl, buf, n, e)) {
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    return buf;
}

static void drop_model(follower *f)
{
    if (f->model) {
        cv_model_free(f->model);
        free(f->model);
    }
    f->model = NULL;
    memset(&f->mkey, 0, sizeof f->mkey);
}

/* CMD_MODEL: -1 on a transport failure. */
static int take_model(follower *f, const command *c, cv_err *e)
{
    drop_model(f);
    char *text = recv_payload(f, c->len[0], e), *params = text ? recv_payload(f, c->len[1], e)
                                                                : NULL;
    if (!params) {
        free(text);
        return -1;
    }
    cv_model *m = calloc(1, sizeof *m);
    cv_err err;
    memset(&f->bad_model, 0, sizeof f->bad_model);
    if (!m || cv_arch_parse(text, c->len[0], m, &err) ||
        cv_params_parse(m, params, c->len[1], &err)) {
        if (!m)
            cv_err_set(&err, CV_ENOMEM, "out_of_memory", "", "model");
        cv_err_set(&f->bad_model, err.status, err.code, "", "rank %d cannot hold model '%s': %.400s",
                   cv_cluster_rank(f->cl), c->model.name, err.message);
        if (m) {
            cv_model_free(m);
            free(m);
        }
    } else {
        f->model = m;
        f->mkey = c->model;
    }
    free(text);
    free(params);
    return 0;
}

/* CMD_DATASET: -1 on a transport failure. */
static int take_dataset(follower *f, const command *c, cv_err *e)
{
    if (f->have_shard)
        cv_dataset_free(&f->shard);
    f->have_shard = 0;
    memset(&f->dkey, 0, sizeof f->dkey);
    memset(&f->bad_shard, 0, sizeof f->bad_shard);
    cv_err err;
    int rc = recv_shard(f->cl, &f->shard, &err);
    if (rc == -2) {
        *e = err;
        return -1;
    }
    if (rc) {
        f->bad_shard = err;
        return 0;
    }
    f->have_shard = 1;
    f->dkey = c->dataset;
    return 0;
}

/* Checks that the held model and shard are the job's and binds the job. */
static cv_job_spec *prepare(follower *f, const command *c, const char *text, cv_err *e)
{
    if (f->bad_model.code[0] || (c->batch_all && f->bad_shard.code[0])) {
        *e = f->bad_model.code[0] ? f->bad_model : f->bad_shard;
        return NULL;
    }
    if (!key_eq(&f->mkey, &c->model) || (c->batch_all && !key_eq(&f->dkey, &c->dataset))) {
        cv_err_set(e, CV_EINTERNAL, "internal", "", "rank %d does not hold the job's %s",
                   cv_cluster_rank(f->cl), key_eq(&f->mkey, &c->model) ? "dataset" : "model");
        return NULL;
    }
    cJSON *doc = cJSON_Parse(text);
    cv_job_spec *j = doc ? cv_job_parse(doc, e) : NULL;
    cJSON_Delete(doc);
    if (!doc)
        cv_err_set(e, CV_EINTERNAL, "internal", "", "rank %d got a job it cannot parse",
                   cv_cluster_rank(f->cl));
    if (j && cv_job_bind_model(j, f->model, e)) {
        cv_job_spec_free(j);
        j = NULL;
    }
    return j;
}

/* CMD_JOB: -1 on a transport failure (the job's own errors are agreed on
 * with rank 0, which reports them). */
static int run_job(follower *f, const command *c, cv_err *e)
{
    char *text = recv_payload(f, c->len[0], e);
    if (!text)
        return -1;
    cv_batch own = {0}, shard = {0};
    int got = 0;
    cv_err shard_err = {0};
    if (!c->batch_all) {
        uint32_t go;
        int rc = recv_shard(f->cl, &own, &shard_err);
        if (rc == -2 || cv_cluster_command(f->cl, &go, sizeof go, e)) {
            if (rc == -2)
                *e = shard_err;
            if (rc == 0)
                cv_dataset_free(&own);
            free(text);
            return -1;
        }
        got = rc == 0;
    }
    cv_job_spec *j = prepare(f, c, text, e);
    if (j && !c->batch_all && !got)
        *e = shard_err;
    free(text);
    if (j && c->batch_all)
        cv_batch_view(&f->shard, 0, f->shard.n, &shard);
    else if (j && got)
        shard = own;
    int rc = j && (c->batch_all || got) ? 0 : -1;
    const cv_comm *comm = cv_cluster_comm(f->cl);
    cv_job_limits lim = {c->dense_max, c->max_vector_dim, c->job_memory};
    if (!cv_comm_agree(comm, rc, NULL, e) &&
        !cv_job_check_memory_shard(j, f->model, &shard, c->n, comm, &lim, NULL, e)) {
        cv_progress p;
        cv_progress_init(&p);
        cJSON_Delete(cv_job_exec_shard(j, f->model, &shard, c->n, comm, &lim, &p, e));
    }
    cv_job_spec_free(j);
    if (got)
        cv_dataset_free(&own);
    return cv_cluster_broken(f->cl) ? -1 : 0;
}

int cv_ranks_follow(cv_cluster *cl)
{
    follower f = {.cl = cl};
    cv_err e;
    int status = 0;
    for (int stop = 0; !stop;) {
        command c;
        if (cv_cluster_command(cl, &c, sizeof c, &e)) {
            status = 1;
            break;
        }
        int rc = c.op == CMD_MODEL     ? take_model(&f, &c, &e)
                 : c.op == CMD_DATASET ? take_dataset(&f, &c, &e)
                 : c.op == CMD_JOB     ? run_job(&f, &c, &e)
                                       : (stop = 1, 0);
        if (rc) {
            status = 1;
            break;
        }
    }
    if (status)
        fprintf(stderr, "curvd: rank %d leaves: %s\n", cv_cluster_rank(cl), e.message);
    drop_model(&f);
    if (f.have_shard)
        cv_dataset_free(&f.shard);
    cv_cluster_leave(cl);
    return status;
}
