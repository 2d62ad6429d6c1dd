"""Two small fused-loss cases against float64, next to the float32 dense and chunked paths (CUDA).

    python benchmarks/fused_precision_cases.py

1. Several captions per image and raw norms (tests/kernels/test_fused.py's case, 20 seeds): the
   D_CS and InfoNCE value errors of the fused kernels, the float32 dense reference and the chunked
   path, each against float64.
2. Well-aligned pairs, float32, temperature 0.07 and 0.01 (test_well_aligned_pairs_keep_their_small_gradients):
   gradient errors against float64, where at 0.01 the true gradients are ~1e-18.
On an H100 (2026-11-23) case 2 at 0.01 found the fused backward's positives rounded by an FMA-contracted
subtraction (errors 6e-9 and a temperature gradient of -1e-4 against -3e-16); fixed, it gives 2.5e-24.
Triton's interpreter does not contract multiplies into adds, so CPU runs never saw it.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from csaligner.kernels import infonce_cs_terms
from csaligner.kernels.fused import fused_infonce_cs
from csaligner.kernels.triton_strips import TritonStrips
from csaligner.losses import cs_divergence, info_nce

SMALL = TritonStrips(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=1, num_stages=1)
D = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU: TRITON_INTERPRET=1
# 1. several captions, raw norms: CS value, fused vs dense32 vs float64, 20 seeds
worst = []
for seed in range(20):
    torch.manual_seed(seed)
    x = F.normalize(torch.randn(21, 16, device=D), dim=-1) * torch.linspace(0.5, 2.0, 21, device=D)[:, None]
    t2i = torch.cat([torch.arange(21), torch.randint(0, 21, (19,))]).to(D)
    y = F.normalize(torch.randn(40, 16, device=D) + 0.2, dim=-1)
    nce, cs = fused_infonce_cs(x, y, 0.05, 1.0, t2i, tiles=SMALL, chunk_size=16)
    c32 = cs_divergence(x, y, 1.0)
    c64 = cs_divergence(x.double(), y.double(), 1.0)
    n64 = info_nce(x.double(), y.double(), 0.05, t2i)
    worst.append((abs(float(cs) - float(c64)), abs(float(c32) - float(c64)), abs(float(nce) - float(n64)), float(c64)))
    ch = infonce_cs_terms(x, y, temperature=0.05, sigma=1.0, text_to_image=t2i, impl="chunked")
    worst[-1] += (abs(float(ch["cs"]) - float(c64)),)
print("cs err: fused vs f64 | dense32 vs f64 | nce fused err | cs value | chunked err")
for w in worst:
    print(" ".join(f"{v:.3e}" for v in w))
print(
    "max fused cs err",
    max(w[0] for w in worst),
    "max dense32 err",
    max(w[1] for w in worst),
    "max chunked",
    max(w[4] for w in worst),
)
# 2. well-aligned pairs, float32, t = 0.01 (and 0.07)
for temp in (0.07, 0.01):
    g = torch.Generator().manual_seed(0)
    x0 = F.normalize(torch.randn(64, 32, generator=g), dim=-1)
    y0 = F.normalize(x0 + 0.2 * torch.randn(64, 32, generator=g) / 32**0.5, dim=-1)
    x, y = x0.to(D).requires_grad_(), y0.to(D).requires_grad_()
    t = torch.tensor(temp, device=D, requires_grad=True)
    nce, _ = fused_infonce_cs(x, y, t, 1.0, tiles=SMALL, chunk_size=32)
    gx, gy, gt = torch.autograd.grad(nce, [x, y, t])
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    t64 = torch.tensor(temp, device=D, dtype=torch.float64, requires_grad=True)
    wx, wy, wt = torch.autograd.grad(info_nce(x64, y64, t64), [x64, y64, t64])
    xd, yd = x.detach().requires_grad_(), y.detach().requires_grad_()
    dx, dy = torch.autograd.grad(info_nce(xd, yd, temp), [xd, yd])
    ch = infonce_cs_terms(xd, yd, temperature=temp, sigma=1.0, impl="chunked")
    cx, cy = torch.autograd.grad(ch["infonce"], [xd, yd])
    for name, a, b in (("fused gx", gx, wx), ("fused gy", gy, wy), ("dense32 gx", dx, wx), ("chunked gx", cx, wx)):
        err = (a.double() - b).abs()
        bad_rows = int((err.amax(1) > 1e-12).sum())
        print(f"t={temp} {name}: max err {float(err.max()):.3e}, max |true| {float(b.abs().max()):.3e}, ", end="")
        print(f"rows with err > 1e-12: {bad_rows}")
    print(f"t={temp} loss {float(nce.detach()):.3e} gt {float(gt):.3e} vs {float(wt):.3e}")
