"""graph_models.py - example graph models for curvd (issue 19): a pre-activation ResNet and a
small decoder-only transformer language model, in the sizes the tests and the bench use.

    from graph_models import preact_resnet, transformer_lm, lm_batch, SMALL_LM, BENCH_LM
    model = transformer_lm(**SMALL_LM, attention="mha")      # or "matmul", "sdpa"
    x, y = lm_batch(n=4, **SMALL_LM)                          # token ids [N, T], next tokens [N, T]
    write_files("out", model, torch.nn.CrossEntropyLoss(), [SMALL_LM["seq_len"]], x, y,
                class_dim=-1)

Both are exported by curvd_client.torch_export in the graph form (torch.fx) and are
built only from what curvd evaluates.  Run as a script to write a model's files:

    python3 graph_models.py lm|resnet [--size small|bench] [--attention mha|matmul|sdpa] DIR
"""
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

#: Test size of the language model (d_model 16, 2 heads, T 8, vocab 11).
SMALL_LM = {"vocab": 11, "d_model": 16, "heads": 2, "seq_len": 8, "layers": 2}
#: Bench size (d_model 128, 4 heads, T 64, vocab 96; the bench uses N = 32 sequences).
BENCH_LM = {"vocab": 96, "d_model": 128, "heads": 4, "seq_len": 64, "layers": 2}
BENCH_LM_N = 32
#: Test and bench widths of the ResNet (input 3x32x32).
SMALL_RESNET = {"width": 4, "classes": 10}
BENCH_RESNET = {"width": 16, "classes": 10}

ATTENTIONS = ("mha", "matmul", "sdpa")


# ---- pre-activation ResNet (He et al. 2016, "Identity mappings") ---------------------------

class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut: the identity, or a 1x1 conv of the
    pre-activated input when the shape changes (the projection shortcut)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()  # parameter-free: called twice
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        a = self.relu(self.bn1(x))
        skip = self.shortcut(a) if self.shortcut is not None else x
        h = self.conv1(a)
        h = self.conv2(F.relu(self.bn2(h)))
        return h + skip


class PreActResNet(nn.Module):
    """conv3x3 stem, two stages (identity block at `width`, projection block to 2*width with
    stride 2), final BN-ReLU, global average pooling (mean over H, W), Linear head."""

    def __init__(self, width=4, classes=10, blocks_per_stage=1):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        layers = []
        for _ in range(blocks_per_stage):
            layers.append(PreActBlock(width, width))
        layers.append(PreActBlock(width, 2 * width, stride=2))
        for _ in range(blocks_per_stage - 1):
            layers.append(PreActBlock(2 * width, 2 * width))
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        h = self.layers(self.stem(x))
        h = F.relu(self.bn(h))
        return self.head(h.mean(dim=(2, 3)))


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm affine parameters and running statistics (eval mode is then
    not the identity), drawn from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
    return model


def preact_resnet(width=4, classes=10, seed=0):
    """A pre-activation ResNet on 3x32x32 inputs in evaluation mode."""
    torch.manual_seed(seed)
    return randomize_bn(PreActResNet(width, classes), seed).eval()


def image_batch(n=4, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


# ---- decoder-only transformer LM -------------------------------------------------------------

def causal_mask(t):
    """[t, t] boolean, True above the diagonal: the positions a query may NOT attend to
    (PyTorch's boolean attn_mask / masked_fill convention)."""
    return torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)


