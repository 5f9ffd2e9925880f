/* test_graph.c - the graph form of the architecture (issue 19): parsing and
 * export of modules + nodes, the graph driver's products against the same
 * network written as a Sequential, and against the independent oracles
 * (finite differences, dense J^T Lambda J, per-sample sums, symmetry/PSD,
 * quadratic forms, Gram matrices) on residual and attention graphs; refusals
 * name the JSON path of the node at fault. */
#include "testutil.h"

#include "api/arch.h"

/* ---- fixtures from documents --------------------------------------------- */

static void must_parse(const char *json, cv_model *m)
{
    cv_err e;
    ck_assert_msg(cv_arch_parse(json, strlen(json), m, &e) == 0, "parse: %s (%s)", e.message,
                  e.field);
}

/* Random parameters of scale 1/sqrt(numel of the tensor's last dims) and
 * buffers (BatchNorm running variances positive). */
static void random_params(cv_model *m, uint64_t seed)
{
    ck_assert_int_eq(cv_model_alloc(m), 0);
    cv_rng r;
    cv_rng_seed(&r, seed);
    for (int l = 0; l < m->nlayers; l++) {
        const cv_layer *L = &m->layers[l];
        for (int p = 0; p < L->nparams; p++) {
            const cv_tensor_info *t = &L->params[p];
            int fan = t->rank > 1 ? t->dim[t->rank - 1] : 4;
            double s = 1.5 / sqrt((double)fan);
            for (size_t q = 0; q < t->numel; q++)
                m->params[t->offset + q] = (float)(s * (2 * cv_rng_uniform(&r) - 1));
        }
        for (int b = 0; b < L->nbuffers; b++) {
            const cv_tensor_info *t = &L->buffers[b];
            for (size_t q = 0; q < t->numel; q++)
                m->buffers[t->offset + q] = (float)(0.5 + cv_rng_uniform(&r));
        }
    }
}

static void fx_from_json(tu_fixture *f, const char *json, size_t n, uint64_t seed)
{
    memset(f, 0, sizeof *f);
    must_parse(json, &f->m);
    random_params(&f->m, seed);
    tu_data(&f->d, &f->m, n, seed + 100);
    cv_err e;
    f->c = cv_curv_new(&f->m, &f->d, NULL, &e);
    ck_assert_msg(f->c != NULL, "cv_curv_new: %s", e.message);
    cv_block_full(&f->m, &f->full);
}

static void check_all_oracles(tu_fixture *f, int variant)
{
    tu_fd_bounds b = {.grad_eps = 1e-3, .grad_tol = 2e-2, .eps = 1e-3, .tol = 3e-2,
                      .hess_seed = 7};
    for (int o = 0; o < TU_NORACLES; o++)
        tu_check_oracle(f, (tu_oracle)o, &b, variant);
    tu_check_quadforms(f->c, &f->full, 3, 11, "graph");
}

/* ---- a Sequential written as a graph --------------------------------------- */

static const char *SEQ_MLP =
    "{\"input_shape\": [6], \"layers\": ["
    "{\"type\": \"Linear\", \"in_features\": 6, \"out_features\": 5},"
    "{\"type\": \"Tanh\"},"
    "{\"type\": \"Linear\", \"in_features\": 5, \"out_features\": 3}],"
    "\"loss\": {\"type\": \"CrossEntropyLoss\"}}";

static const char *GRAPH_MLP =
    "{\"input_shape\": [6],"
    " \"modules\": {\"0\": {\"type\": \"Linear\", \"in_features\": 6, \"out_features\": 5},"
    "               \"1\": {\"type\": \"Tanh\"},"
    "               \"2\": {\"type\": \"Linear\", \"in_features\": 5, \"out_features\": 3}},"
    " \"nodes\": [{\"name\": \"x\", \"op\": \"placeholder\"},"
    "  {\"name\": \"fc\", \"op\": \"call_module\", \"target\": \"0\", \"args\": [\"x\"]},"
    "  {\"name\": \"act\", \"op\": \"call_module\", \"target\": \"1\", \"args\": [\"fc\"]},"
    "  {\"name\": \"out\", \"op\": \"call_module\", \"target\": \"2\", \"args\": [\"act\"]},"
    "  {\"name\": \"output\", \"op\": \"output\", \"args\": [\"out\"]}],"
    " \"loss\": {\"type\": \"CrossEntropyLoss\"}}";

