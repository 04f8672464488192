"""
PyTorch reference for llm.moe: GPT-2 (as llm.c computes it) with Mixture-of-Experts layers.
Written from DESIGN.md alone, as an independent check of the C trainer. It builds five tiny
models (dense, moe, cap, and two with LSH-compressed MoE dispatch: lsh, lsh_nocomp), computes
loss and gradients on one batch, runs 10 AdamW steps on that batch, and writes NAME_model.bin +
NAME_debug.bin for each (formats and the LSH definitions: dev/reference/README.md).

Run from the repo root (CPU, float32, deterministic, a few seconds):
    /usr/bin/python3 dev/reference/moe_reference.py --outdir dev/reference/states
"""
import argparse, copy, math, os, struct
from dataclasses import dataclass
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# configs

@dataclass
class Config:
    maxT: int; V: int; L: int; NH: int; C: int
    E: int = 0          # experts; E <= 1 means a plain dense GPT-2
    K: int = 0          # top-k
    moe_every: int = 1  # layer l is MoE iff l % moe_every == moe_every - 1
    H: int = 0          # expert hidden size
    renorm: bool = True # renormalise the K chosen gates to sum 1 (when K > 1)

    @property
    def Vp(self): return (self.V + 127) // 128 * 128
    def is_moe(self, l): return self.E > 1 and l % self.moe_every == self.moe_every - 1
    @property
    def Lm(self): return sum(self.is_moe(l) for l in range(self.L))
    @property
    def Ld(self): return self.L - self.Lm

@dataclass
class Train:
    B: int = 2; T: int = 8
    capacity_factor: float = 0.0  # <= 0: dropless
    aux_w: float = 0.01; z_w: float = 0.001
    lr: float = 1e-3; beta1: float = 0.9; beta2: float = 0.999; eps: float = 1e-8
    weight_decay: float = 0.1; grad_clip: float = 1.0; nsteps: int = 10; seed: int = 0
    # LSH compression of each MoE layer's dispatch (README "LSH"); lsh_L = 0 means off
    lsh_L: int = 0        # hash functions (Lh)
    lsh_dp: int = 0       # projection rows per hash function (d')
    lsh_center: int = 0   # subtract the group mean before hashing
    lsh_comp: int = 0     # residual compensation yhat = E(c) + (x - c)
    lsh_ranks: int = 0    # simulated source ranks; token t is sent by rank t // (N / lsh_ranks)
    lsh_S: int = 0        # LSH seed

CONFIGS = {
    "dense": (Config(maxT=16, V=100, L=2, NH=2, C=16), Train(seed=1)),
    "moe":   (Config(maxT=16, V=100, L=2, NH=2, C=16, E=4, K=2, moe_every=1, H=24), Train(seed=2)),
    "cap":   (Config(maxT=16, V=100, L=3, NH=2, C=16, E=4, K=2, moe_every=2, H=24),
              Train(seed=3, capacity_factor=0.5)),
    "lsh":   (Config(maxT=16, V=100, L=2, NH=2, C=16, E=4, K=2, moe_every=1, H=24),
              Train(seed=4, lsh_L=1, lsh_dp=2, lsh_center=1, lsh_comp=1, lsh_ranks=2, lsh_S=1234)),
    "lsh_nocomp": (Config(maxT=16, V=100, L=2, NH=2, C=16, E=4, K=2, moe_every=1, H=24),
              Train(seed=5, capacity_factor=1.0, lsh_L=2, lsh_dp=2, lsh_center=0, lsh_comp=0,
                    lsh_ranks=2, lsh_S=99)),
}

def param_shapes(cfg):
    """(name, shape) in checkpoint order; every tensor stacked over its layers."""
    Vp, C, L, Ld, Lm, E, H = cfg.Vp, cfg.C, cfg.L, cfg.Ld, cfg.Lm, cfg.E, cfg.H
    return [("wte", (Vp, C)), ("wpe", (cfg.maxT, C)),
            ("ln1w", (L, C)), ("ln1b", (L, C)), ("qkvw", (L, 3*C, C)), ("qkvb", (L, 3*C)),
            ("attprojw", (L, C, C)), ("attprojb", (L, C)), ("ln2w", (L, C)), ("ln2b", (L, C)),
            ("fcw", (Ld, 4*C, C)), ("fcb", (Ld, 4*C)), ("fcprojw", (Ld, C, 4*C)), ("fcprojb", (Ld, C)),
            ("routerw", (Lm, E, C)), ("expfcw", (Lm, E, H, C)), ("expfcb", (Lm, E, H)),
            ("expprojw", (Lm, E, C, H)), ("expprojb", (Lm, E, C)),
            ("lnfw", (C,)), ("lnfb", (C,))]

