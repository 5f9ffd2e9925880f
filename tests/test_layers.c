/* test_layers.c - the layer registry as a whole: every registered class is
 * well formed, parses from an example document, exports every attribute and
 * re-parses to the same model (classes, attributes, shapes, tensor layout),
 * and an attribute typo gets a "did you mean" hint.  A new layer class needs
 * an example here; the test fails until it has one. */
#include <cJSON.h>
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/arch.h"
#include "engine/layer.h"
#include "testutil.h"

/* One layer object per class (single quotes for double), giving every stored
 * attribute a value other than its default so that an attribute dropped from
 * the export comes back different, and a per-sample input it accepts. */
typedef struct {
    const char *name, *input, *layer;
} example;

static const example EXAMPLES[] = {
    {"Linear", "[6]", "{'type': 'Linear', 'in_features': 6, 'out_features': 3, 'bias': false}"},
    {"Conv2d", "[4, 7, 6]",
     "{'type': 'Conv2d', 'in_channels': 4, 'out_channels': 6, 'kernel_size': [2, 3],"
     " 'stride': [2, 1], 'padding': [1, 2], 'dilation': [2, 1], 'groups': 2, 'bias': false,"
     " 'padding_mode': 'zeros'}"},
    {"ReLU", "[3, 4]", "{'type': 'ReLU', 'inplace': true}"},
    {"Tanh", "[5]", "{'type': 'Tanh'}"},
    {"Sigmoid", "[2, 3, 3]", "{'type': 'Sigmoid'}"},
    {"LeakyReLU", "[5]", "{'type': 'LeakyReLU', 'negative_slope': 0.25, 'inplace': false}"},
    {"ELU", "[5]", "{'type': 'ELU', 'alpha': 0.75}"},
    {"GELU", "[5]", "{'type': 'GELU', 'approximate': 'tanh'}"},
    {"Softplus", "[5]", "{'type': 'Softplus', 'beta': 2.5, 'threshold': 7}"},
    {"Identity", "[5]", "{'type': 'Identity'}"},
    {"Flatten", "[2, 3, 4]", "{'type': 'Flatten', 'start_dim': 2, 'end_dim': 3}"},
    {"MaxPool2d", "[2, 9, 8]",
     "{'type': 'MaxPool2d', 'kernel_size': [3, 2], 'stride': [2, 1], 'padding': [1, 1],"
     " 'dilation': [2, 1], 'ceil_mode': true, 'return_indices': false}"},
    {"AvgPool2d", "[2, 9, 8]",
     "{'type': 'AvgPool2d', 'kernel_size': [3, 2], 'stride': 2, 'padding': [1, 0],"
     " 'ceil_mode': true, 'count_include_pad': false, 'divisor_override': null}"},
    {"AdaptiveAvgPool2d", "[2, 9, 8]", "{'type': 'AdaptiveAvgPool2d', 'output_size': [4, 3]}"},
    {"BatchNorm1d", "[3, 5]",
     "{'type': 'BatchNorm1d', 'num_features': 3, 'eps': 0.001, 'momentum': 0.2,"
     " 'affine': false, 'track_running_stats': true, 'training': false}"},
    {"BatchNorm2d", "[3, 4, 4]",
     "{'type': 'BatchNorm2d', 'num_features': 3, 'eps': 0.01, 'momentum': null,"
     " 'affine': false}"},
    {"Dropout", "[5]", "{'type': 'Dropout', 'p': 0.125, 'inplace': true, 'training': false}"},
    {"SiLU", "[2, 3]", "{'type': 'SiLU', 'inplace': true}"},
    {"transpose", "[3, 4, 5]", "{'type': 'transpose', 'dim0': 2, 'dim1': -1}"},
    {"permute", "[3, 4, 5]", "{'type': 'permute', 'dims': [0, 1, 3, 2]}"},
    {"reshape", "[3, 4]", "{'type': 'reshape', 'shape': [-1, 3, 2, -1]}"},
    {"flatten", "[3, 4, 5]", "{'type': 'flatten', 'start_dim': 2, 'end_dim': 3}"},
    {"narrow", "[3, 6]", "{'type': 'narrow', 'dim': 2, 'start': -5, 'length': 4}"},
    {"mean", "[3, 4, 5]", "{'type': 'mean', 'dim': [-1, 2], 'keepdim': true, 'dtype': null}"},
    {"sum", "[3, 4, 5]", "{'type': 'sum', 'dim': 3, 'keepdim': true}"},
    {"softmax", "[3, 5]", "{'type': 'softmax', 'dim': -1, 'dtype': null}"},
    {"log_softmax", "[3, 5]", "{'type': 'log_softmax', 'dim': 2}"},
    {"attn_scale", "[3, 5]", "{'type': 'attn_scale', 'scale': 0.5}"},
    {"Mish", "[2, 3]", "{'type': 'Mish', 'inplace': true}"},
    {"Hardswish", "[5]", "{'type': 'Hardswish', 'inplace': false}"},
    {"LayerNorm", "[3, 2, 4]",
     "{'type': 'LayerNorm', 'normalized_shape': [2, 4], 'eps': 0.001,"
     " 'elementwise_affine': false, 'bias': false}"},
    {"GroupNorm", "[4, 3, 3]",
     "{'type': 'GroupNorm', 'num_groups': 2, 'num_channels': 4, 'eps': 0.01, 'affine': false}"},
    {"Embedding", "[5]",
     "{'type': 'Embedding', 'num_embeddings': 7, 'embedding_dim': 3, 'padding_idx': -2,"
     " 'max_norm': null, 'norm_type': 2.0, 'scale_grad_by_freq': false, 'sparse': false}"},
    {"Conv1d", "[4, 11]",
     "{'type': 'Conv1d', 'in_channels': 4, 'out_channels': 6, 'kernel_size': [3], 'stride': 2,"
     " 'padding': [2], 'dilation': 2, 'groups': 2, 'bias': false, 'padding_mode': 'zeros'}"},
    {"MaxPool1d", "[2, 9]",
     "{'type': 'MaxPool1d', 'kernel_size': 3, 'stride': [2], 'padding': 1, 'dilation': 2,"
     " 'ceil_mode': true, 'return_indices': false}"},
    {"AvgPool1d", "[2, 9]",
     "{'type': 'AvgPool1d', 'kernel_size': [3], 'stride': 2, 'padding': 1, 'ceil_mode': true,"
     " 'count_include_pad': false}"},
    {"AdaptiveAvgPool1d", "[2, 9]", "{'type': 'AdaptiveAvgPool1d', 'output_size': 4}"},
    {"ConvTranspose2d", "[4, 3, 5]",
     "{'type': 'ConvTranspose2d', 'in_channels': 4, 'out_channels': 6, 'kernel_size': [2, 3],"
     " 'stride': [2, 1], 'padding': [1, 0], 'output_padding': [1, 0], 'groups': 2,"
     " 'bias': false, 'dilation': [1, 2], 'padding_mode': 'zeros'}"},
    /* PyTorch takes one of size and scale_factor; curvd both if they agree */
    {"Upsample", "[2, 3, 4]",
     "{'type': 'Upsample', 'size': [6, 8], 'scale_factor': 2.0, 'mode': 'nearest',"
     " 'align_corners': null, 'recompute_scale_factor': null}"},
};

