// The Gramian of a row stack by ATen matrix products, for the shapes the CUDA streaming kernel does
// not take (more rows than its tiles cover). ATen only. (The CPU engine, csrc/cpu/gram_engine.h,
// takes any number of rows.)
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "../common.h"

namespace fusedjd {

// Gramian [r, r] (dtype `acc`) of the rows of A [ra, n], stacked over those of B [rb, n] when B is
// defined (r = ra + rb): the blocks A Aᵀ, A Bᵀ, B Bᵀ.
// - float32/float64 rows (A's dtype is `acc`) go straight to the products: no temporary beyond
//   the r x r result;
// - other dtypes are converted `cols` columns at a time (at most 2^22 elements per block), so no
//   r x n temporary exists;
// - when the user allowed float32 products to lose precision (TF32 or bfloat16 inside cuBLAS:
//   torch.set_float32_matmul_precision("high"/"medium"), torch.backends.cuda.matmul.allow_tf32),
//   float32 and narrower rows are converted to float64 column blocks instead, so the result keeps
//   the contract's float32 accuracy whatever that global setting says (no global state changes).
// The result is mirrored from its upper triangle: exactly symmetric, as every other path.
inline bool reduced_fp32_matmul() {
  return at::globalContext().allowTF32CuBLAS() ||
         at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
}

inline at::Tensor blas_gram(const at::Tensor& A, const at::Tensor& B, at::ScalarType acc) {
  const int64_t ra = A.size(0), rb = B.defined() ? B.size(0) : 0, r = ra + rb, n = A.size(1);
  // the dtype of the products: float64 input, or float32 input while float32 products are exact
  const at::ScalarType work = (acc == at::kFloat && reduced_fp32_matmul()) ? at::kDouble : acc;
  at::Tensor out = at::zeros({r, r}, A.options().dtype(work));
  if (r == 0 || n == 0) return out.to(acc);
  if (A.scalar_type() == work) {
    out.narrow(0, 0, ra).narrow(1, 0, ra).copy_(at::mm(A, A.t()));
    if (rb > 0) {
      out.narrow(0, 0, ra).narrow(1, ra, rb).copy_(at::mm(A, B.t()));
      out.narrow(0, ra, rb).narrow(1, ra, rb).copy_(at::mm(B, B.t()));
    }
  } else {
    const int64_t cols = std::max<int64_t>(1, (int64_t{1} << 22) / r);
    for (int64_t c = 0; c < n; c += cols) {
      const int64_t w = std::min(cols, n - c);
      at::Tensor S = rb > 0 ? at::cat({A.narrow(1, c, w), B.narrow(1, c, w)}).to(work) : A.narrow(1, c, w).to(work);
      out.addmm_(S, S.t());
    }
  }
  return (at::triu(out) + at::triu(out, 1).t()).to(acc);
}

}  // namespace fusedjd
