"""A CPU kernel for the segmented decode product (Punica's SGMV): y_b += sᵢ·Bᵢ·(Aᵢ·x_b) for rows grouped by adapter.

For each adapter of a site, its rows' inputs are read (in the activations' dtype, widened to fp32), then each
row of Aᵢ (r, d_in) and of Bᵢ (r, d_out) is read once from memory and used for all of the adapter's rows while
it is in L1, and each output row gets its own product added in place, rounded once to its dtype; the adapters
are split over torch's threads, and every argument is checked (shapes, dtypes, index ranges). Against the
same product in torch ops (an index_select and cast of the inputs, two batched matmuls through padded groups, a
cast and an index_add_ back; deltatune.serve.fused_lora), it needs no padding and no buffers between the steps,
and reads the factors at close to the memory's bandwidth where MKL's batched product with 1-4 rows per adapter
reads them at half to two thirds of it (measured in bench/bench_serve.py --kernels, docs/serving.md).

It is C++ compiled with torch.utils.cpp_extension (a C++ compiler and ninja; about 20 s once per machine, CPU and
torch version, in the background from the engine's start, then loaded from torch's extension cache in about
half a second). Where that is not possible, `kernel()` returns None and fused_lora keeps the torch-op path;
DELTATUNE_SGMV=0 turns it off. fp32 arithmetic throughout, in the order of a plain loop: the result equals the
torch-op path's to float rounding (1e-5), not bitwise.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import time
from typing import Callable

import torch

logger = logging.getLogger("deltatune.serve")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>

namespace {

constexpr int64_t W = 16;  // accumulator lanes: one AVX-512 register of floats

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[W] = {0};
  int64_t c = 0;
  for (; c + W <= n; c += W)
    for (int64_t l = 0; l < W; ++l) acc[l] += a[c + l] * b[c + l];
  float sum = 0;
  for (int64_t l = 0; l < W; ++l) sum += acc[l];
  for (; c < n; ++c) sum += a[c] * b[c];
  return sum;
}

template <typename T>
void run(const T* x, T* out, const float* A, const float* B, const float* scale, const int64_t* rows,
         const int64_t* starts, const int64_t* ids, int64_t segments, int64_t r, int64_t d_in, int64_t d_out) {
  at::parallel_for(0, segments, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> xs, h, y;
    for (int64_t s = lo; s < hi; ++s) {
      const int64_t begin = starts[s], G = starts[s + 1] - begin, a = ids[s];
      if (G == 0) continue;
      const float* Aa = A + a * r * d_in;
      const float* Ba = B + a * r * d_out;
      xs.resize(G * d_in);
      h.resize(G * r);
      y.assign(G * d_out, 0.f);
      for (int64_t g = 0; g < G; ++g) {
        const T* src = x + rows[begin + g] * d_in;
        for (int64_t c = 0; c < d_in; ++c) xs[g * d_in + c] = static_cast<float>(src[c]);
      }
      for (int64_t j = 0; j < r; ++j)  // A's row j read once, for every row of the adapter
        for (int64_t g = 0; g < G; ++g) h[g * r + j] = dot(Aa + j * d_in, xs.data() + g * d_in, d_in) * scale[a];
      for (int64_t j = 0; j < r; ++j) {  // B's row j read once
        const float* Bj = Ba + j * d_out;
        for (int64_t g = 0; g < G; ++g) {
          const float hj = h[g * r + j];
          float* yg = y.data() + g * d_out;
          for (int64_t c = 0; c < d_out; ++c) yg[c] += hj * Bj[c];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* dst = out + rows[begin + g] * d_out;
        const float* yg = y.data() + g * d_out;
        for (int64_t c = 0; c < d_out; ++c) dst[c] = static_cast<T>(static_cast<float>(dst[c]) + yg[c]);
      }
    }
  });
}

}  // namespace

// out[rows[i]] += scale[a] * B[a]^T (A[a] x[rows[i]]) for the rows i of segment s (starts[s] <= i < starts[s+1]),
// a = ids[s]; x (N, d_in) and out (N, d_out) contiguous in one dtype, A (k, r, d_in), B (k, r, d_out), scale (k,)
// fp32 contiguous; rows, starts, ids int64.
void sgmv(torch::Tensor x, torch::Tensor out, torch::Tensor A, torch::Tensor B, torch::Tensor scale,
          torch::Tensor rows, torch::Tensor starts, torch::Tensor ids) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && A.dim() == 3 && B.dim() == 3, "sgmv: x, out (N, d); A, B (k, r, d)");
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && A.is_contiguous() && B.is_contiguous() &&
              scale.is_contiguous() && rows.is_contiguous() && starts.is_contiguous() && ids.is_contiguous(),
              "sgmv: every tensor contiguous");
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && A.scalar_type() == at::kFloat &&
              B.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat, "sgmv: x, out one dtype; A, B, scale fp32");
  TORCH_CHECK(rows.scalar_type() == at::kLong && starts.scalar_type() == at::kLong && ids.scalar_type() == at::kLong,
              "sgmv: rows, starts, ids int64");
  const int64_t r = A.size(1), d_in = A.size(2), d_out = B.size(2), segments = ids.size(0);
  TORCH_CHECK(x.size(1) == d_in && out.size(1) == d_out && out.size(0) == x.size(0) && B.size(0) == A.size(0) &&
              B.size(1) == r && scale.size(0) == A.size(0) && starts.size(0) == segments + 1, "sgmv: shapes disagree");
  const int64_t *st = starts.data_ptr<int64_t>(), *id = ids.data_ptr<int64_t>(), *rw = rows.data_ptr<int64_t>();
  TORCH_CHECK(st[0] == 0 && st[segments] == rows.size(0), "sgmv: starts must run from 0 to len(rows)");
  for (int64_t s = 0; s < segments; ++s) {
    TORCH_CHECK(st[s] <= st[s + 1], "sgmv: starts must not decrease");
    TORCH_CHECK(id[s] >= 0 && id[s] < A.size(0), "sgmv: adapter id out of range");
  }
  for (int64_t i = 0; i < rows.size(0); ++i)
    TORCH_CHECK(rw[i] >= 0 && rw[i] < x.size(0), "sgmv: row out of range");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sgmv", [&] {
    run<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), A.data_ptr<float>(), B.data_ptr<float>(),
                  scale.data_ptr<float>(), rows.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                  ids.data_ptr<int64_t>(), segments, r, d_in, d_out);
  });
}
"""

