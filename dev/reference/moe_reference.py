"""
PyTorch reference for llm.moe: GPT-2 (as llm.c computes it) with Mixture-of-Experts layers.
Written from DESIGN.md alone, as an independent check of the C trainer. It builds three tiny
models (dense, moe, cap), computes loss and gradients on one batch, runs 10 AdamW steps on that
batch, and writes NAME_model.bin + NAME_debug.bin for each (formats: dev/reference/README.md).

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

CONFIGS = {
    "dense": (Config(maxT=16, V=100, L=2, NH=2, C=16), Train(seed=1)),
    "moe":   (Config(maxT=16, V=100, L=2, NH=2, C=16, E=4, K=2, moe_every=1, H=24), Train(seed=2)),
    "cap":   (Config(maxT=16, V=100, L=3, NH=2, C=16, E=4, K=2, moe_every=2, H=24),
              Train(seed=3, capacity_factor=0.5)),
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

def moe(x, routerw, expfcw, expfcb, expprojw, expprojb, K, renorm, capacity_factor, route=None):
    """x (N, C) after ln2. Returns out (N, C), lb, z, route (topi, kept), dropped-slot count.
    `route` forces the expert choice and capacity mask (used by the finite-difference check)."""
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
        route = (topi, kept)
    topi, kept = route
    expert = topi.reshape(-1)                                  # (N*K,)
    g = p.gather(1, topi)                                      # (N, K)
    if renorm and K > 1:
        g = g / g.sum(dim=1, keepdim=True)                     # over all K chosen, dropped included
    g = g.reshape(-1)                                          # (N*K,)
    out = torch.zeros_like(x)                                  # (N, C)
    for e in range(E):
        s = torch.nonzero((expert == e) & kept).squeeze(1)     # (n_e,) kept slots, slot order
        t = s // K                                             # (n_e,) their tokens
        y = mlp(x[t], expfcw[e], expfcb[e], expprojw[e], expprojb[e])  # (n_e, C)
        out = out.index_add(0, t, g[s, None] * y)
    # Switch load balancing: f counts routed slots before dropping, a constant
    f = torch.bincount(expert, minlength=E).to(x.dtype) / (N * K)    # (E,)
    P = p.mean(dim=0)                                          # (E,) full softmax, with gradient
    lb = E * (f * P).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()          # router z-loss
    return out, lb, z, route, int((~kept).sum())

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

    def forward(self, idx, targets, routes=None):
        """idx, targets (B, T). Returns logits (B, T, Vp), ce, lb_sum, z_sum, routes, dropped."""
        cfg, tr = self.cfg, self.train_cfg
        B, T = idx.shape
        x = self.wte[idx] + self.wpe[:T]                       # (B, T, C)
        lb_sum = z_sum = x.new_zeros(())
        new_routes, dropped, ld, lm = [], 0, 0, 0
        for l in range(cfg.L):
            x = x + attention(layernorm(x, self.ln1w[l], self.ln1b[l]), self.qkvw[l],
                              self.qkvb[l], self.attprojw[l], self.attprojb[l], cfg.NH)
            h = layernorm(x, self.ln2w[l], self.ln2b[l])       # (B, T, C)
            if cfg.is_moe(l):
                out, lb, z, route, nd = moe(h.view(B * T, cfg.C), self.routerw[lm], self.expfcw[lm],
                                            self.expfcb[lm], self.expprojw[lm], self.expprojb[lm],
                                            cfg.K, cfg.renorm, tr.capacity_factor,
                                            None if routes is None else routes[lm])
                x = x + out.view(B, T, cfg.C)
                if self.trace is not None:
                    self.trace.append((h.view(B * T, cfg.C), out, nd))
                lb_sum, z_sum, dropped = lb_sum + lb, z_sum + z, dropped + nd
                new_routes.append(route)
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
# self-check: autograd vs float64 central differences, with the expert choice held fixed

def check_finite_differences(model, idx, targets, n_entries=3, h=1e-6):
    m64 = copy.deepcopy(model).double()
    logits, ce, lb, z, routes, _ = m64(idx, targets)
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

def check_moe_naive(model, idx, targets):
    """Recompute each MoE layer one token at a time with plain Python bookkeeping."""
    cfg, cf, K = model.cfg, model.train_cfg.capacity_factor, model.cfg.K
    model.trace = []
    with torch.no_grad():
        model(idx, targets)
    for lm, (x, out, nd) in enumerate(model.trace):            # x (N, C), out (N, C)
        rw, w1, b1, w2, b2 = (getattr(model, n)[lm].detach()
                              for n in ("routerw", "expfcw", "expfcb", "expprojw", "expprojb"))
        N, E = x.shape[0], rw.shape[0]
        cap = math.ceil(cf * N * K / E) if cf > 0 else N * K
        used, ref, dropped = [0] * E, torch.zeros_like(x), 0
        for t in range(N):
            p = (x[t] @ rw.T).softmax(-1).tolist()
            chosen = sorted(range(E), key=lambda e: (-p[e], e))[:K]
            norm = sum(p[e] for e in chosen) if (cfg.renorm and K > 1) else 1.0
            for e in chosen:
                used[e] += 1
                if used[e] > cap:
                    dropped += 1
                    continue
                ref[t] += p[e] / norm * mlp(x[t], w1[e], b1[e], w2[e], b2[e])
        assert dropped == nd and torch.allclose(ref, out, atol=1e-6), "naive MoE check failed"
    n, model.trace = len(model.trace), None
    return n

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

def debug_header(cfg, tr, dropped):
    return header({0: 20241112, 1: 1, 2: tr.B, 3: tr.T, 4: tr.nsteps, 5: cfg.V, 6: cfg.Vp, 7: cfg.Lm,
                   8: dropped},
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
    logits, ce, lb, z, _, dropped = model(x, y)
    loss = model.total_loss(ce, lb, z)
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.params()]
    debug = [debug_header(cfg, tr, dropped), x.to(torch.int32).numpy().astype("<i4").tobytes(),
             y.to(torch.int32).numpy().astype("<i4").tobytes(), f32(logits[..., :cfg.V]),
             f32(torch.stack([ce, lb, z])), f32(loss.reshape(1))] + [f32(g) for g in grads]
    fd_err, rel32 = check_finite_differences(model, x, y)
    assert check_moe_naive(model, x, y) == cfg.Lm

    # AdamW on the same batch; decay only on the matrices (and embeddings)
    ps = [(n, p) for n, p in zip(model.names, model.params()) if p.numel() > 0]
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in ps if n in DECAYED], "weight_decay": tr.weight_decay},
         {"params": [p for n, p in ps if n not in DECAYED], "weight_decay": 0.0}],
        lr=tr.lr, betas=(tr.beta1, tr.beta2), eps=tr.eps)
    steps, norms = [], []
    for step in range(tr.nsteps):
        _, ce_s, lb_s, z_s, _, _ = model(x, y)
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
    if name == "cap":
        assert dropped > 0, "the cap config must drop slots"
    print(f"wrote {model_path} ({init_params.numel()} params), debug: ce={ce.item():.6f}, "
          f"lb={lb.item():.6f}, z={z.item():.6f}, total={loss.item():.6f}, dropped={dropped}; "
          f"step {tr.nsteps} ce={steps[-1][0]:.6f} total={steps[-1][1]:.6f}; "
          f"grad norm {min(norms):.2f}..{max(norms):.2f}; fd rel err {fd_err:.1e}, fp32-vs-fp64 grad {rel32:.1e}")

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outdir", default="dev/reference/states")
    ap.add_argument("--configs", default="dense,moe,cap")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)                                   # bit-reproducible files
    torch.use_deterministic_algorithms(True)
    for name in args.configs.split(","):
        run_config(name, *CONFIGS[name], args.outdir)

if __name__ == "__main__":
    main()
