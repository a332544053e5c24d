// varlen_fwd_f16.cu — f16 instantiations of the tensor-core varlen forward.
#include "varlen_fwd_mma.cuh"

extern "C" cudaError_t nsa_cuda_launch_fwd_mma_f16(const nsa_cuda_attn_t *a, int P,
                                                   const nsa_cuda_piece_t *pieces,
                                                   const int2 *gcount, int64_t max_pieces,
                                                   cudaStream_t st) {
  return nsa_mma::dispatch<__half>(a, P, pieces, gcount, max_pieces, st);
}