START_TEST(graph_chain_equals_sequential)
{
    tu_fixture s, g;
    fx_from_json(&s, SEQ_MLP, 7, 3);
    fx_from_json(&g, GRAPH_MLP, 7, 3);
    ck_assert_uint_eq(s.m.nparams_total, g.m.nparams_total);
    for (int i = 0; i < cv_model_param_count(&s.m); i++)
        ck_assert_str_eq(cv_model_param(&s.m, i)->name, cv_model_param(&g.m, i)->name);
    ck_assert(cv_curv_loss(s.c) == cv_curv_loss(g.c));
    size_t D = s.full.dim;
    double *X = malloc(sizeof(double) * D * 2), *Y1 = malloc(sizeof(double) * D * 2),
           *Y2 = malloc(sizeof(double) * D * 2);
    cv_rng r;
    cv_rng_seed(&r, 5);
    cv_rng_gaussian(&r, X, D * 2);
    cv_err e;
    for (int k = 0; k < CV_CURV_EXACT_COUNT; k++) {
        ck_assert_int_eq(cv_curv_matvec(s.c, (cv_curvature)k, &s.full, 2, X, Y1, &e), 0);
        ck_assert_int_eq(cv_curv_matvec(g.c, (cv_curvature)k, &g.full, 2, X, Y2, &e), 0);
        ck_assert_msg(memcmp(Y1, Y2, sizeof(double) * D * 2) == 0,
                      "%s differs between the Sequential and the graph form",
                      cv_curvature_name((cv_curvature)k));
    }
    cv_block blocks[4];
    ck_assert_int_eq(cv_blocks_per_layer(&g.m, blocks, 4), 2);
    ck_assert_str_eq(blocks[0].name, "0");
    ck_assert_str_eq(blocks[1].name, "2");
    free(X);
    free(Y1);
    free(Y2);
    tu_fx_free(&s);
    tu_fx_free(&g);
}
END_TEST

START_TEST(graph_export_round_trip)
{
    cv_model m, m2;
    must_parse(GRAPH_MLP, &m);
    char *text = tu_arch_reparse(&m, &m2, "graph mlp");
    ck_assert_ptr_nonnull(strstr(text, "\"nodes\""));
    ck_assert_ptr_null(strstr(text, "\"layers\""));
    free(text);
}
END_TEST

/* ---- residual and attention graphs against the oracles ---------------------- */

/* fc2(tanh(fc1(x)) + x) * 0.5 + relu(x) @ ... : fan-out, add, scalar mul. */
static const char *RESIDUAL_MLP =
    "{\"input_shape\": [6],"
    " \"modules\": {\"fc1\": {\"type\": \"Linear\", \"in_features\": 6, \"out_features\": 6},"
    "               \"act\": {\"type\": \"Tanh\"},"
    "               \"fc2\": {\"type\": \"Linear\", \"in_features\": 6, \"out_features\": 3}},"
    " \"nodes\": [{\"name\": \"x\", \"op\": \"placeholder\"},"
    "  {\"name\": \"fc1\", \"op\": \"call_module\", \"target\": \"fc1\", \"args\": [\"x\"]},"
    "  {\"name\": \"act\", \"op\": \"call_module\", \"target\": \"act\", \"args\": [\"fc1\"]},"
    "  {\"name\": \"res\", \"op\": \"call_function\", \"target\": \"add\", \"args\": [\"act\", \"x\"]},"
    "  {\"name\": \"sq\", \"op\": \"call_function\", \"target\": \"mul\", \"args\": [\"res\", \"act\"]},"
    "  {\"name\": \"h\", \"op\": \"call_function\", \"target\": \"add\", \"args\": [\"sq\", \"res\"]},"
    "  {\"name\": \"fc2\", \"op\": \"call_module\", \"target\": \"fc2\", \"args\": [\"h\"]},"
    "  {\"name\": \"half\", \"op\": \"call_function\", \"target\": \"mul\", \"args\": [\"fc2\"], \"scalar\": 0.5},"
    "  {\"name\": \"output\", \"op\": \"output\", \"args\": [\"half\"]}],"
    " \"loss\": {\"type\": \"CrossEntropyLoss\"}}";