/* Classes that need 2 or more inputs exist only in the graph form: a layer
 * list cannot give them an example (the graph form's tests cover them). */
static int graph_only(const cv_layer_class *c) { return !c->ops || c->min_inputs > 1; }

static const example *example_for(const char *name)
{
    for (size_t i = 0; i < sizeof EXAMPLES / sizeof EXAMPLES[0]; i++)
        if (strcmp(EXAMPLES[i].name, name) == 0)
            return &EXAMPLES[i];
    return NULL;
}

/* text with ' -> " */
static char *dq(const char *text)
{
    char *s = strdup(text);
    for (char *p = s; *p; p++)
        if (*p == '\'')
            *p = '"';
    return s;
}

/* [BatchNorm (parameters, whatever the example has), the example, Flatten]
 * on the example's input, MSELoss: a model that finalizes. */
static int parse_example(const example *ex, cv_model *m, cv_err *e)
{
    int c0 = atoi(ex->input + 1), rank = 1;
    for (const char *p = ex->input; *p; p++)
        rank += *p == ',';
    char buf[2048];
    snprintf(buf, sizeof buf,
             "{'input_shape': %s, 'layers': [{'type': 'BatchNorm%dd', 'num_features': %d}, %s,"
             " {'type': 'Flatten'}], 'loss': {'type': 'MSELoss'}}",
             ex->input, rank == 3 ? 2 : 1, c0, ex->layer);
    char *s = dq(buf);
    int rc = cv_arch_parse(s, strlen(s), m, e);
    free(s);
    return rc;
}

