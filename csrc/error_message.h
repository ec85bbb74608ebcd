// Argument-check messages built without C++ streams.
//
// TORCH_CHECK formats its message arguments with a std::ostringstream instantiated in the calling library. When
// the extension carries its own copy of libstdc++ (a compiler wrapper that links it statically, as the GPU
// image's /opt/gcc/bin/g++ appears to), that copy's stream locale is not set up for number formatting: in a
// `-static-libstdc++` build here `ss << int64_t(5)` writes nothing, and on the GPU image every argument error
// whose message held a number crashed its process (SIGSEGV), while those with only strings and dtype names
// worked (bench/results/h200-recheck-2026-11-30/summary.md). So the checks below build their message as one
// std::string by concatenation: integers through std::to_string, doubles through snprintf, shapes and devices
// by hand or through libc10's own std::string functions. TORCH_CHECK is then handed that single string, which
// c10::str passes through without a stream.
#pragma once

#include <ATen/ATen.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace beit_fast {
namespace msg {

inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(char c) { return std::string(1, c); }
inline std::string piece(bool b) { return b ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral<T>::value, int> = 0>
std::string piece(T v) { return std::to_string(v); }
inline std::string piece(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);   // what a default std::ostream prints
  return buf;
}
inline std::string piece(float v) { return piece(static_cast<double>(v)); }
inline std::string piece(at::ScalarType t) { return c10::toString(t); }
inline std::string piece(const c10::Device& d) { return d.str(); }   // built in libc10, no stream
inline std::string piece(at::IntArrayRef s) {                      // "[2, 197, 768]", as torch prints sizes
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(s[i]);
  }
  return out + "]";
}

template <typename... Args>
std::string cat(const Args&... args) {
  std::string out;
  ((out += piece(args)), ...);
  return out;
}

}  // namespace msg
}  // namespace beit_fast

// TORCH_CHECK_VALUE / TORCH_CHECK with a stream-free message (arguments evaluated only when cond fails).
#define BEIT_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::beit_fast::msg::cat(__VA_ARGS__))
#define BEIT_CHECK(cond, ...) TORCH_CHECK(cond, ::beit_fast::msg::cat(__VA_ARGS__))
