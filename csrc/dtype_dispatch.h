// Dtype dispatch for ops whose main input may be paired with a lower-precision second input (the AMP
// residual stream: x in fp32, the branch output y in fp16/bf16). Written for C++17 (generic lambdas that
// receive type tags), since the GPU machine's torch builds extensions as C++17.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "error_message.h"

namespace beit_fast {

template <typename T> struct TypeTag { using type = T; };
template <int V> struct IntTag { static constexpr int value = V; };

// Calls f(TypeTag<T>{}) for T in {float, Half, BFloat16} (and double when AllowDouble). A template flag, so that
// the GPU code does not compile double kernels it can never launch.
template <bool AllowDouble, typename F>
void dispatch_float_impl(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(TypeTag<float>{}); return;
    case at::kHalf: f(TypeTag<at::Half>{}); return;
    case at::kBFloat16: f(TypeTag<at::BFloat16>{}); return;
    case at::kDouble:
      if constexpr (AllowDouble) {
        f(TypeTag<double>{});
        return;
      }
      break;
    default: break;
  }
  BEIT_CHECK_VALUE(false, op, ": unsupported dtype ", t, " (supported: float32, float16, bfloat16",
              AllowDouble ? ", float64)" : "; float64 only on the CPU)");
}

// Calls f(TypeTag<Tx>{}, TypeTag<Ty>{}) for Ty == Tx, or Tx == float with Ty in {Half, BFloat16}.
template <bool AllowDouble, typename F>
void dispatch_pair_impl(at::ScalarType tx, at::ScalarType ty, const char* op, F&& f) {
  if (tx == ty) {
    dispatch_float_impl<AllowDouble>(tx, op, [&](auto tag) { f(tag, tag); });
    return;
  }
  BEIT_CHECK_VALUE(tx == at::kFloat && (ty == at::kHalf || ty == at::kBFloat16), op,
              ": y must have x's dtype, or be float16/bfloat16 when x is float32; got x ", tx, ", y ", ty);
  if (ty == at::kHalf) f(TypeTag<float>{}, TypeTag<at::Half>{});
  else f(TypeTag<float>{}, TypeTag<at::BFloat16>{});
}

// Calls f(TypeTag<Ta>{}, TypeTag<Tb>{}) for every pair of float types (an op that reads one and writes another).
template <bool AllowDouble, typename F>
void dispatch_float2_impl(at::ScalarType ta, at::ScalarType tb, const char* op, F&& f) {
  dispatch_float_impl<AllowDouble>(ta, op, [&](auto a) {
    dispatch_float_impl<AllowDouble>(tb, op, [&](auto b) { f(a, b); });
  });
}

// The CPU code (double allowed where allow_double) ...
template <typename F>
void dispatch_float(at::ScalarType t, bool allow_double, const char* op, F&& f) {
  if (allow_double) dispatch_float_impl<true>(t, op, f);
  else dispatch_float_impl<false>(t, op, f);
}

template <typename F>
void dispatch_pair(at::ScalarType tx, at::ScalarType ty, bool allow_double, const char* op, F&& f) {
  if (allow_double) dispatch_pair_impl<true>(tx, ty, op, f);
  else dispatch_pair_impl<false>(tx, ty, op, f);
}

template <typename F>
void dispatch_float2(at::ScalarType ta, at::ScalarType tb, bool allow_double, const char* op, F&& f) {
  if (allow_double) dispatch_float2_impl<true>(ta, tb, op, f);
  else dispatch_float2_impl<false>(ta, tb, op, f);
}

// ... and the GPU kernels' launch code (no double).
template <typename F>
void dispatch_float_no_double(at::ScalarType t, const char* op, F&& f) { dispatch_float_impl<false>(t, op, f); }

template <typename F>
void dispatch_float2_no_double(at::ScalarType ta, at::ScalarType tb, const char* op, F&& f) {
  dispatch_float2_impl<false>(ta, tb, op, f);
}

template <typename F>
void dispatch_pair_no_double(at::ScalarType tx, at::ScalarType ty, const char* op, F&& f) {
  dispatch_pair_impl<false>(tx, ty, op, f);
}

}  // namespace beit_fast