START_TEST(residual_graph_oracles)
{
    tu_fixture f;
    fx_from_json(&f, RESIDUAL_MLP, 5, 21);
    check_all_oracles(&f, 0);
    tu_fx_free(&f);
}
END_TEST

/* A tiny decoder-only transformer on token ids: embedding + learned
 * positions, pre-LayerNorm causal self-attention (MultiheadAttention or
 * scaled_dot_product_attention on hand-made heads) and a GELU MLP with
 * residuals, a Linear head, sequence cross-entropy (class_dim -1). */
static char *transformer_json(int sdpa, const char *loss_extra)
{
    const char *attn_mods =
        sdpa ? "\"attn_q\": {\"type\": \"Linear\", \"in_features\": 8, \"out_features\": 8},"
               "\"attn_k\": {\"type\": \"Linear\", \"in_features\": 8, \"out_features\": 8},"
               "\"attn_v\": {\"type\": \"Linear\", \"in_features\": 8, \"out_features\": 8},"
               "\"attn_o\": {\"type\": \"Linear\", \"in_features\": 8, \"out_features\": 8},"
             : "\"attn\": {\"type\": \"MultiheadAttention\", \"embed_dim\": 8, \"num_heads\": 2,"
               " \"batch_first\": true},";
    const char *attn_nodes =
        sdpa ? "{\"name\": \"q\", \"op\": \"call_module\", \"target\": \"attn_q\", \"args\": [\"ln1\"]},"
               "{\"name\": \"k\", \"op\": \"call_module\", \"target\": \"attn_k\", \"args\": [\"ln1\"]},"
               "{\"name\": \"v\", \"op\": \"call_module\", \"target\": \"attn_v\", \"args\": [\"ln1\"]},"
               "{\"name\": \"qh\", \"op\": \"call_function\", \"target\": \"reshape\", \"args\": [\"q\"], \"shape\": [-1, 5, 2, 4]},"
               "{\"name\": \"kh\", \"op\": \"call_function\", \"target\": \"reshape\", \"args\": [\"k\"], \"shape\": [-1, 5, 2, 4]},"
               "{\"name\": \"vh\", \"op\": \"call_function\", \"target\": \"reshape\", \"args\": [\"v\"], \"shape\": [-1, 5, 2, 4]},"
               "{\"name\": \"qt\", \"op\": \"call_function\", \"target\": \"transpose\", \"args\": [\"qh\"], \"dim0\": 1, \"dim1\": 2},"
               "{\"name\": \"kt\", \"op\": \"call_function\", \"target\": \"transpose\", \"args\": [\"kh\"], \"dim0\": 1, \"dim1\": 2},"
               "{\"name\": \"vt\", \"op\": \"call_function\", \"target\": \"transpose\", \"args\": [\"vh\"], \"dim0\": 1, \"dim1\": 2},"
               "{\"name\": \"o\", \"op\": \"call_function\", \"target\": \"scaled_dot_product_attention\", \"args\": [\"qt\", \"kt\", \"vt\"], \"is_causal\": true},"
               "{\"name\": \"ot\", \"op\": \"call_function\", \"target\": \"transpose\", \"args\": [\"o\"], \"dim0\": 1, \"dim1\": 2},"
               "{\"name\": \"om\", \"op\": \"call_function\", \"target\": \"reshape\", \"args\": [\"ot\"], \"shape\": [-1, 5, 8]},"
               "{\"name\": \"attn\", \"op\": \"call_module\", \"target\": \"attn_o\", \"args\": [\"om\"]},"
             : "{\"name\": \"attn\", \"op\": \"call_module\", \"target\": \"attn\", \"args\": [\"ln1\", \"ln1\", \"ln1\"], \"is_causal\": true},";
    char *buf = malloc(8192);
    snprintf(buf, 8192,
             "{\"input_shape\": [5], \"input_dtype\": \"int64\","
             " \"modules\": {\"tok\": {\"type\": \"Embedding\", \"num_embeddings\": 11, \"embedding_dim\": 8},"
             "  \"ln1\": {\"type\": \"LayerNorm\", \"normalized_shape\": [8]},"
             "  %s"
             "  \"ln2\": {\"type\": \"LayerNorm\", \"normalized_shape\": 8, \"elementwise_affine\": false},"
             "  \"mlp.0\": {\"type\": \"Linear\", \"in_features\": 8, \"out_features\": 16},"
             "  \"mlp.1\": {\"type\": \"GELU\"},"
             "  \"mlp.2\": {\"type\": \"Linear\", \"in_features\": 16, \"out_features\": 8},"
             "  \"head\": {\"type\": \"Linear\", \"in_features\": 8, \"out_features\": 11}},"
             " \"nodes\": [{\"name\": \"idx\", \"op\": \"placeholder\"},"
             "  {\"name\": \"tok\", \"op\": \"call_module\", \"target\": \"tok\", \"args\": [\"idx\"]},"
             "  {\"name\": \"pos\", \"op\": \"get_attr\", \"target\": \"pos_emb\", \"shape\": [1, 5, 8]},"
             "  {\"name\": \"h0\", \"op\": \"call_function\", \"target\": \"add\", \"args\": [\"tok\", \"pos\"]},"
             "  {\"name\": \"ln1\", \"op\": \"call_module\", \"target\": \"ln1\", \"args\": [\"h0\"]},"
             "  %s"
             "  {\"name\": \"h1\", \"op\": \"call_function\", \"target\": \"add\", \"args\": [\"h0\", \"attn\"]},"
             "  {\"name\": \"ln2\", \"op\": \"call_module\", \"target\": \"ln2\", \"args\": [\"h1\"]},"
             "  {\"name\": \"m0\", \"op\": \"call_module\", \"target\": \"mlp.0\", \"args\": [\"ln2\"]},"
             "  {\"name\": \"m1\", \"op\": \"call_module\", \"target\": \"mlp.1\", \"args\": [\"m0\"]},"
             "  {\"name\": \"m2\", \"op\": \"call_module\", \"target\": \"mlp.2\", \"args\": [\"m1\"]},"
             "  {\"name\": \"h2\", \"op\": \"call_function\", \"target\": \"add\", \"args\": [\"h1\", \"m2\"]},"
             "  {\"name\": \"head\", \"op\": \"call_module\", \"target\": \"head\", \"args\": [\"h2\"]},"
             "  {\"name\": \"output\", \"op\": \"output\", \"args\": [\"head\"]}],"
             " \"loss\": {\"type\": \"CrossEntropyLoss\", \"class_dim\": -1%s}}",
             attn_mods, attn_nodes, loss_extra);
    return buf;
}