static size_t field_size(const cv_field *f)
{
    switch (f->kind) {
    case CV_F_PAIR: return 2 * sizeof(int);
    case CV_F_INT_LIST: return sizeof(cv_int_list);
    case CV_F_DIMS: return sizeof(cv_shape);
    case CV_F_NUMBER: return sizeof(double);
    case CV_F_INT:
    case CV_F_BOOL:
    case CV_F_ENUM:
    case CV_F_FIXED_BOOL: return sizeof(int);
    default: return 0;
    }
}

START_TEST(every_class_is_well_formed)
{
    int n = cv_layer_class_count();
    ck_assert_int_ge(n, 17);
    ck_assert_ptr_null(cv_layer_class_at(n));
    for (int i = 0; i < n; i++) {
        const cv_layer_class *c = cv_layer_class_at(i);
        ck_assert_ptr_nonnull(c);
        ck_assert_ptr_eq(cv_layer_class_find(c->name), c); /* names are unique */
        ck_assert_msg(example_for(c->name) != NULL || graph_only(c),
                      "layer class %s has no example in tests/test_layers.c", c->name);
        /* composite classes (attention) carry attributes only: the graph
         * parser expands them into primitive nodes */
        int composite = strcmp(c->name, "MultiheadAttention") == 0 ||
                        strcmp(c->name, "scaled_dot_product_attention") == 0;
        ck_assert_msg((c->ops != NULL) != composite, "%s: kernels", c->name);
        ck_assert_msg(composite || c->ops->forward, "%s: forward", c->name);
        ck_assert_uint_le(c->attr_size, CV_LAYER_ATTR_SIZE);
        ck_assert_int_le(c->nfields, CV_LAYER_MAX_FIELDS);
        for (int f = 0; f < c->nfields; f++) {
            const cv_field *fd = &c->fields[f];
            ck_assert_msg(strcmp(fd->name, "type") != 0, "%s: 'type' is no attribute", c->name);
            for (int g = 0; g < f; g++)
                ck_assert_str_ne(fd->name, c->fields[g].name);
            if (fd->kind != CV_F_FIXED_BOOL && field_size(fd))
                ck_assert_msg(fd->offset != CV_F_NOSTORE, "%s.%s must be stored", c->name,
                              fd->name);
            if (fd->offset != CV_F_NOSTORE)
                ck_assert_msg(fd->offset + field_size(fd) <= c->attr_size,
                              "%s.%s lies outside the attribute struct", c->name, fd->name);
            if ((fd->kind == CV_F_PAIR || fd->kind == CV_F_INT) && fd->choices)
                ck_assert_msg(fd->aux + sizeof(int) <= c->attr_size && fd->text,
                              "%s.%s: keyword slot or message missing", c->name, fd->name);
            if (fd->kind == CV_F_ENUM)
                ck_assert_ptr_nonnull(fd->choices);
        }
    }
    ck_assert_ptr_null(cv_layer_class_find("Conv3d"));
}
END_TEST

