// Host emulation of CUDA's 16-bit float types (cuda_bf16.h / cuda_fp16.h subset).
//
// `__nv_bfloat16` and `__half` are trivially copyable 2-byte structs holding the raw bits,
// with the same size and alignment as on the device; conversions from float round to nearest
// even (NaN stays NaN, overflow goes to infinity), conversions to float are exact.
#ifndef BC_EMU_BF16_H
#define BC_EMU_BF16_H

#include <cstdint>
#include <cstring>

struct alignas(2) __nv_bfloat16 {
    unsigned short __x;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
struct alignas(2) __half {
    unsigned short __x;
};
struct alignas(4) __half2 {
    __half x, y;
};
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

namespace bc_emu_detail {
inline uint32_t f2u(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float u2f(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
}  // namespace bc_emu_detail

inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u = bc_emu_detail::f2u(f);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it quiet and NaN
        r.__x = (unsigned short)((u >> 16) | 0x40u);
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    r.__x = (unsigned short)(u >> 16);
    return r;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return bc_emu_detail::u2f((uint32_t)b.__x << 16); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16(a), __float2bfloat16(b)};
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return __nv_bfloat16{x}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline float __low2float(__nv_bfloat162 p) { return __bfloat162float(p.x); }
inline float __high2float(__nv_bfloat162 p) { return __bfloat162float(p.y); }

inline __half __float2half(float f) {
    // IEEE binary16, round to nearest even, with subnormals.
    uint32_t u = bc_emu_detail::f2u(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    __half r;
    if (a > 0x7f800000u) {
        r.__x = (unsigned short)(sign | 0x7e00u);
        return r;
    }
    if (a >= 0x477ff000u) {  // rounds to >= 65520: infinity
        r.__x = (unsigned short)(sign | 0x7c00u);
        return r;
    }
    if (a < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
        // value = a_float; half subnormal unit = 2^-24
        float af = bc_emu_detail::u2f(a);
        float scaled = af * 16777216.0f;  // exact (power of two)
        // round to nearest even integer
        float fl = (float)(int64_t)scaled;
        float diff = scaled - fl;
        int64_t q = (int64_t)fl;
        if (diff > 0.5f || (diff == 0.5f && (q & 1))) q++;
        r.__x = (unsigned short)(sign | (uint32_t)q);
        return r;
    }
    uint32_t e = (a >> 23) - 127 + 15;
    uint32_t m = a & 0x7fffffu;
    uint32_t h = (e << 10) | (m >> 13);
    uint32_t rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    r.__x = (unsigned short)(sign | h);
    return r;
}
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half hv) {
    uint32_t h = hv.__x;
    uint32_t sign = (h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    if (e == 0) {
        float v = (float)m / 16777216.0f;
        return sign ? -v : v;
    }
    if (e == 31) return bc_emu_detail::u2f(sign | 0x7f800000u | (m << 13));
    return bc_emu_detail::u2f(sign | ((e - 15 + 127) << 23) | (m << 13));
}

#endif
