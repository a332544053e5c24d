// varlen_fwd_bf16.cu — bf16 instantiations of the tensor-core varlen forward
// (split from f16 so the 16 (Dk, Dv) pairs of each dtype compile in parallel).
#include "varlen_fwd_mma.cuh"

extern "C" cudaError_t nsa_cuda_launch_fwd_mma_bf16(const nsa_cuda_attn_t *a, int P,
                                                    const nsa_cuda_piece_t *pieces,
                                                    const int2 *gcount, int64_t max_pieces,
                                                    cudaStream_t st) {
  return nsa_mma::dispatch<__nv_bfloat16>(a, P, pieces, gcount, max_pieces, st);
}