/* _i: registry index */
START_TEST(every_class_roundtrips)
{
    const cv_layer_class *cls = cv_layer_class_at(_i);
    if (graph_only(cls))
        return;
    const example *ex = example_for(cls->name);
    ck_assert_msg(ex != NULL, "layer class %s has no example", cls->name);
    cv_model *m = calloc(1, sizeof *m), *m2 = calloc(1, sizeof *m2);
    cv_err e;
    ck_assert_msg(parse_example(ex, m, &e) == 0, "%s: %s", cls->name, e.message);
    const cv_layer *L = &m->layers[1];
    ck_assert_ptr_eq(L->cls, cls);

    /* the example sets every stored attribute away from its default */
    cv_layer def;
    cv_layer_init(&def, cls);
    for (int f = 0; f < cls->nfields; f++) {
        const cv_field *fd = &cls->fields[f];
        if (fd->offset == CV_F_NOSTORE || fd->kind == CV_F_FIXED_BOOL)
            continue;
        ck_assert_msg(memcmp(L->attr.bytes + fd->offset, def.attr.bytes + fd->offset,
                             field_size(fd)) != 0,
                      "the %s example leaves %s at its default", cls->name, fd->name);
    }

    /* every attribute is exported; re-parsing gives the same model */
    cJSON *j = cv_arch_to_json(m);
    ck_assert_ptr_nonnull(j);
    const cJSON *lo = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "layers"), 1);
    ck_assert_str_eq(cJSON_GetObjectItem(lo, "type")->valuestring, cls->name);
    for (int f = 0; f < cls->nfields; f++) {
        const cv_field *fd = &cls->fields[f];
        int exported = !(fd->flags & CV_F_HIDDEN) && fd->kind != CV_F_IGNORED &&
                       fd->kind != CV_F_FIXED_NULL;
        ck_assert_msg((cJSON_GetObjectItem(lo, fd->name) != NULL) == exported,
                      "%s.%s: exported %d, expected %d", cls->name, fd->name,
                      cJSON_GetObjectItem(lo, fd->name) != NULL, exported);
    }
    cJSON_Delete(j);
    free(tu_arch_reparse(m, m2, cls->name));
    free(m);
    free(m2);
}
END_TEST

/* _i: registry index.  An attribute with its last letter doubled is unknown
 * and the hint names the attribute; a class without attributes says so. */
START_TEST(unknown_attribute_gets_a_hint)
{
    const cv_layer_class *cls = cv_layer_class_at(_i);
    if (graph_only(cls))
        return;
    const example *ex = example_for(cls->name);
    ck_assert_ptr_nonnull(ex);
    const char *attr = cls->nfields ? cls->fields[cls->nfields - 1].name : "biass";
    char typo[64], layer[128], want[96];
    snprintf(typo, sizeof typo, "%s%c", attr, attr[strlen(attr) - 1]);
    snprintf(layer, sizeof layer, "{'type': '%s', '%s': 1}", cls->name, typo);
    example bad = {cls->name, ex->input, layer};
    cv_model *m = calloc(1, sizeof *m);
    cv_err e;
    ck_assert_int_eq(parse_example(&bad, m, &e), -1);
    ck_assert_str_eq(e.code, "unknown_field");
    snprintf(want, sizeof want, "layers[1].%s", typo);
    ck_assert_str_eq(e.field, want);
    if (cls->nfields)
        snprintf(want, sizeof want, "did you mean '%s'?", attr);
    else
        snprintf(want, sizeof want, "unknown field for %s (known: none)", cls->name);
    ck_assert_msg(strstr(e.message, want) != NULL, "'%s' lacks '%s'", e.message, want);
    free(m);
}
END_TEST

static Suite *layers_suite(void)
{
    Suite *s = suite_create("layers");
    TCase *tc = tcase_create("registry");
    int n = cv_layer_class_count();
    tcase_add_test(tc, every_class_is_well_formed);
    tcase_add_loop_test(tc, every_class_roundtrips, 0, n);
    tcase_add_loop_test(tc, unknown_attribute_gets_a_hint, 0, n);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_main(layers_suite); }
