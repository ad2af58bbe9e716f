// float_formats.h: bit-exact conversions between float/double and the 16-bit formats
// (IEEE binary16 for __half, bfloat16 for __nv_bfloat16), shared by the emulator's
// cuda_fp16.h and cuda_bf16.h.
//
// Narrowing rounds once, to nearest with ties to even, from the exact double value
// (a float widens to double exactly), handling subnormals, overflow to infinity and
// NaN (quietened, sign kept). Arithmetic on the 16-bit types is done in float and
// rounded once: float carries more than 2p+2 bits for both formats, so +, -, *, / and
// sqrt give the correctly rounded result, as the GPU does.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

namespace rnnemu {

template <int ExponentBits, int MantissaBits>
inline unsigned short narrow_from_double(double value) {
    constexpr int bias = (1 << (ExponentBits - 1)) - 1;
    constexpr int min_exponent = 1 - bias;
    constexpr unsigned infinity_field = (1u << ExponentBits) - 1u;
    uint64_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    const unsigned sign = unsigned(bits >> 63) << (ExponentBits + MantissaBits);
    const int field = int((bits >> 52) & 0x7ff);
    const uint64_t mantissa = bits & ((uint64_t(1) << 52) - 1);
    if (field == 0x7ff) {  // infinity or NaN
        unsigned out = sign | (infinity_field << MantissaBits);
        if (mantissa) out |= (1u << (MantissaBits - 1)) | unsigned(mantissa >> (52 - MantissaBits));
        return static_cast<unsigned short>(out);
    }
    if (field == 0) return static_cast<unsigned short>(sign);  // zero or a double subnormal
    const int exponent = field - 1023;
    if (exponent > bias) return static_cast<unsigned short>(sign | (infinity_field << MantissaBits));
    uint64_t significand;
    int shift;
    unsigned out;
    if (exponent >= min_exponent) {
        shift = 52 - MantissaBits;
        significand = mantissa;
        out = unsigned(exponent + bias) << MantissaBits;
    } else {
        shift = 52 - MantissaBits + (min_exponent - exponent);
        if (shift > 53) return static_cast<unsigned short>(sign);  // below half the smallest
        significand = mantissa | (uint64_t(1) << 52);
        out = 0;
    }
    uint64_t kept = significand >> shift;
    const uint64_t rest = significand & ((uint64_t(1) << shift) - 1);
    const uint64_t half = uint64_t(1) << (shift - 1);
    if (rest > half || (rest == half && (kept & 1))) kept += 1;
    // A carry out of the mantissa moves into the exponent field, up to infinity.
    return static_cast<unsigned short>(sign | (out + unsigned(kept)));
}

// float -> double, exactly, denormals included even while a launch flushes them
// (runtime.cpp sets MXCSR's DAZ bit, under which double(f) would read a float denormal
// as 0). The GPU's conversion instructions (cvt.rn.bf16.f32, in cuda_bf16.h's inline
// PTX) are not flushed by -ftz=true, so a float denormal keeps its bfloat16 value.
inline double widen_float(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    const uint32_t mantissa = bits & 0x7fffffu;
    if ((bits & 0x7f800000u) != 0 || mantissa == 0) return double(f);  // not a denormal
    const double magnitude = std::ldexp(double(mantissa), -149);  // exact, a normal double
    return (bits >> 31) ? -magnitude : magnitude;
}

inline unsigned short float_to_half_bits(float f) { return narrow_from_double<5, 10>(widen_float(f)); }
inline unsigned short double_to_half_bits(double d) { return narrow_from_double<5, 10>(d); }
inline unsigned short float_to_bfloat16_bits(float f) { return narrow_from_double<8, 7>(widen_float(f)); }
inline unsigned short double_to_bfloat16_bits(double d) { return narrow_from_double<8, 7>(d); }

// Round toward zero (the _rz conversions): drop the extra bits; finite never becomes inf.
template <int ExponentBits, int MantissaBits>
inline unsigned short narrow_toward_zero(float value) {
    const unsigned short nearest = narrow_from_double<ExponentBits, MantissaBits>(widen_float(value));
    constexpr unsigned magnitude_mask = (1u << (ExponentBits + MantissaBits)) - 1u;
    constexpr unsigned infinity = ((1u << ExponentBits) - 1u) << MantissaBits;
    const unsigned magnitude = nearest & magnitude_mask;
    if (magnitude > infinity) return nearest;  // NaN
    // Widen back; if rounding went away from zero, step one unit toward zero. The
    // magnitudes are compared as bit patterns (same order as the values for floats >= 0),
    // which, unlike a float comparison, sees denormals while a launch flushes them.
    uint32_t value_bits;
    std::memcpy(&value_bits, &value, sizeof value_bits);
    const uint32_t abs_bits = value_bits & 0x7fffffffu;
    float back;
    if constexpr (ExponentBits == 5) {
        const unsigned e = magnitude >> 10, m = magnitude & 0x3ff;
        back = e == 0 ? std::ldexp(float(m), -24)
                      : (e == 31 ? __builtin_inff() : std::ldexp(float(m | 0x400), int(e) - 25));
    } else {
        uint32_t bits = uint32_t(magnitude) << 16;
        std::memcpy(&back, &bits, sizeof back);
    }
    uint32_t back_bits;
    std::memcpy(&back_bits, &back, sizeof back_bits);
    if (back_bits > abs_bits && magnitude > 0) return static_cast<unsigned short>(nearest - 1);
    return nearest;
}

inline float half_bits_to_float(unsigned short h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0) {
        float magnitude = float(mantissa) * (1.0f / 16777216.0f);  // m * 2^-24, exact
        std::memcpy(&bits, &magnitude, sizeof bits);
        bits |= sign;
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

inline float bfloat16_bits_to_float(unsigned short b) {
    const uint32_t bits = uint32_t(b) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

}  // namespace rnnemu