/* Shared tensors: fc1 called twice, and an F.linear naming fc1.weight (a
 * tied weight); the shared tensor is one parameter whose gradient and
 * products sum its uses. */
static const char *SHARED_MLP =
    "{\"input_shape\": [6],"
    " \"modules\": {\"fc1\": {\"type\": \"Linear\", \"in_features\": 6, \"out_features\": 6},"
    "               \"act\": {\"type\": \"Tanh\"},"
    "               \"fc2\": {\"type\": \"Linear\", \"in_features\": 6, \"out_features\": 3}},"
    " \"nodes\": [{\"name\": \"x\", \"op\": \"placeholder\"},"
    "  {\"name\": \"a\", \"op\": \"call_module\", \"target\": \"fc1\", \"args\": [\"x\"]},"
    "  {\"name\": \"b\", \"op\": \"call_module\", \"target\": \"act\", \"args\": [\"a\"]},"
    "  {\"name\": \"c\", \"op\": \"call_module\", \"target\": \"fc1\", \"args\": [\"b\"]},"
    "  {\"name\": \"d\", \"op\": \"call_module\", \"target\": \"act\", \"args\": [\"c\"]},"
    "  {\"name\": \"e\", \"op\": \"call_function\", \"target\": \"linear\", \"args\": [\"d\"],"
    "   \"in_features\": 6, \"out_features\": 6, \"bias\": false, \"params\": {\"weight\": \"fc1.weight\"}},"
    "  {\"name\": \"f\", \"op\": \"call_module\", \"target\": \"fc2\", \"args\": [\"e\"]},"
    "  {\"name\": \"output\", \"op\": \"output\", \"args\": [\"f\"]}],"
    " \"loss\": {\"type\": \"CrossEntropyLoss\"}}";

