// Embedding lookup and its deterministic backward (as ops::embedding). The table and the output
// have the storage type T; the gradient table is always f32.
#include "common.cuh"

// out[t, :] = table[ids[t], :], copied as stored: 16 bytes at a time where the rows are aligned.
// grid (tokens, any).
template <typename T>
__device__ __forceinline__ void embedding_fwd_impl(T* __restrict__ out, const T* __restrict__ table, const unsigned int* __restrict__ ids, int dim) {
    const unsigned long long t = blockIdx.x;
    const unsigned long long row = ids[t];
    constexpr int N = lcpt::Pack<T>::N;
    if (dim % N == 0 && lcpt::aligned16(out) && lcpt::aligned16(table)) {
        const uint4* src = reinterpret_cast<const uint4*>(table + row * dim);
        uint4* dst = reinterpret_cast<uint4*>(out + t * dim);
        for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < dim / N; c += gridDim.y * blockDim.x) {
            lcpt::check_vector_access(src + c, 16);
            dst[c] = src[c];
        }
    } else {
        for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < dim; c += gridDim.y * blockDim.x) out[t * dim + c] = table[row * dim + c];
    }
}

// dtable[id, :] += Σ dout[t, :] over the tokens t with ids[t] == id, in token order: the host groups
// token indices by id (a stable sort) into segments, `order[seg_start[s] .. seg_start[s+1]]` for the
// id `seg_ids[s]`. One block column per segment: no atomics, the same additions in the same order as
// the CPU reference, so the result is bit-identical to it. grid (segments, any); a thread takes a
// pack of N columns where the rows are aligned, one column otherwise.
template <typename T>
__device__ __forceinline__ void embedding_bwd_impl(float* __restrict__ dtable, const T* __restrict__ dout, const unsigned int* __restrict__ order,
                                                   const unsigned int* __restrict__ seg_start, const unsigned int* __restrict__ seg_ids, int dim) {
    const int s = blockIdx.x;
    const unsigned long long row = seg_ids[s];
    const unsigned int b = seg_start[s], e = seg_start[s + 1];
    constexpr int N = lcpt::Pack<T>::N;
    if (dim % N == 0 && lcpt::aligned16(dtable) && lcpt::aligned16(dout)) {
        float* dst = dtable + row * dim;
        for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < dim / N; c += gridDim.y * blockDim.x) {
            float acc[N];
            lcpt::load_f32s(acc, dst, c);
            for (unsigned int j = b; j < e; ++j) {
                const lcpt::Pack<T> g = lcpt::load_pack(dout + (unsigned long long)order[j] * dim, c);
#pragma unroll
                for (int k = 0; k < N; ++k) acc[k] += g.v[k];
            }
            lcpt::store_f32s(dst, c, acc);
        }
    } else {
        for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < dim; c += gridDim.y * blockDim.x) {
            float acc = dtable[row * dim + c];
            for (unsigned int k = b; k < e; ++k) acc += lcpt::to_f(dout[(unsigned long long)order[k] * dim + c]);
            dtable[row * dim + c] = acc;
        }
    }
}

#define LCPT_EMB_FWD(S, T)                                                                                      \
    extern "C" __global__ void embedding_fwd_##S(T* out, const T* table, const unsigned int* ids, int dim) { \
        embedding_fwd_impl<T>(out, table, ids, dim);                                                           \
    }
#define LCPT_EMB_BWD(S, T)                                                                                                  \
    extern "C" __global__ void embedding_bwd_##S(float* dtable, const T* dout, const unsigned int* order,                   \
                                                 const unsigned int* seg_start, const unsigned int* seg_ids, int dim) {     \
        embedding_bwd_impl<T>(dtable, dout, order, seg_start, seg_ids, dim);                                               \
    }
LCPT_BOTH_TYPES(LCPT_EMB_FWD)
LCPT_BOTH_TYPES(LCPT_EMB_BWD)