DECAYED = {"wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw", "routerw", "expfcw", "expprojw"}

# -----------------------------------------------------------------------------
# layers

def gelu(x):  # tanh approximation, as GPT-2 / llm.c
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))

def layernorm(x, w, b):  # x (..., C), w b (C,)
    return F.layer_norm(x, (x.shape[-1],), w, b, eps=1e-5)

def attention(x, qkvw, qkvb, projw, projb, NH):
    B, T, C = x.shape
    hs = C // NH
    qkv = x @ qkvw.T + qkvb                                    # (B, T, 3C), order q, k, v
    q, k, v = qkv.split(C, dim=2)                              # each (B, T, C)
    q, k, v = (a.view(B, T, NH, hs).transpose(1, 2) for a in (q, k, v))  # (B, NH, T, hs)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)            # (B, NH, T, T)
    mask = torch.ones(T, T, dtype=torch.bool).tril()           # (T, T) causal
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    out = (att @ v).transpose(1, 2).reshape(B, T, C)           # (B, T, C)
    return out @ projw.T + projb                               # (B, T, C)

def mlp(x, fcw, fcb, projw, projb):  # x (..., C), fcw (4C|H, C), projw (C, 4C|H)
    return gelu(x @ fcw.T + fcb) @ projw.T + projb

# -----------------------------------------------------------------------------
# LSH compression of the dispatch (DESIGN.md "LSH compression"; exact definitions in README.md)

M64, GOLDEN = (1 << 64) - 1, 0x9E3779B97F4A7C15

def mix64(z):  # splitmix64's finaliser on a uint64 held in a Python int
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)

def lsh_seed(seed, layer, step):
    """Per (MoE layer, step) projection seed; ints are taken as two's complement uint64."""
    a = mix64((seed + GOLDEN) & M64) ^ (layer & M64)
    b = mix64((a + GOLDEN) & M64) ^ (step & M64)
    return mix64((b + GOLDEN) & M64)

def projections(L, dp, C, seed):
    """R (L*dp, C) float32: splitmix64 from `seed`, one Box-Muller normal (double) per entry."""
    s, out = seed & M64, []
    def uniform():
        nonlocal s
        s = (s + GOLDEN) & M64
        return (mix64(s) >> 11) * 2.0**-53                     # [0, 1), exact in double
    for _ in range(L * dp * C):
        u1 = uniform(); u2 = uniform()
        out.append(math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(6.283185307179586 * u2))
    return np.array(out, dtype=np.float64).astype(np.float32).reshape(L * dp, C)  # round to nearest

def lsh_hash(x, R, L, dp, center):
    """x (n, C) float32 numpy rows of one group. Returns the bucket keys (n,) as Python ints.
    Float32 arithmetic as the spec: sequential dot products, the mean in float64."""
    n, C = x.shape
    if center:
        s = np.zeros(C, np.float64)
        for i in range(n):                                     # row order, in double
            s = s + x[i].astype(np.float64)
        x = x - (s / np.float64(n)).astype(np.float32)[None, :]   # difference in float32
    v = np.zeros((n, L * dp), np.float32)                      # (n, L*dp)
    for c in range(C):                                         # acc += R[r, c] * x[c], in float32
        v = v + x[:, c:c + 1] * R[None, :, c]
    assert v.dtype == np.float32
    keys = []
    for i in range(n):
        key = 0
        for j in reversed(range(L)):                           # key = sum_j h_j * (2dp)^j
            best, bi = -1.0, 0                                 # strict >: the first k wins a tie
            for k in range(dp):
                a = abs(float(v[i, j * dp + k]))
                if a > best:                                   # a NaN never wins
                    best, bi = a, k
            h = 2 * bi + (1 if v[i, j * dp + bi] < 0 else 0)   # cross-polytope: argmax and sign
            key = key * (2 * dp) + h
        keys.append(key)
    return keys