/* cv_curv_gram on block b against the Gram of explicit per-(vector, sample)
 * gradients J_n^T cot_j(n), each from a vjp of a cotangent zero but on sample n. */
static void check_gram(tu_fixture *f, const cv_block *b, int k, const char *tag)
{
    size_t N = f->d.n, C = (size_t)cv_model_output_dim(&f->m), R = (size_t)k * N, D = b->dim;
    float *cot = malloc(sizeof(float) * R * C), *one = calloc(N * C, sizeof(float));
    double *rows = malloc(sizeof(double) * R * D), *G = malloc(sizeof(double) * R * R);
    cv_rng r;
    cv_rng_seed(&r, 9);
    for (size_t i = 0; i < R * C; i++)
        cot[i] = (float)cv_rng_normal(&r);
    cv_err e;
    for (int j = 0; j < k; j++)
        for (size_t n = 0; n < N; n++) {
            memset(one, 0, sizeof(float) * N * C);
            memcpy(one + n * C, cot + ((size_t)j * N + n) * C, sizeof(float) * C);
            ck_assert_int_eq(cv_curv_vjp(f->c, b, 1, one, rows + ((size_t)j * N + n) * D, &e), 0);
        }
    ck_assert_msg(cv_curv_gram(f->c, b, k, cot, G, &e) == 0, "%s: %s", tag, e.message);
    double err = 0, scale = 0;
    for (size_t a = 0; a < R; a++)
        for (size_t c2 = 0; c2 < R; c2++) {
            double want = tu_dot(rows + a * D, rows + c2 * D, D);
            err = fmax(err, fabs(G[a * R + c2] - want));
            scale = fmax(scale, fabs(want));
        }
    ck_assert_msg(err <= 1e-5 * scale, "%s: Gram off by %g (scale %g)", tag, err, scale);
    free(cot);
    free(one);
    free(rows);
    free(G);
}

START_TEST(shared_tensors_oracles)
{
    tu_fixture f;
    fx_from_json(&f, SHARED_MLP, 4, 13);
    ck_assert_int_eq(cv_model_param_count(&f.m), 4); /* fc1.weight, fc1.bias, fc2.* */
    ck_assert_uint_eq(f.m.nparams_total, 6 * 6 + 6 + 3 * 6 + 3);
    ck_assert_str_eq(cv_model_param(&f.m, 0)->name, "fc1.weight");
    check_all_oracles(&f, 0);
    check_gram(&f, &f.full, 2, "shared, full block");
    cv_block blocks[8];
    int nb = cv_blocks_per_layer(&f.m, blocks, 8);
    ck_assert_int_eq(nb, 2);
    ck_assert_str_eq(blocks[0].name, "fc1");
    check_gram(&f, &blocks[0], 2, "shared, fc1 block");
    check_gram(&f, &blocks[1], 2, "shared, fc2 block (kernel path)");
    cv_model m2;
    free(tu_arch_reparse(&f.m, &m2, "shared"));
    tu_fx_free(&f);
}
END_TEST

/* F.batch_norm with get_attr-free "params" naming weight, bias and the
 * running statistics (buffers) explicitly. */
static const char *FN_BATCHNORM =
    "{\"input_shape\": [6],"
    " \"modules\": {\"fc1\": {\"type\": \"Linear\", \"in_features\": 6, \"out_features\": 6},"
    "               \"fc2\": {\"type\": \"Linear\", \"in_features\": 6, \"out_features\": 3}},"
    " \"nodes\": [{\"name\": \"x\", \"op\": \"placeholder\"},"
    "  {\"name\": \"a\", \"op\": \"call_module\", \"target\": \"fc1\", \"args\": [\"x\"]},"
    "  {\"name\": \"bn\", \"op\": \"call_function\", \"target\": \"batch_norm\", \"args\": [\"a\"],"
    "   \"num_features\": 6, \"eps\": 0.001, \"params\": {\"weight\": \"g\", \"bias\": \"b\","
    "   \"running_mean\": \"stats.mean\", \"running_var\": \"stats.var\"}},"
    "  {\"name\": \"t\", \"op\": \"call_function\", \"target\": \"tanh\", \"args\": [\"bn\"]},"
    "  {\"name\": \"f\", \"op\": \"call_module\", \"target\": \"fc2\", \"args\": [\"t\"]},"
    "  {\"name\": \"output\", \"op\": \"output\", \"args\": [\"f\"]}],"
    " \"loss\": {\"type\": \"MSELoss\"}}";

