"""How closely two float results must agree, derived from the float type and the size of the computation.

Every numeric assertion in this suite is one of two kinds:

* Both sides come from the same kernels on the same shapes (and memory layouts) in one process: the same
  float operations in the same order on the same bits give the same bits, so the test asserts exact
  equality and says why.
* The two sides take different kernel paths (batched vs one at a time, cached vs uncached, another batch
  order or memory layout, a reference implementation, another formula for the same value). Float addition
  is not associative, and BLAS/conv kernels pick their summation order from the shapes, the layout, the
  thread count and the CPU, so the sides agree only to rounding. Those assertions take a bound from here,
  computed from the sizes the test runs, so a real bug (a missing term, a wrong row, other weights) fails.

u = eps / 2 is the unit roundoff of the dtype (2**-24 for float32).
"""
from __future__ import annotations

import math

import torch

# chain_tol's bound fails with probability <= 2 n exp(-LAMBDA**2 / 2): below 3e-9 for n up to 1e5 terms.
LAMBDA = 8.0


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    return torch.finfo(dtype).eps / 2


def elementwise_tol(dtype: torch.dtype, n_ops: int, scale: float | torch.Tensor = 1.0) -> float | torch.Tensor:
    """Most two evaluations of a chain of `n_ops` elementwise operations (each correctly rounded, or within
    one ulp like libm's cos/sin) can differ by: each path is within n_ops u of the exact value, relative to
    `scale`, the size of the operands."""
    return 2 * n_ops * unit_roundoff(dtype) * scale


def reduction_tol(dtype: torch.dtype, n_terms: int, scale: float | torch.Tensor = 1.0) -> float | torch.Tensor:
    """Most two evaluation orders of one n-term sum or dot product can differ by (worst case, any data).

    Higham, Accuracy and Stability of Numerical Algorithms (2nd ed., 2002), eq. 3.5: summed in any order,
    |fl(sum) - sum| <= gamma_n * sum|terms|, gamma_n = n u / (1 - n u); two orders: twice that. `scale` is
    sum|terms| (<= 1 for the dot product of two unit vectors, by Cauchy-Schwarz; the sum itself when every
    term is >= 0). Meant for short reductions: a norm, a cosine similarity, a mean of some losses.
    """
    nu = n_terms * unit_roundoff(dtype)
    assert nu < 0.5, "too long for a worst-case bound: use chain_tol"
    return 2 * nu / (1 - nu) * scale


def chain_tol(dtype: torch.dtype, n_terms: int, scale: float | torch.Tensor = 1.0) -> float | torch.Tensor:
    """Most two kernel paths through a long computation (a network pass) can differ by, relative to `scale`
    (the size of the result: its largest magnitude).

    `n_terms` is the summed length of the reductions chained along the way (`network_terms`). To first order
    the rounding errors of a chain add up, each carried forward unamplified (normalised and residual layers).
    Their worst case grows like n u and is useless here (n = 1e4: 1e-3, as large as the effects the tests
    look for), so this takes the probabilistic bound of Higham & Mary, "A New Approach to Probabilistic
    Rounding Error Analysis", SIAM J. Sci. Comput. 41 (2019), Thm. 2.4: with rounding errors independent and
    of mean zero, the error is <= LAMBDA sqrt(n) u * scale except with negligible probability; two paths:
    twice that.
    """
    return 2 * LAMBDA * math.sqrt(n_terms) * unit_roundoff(dtype) * scale


def network_terms(*modules: torch.nn.Module, backward: bool = False) -> int:
    """Summed reduction length of one forward pass through `modules`: the fan-in of every linear and
    convolution layer (each of their outputs is a dot product that long). It counts parallel branches as if
    in series (an over-count) and leaves out attention's own two matmuls (head dim and sequence length, no
    longer than the projections around them in these tiny models). `backward`: the backward pass chains the
    same reductions transposed and sums the weight gradients over positions, about twice the forward's
    work, so x3 for forward and backward.
    """
    terms = 0
    for module in modules:
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                terms += m.in_features
            elif isinstance(m, torch.nn.MultiheadAttention):  # its packed q/k/v projection (out_proj is a Linear)
                terms += m.embed_dim
            elif isinstance(m, torch.nn.modules.conv._ConvNd):
                terms += m.in_channels // m.groups * math.prod(m.kernel_size)
    return 3 * terms if backward else terms
