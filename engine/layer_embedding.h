/* layer_embedding.h - torch.nn.Embedding's attributes and layer class
 * (engine/layer_embedding.c): a lookup table weight [num_embeddings,
 * embedding_dim] indexed by token ids that the input holds as exact float
 * values; per-sample input [...] -> output [..., embedding_dim]. */
#ifndef CV_LAYER_EMBEDDING_H
#define CV_LAYER_EMBEDDING_H

#include "layer.h"

#define CV_EMBEDDING_NO_PADDING (-(1 << 30)) /* padding_idx None */

CV_LAYER_ATTRS(cv_embedding_attr, {
    int num_embeddings, embedding_dim;
    int padding_idx;               /* in [0, num_embeddings) or CV_EMBEDDING_NO_PADDING */
});

extern const cv_layer_class cv_embedding_class;

#endif
