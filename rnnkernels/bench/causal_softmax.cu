// Causal softmax over the rows of an attention score matrix: the one custom kernel of
// the benchmark's CuPy attention baseline (rnnkernels/bench/attention.py). The products
// around it (Q·K^T, P·V, the projections) are cuBLAS GEMMs through cupy.matmul.
//
// Layout and meaning
//   scores [rows, keys]  row-major; rows = batch * heads * queries. Row r holds the raw
//                        scores of query q = r % queries against every key.
//   probs  [rows, keys]  out (may alias scores): softmax(scale * scores) over the keys
//                        query q may see, 0 for the others.
//   Query q sees keys j <= q + (keys - queries): a square matrix (self-attention over
//   a whole sequence) keeps its lower triangle; one decode query against a KV cache of
//   `keys` entries sees all of them.
//
// One block of kThreads threads per row; each thread strides along the row. Storage is
// float32 or float16 (passed as raw 16-bit words and converted with PTX `cvt`, so the
// source needs no CUDA headers); arithmetic is float32 throughout.

constexpr int kThreads = 256;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block must be whole warps");

// -inf without <math.h> (NVRTC compiles this file without headers).
__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000u); }

__device__ __forceinline__ float load_value(const float* p) { return *p; }
__device__ __forceinline__ float load_value(const unsigned short* p) {
    float value;
    asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(*p));
    return value;
}
__device__ __forceinline__ void store_value(float* p, float value) { *p = value; }
__device__ __forceinline__ void store_value(unsigned short* p, float value) {
    unsigned short bits;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));
    *p = bits;
}

// Reduce `value` over the block; every thread gets the result. `shared` holds one
// float per warp. Max when `take_max`, else sum.
template <bool take_max>
__device__ float block_reduce(float value, float* shared) {
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    for (int offset = 16; offset > 0; offset /= 2) {
        const float other = __shfl_xor_sync(0xffffffffu, value, offset);
        value = take_max ? fmaxf(value, other) : value + other;
    }
    if (lane == 0) shared[warp] = value;
    __syncthreads();
    const int warps = kThreads / 32;
    value = lane < warps ? shared[lane] : (take_max ? negative_infinity() : 0.0f);
    for (int offset = 16; offset > 0; offset /= 2) {
        const float other = __shfl_xor_sync(0xffffffffu, value, offset);
        value = take_max ? fmaxf(value, other) : value + other;
    }
    __syncthreads();  // `shared` is reused by the next reduction
    return value;
}

template <typename Storage>
__device__ void causal_softmax(
    const Storage* scores,  // [rows, keys]
    Storage* probs,         // [rows, keys], out
    long long rows,         // batch * heads * queries
    int queries,            // queries per (batch, head)
    int keys,               // keys per (batch, head), keys >= queries
    float scale)            // multiplies the raw scores, 1/sqrt(head_dim)
{
    __shared__ float shared[kThreads / 32];
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const int query = static_cast<int>(row % queries);
        const int visible = min(keys, query + (keys - queries) + 1);
        const Storage* in = scores + row * keys;
        Storage* out = probs + row * keys;

        float row_max = negative_infinity();
        for (int j = threadIdx.x; j < visible; j += kThreads)
            row_max = fmaxf(row_max, scale * load_value(in + j));
        row_max = block_reduce<true>(row_max, shared);

        float row_sum = 0.0f;
        for (int j = threadIdx.x; j < visible; j += kThreads)
            row_sum += __expf(scale * load_value(in + j) - row_max);
        row_sum = block_reduce<false>(row_sum, shared);

        const float inverse = 1.0f / row_sum;
        for (int j = threadIdx.x; j < keys; j += kThreads) {
            const float p = j < visible ? __expf(scale * load_value(in + j) - row_max) * inverse : 0.0f;
            store_value(out + j, p);
        }
    }
}

extern "C" __global__ void __launch_bounds__(kThreads) causal_softmax_float32(
    const float* scores, float* probs, long long rows, int queries, int keys, float scale) {
    causal_softmax(scores, probs, rows, queries, keys, scale);
}

extern "C" __global__ void __launch_bounds__(kThreads) causal_softmax_float16(
    const unsigned short* scores, unsigned short* probs, long long rows, int queries,
    int keys, float scale) {
    causal_softmax(scores, probs, rows, queries, keys, scale);
}

// Notes for the launcher: grid = min(rows, 65535 * 32) blocks of kThreads threads (the
// kernel strides over rows beyond the grid); pass scale as float32, rows as int64,
// queries and keys as int32. probs may be the scores buffer itself: each row is read
// completely (two passes) before the third pass writes it, and only by its own block.
