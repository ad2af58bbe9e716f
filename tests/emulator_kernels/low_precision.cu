// low_precision.cu: __half and __nv_bfloat16 conversions and arithmetic, for
// tests/test_emulator.py (compared bit for bit with NumPy's float16 and a bfloat16
// rounding written in NumPy).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Round-trips x through each format: the 16-bit patterns and the values read back.
__global__ void convert(const float* x,                 // [n]
                        unsigned short* half_bits,      // [n]
                        float* half_back,               // [n]
                        unsigned short* bfloat16_bits,  // [n]
                        float* bfloat16_back,           // [n]
                        int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const __half h = __float2half(x[i]);
    half_bits[i] = __half_as_ushort(h);
    half_back[i] = __half2float(h);
    const __nv_bfloat16 b = __float2bfloat16(x[i]);
    bfloat16_bits[i] = __bfloat16_as_ushort(b);
    bfloat16_back[i] = __bfloat162float(b);
}

// a + b and a * b in each format (a, b given as 16-bit patterns), and a shuffle of
// __half values (2-byte shuffles) to the neighbouring lane.
__global__ void arithmetic(const unsigned short* a_half, const unsigned short* b_half,
                           unsigned short* sum_half, unsigned short* product_half,
                           unsigned short* rotated_half,
                           const unsigned short* a_bf16, const unsigned short* b_bf16,
                           unsigned short* sum_bf16, unsigned short* product_bf16, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = i < n;
    const __half a = __ushort_as_half(active ? a_half[i] : 0);
    const __half b = __ushort_as_half(active ? b_half[i] : 0);
    const __half rotated = __shfl_sync(0xffffffffu, a, (threadIdx.x + 1) & 31);
    if (!active) return;
    sum_half[i] = __half_as_ushort(__hadd(a, b));
    product_half[i] = __half_as_ushort(a * b);
    rotated_half[i] = __half_as_ushort(rotated);
    const __nv_bfloat16 c = __ushort_as_bfloat16(a_bf16[i]);
    const __nv_bfloat16 d = __ushort_as_bfloat16(b_bf16[i]);
    sum_bf16[i] = __bfloat16_as_ushort(c + d);
    product_bf16[i] = __bfloat16_as_ushort(__hmul(c, d));
}