_lock = threading.Lock()
_built: dict[str, Callable | None] = {}
_building: list[threading.Thread] = []
STALE_LOCK_S = 600  # a build takes ~20 s: a lock file this old was left by a process killed while building


def _cpu_tag() -> str:
    """A cache entry per CPU model and flags (the code is -march=native; a shared home directory), torch and
    Python version (the module is built against both)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = "".join(line for line in f if line.startswith(("model name", "flags")))
    except OSError:
        info = platform.processor()
    return hashlib.sha1((info + torch.__version__ + sys.version).encode()).hexdigest()[:10]


def prepare() -> None:
    """Start building the kernel in the background (the engine does at start, so that the first segmented decode
    step finds it built, or waits only for the rest of the build); `kernel()` then returns it."""
    with _lock:
        if os.environ.get("DELTATUNE_SGMV", "1") == "0" or "sgmv" in _built or _building:
            return
        _building.append(threading.Thread(target=kernel, name="deltatune-sgmv-build", daemon=True))
    _building[0].start()


def kernel() -> Callable | None:
    """The compiled `sgmv(x, out, A, B, scale, rows, starts, ids)`, or None where it cannot be built (no compiler,
    not x86-64/aarch64 Linux, DELTATUNE_SGMV=0): the caller keeps the torch-op path."""
    if os.environ.get("DELTATUNE_SGMV", "1") == "0":
        return None
    with _lock:
        if "sgmv" not in _built:
            _built["sgmv"] = _build()
        return _built["sgmv"]


def _build() -> Callable | None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return None
    try:
        from torch.utils.cpp_extension import get_default_build_root, load_inline

        name = f"deltatune_sgmv_{_cpu_tag()}"
        directory = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root(), name)
        os.makedirs(directory, exist_ok=True)
        lock = os.path.join(directory, "lock")  # torch's build lock: a stale one would make every start wait
        if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
            logger.warning("deltatune serve: removing %s, left by a build that did not finish", lock)
            os.remove(lock)
        module = load_inline(name=name, cpp_sources=_SOURCE, functions=["sgmv"], build_directory=directory,
                             # OpenMP for at::parallel_for (without it the header runs serially); the library
                             # it needs is the libgomp.so.1 torch has already loaded, so there is one thread pool
                             extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
                             extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, a failed build: the torch-op path serves
        logger.warning("deltatune serve: the SGMV decode kernel could not be built (%s: %s); serving with the "
                       "torch-op segmented product instead", type(error).__name__, str(error).splitlines()[0][:200])
        return None
    return module.sgmv