START_TEST(functional_batch_norm)
{
    tu_fixture f;
    fx_from_json(&f, FN_BATCHNORM, 4, 17);
    ck_assert_int_eq(cv_model_param_count(&f.m), 6);
    ck_assert_str_eq(cv_model_param(&f.m, 2)->name, "g");
    ck_assert_str_eq(f.m.layers[1].buffers[1].name, "stats.var");
    ck_assert_int_eq(f.m.layers[1].nbuffers, 2); /* no num_batches_tracked */
    check_all_oracles(&f, 0);
    cv_model m2;
    free(tu_arch_reparse(&f.m, &m2, "F.batch_norm"));
    tu_fx_free(&f);
    /* a tensor the class does not have */
    const char *p = strstr(FN_BATCHNORM, "\"running_var\"");
    char *doc = strdup(FN_BATCHNORM);
    memcpy(doc + (p - FN_BATCHNORM), "\"running_vaR\"", 13);
    cv_err e;
    ck_assert_int_eq(cv_arch_parse(doc, strlen(doc), &m2, &e), -1);
    ck_assert_str_eq(e.field, "nodes[2].params");
    ck_assert_msg(strstr(e.message, "no tensor 'running_vaR'") != NULL, "%s", e.message);
    free(doc);
}
END_TEST

/* Token ids with repeats, and some labels ignored (ignore_index 3 when the
 * loss says so: label 3 occurs). */
static void token_data(tu_fixture *f)
{
    cv_rng r;
    cv_rng_seed(&r, 77);
    f->d.x_dtype = CV_DTYPE_INT64;
    for (size_t i = 0; i < f->d.n * 5; i++)
        f->d.x[i] = (float)cv_rng_below(&r, 6); /* 6 of 11 ids: repeats */
}

static void transformer_case(int sdpa, const char *loss_extra, int variant)
{
    tu_fixture f;
    memset(&f, 0, sizeof f);
    char *doc = transformer_json(sdpa, loss_extra);
    must_parse(doc, &f.m);
    free(doc);
    random_params(&f.m, 31 + variant);
    tu_data(&f.d, &f.m, 3, 41 + variant);
    token_data(&f);
    cv_err e;
    ck_assert_msg(cv_dataset_check(&f.d, &f.m, &e) == 0, "%s", e.message);
    f.c = cv_curv_new(&f.m, &f.d, NULL, &e);
    ck_assert_msg(f.c != NULL, "%s", e.message);
    cv_block_full(&f.m, &f.full);
    check_all_oracles(&f, variant);
    check_gram(&f, &f.full, 1, "transformer");
    cv_block blocks[16];
    int nb = cv_blocks_per_layer(&f.m, blocks, 16);
    ck_assert_str_eq(blocks[0].name, "tok");
    ck_assert_str_eq(blocks[1].name, "pos_emb");
    if (!sdpa) { /* the attention module's four tensors are one block */
        ck_assert_str_eq(blocks[3].name, "attn");
        ck_assert_int_eq(blocks[3].count, 4);
        ck_assert_str_eq(cv_model_param(&f.m, blocks[3].idx[0])->name, "attn.in_proj_weight");
        ck_assert_str_eq(cv_model_param(&f.m, blocks[3].idx[3])->name, "attn.out_proj.bias");
    }
    ck_assert_str_eq(blocks[nb - 1].name, "head");
    cv_model m2;
    free(tu_arch_reparse(&f.m, &m2, "transformer"));
    tu_fx_free(&f);
}

