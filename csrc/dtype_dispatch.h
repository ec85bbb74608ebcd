// Dtype dispatch for ops whose main input may be paired with a lower-precision second input (the AMP
// residual stream: x in fp32, the branch output y in fp16/bf16). Written for C++17 (generic lambdas that
// receive type tags), since the GPU machine's torch builds extensions as C++17.
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace beit_fast {

template <typename T> struct TypeTag { using type = T; };
template <int V> struct IntTag { static constexpr int value = V; };

// Calls f(TypeTag<T>{}) for T in {float, Half, BFloat16} (and double when allow_double).
template <typename F>
void dispatch_float(at::ScalarType t, bool allow_double, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(TypeTag<float>{}); return;
    case at::kHalf: f(TypeTag<at::Half>{}); return;
    case at::kBFloat16: f(TypeTag<at::BFloat16>{}); return;
    case at::kDouble:
      if (allow_double) { f(TypeTag<double>{}); return; }
      break;
    default: break;
  }
  TORCH_CHECK_VALUE(false, op, ": unsupported dtype ", t, " (supported: float32, float16, bfloat16",
              allow_double ? ", float64)" : "; float64 only on the CPU)");
}

// Calls f(TypeTag<Tx>{}, TypeTag<Ty>{}) for Ty == Tx, or Tx == float with Ty in {Half, BFloat16}.
template <typename F>
void dispatch_pair(at::ScalarType tx, at::ScalarType ty, bool allow_double, const char* op, F&& f) {
  if (tx == ty) {
    dispatch_float(tx, allow_double, op, [&](auto tag) { f(tag, tag); });
    return;
  }
  TORCH_CHECK_VALUE(tx == at::kFloat && (ty == at::kHalf || ty == at::kBFloat16), op,
              ": y must have x's dtype, or be float16/bfloat16 when x is float32; got x ", tx, ", y ", ty);
  if (ty == at::kHalf) f(TypeTag<float>{}, TypeTag<at::Half>{});
  else f(TypeTag<float>{}, TypeTag<at::BFloat16>{});
}

}  // namespace beit_fast