class SelfAttention(nn.Module):
    """Multi-head self-attention, three ways that compute the same function:
    "mha": nn.MultiheadAttention(batch_first) with the mask buffer as attn_mask;
    "matmul": q k^T / sqrt(d_head), masked_fill of the mask buffer, softmax, @ v;
    "sdpa": F.scaled_dot_product_attention(is_causal=...) (torch >= 2.0)."""

    def __init__(self, d_model, heads, seq_len, attention="mha", causal=True):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError("attention must be one of %s" % (ATTENTIONS,))
        if attention == "sdpa" and not hasattr(F, "scaled_dot_product_attention"):
            raise RuntimeError("attention='sdpa' needs torch >= 2.0 "
                               "(F.scaled_dot_product_attention); this is torch %s"
                               % torch.__version__)
        self.kind, self.causal, self.heads = attention, causal, heads
        self.d_head = d_model // heads
        if causal and attention != "sdpa":
            self.register_buffer("mask", causal_mask(seq_len))
        else:
            self.mask = None
        if attention == "mha":
            self.mha = nn.MultiheadAttention(d_model, heads, batch_first=True)
        else:
            self.qkv = nn.Linear(d_model, 3 * d_model)
            self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        if self.kind == "mha":
            return self.mha(x, x, x, attn_mask=self.mask, need_weights=False)[0]
        t, d = x.size(1), x.size(2)
        q, k, v = self.qkv(x).split(d, dim=2)
        q = q.view(-1, t, self.heads, self.d_head).transpose(1, 2)
        k = k.view(-1, t, self.heads, self.d_head).transpose(1, 2)
        v = v.view(-1, t, self.heads, self.d_head).transpose(1, 2)
        if self.kind == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d_head))
            if self.mask is not None:
                att = att.masked_fill(self.mask, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).reshape(-1, t, d)
        return self.proj(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)) (GELU MLP)."""

    def __init__(self, d_model, heads, seq_len, attention, causal):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads, seq_len, attention, causal)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    """Token Embedding + learned positional nn.Parameter [1, T, d], `layers` blocks, final
    LayerNorm, untied Linear head (or tied to the token embedding): logits [N, T, vocab]."""

    def __init__(self, vocab=11, d_model=16, heads=2, seq_len=8, layers=2, attention="mha",
                 causal=True, tied=False):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Parameter(0.1 * torch.randn(1, seq_len, d_model))
        self.blocks = nn.ModuleList([Block(d_model, heads, seq_len, attention, causal)
                                     for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        if tied:
            self.head.weight = self.tok_emb.weight

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def transformer_lm(vocab=11, d_model=16, heads=2, seq_len=8, layers=2, attention="mha",
                   causal=True, tied=False, seed=0):
    """The LM in evaluation mode with seeded weights (LayerNorm affine randomized too)."""
    torch.manual_seed(seed)
    m = TransformerLM(vocab, d_model, heads, seq_len, layers, attention, causal, tied)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m.eval()


def lm_batch(n=4, vocab=11, seq_len=8, seed=0, **_):
    """Token ids [n, T] (with repeated tokens) and next-token targets [n, T]."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (n, seq_len + 1), generator=g)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def main(argv):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from curvd_client.torch_export import write_files
    args = list(argv)
    size = args.pop(args.index("--size") + 1) if "--size" in args else "small"
    attn = args.pop(args.index("--attention") + 1) if "--attention" in args else "mha"
    args = [a for a in args if a not in ("--size", "--attention")]
    if len(args) != 2 or args[0] not in ("lm", "resnet"):
        print(__doc__, file=sys.stderr)
        return 2
    which, d = args
    if which == "lm":
        cfg = SMALL_LM if size == "small" else BENCH_LM
        model = transformer_lm(**cfg, attention=attn)
        x, y = lm_batch(n=4 if size == "small" else BENCH_LM_N, **cfg)
        files = write_files(d, model, nn.CrossEntropyLoss(), [cfg["seq_len"]], x, y, class_dim=-1)
    else:
        cfg = SMALL_RESNET if size == "small" else BENCH_RESNET
        model = preact_resnet(**cfg)
        x, y = image_batch(n=4 if size == "small" else 32, classes=cfg["classes"])
        files = write_files(d, model, nn.CrossEntropyLoss(), [3, 32, 32], x, y)
    print(" ".join(files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