START_TEST(transformer_mha_oracles) { transformer_case(0, "", 0); }
END_TEST

START_TEST(transformer_sdpa_oracles)
{
    transformer_case(1, ", \"ignore_index\": 3, \"label_smoothing\": 0.1", 1);
}
END_TEST

/* ---- refusals -------------------------------------------------------------- */

/* GRAPH_MLP with `from` replaced by `to` must be refused with code and a
 * field starting with field. */
static void expect_refused(const char *from, const char *to, const char *code,
                           const char *field)
{
    const char *p = strstr(GRAPH_MLP, from);
    ck_assert_msg(p != NULL, "fixture lacks %s", from);
    size_t a = (size_t)(p - GRAPH_MLP), tl = strlen(to);
    char *doc = malloc(strlen(GRAPH_MLP) + tl + 1);
    memcpy(doc, GRAPH_MLP, a);
    memcpy(doc + a, to, tl);
    strcpy(doc + a + tl, p + strlen(from));
    cv_model m;
    cv_err e;
    ck_assert_msg(cv_arch_parse(doc, strlen(doc), &m, &e) != 0, "accepted: %s", doc);
    ck_assert_msg(strcmp(e.code, code) == 0 && strncmp(e.field, field, strlen(field)) == 0,
                  "%s -> %s: got %s at %s: %s", from, to, e.code, e.field, e.message);
    free(doc);
}

START_TEST(graph_refusals_name_the_node)
{
    /* a cycle: fc reads out, computed later */
    expect_refused("\"args\": [\"x\"]}", "\"args\": [\"out\"]}", "invalid_graph",
                   "nodes[1].args[0]");
    /* an undefined name */
    expect_refused("\"args\": [\"act\"]", "\"args\": [\"acts\"]", "invalid_graph",
                   "nodes[3].args[0]");
    /* shape mismatch: Linear(5, 3) on a 6-wide input */
    expect_refused("\"args\": [\"act\"]", "\"args\": [\"x\"]", "invalid_model", "nodes[3]");
    /* a module that is not in "modules" */
    expect_refused("\"target\": \"1\"", "\"target\": \"9\"", "invalid_graph", "nodes[2].target");
    /* a module called twice whose input does not fit the second time */
    expect_refused("\"target\": \"2\"", "\"target\": \"0\"", "invalid_model", "nodes[3]");
    /* duplicate node names */
    expect_refused("\"name\": \"act\"", "\"name\": \"fc\"", "invalid_graph", "nodes[2].name");
    /* output not last, placeholder not first */
    expect_refused("\"op\": \"output\"", "\"op\": \"call_module\"", "invalid_graph", "nodes[4]");
    expect_refused("\"op\": \"placeholder\"", "\"op\": \"call_module\"", "invalid_graph",
                   "nodes[0]");
    /* an unknown function, an unknown op */
    expect_refused("\"op\": \"call_module\", \"target\": \"1\"",
                   "\"op\": \"call_function\", \"target\": \"tanhh\"", "unknown_function",
                   "nodes[2].target");
    expect_refused("\"op\": \"call_module\", \"target\": \"1\"", "\"op\": \"call_modul\"",
                   "invalid_value", "nodes[2].op");
    /* both forms at once */
    expect_refused("\"input_shape\": [6],", "\"input_shape\": [6], \"layers\": [],",
                   "invalid_value", "nodes");
}
END_TEST

/* Token ids outside the embedding, float data for an integer model, and
 * NLLLoss without log_softmax are refused before anything runs. */
