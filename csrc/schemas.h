// The fusedjd operator schemas, shared by the extension (csrc/fusedjd.cpp) and the test-only
// SIMT emulation build of the CUDA sources (tests/simt), which registers the same ops under its
// own namespace.
#pragma once

#include <torch/library.h>

namespace fusedjd {

inline void define_ops(torch::Library& m) {
  // J is a list of matrices [m, n_b] (one dtype, device and m): the ops read it as the matrix
  // [J[0] J[1] ...] of n = sum n_b columns without forming it (a plain matrix is a list of one).
  //
  // Per-column-group Gramians of J: returns [k, m, m], G[g] = J_g J_g^T where J_g are the
  // consecutive column groups of the given sizes (a group may span several matrices). Float32
  // output for float16/bfloat16/float32 inputs, float64 for float64.
  m.def("gramian(Tensor[] J, SymInt[] group_sizes) -> Tensor");

  // The GradVac loop on k Gramians G [k, m, m] with visit orders perms
  // [k, m, m-1] (row i of group g visits perms[g, i, :]); updates the EMA
  // targets [k, m, m] in place and returns the weights [k, m] (column sums of
  // the coefficient matrix). A non-finite G, or a visit order that names row i
  // itself or a row outside [0, m), leaves the targets untouched and returns NaN
  // weights, on every backend (CUDA cannot raise without a host sync). Any m.
  m.def("gradvac_loop(Tensor G, Tensor perms, Tensor(a!) targets, float beta, float eps) -> Tensor");

  // The PCGrad loop (target fixed at 0, no state) on the same inputs, with the
  // same refusal of non-finite G and invalid visit orders.
  m.def("pcgrad_loop(Tensor G, Tensor perms) -> Tensor");

  // Visit orders [k, m, m-1] (int64) drawn from the default CPU generator exactly as torchjd
  // draws them with torch.randperm: GradVac takes randperm(m-1) per row mapped onto the other
  // rows, PCGrad randperm(m) per row with the row itself skipped. Returned on `device` (CPU when
  // None); a CUDA copy goes through pinned memory without a host sync.
  m.def("draw_perms(int k, int m, bool pcgrad, Device? device=None) -> Tensor", {at::Tag::nondeterministic_seeded});

  // Per-group combination of the rows of J with weights [k, m]: out [n], out[cols of g] =
  // weights[g] @ J_g. Output dtype is J's.
  m.def("combine(Tensor[] J, Tensor weights, SymInt[] group_sizes) -> Tensor");

  // One MoCo step on J and the tracking matrix Y [m, n] (contiguous): step += 1;
  // Y <- Y - b (Y - J); lam <- S(lam - c (Y Y^T + rho I) lam); returns (weights, lam^T Y). A
  // non-finite J (or Gramian term) leaves Y, lam and step untouched and returns NaN for both
  // outputs. `step` is a 0-dim int64 tensor so that no host sync is ever needed.
  // `gram`: Y Y^T of the updated Y when the caller has it (sharded MoCo: the sum over the ranks of
  // moco_gramian); without it the step computes it in its first pass, reading Y and J once. A
  // given `gram` is trusted: J's finiteness then shows only through it (sharded MoCo's `gram`
  // comes from the same J), so a non-finite J with a finite `gram` is written into Y.
  m.def(
      "moco_step(Tensor[] J, Tensor(a!) Y, Tensor(b!) lam, Tensor(c!) step, float beta, "
      "float beta_sigma, float gamma, float gamma_sigma, float rho, bool projection, Tensor? gram=None) "
      "-> (Tensor, Tensor)");

  // The whole GradVac (pcgrad = false; `targets` required) or PCGrad (pcgrad = true; no targets)
  // aggregation in one call: draw_perms, gramian, the loop and combine, as the separate ops do
  // them; returns (the combination [n], the weights [k, m]). The aggregators' single-process path.
  // `perms`: visit orders [k, m, m-1] drawn by the caller (the classes' draws="device"), used
  // instead of draw_perms.
  m.def("aggregate(Tensor[] J, SymInt[] group_sizes, Tensor(a!)? targets, float beta, float eps, bool pcgrad, "
        "Tensor? perms=None) -> (Tensor, Tensor)",
        {at::Tag::nondeterministic_seeded});

  // The dual-cone projection of UPGrad and DualProj (torchjd.linalg.DualConeProjector's problem):
  // for each u in U [..., m], the v >= u minimising v^T G v, G [m, m] symmetric positive definite
  // (csrc/dual_cone.h: an exact active-set method in float64, one right-hand side per CPU task or
  // CUDA thread). Returns V with U's shape in G's dtype; a non-finite G or u gives NaN.
  m.def("dual_cone(Tensor U, Tensor G) -> Tensor");
  // The same solves, returning for each right-hand side (int64 [k], U as k rows of m) how it was
  // solved: 0 by block principal pivoting (or not at all: a non-finite G or u), else 1 + the
  // active-set method's steps (csrc/dual_cone.h, dual_cone_solve). For the tests: a factorisation
  // that loses accuracy shows as fallbacks, which the answers alone would hide (the fallback is
  // exact too). Private, eager only (no fake kernel).
  m.def("_dual_cone_paths(Tensor U, Tensor G) -> Tensor");

  // MGDA's weighting (torchjd.aggregation.MGDAWeighting): torchjd's Frank-Wolfe iteration on the
  // Gramian G [m, m] (csrc/mgda.h), in float64, the loop and its stopping test on the device.
  // Returns the weights [m] in G's dtype; a non-finite G gives NaN.
  m.def("mgda(Tensor G, float epsilon, int max_iters) -> Tensor");

  // MoCo's first pass alone: the Gramian [m, m] (float32; float64 for float64) of the Y the next
  // moco_step would store, Y + b (J - Y) with b from the step counter, rounded to Y's dtype as the
  // step stores it (on CUDA beyond 128 rows, 64 for float64: of the unrounded update, from the
  // Gramian of [Y; J]); Y and step are not written.
  m.def("moco_gramian(Tensor[] J, Tensor Y, Tensor step, float beta, float beta_sigma) -> Tensor");
}

}  // namespace fusedjd
