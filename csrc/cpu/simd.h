// SIMD lanes for the CPU kernels: the vector width the build targets, the element type the
// register blocks read for each row type, vector loads (float16 widened in registers where the
// CPU can), and whole rows converted to and from the lane type. Used by the Gramian engine
// (gram_engine.h), the combine and MoCo's passes.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(__F16C__) || defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fusedjd::cpu {

// The vector width the build targets (a vector must fit one register: see block_pairs).
#if defined(__AVX512F__)
inline constexpr int kVecBytes = 64;
#elif defined(__AVX__)
inline constexpr int kVecBytes = 32;
#else
inline constexpr int kVecBytes = 16;  // SSE2, NEON: portable builds
#endif

#if defined(__AVX512BF16__)
// vdpbf16ps: pairs of bfloat16 products summed into float32 lanes, straight from the rows
inline constexpr bool kBf16Dot = true;
#else
inline constexpr bool kBf16Dot = false;
#endif
#if defined(__F16C__) && (defined(__AVX512F__) || defined(__AVX__))
// vcvtph2ps: float16 rows widened in registers as the blocks load them
inline constexpr bool kF16Load = true;
#else
inline constexpr bool kF16Load = false;
#endif

// The element type the register blocks read for rows of type T: float64 and float32 rows as they
// are; bfloat16 rows as they are where the CPU multiplies them in pairs (kBf16Dot); float16 rows
// as they are where the CPU widens them in registers (kF16Load); otherwise the half types
// converted to float32 in a staging tile. Sums are float32 lanes except for float64.
template <typename T>
using elem_t = std::conditional_t<
    std::is_same_v<T, double>, double,
    std::conditional_t<(std::is_same_v<T, c10::BFloat16> && kBf16Dot) || (std::is_same_v<T, c10::Half> && kF16Load),
                       T, float>>;

template <typename E>
struct Simd {
  using A = std::conditional_t<std::is_same_v<E, double>, double, float>;
  // elements per vector: one per lane (float16 widened in registers), two per lane for the
  // bfloat16 pairs
  static constexpr int kElemBytes = std::is_same_v<E, c10::Half> ? static_cast<int>(sizeof(A)) : static_cast<int>(sizeof(E));
  static constexpr int L = kVecBytes / kElemBytes;
  typedef A V __attribute__((vector_size(kVecBytes)));  // the lane sums
  static V load(const E* p) {
    V v;
#if defined(__F16C__)
    if constexpr (std::is_same_v<E, c10::Half> && kVecBytes == 64) {
      const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      std::memcpy(&v, &x, sizeof(V));
      return v;
    } else if constexpr (std::is_same_v<E, c10::Half> && kVecBytes == 32) {
      const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      std::memcpy(&v, &x, sizeof(V));
      return v;
    }
#endif
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  // The first `count` (< L) elements at p, zeros after them: the ragged end of a row read in place.
  static V load_partial(const E* p, int64_t count) {
    E buf[L] = {};
    std::memcpy(buf, p, static_cast<size_t>(count) * sizeof(E));
    return load(buf);
  }
};

// dst[c] = src[c] as the lane type, for c < len: vectorized for the half types (bfloat16 is the
// upper half of a float32; float16 through F16C where the build targets it).
template <typename T, typename A>
inline void convert_row(const T* src, A* dst, int64_t len) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    uint32_t* d = reinterpret_cast<uint32_t*>(dst);
    for (int64_t c = 0; c < len; ++c) d[c] = static_cast<uint32_t>(s[c]) << 16;
    return;
  }
#if defined(__F16C__)
  if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<A, float>) {
    int64_t c = 0;
#if defined(__AVX512F__)
    for (; c + 16 <= len; c += 16)
      _mm512_storeu_ps(dst + c, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + c))));
#endif
    for (; c + 8 <= len; c += 8)
      _mm256_storeu_ps(dst + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c))));
    for (; c < len; ++c) dst[c] = static_cast<A>(src[c]);
    return;
  }
#endif
  for (int64_t c = 0; c < len; ++c) dst[c] = static_cast<A>(src[c]);
}

// dst[c] = src[c] rounded to T (round to nearest even), for c < len: vectorized for float16
// through F16C; bfloat16 by c10's rounding, which the compiler vectorizes.
template <typename T, typename A>
inline void store_row(const A* src, T* dst, int64_t len) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    // c10's rounding (nearest even, NaN to 0x7fc0) on whole vectors
    typedef uint32_t U __attribute__((vector_size(kVecBytes)));
    typedef int32_t I __attribute__((vector_size(kVecBytes)));
    typedef float F __attribute__((vector_size(kVecBytes)));
    typedef uint16_t H __attribute__((vector_size(kVecBytes / 2)));
    constexpr int L = kVecBytes / 4;
    int64_t c = 0;
    for (; c + L <= len; c += L) {
      F f;
      U u;
      std::memcpy(&f, src + c, sizeof(F));
      std::memcpy(&u, src + c, sizeof(U));
      const U nan = reinterpret_cast<U>(I(f != f));
      const U r = ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16 & ~nan) | (0x7fc0u & nan);
      const H h = __builtin_convertvector(r, H);
      std::memcpy(dst + c, &h, sizeof(H));
    }
    for (; c < len; ++c) dst[c] = static_cast<T>(src[c]);
    return;
  }
#if defined(__F16C__)
  if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<A, float>) {
    int64_t c = 0;
    for (; c + 8 <= len; c += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), _mm256_cvtps_ph(_mm256_loadu_ps(src + c), _MM_FROUND_TO_NEAREST_INT));
    for (; c < len; ++c) dst[c] = static_cast<T>(src[c]);
    return;
  }
#endif
  for (int64_t c = 0; c < len; ++c) dst[c] = static_cast<T>(src[c]);
}

// One vector of float32 (float64 for float64 rows) lanes loaded from rows of type T: converted
// in registers for float16 (F16C) and bfloat16 (the upper half of a float32).
template <typename T>
struct RowVec {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  using S = Simd<A>;
  using V = typename S::V;
  static constexpr int L = S::L;
  static V load(const T* p) {
    if constexpr (std::is_same_v<T, A>) {
      return S::load(p);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      typedef uint16_t H __attribute__((vector_size(kVecBytes / 2)));
      typedef uint32_t U __attribute__((vector_size(kVecBytes)));
      H h;
      std::memcpy(&h, p, sizeof(H));
      const U u = __builtin_convertvector(h, U) << 16;
      V v;
      std::memcpy(&v, &u, sizeof(V));
      return v;
    } else if constexpr (std::is_same_v<T, c10::Half> && kF16Load) {
      return Simd<c10::Half>::load(p);  // widened in registers, as the Gramian's blocks do
    } else {
      V v;
      for (int l = 0; l < L; ++l) v[l] = static_cast<A>(p[l]);
      return v;
    }
  }
};

}  // namespace fusedjd::cpu