START_TEST(dataset_refusals)
{
    cv_model m;
    char *doc = transformer_json(0, "");
    must_parse(doc, &m);
    free(doc);
    cv_dataset d;
    tu_data(&d, &m, 2, 5);
    cv_err e;
    ck_assert_int_eq(cv_dataset_check(&d, &m, &e), -1); /* float data, int64 model */
    ck_assert_str_eq(e.code, "dtype_mismatch");
    ck_assert_str_eq(e.field, "x");
    d.x_dtype = CV_DTYPE_INT64;
    for (size_t i = 0; i < 10; i++)
        d.x[i] = (float)(i % 11);
    ck_assert_msg(cv_dataset_check(&d, &m, &e) == 0, "%s", e.message);
    d.x[7] = 11; /* num_embeddings is 11 */
    ck_assert_int_eq(cv_dataset_check(&d, &m, &e), -1);
    ck_assert_str_eq(e.field, "x");
    ck_assert_msg(strstr(e.message, "token id 11 at sample 1, position 2") != NULL, "%s",
                  e.message);
    tu_data_free(&d);
    const char *nll = "{\"input_shape\": [4], \"layers\": [{\"type\": \"Linear\", "
                      "\"in_features\": 4, \"out_features\": 3}], \"loss\": {\"type\": "
                      "\"NLLLoss\"}}";
    ck_assert_int_eq(cv_arch_parse(nll, strlen(nll), &m, &e), -1);
    ck_assert_str_eq(e.field, "loss");
    ck_assert_msg(strstr(e.message, "log_softmax") != NULL, "%s", e.message);
}
END_TEST

/* A MultiheadAttention module with a long qualified name (the expansion's
 * tensor names are longer still), and the expansion's internal names are not
 * visible to the user's nodes. */
START_TEST(attention_names)
{
    const char *doc =
        "{\"input_shape\": [4, 8],"
        " \"modules\": {\"encoder.layers.0.self_attn\": {\"type\": \"MultiheadAttention\","
        "   \"embed_dim\": 8, \"num_heads\": 2, \"batch_first\": true}},"
        " \"nodes\": [{\"name\": \"x\", \"op\": \"placeholder\"},"
        "  {\"name\": \"attn\", \"op\": \"call_module\", \"target\": \"encoder.layers.0.self_attn\","
        "   \"args\": [\"x\", \"x\", \"x\"]},"
        "  {\"name\": \"r\", \"op\": \"call_function\", \"target\": \"relu\", \"args\": [\"attn\"]},"
        "  {\"name\": \"output\", \"op\": \"output\", \"args\": [\"r\"]}],"
        " \"loss\": {\"type\": \"MSELoss\"}}";
    cv_model m, m2;
    must_parse(doc, &m);
    ck_assert_str_eq(cv_model_param(&m, 0)->name, "encoder.layers.0.self_attn.in_proj_weight");
    ck_assert_str_eq(cv_model_param(&m, 3)->name, "encoder.layers.0.self_attn.out_proj.bias");
    free(tu_arch_reparse(&m, &m2, "long attention name"));
    /* an embed_dim that does not fit the input: the message names the node as written */
    char *wide = strdup(doc);
    memcpy(strstr(wide, "\"embed_dim\": 8") + 13, "6", 1);
    memcpy(strstr(wide, "\"num_heads\": 2") + 13, "3", 1);
    cv_err e;
    ck_assert_int_eq(cv_arch_parse(wide, strlen(wide), &m, &e), -1);
    ck_assert_str_eq(e.field, "nodes[1]");
    ck_assert_msg(strstr(e.message, "nodes[1] (MultiheadAttention 'attn', its Linear)") != NULL,
                  "%s", e.message);
    free(wide);
    char *bad = strdup(doc);
    memcpy(strstr(bad, "[\"attn\"]") + 2, "#qkv", 4); /* r reads the expansion's "#qkv" */
    ck_assert_int_eq(cv_arch_parse(bad, strlen(bad), &m, &e), -1);
    ck_assert_str_eq(e.code, "invalid_graph");
    ck_assert_str_eq(e.field, "nodes[2].args[0]");
    free(bad);
}
END_TEST

static Suite *graph_suite(void)
{
    Suite *s = suite_create("graph");
    TCase *tc = tcase_create("graph");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, graph_chain_equals_sequential);
    tcase_add_test(tc, graph_export_round_trip);
    tcase_add_test(tc, graph_refusals_name_the_node);
    tcase_add_test(tc, residual_graph_oracles);
    tcase_add_test(tc, shared_tensors_oracles);
    tcase_add_test(tc, functional_batch_norm);
    tcase_add_test(tc, attention_names);
    tcase_add_test(tc, transformer_mha_oracles);
    tcase_add_test(tc, transformer_sdpa_oracles);
    tcase_add_test(tc, dataset_refusals);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_main(graph_suite); }
