"""The PyTorch reference models of `ndtrain bench engine` (launch/bench/engine.py): the same networks as the
engine's S (encoder-decoder), M (decoder-only LM) and MLP configs, built with torch.nn (pre-LN, GELU with the tanh
approximation, learned positions, causal self-attention, tied LM output), trained with torch.optim.AdamW.
torch is optional: it is imported when a model is built."""
from __future__ import annotations

import time

import numpy as np


def build_torch(c: dict, lr: float, weight_decay: float):
    """The PyTorch model of config c (launch/bench/engine.py CONFIGS) with AdamW(lr, weight_decay): returns
    (step(batch) -> (forward, backward, optimizer seconds), to_torch(numpy batch) -> torch batch)."""
    import torch  # torch: optional, the reference of the benchmark only
    import torch.nn as nn  # torch: optional, the reference of the benchmark only
    import torch.nn.functional as F  # torch: optional, the reference of the benchmark only

    torch.manual_seed(0)
    gelu = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731

    def enc_layer():
        return nn.TransformerEncoderLayer(c["d"], c["h"], c["ff"], dropout=0.0, activation=gelu, batch_first=True,
                                          norm_first=True)

    class S(nn.Module):
        def __init__(self):
            super().__init__()
            d, V, T = c["d"], c["vocab"], c["len"]
            self.src_emb, self.tgt_emb = nn.Embedding(V, d), nn.Embedding(V, d)
            self.src_pos, self.tgt_pos = nn.Parameter(0.02 * torch.randn(T, d)), nn.Parameter(0.02 * torch.randn(T, d))
            self.enc = nn.ModuleList(enc_layer() for _ in range(c["layers"][0]))
            self.dec = nn.ModuleList(nn.TransformerDecoderLayer(d, c["h"], c["ff"], dropout=0.0, activation=gelu,
                                                                batch_first=True, norm_first=True)
                                     for _ in range(c["layers"][1]))
            self.enc_norm, self.dec_norm, self.out = nn.LayerNorm(d), nn.LayerNorm(d), nn.Linear(d, V)

        def forward(self, src, tgt):
            T = tgt.shape[1]
            x = self.src_emb(src) + self.src_pos[: src.shape[1]]
            for layer in self.enc:
                x = layer(x)
            mem = self.enc_norm(x)
            mask = nn.Transformer.generate_square_subsequent_mask(T)
            y = self.tgt_emb(tgt) + self.tgt_pos[:T]
            for layer in self.dec:
                y = layer(y, mem, tgt_mask=mask, tgt_is_causal=True)
            return self.out(self.dec_norm(y))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            d, V, T = c["d"], c["vocab"], c["len"]
            self.emb = nn.Embedding(V, d)
            self.pos = nn.Parameter(0.02 * torch.randn(T, d))
            self.blocks = nn.ModuleList(enc_layer() for _ in range(c["layers"][1]))
            self.norm = nn.LayerNorm(d)

        def forward(self, x):
            T = x.shape[1]
            h = self.emb(x) + self.pos[:T]
            mask = nn.Transformer.generate_square_subsequent_mask(T)
            for b in self.blocks:
                h = b(h, src_mask=mask, is_causal=True)
            return self.norm(h) @ self.emb.weight.T  # tied

    if c["kind"] == "mlp":
        s = c["sizes"]
        mods = []
        for i, (a, b) in enumerate(zip(s, s[1:])):
            mods += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(s) - 2 else [])
        model = nn.Sequential(*mods)
    else:
        model = S() if c["kind"] == "seq2seq" else M()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def step(b):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if c["kind"] == "seq2seq":
            logits, target = model(b["src"], b["tgt_in"]), b["tgt_out"]
        else:
            logits, target = model(b["x"]), b["y"]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    def to_torch(batch):
        return {k: torch.from_numpy(v if v.dtype == np.float32 else v.astype(np.int64)) for k, v in batch.items()}

    return step, to_torch


# -- driver -----------------------------------------------------------------------------------------------------------