def lsh_groups(x, expert, kept, K, lsh):
    """Splits each expert's kept slots into groups by simulated source rank and buckets each group.
    x (N, C), expert (N*K,), kept (N*K,). Returns, per expert, a list of groups (v, slots, bucket):
    slots (n,) the kept slots of (e, v) in slot order, bucket (n,) the bucket of each row, in order
    of first appearance. lsh: dict with L, dp, center, ranks, R."""
    N, E = x.shape[0], lsh["E"]
    assert N % lsh["ranks"] == 0
    per_rank = N // lsh["ranks"]
    xs = x.detach().to(torch.float32).numpy()                  # hashing sees fp32, no gradient
    groups = []
    for e in range(E):
        s_e = torch.nonzero((expert == e) & kept).squeeze(1)   # slot order
        ge = []
        for v in range(lsh["ranks"]):
            s = s_e[(s_e // K) // per_rank == v]
            if len(s) == 0:
                continue
            keys = lsh_hash(xs[(s // K).numpy()], lsh["R"], lsh["L"], lsh["dp"], lsh["center"])
            ids = {}
            bucket = torch.tensor([ids.setdefault(k, len(ids)) for k in keys])
            ge.append((v, s, bucket))
        groups.append(ge)
    return groups

def lsh_expert(x, groups_e, K, comp, w1, b1, w2, b2):
    """The expert on the centroids of all its groups, then compensation. x (N, C) with gradient;
    the buckets are fixed, so autograd gives the exact backward with the assignment held fixed.
    Returns yhat (n_e, C) in slot order and the statistics of these groups."""
    cents, bidx, off = [], [], 0
    for v, s, bucket in groups_e:
        xg = x[s // K]                                         # (n, C)
        for b in range(int(bucket.max()) + 1):
            rows = torch.nonzero(bucket == b).squeeze(1).tolist()
            c = xg[rows[0]]
            for r in rows[1:]:                                 # float32 sum in row order
                c = c + xg[r]
            cents.append(c / len(rows))                        # gradient 1/n_b to each row
        bidx.append(bucket + off)
        off += int(bucket.max()) + 1
    cents, bidx = torch.stack(cents), torch.cat(bidx)          # (m, C), (n_e,)
    ycent = mlp(cents, w1, b1, w2, b2)                         # (m, C): one row per centroid
    t = torch.cat([s for _, s, _ in groups_e]) // K            # (n_e,)
    yhat = ycent[bidx] + (x[t] - cents[bidx]) if comp else ycent[bidx]   # LSH-MoE Eq. 5
    with torch.no_grad():
        xd, cd = x[t].double(), cents[bidx].double()
        st = dict(n=len(t), m=off, maxb=int(torch.bincount(bidx).max()),
                  sse=float(((xd - cd) ** 2).sum()), ssx=float((xd ** 2).sum()))
    return yhat, st

def moe(x, routerw, expfcw, expfcb, expprojw, expprojb, K, renorm, capacity_factor, route=None,
        lsh=None):
    """x (N, C) after ln2. Returns out (N, C), lb, z, route (topi, kept, groups), dropped-slot
    count, LSH statistics (None without LSH). `route` forces the expert choice, capacity mask and
    LSH buckets (used by the finite-difference check). `lsh`: None, or a dict (L, dp, center, comp,
    ranks, R, E) that compresses each (expert, source rank) group of kept slots."""
    N, C = x.shape
    E = routerw.shape[0]
    logits = x @ routerw.T                                     # (N, E)
    p = logits.softmax(dim=-1)                                 # (N, E)
    if route is None:
        # top-K by p descending; a stable sort of -p breaks ties by lower expert index first
        order = torch.sort(-p.detach(), dim=-1, stable=True).indices   # (N, E)
        topi = order[:, :K]                                    # (N, K), j = 0 is the largest
        expert = topi.reshape(-1)                              # (N*K,) slot s = t*K + j
        onehot = F.one_hot(expert, E)                          # (N*K, E)
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1          # (N*K,) place in its expert's queue
        if capacity_factor > 0:
            cap = math.ceil(capacity_factor * N * K / E)
            kept = rank < cap                                  # (N*K,) first cap slots per expert
        else:
            kept = torch.ones(N * K, dtype=torch.bool)
        # capacity first: dropped slots are neither hashed nor sent
        groups = None if lsh is None else lsh_groups(x, expert, kept, K, dict(lsh, E=E))
        route = (topi, kept, groups)
    topi, kept, groups = route
    expert = topi.reshape(-1)                                  # (N*K,)
    g = p.gather(1, topi)                                      # (N, K)
    if renorm and K > 1:
        g = g / g.sum(dim=1, keepdim=True)                     # over all K chosen, dropped included
    g = g.reshape(-1)                                          # (N*K,)
    out = torch.zeros_like(x)                                  # (N, C)
    stats = None if groups is None else dict(n=0, m=0, maxb=0, sse=0.0, ssx=0.0)
    for e in range(E):
        s = torch.nonzero((expert == e) & kept).squeeze(1)     # (n_e,) kept slots, slot order
        t = s // K                                             # (n_e,) their tokens
        if groups is None:
            y = mlp(x[t], expfcw[e], expfcb[e], expprojw[e], expprojb[e])  # (n_e, C)
        elif len(s) == 0:
            continue
        else:
            assert torch.equal(torch.cat([sg for _, sg, _ in groups[e]]), s)
            y, st = lsh_expert(x, groups[e], K, lsh["comp"],
                               expfcw[e], expfcb[e], expprojw[e], expprojb[e])
            for k in ("n", "m", "sse", "ssx"): stats[k] += st[k]
            stats["maxb"] = max(stats["maxb"], st["maxb"])
        out = out.index_add(0, t, g[s, None] * y)
    # Switch load balancing: f counts routed slots before dropping, a constant
    f = torch.bincount(expert, minlength=E).to(x.dtype) / (N * K)    # (E,)
    P = p.mean(dim=0)                                          # (E,) full softmax, with gradient
    lb = E * (f * P).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()          # router z-loss
    return out, lb, z, route, int((~kept).sum()), stats

# -----------------------------------------------------------------------------
# model

class GPT(nn.Module):
    def __init__(self, cfg, train):
        super().__init__()
        self.cfg, self.train_cfg = cfg, train
        self.names = [n for n, _ in param_shapes(cfg)]
        for name, shape in param_shapes(cfg):
            setattr(self, name, nn.Parameter(torch.empty(shape)))
        self.trace = None  # a list to record MoE (input, output, dropped) for check_moe_naive
        self.lsh_R, self.lsh_stats = {}, []  # projections per (MoE layer, step); last forward's stats

    def params(self):  # checkpoint order
        return [getattr(self, n) for n in self.names]

    @torch.no_grad()
    def init_weights(self):
        for name in self.names:
            p = getattr(self, name)
            if name in ("ln1w", "ln2w", "lnfw"):
                p.normal_(0.0, 0.1).add_(1.0)
            elif name == "routerw":
                p.normal_(0.0, 0.5)                            # decisive routing, varied gates
            else:
                p.normal_(0.0, 0.02)                           # weights and biases alike

    def lsh(self, lm, step):
        """LSH settings of MoE layer lm at optimizer step `step`, or None when LSH is off."""
        tr = self.train_cfg
        if tr.lsh_L <= 0:
            return None
        key = (lm, step)
        if key not in self.lsh_R:                              # one R per (MoE layer, step)
            self.lsh_R[key] = projections(tr.lsh_L, tr.lsh_dp, self.cfg.C, lsh_seed(tr.lsh_S, lm, step))
        return dict(L=tr.lsh_L, dp=tr.lsh_dp, center=tr.lsh_center, comp=tr.lsh_comp,
                    ranks=tr.lsh_ranks, R=self.lsh_R[key])

    def forward(self, idx, targets, routes=None, step=0):
        """idx, targets (B, T); step: the optimizer step (seeds the LSH projections). Returns
        logits (B, T, Vp), ce, lb_sum, z_sum, routes, dropped; LSH statistics go to self.lsh_stats."""
        cfg, tr = self.cfg, self.train_cfg
        B, T = idx.shape
        x = self.wte[idx] + self.wpe[:T]                       # (B, T, C)
        lb_sum = z_sum = x.new_zeros(())
        new_routes, dropped, ld, lm = [], 0, 0, 0
        self.lsh_stats = []
        for l in range(cfg.L):
            x = x + attention(layernorm(x, self.ln1w[l], self.ln1b[l]), self.qkvw[l],
                              self.qkvb[l], self.attprojw[l], self.attprojb[l], cfg.NH)
            h = layernorm(x, self.ln2w[l], self.ln2b[l])       # (B, T, C)
            if cfg.is_moe(l):
                out, lb, z, route, nd, st = moe(h.view(B * T, cfg.C), self.routerw[lm],
                                                self.expfcw[lm], self.expfcb[lm], self.expprojw[lm],
                                                self.expprojb[lm], cfg.K, cfg.renorm,
                                                tr.capacity_factor,
                                                None if routes is None else routes[lm],
                                                self.lsh(lm, step))
                x = x + out.view(B, T, cfg.C)
                if self.trace is not None:
                    self.trace.append((h.view(B * T, cfg.C), out, nd))
                lb_sum, z_sum, dropped = lb_sum + lb, z_sum + z, dropped + nd
                new_routes.append(route)
                self.lsh_stats.append(st)
                lm += 1
            else:
                x = x + mlp(h, self.fcw[ld], self.fcb[ld], self.fcprojw[ld], self.fcprojb[ld])
                ld += 1
        x = layernorm(x, self.lnfw, self.lnfb)
        logits = x @ self.wte.T                                # (B, T, Vp)
        ce = F.cross_entropy(logits[..., :cfg.V].reshape(B * T, cfg.V), targets.reshape(B * T))
        return logits, ce, lb_sum, z_sum, new_routes, dropped

    def total_loss(self, ce, lb_sum, z_sum):
        return ce + self.train_cfg.aux_w * lb_sum + self.train_cfg.z_w * z_sum

# -----------------------------------------------------------------------------
# self-check: autograd vs float64 central differences, with the expert choice (and the LSH
# buckets) held fixed

def check_finite_differences(model, idx, targets, routes, n_entries=3, h=1e-6):
    """`routes`: the float32 forward's expert choice, capacity mask and LSH buckets, held fixed."""
    m64 = copy.deepcopy(model).double()
    logits, ce, lb, z, _, _ = m64(idx, targets, routes=routes)
    m64.zero_grad()
    m64.total_loss(ce, lb, z).backward()
    names = (["routerw", "expfcw", "expfcb", "expprojw", "expprojb", "ln2w"] if model.cfg.Lm > 0
             else ["fcw", "qkvw", "ln2w"])
    gen = torch.Generator().manual_seed(1234)
    worst = 0.0
    for name in names:
        p = getattr(m64, name)
        flat = p.data.view(-1)
        for i in torch.randint(0, flat.numel(), (n_entries,), generator=gen).tolist():
            old = flat[i].item()
            vals = []
            for sign in (+1, -1):
                flat[i] = old + sign * h
                with torch.no_grad():
                    _, c2, l2, z2, _, _ = m64(idx, targets, routes=routes)
                vals.append(m64.total_loss(c2, l2, z2).item())
            flat[i] = old
            fd, g = (vals[0] - vals[1]) / (2 * h), p.grad.view(-1)[i].item()
            err = abs(fd - g) / max(1e-3, abs(g))
            worst = max(worst, err)
            assert err < 1e-5, f"finite difference check failed: {name}[{i}] fd={fd} grad={g}"
    # the float32 gradients should agree with float64 ones to float32 accuracy
    g32 = torch.cat([p.grad.reshape(-1) for p in model.params() if p.grad is not None])
    g64 = torch.cat([p.grad.reshape(-1) for p in m64.params() if p.grad is not None]).float()
    rel32 = ((g32 - g64).norm() / g64.norm()).item()
    assert rel32 < 1e-4, f"float32 vs float64 gradients differ: {rel32}"
    return worst, rel32

def naive_slots(x, rw, K, renorm, cf):
    """Routing one token at a time, in slot order: yields (token, expert, gate, kept) for every
    slot; kept is False once the expert's capacity ceil(cf * N * K / E) is used (cf <= 0: never)."""
    N, E = x.shape[0], rw.shape[0]
    cap = math.ceil(cf * N * K / E) if cf > 0 else N * K
    used = [0] * E
    for t in range(N):
        p = (x[t] @ rw.T).softmax(-1).tolist()
        chosen = sorted(range(E), key=lambda e: (-p[e], e))[:K]
        norm = sum(p[e] for e in chosen) if (renorm and K > 1) else 1.0
        for e in chosen:
            used[e] += 1
            yield t, e, p[e] / norm, used[e] <= cap

def check_moe_naive(model, idx, targets):
    """Recompute each MoE layer one token at a time with plain Python bookkeeping."""
    cfg, cf, K = model.cfg, model.train_cfg.capacity_factor, model.cfg.K
    model.trace = []
    with torch.no_grad():
        model(idx, targets)
    for lm, (x, out, nd) in enumerate(model.trace):            # x (N, C), out (N, C)
        rw, w1, b1, w2, b2 = (getattr(model, n)[lm].detach()
                              for n in ("routerw", "expfcw", "expfcb", "expprojw", "expprojb"))
        ref, dropped = torch.zeros_like(x), 0
        for t, e, gate, kept in naive_slots(x, rw, K, cfg.renorm, cf):
            if not kept:
                dropped += 1
                continue
            ref[t] += gate * mlp(x[t], w1[e], b1[e], w2[e], b2[e])
        assert dropped == nd and torch.allclose(ref, out, atol=1e-6), "naive MoE check failed"
    n, model.trace = len(model.trace), None
    return n

def check_lsh_naive(model, idx, targets):
    """Recompute each LSH-compressed MoE layer (step 0) with plain Python bookkeeping: scalar
    float32 hashes, tuple keys, dict buckets, one centroid at a time through the expert. Checks the
    bucket partition of every group exactly and the layer output to 1e-6. Returns (rows, centroids)."""
    cfg, tr, K, C = model.cfg, model.train_cfg, model.cfg.K, model.cfg.C
    L, dp = tr.lsh_L, tr.lsh_dp
    model.trace = []
    with torch.no_grad():
        _, _, _, _, routes, _ = model(idx, targets, step=0)
    n_tot = m_tot = 0
    for lm, (x, out, nd) in enumerate(model.trace):            # x (N, C), out (N, C)
        rw, w1, b1, w2, b2 = (getattr(model, n)[lm].detach()
                              for n in ("routerw", "expfcw", "expfcb", "expprojw", "expprojb"))
        R = projections(L, dp, C, lsh_seed(tr.lsh_S, lm, 0))
        N = x.shape[0]
        groups = {}                                            # (e, v) -> [(t, gate)] in slot order
        for t, e, gate, kept in naive_slots(x, rw, K, cfg.renorm, tr.capacity_factor):
            if kept:
                groups.setdefault((e, t // (N // tr.lsh_ranks)), []).append((t, gate))
        ref = torch.zeros_like(x)
        model_buckets = {(e, v): b.tolist() for e, ge in enumerate(routes[lm][2]) for v, _, b in ge}
        assert set(model_buckets) == set(groups), "naive LSH check: groups differ"
        for (e, v), members in groups.items():
            rows = [x[t].numpy() for t, _ in members]          # float32
            n = len(rows)
            mean = [np.float32(sum(float(r[c]) for r in rows) / n) for c in range(C)]
            buckets = {}                                       # (h_0..h_L-1) -> member indices
            for i, r in enumerate(rows):
                hs = []
                for j in range(L):
                    v_k = []
                    for k in range(dp):
                        acc = np.float32(0.0)
                        for c in range(C):
                            xc = np.float32(r[c] - mean[c]) if tr.lsh_center else r[c]
                            acc = np.float32(acc + R[j * dp + k, c] * xc)
                        v_k.append(acc)
                    best = max(range(dp), key=lambda k: (abs(v_k[k]), -k))   # first k on a tie
                    hs.append(2 * best + int(v_k[best] < 0))
                buckets.setdefault(tuple(hs), []).append(i)
            ids = [0] * n
            for b, mem in enumerate(buckets.values()):         # dicts keep first-appearance order
                for i in mem:
                    ids[i] = b
            assert ids == model_buckets[(e, v)], f"naive LSH check: buckets of {(e, v)} differ"
            for mem in buckets.values():
                cent = rows[mem[0]].copy()
                for i in mem[1:]:
                    cent = cent + rows[i]                      # float32, row order
                cent = torch.from_numpy(cent / np.float32(len(mem)))
                yc = mlp(cent, w1[e], b1[e], w2[e], b2[e])
                for i in mem:
                    t, gate = members[i]
                    ref[t] += gate * (yc + (x[t] - cent) if tr.lsh_comp else yc)
            n_tot, m_tot = n_tot + n, m_tot + len(buckets)
        assert torch.allclose(ref, out, atol=1e-6), "naive LSH check: outputs differ"
        assert (model.lsh_stats[lm]["n"], model.lsh_stats[lm]["m"]) == (
            sum(len(g) for g in model_buckets.values()), sum(max(g) + 1 for g in model_buckets.values()))
    model.trace = None
    return n_tot, m_tot

def check_lsh_singletons(model, idx, targets):
    """With Lh = 6, dp = 8 (16^6 buckets) every row of these groups is alone in its bucket, and the
    LSH layer must then be the uncompressed MoE layer: output bit for bit, gradients to 1e-6."""
    tr, K = model.train_cfg, model.cfg.K
    model.trace = []
    with torch.no_grad():
        model(idx, targets)
    trace, model.trace = model.trace, None
    gen = torch.Generator().manual_seed(7)
    for lm, (x, _, _) in enumerate(trace):
        R = projections(6, 8, model.cfg.C, lsh_seed(tr.lsh_S, lm, 0))
        ws = [getattr(model, n)[lm].detach() for n in ("routerw", "expfcw", "expfcb", "expprojw", "expprojb")]
        gout = torch.randn(x.shape, generator=gen)
        for center in (0, 1):
            for comp in (0, 1):
                res = []
                for lsh in (None, dict(L=6, dp=8, center=center, comp=comp, ranks=tr.lsh_ranks, R=R)):
                    xa, wa = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws]
                    out, lb, z, _, _, st = moe(xa, *wa, K, model.cfg.renorm, tr.capacity_factor, lsh=lsh)
                    (out * gout).sum().backward()
                    res.append((out.detach(), [xa.grad] + [w.grad for w in wa], st))
                (o0, g0, _), (o1, g1, st) = res
                assert st["n"] == st["m"] and st["maxb"] == 1, "singleton check: a bucket has 2 rows"
                assert torch.equal(o0, o1), "singleton check: LSH output differs from the MoE layer"
                for a, b in zip(g0, g1):
                    assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), "singleton check: gradients differ"
    return len(trace)

# -----------------------------------------------------------------------------
# I/O

def header(ints, floats=None):
    buf = bytearray(256 * 4)
    for i, v in ints.items(): struct.pack_into("<i", buf, 4 * i, int(v))
    for i, v in (floats or {}).items(): struct.pack_into("<f", buf, 4 * i, float(v))
    return bytes(buf)

def f32(t): return t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()

def model_header(cfg):
    if cfg.E <= 1:  # llm.c checkpoint
        return header({0: 20240326, 1: 3, 2: cfg.maxT, 3: cfg.V, 4: cfg.L, 5: cfg.NH, 6: cfg.C, 7: cfg.Vp})
    return header({0: 20241111, 1: 1, 2: cfg.maxT, 3: cfg.V, 4: cfg.L, 5: cfg.NH, 6: cfg.C, 7: cfg.Vp,
                   8: cfg.E, 9: cfg.K, 10: cfg.moe_every, 11: cfg.H, 12: int(cfg.renorm)})

def debug_header(cfg, tr, dropped, lsh_m=0, lsh_n=0):
    return header({0: 20241112, 1: 1, 2: tr.B, 3: tr.T, 4: tr.nsteps, 5: cfg.V, 6: cfg.Vp, 7: cfg.Lm,
                   8: dropped, 9: tr.lsh_L, 10: tr.lsh_dp, 11: tr.lsh_center, 12: tr.lsh_comp,
                   13: tr.lsh_ranks, 14: tr.lsh_S, 15: lsh_m, 25: lsh_n},
                  {16: tr.capacity_factor, 17: tr.aux_w, 18: tr.z_w, 19: tr.lr, 20: tr.beta1,
                   21: tr.beta2, 22: tr.eps, 23: tr.weight_decay, 24: tr.grad_clip})

def read_back(model_path, debug_path, cfg, tr):
    """A minimal reader: checks headers and sizes, returns params, grads and step losses."""
    nparams = sum(math.prod(s) for _, s in param_shapes(cfg))
    mh = np.fromfile(model_path, dtype="<i4", count=256)
    assert mh[0] == (20240326 if cfg.E <= 1 else 20241111), model_path
    assert os.path.getsize(model_path) == 1024 + 4 * nparams, model_path
    params = np.fromfile(model_path, dtype="<f4", offset=1024)
    dh = np.fromfile(debug_path, dtype="<i4", count=256)
    B, T, nsteps, V = dh[2], dh[3], dh[4], dh[5]
    assert dh[0] == 20241112 and dh[1] == 1, debug_path
    assert dh[16:25].view("<f4")[0] == np.float32(tr.capacity_factor)
    assert list(dh[9:15]) == [tr.lsh_L, tr.lsh_dp, tr.lsh_center, tr.lsh_comp, tr.lsh_ranks, tr.lsh_S]
    assert (dh[15] > 0) == (dh[25] > 0) == (tr.lsh_L > 0) and dh[15] <= dh[25]
    expect = 1024 + 4 * (2 * B * T + B * T * V + 3 + 1 + nparams + 2 * nsteps)
    assert os.path.getsize(debug_path) == expect, f"{debug_path}: {os.path.getsize(debug_path)} != {expect}"
    o = 1024
    x = np.fromfile(debug_path, "<i4", B * T, offset=o); o += 4 * B * T
    y = np.fromfile(debug_path, "<i4", B * T, offset=o); o += 4 * B * T
    logits = np.fromfile(debug_path, "<f4", B * T * V, offset=o).reshape(B, T, V); o += 4 * B * T * V
    losses = np.fromfile(debug_path, "<f4", 4, offset=o); o += 16
    grads = np.fromfile(debug_path, "<f4", nparams, offset=o); o += 4 * nparams
    steps = np.fromfile(debug_path, "<f4", 2 * nsteps, offset=o).reshape(nsteps, 2)
    return dict(params=params, x=x, y=y, logits=logits, losses=losses, grads=grads, steps=steps)

# -----------------------------------------------------------------------------

def run_config(name, cfg, tr, outdir):
    torch.manual_seed(tr.seed)
    model = GPT(cfg, tr)
    model.init_weights()
    x = torch.randint(0, cfg.V, (tr.B, tr.T))                  # (B, T)
    y = torch.cat([x[:, 1:], torch.randint(0, cfg.V, (tr.B, 1))], dim=1)  # (B, T) next token
    init_params = torch.cat([f for f in (p.detach().reshape(-1).clone() for p in model.params())])

    # initial forward + backward, for the debug state
    logits, ce, lb, z, routes, dropped = model(x, y, step=0)
    lsh_on = tr.lsh_L > 0
    if lsh_on:  # rows in groups and centroids, summed over groups and MoE layers
        lsh = {k: sum(st[k] for st in model.lsh_stats) for k in ("n", "m", "sse", "ssx")}
        lsh["maxb"] = max(st["maxb"] for st in model.lsh_stats)
        assert lsh["n"] + dropped == cfg.Lm * tr.B * tr.T * cfg.K
        assert lsh["m"] < lsh["n"] and lsh["maxb"] >= 2, f"{name}: LSH does not compress"
    loss = model.total_loss(ce, lb, z)
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.params()]
    debug = [debug_header(cfg, tr, dropped, *((lsh["m"], lsh["n"]) if lsh_on else ())),
             x.to(torch.int32).numpy().astype("<i4").tobytes(),
             y.to(torch.int32).numpy().astype("<i4").tobytes(), f32(logits[..., :cfg.V]),
             f32(torch.stack([ce, lb, z])), f32(loss.reshape(1))] + [f32(g) for g in grads]
    fd_err, rel32 = check_finite_differences(model, x, y, routes)
    if lsh_on:
        assert check_lsh_naive(model, x, y) == (lsh["n"], lsh["m"])
        assert check_lsh_singletons(model, x, y) == cfg.Lm
    else:
        assert check_moe_naive(model, x, y) == cfg.Lm

    # AdamW on the same batch; decay only on the matrices (and embeddings)
    ps = [(n, p) for n, p in zip(model.names, model.params()) if p.numel() > 0]
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in ps if n in DECAYED], "weight_decay": tr.weight_decay},
         {"params": [p for n, p in ps if n not in DECAYED], "weight_decay": 0.0}],
        lr=tr.lr, betas=(tr.beta1, tr.beta2), eps=tr.eps)
    steps, norms = [], []
    for step in range(tr.nsteps):
        _, ce_s, lb_s, z_s, _, _ = model(x, y, step=step)       # step seeds the LSH projections
        loss_s = model.total_loss(ce_s, lb_s, z_s)
        steps.append((ce_s.item(), loss_s.item()))
        opt.zero_grad(set_to_none=True)
        loss_s.backward()
        norms.append(torch.nn.utils.clip_grad_norm_([p for _, p in ps], tr.grad_clip).item())
        opt.step()
    assert steps[0] == (ce.item(), loss.item()), "step 1 must see the initial parameters"
    debug.append(f32(torch.tensor(steps)))

    # the model file holds the INITIAL parameters (the ones the debug state was computed from)
    os.makedirs(outdir, exist_ok=True)
    model_path, debug_path = (os.path.join(outdir, f"{name}_{k}.bin") for k in ("model", "debug"))
    with open(model_path, "wb") as f:
        f.write(model_header(cfg) + f32(init_params))
    with open(debug_path, "wb") as f:
        f.write(b"".join(debug))

    back = read_back(model_path, debug_path, cfg, tr)
    assert np.array_equal(back["params"], init_params.numpy())
    assert np.array_equal(back["x"], x.reshape(-1).numpy()) and back["losses"][0] == np.float32(ce.item())
    if name in ("cap", "lsh_nocomp"):
        assert dropped > 0, f"the {name} config must drop slots"
    lsh_msg = "" if not lsh_on else (
        f"; LSH rows={lsh['n']} centroids={lsh['m']} (rate {lsh['m'] / lsh['n']:.3f}, largest bucket "
        f"{lsh['maxb']}, rel err {math.sqrt(lsh['sse'] / lsh['ssx']):.3f})")
    print(f"wrote {model_path} ({init_params.numel()} params), debug: ce={ce.item():.6f}, "
          f"lb={lb.item():.6f}, z={z.item():.6f}, total={loss.item():.6f}, dropped={dropped}; "
          f"step {tr.nsteps} ce={steps[-1][0]:.6f} total={steps[-1][1]:.6f}; "
          f"grad norm {min(norms):.2f}..{max(norms):.2f}; fd rel err {fd_err:.1e}, fp32-vs-fp64 grad {rel32:.1e}"
          + lsh_msg)

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outdir", default="dev/reference/states")
    ap.add_argument("--configs", default="dense,moe,cap,lsh,lsh_nocomp")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)                                   # bit-reproducible files
    torch.use_deterministic_algorithms(True)
    # golden values shared with the C tests (lshmoe.h's lsh_seed)
    assert lsh_seed(1337, 2, 100) == 0xbe5abe4c9e701fed and lsh_seed(0, -1, -5) == 0xd8edc582a36c8907
    for name in args.configs.split(","):
        run_config(name, *CONFIGS[name], args.outdir)

if __name__ == "__main__":
    main()
