/* libsgmv from C99 with the CUDA runtime API: one sgmv_expand call on its own stream, checked
 * element by element against a host reference in double precision.
 *
 * Build with CMake (see CMakeLists.txt here) or with pkg-config:
 *   export PKG_CONFIG_PATH=$(sgmv --pkgconfig-dir)
 *   gcc -std=c99 expand.c $(pkg-config --cflags --libs sgmv) -I/usr/local/cuda/include \
 *       -L/usr/local/cuda/lib64 -lcudart -lm -o expand
 * Exit status: 0 ok, 1 a CUDA or sgmv error or a wrong result. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sgmv.h"

#define CUDA_CHECK(call)                                                                     \
  do {                                                                                       \
    cudaError_t e_ = (call);                                                                 \
    if (e_ != cudaSuccess) {                                                                 \
      fprintf(stderr, "expand: %s failed: %s (%s)\n", #call, cudaGetErrorName(e_), cudaGetErrorString(e_)); \
      exit(1);                                                                               \
    }                                                                                        \
  } while (0)

/* bf16 is the top half of an fp32; round to nearest even (the inputs here are finite). */
static uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}
static double from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static float frand(void) { return (float)rand() / RAND_MAX * 2.0f - 1.0f; }

/* tokens, rank, hidden, adapters, segments */
enum { T = 64, R = 16, N = 512, L = 3, B = 5 };

int main(void) {
  /* Segments: rows start..start+len-1 use adapter idx. One is empty, one is skipped (-1);
   * rows 62 and 63 belong to no segment. All of them must stay untouched. */
  int32_t start[B] = {0, 20, 20, 32, 50}, len[B] = {20, 0, 12, 18, 12}, idx[B] = {1, 0, -1, 2, 0};
  static uint16_t x[T * R], w[L * N * R];
  static float out0[T * N], out[T * N];
  srand(1);
  for (int i = 0; i < T * R; i++) x[i] = to_bf16(frand());
  for (int i = 0; i < L * N * R; i++) w[i] = to_bf16(frand());
  for (int i = 0; i < T * N; i++) out0[i] = frand();

  cudaStream_t stream;
  void *dx, *dw, *dout, *dstart, *dlen, *didx;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CUDA_CHECK(cudaMalloc(&dx, sizeof x));
  CUDA_CHECK(cudaMalloc(&dw, sizeof w));
  CUDA_CHECK(cudaMalloc(&dout, sizeof out0));
  CUDA_CHECK(cudaMalloc(&dstart, sizeof start));
  CUDA_CHECK(cudaMalloc(&dlen, sizeof len));
  CUDA_CHECK(cudaMalloc(&didx, sizeof idx));
  CUDA_CHECK(cudaMemcpy(dx, x, sizeof x, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(dw, w, sizeof w, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(dout, out0, sizeof out0, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(dstart, start, sizeof start, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(dlen, len, sizeof len, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(didx, idx, sizeof idx, cudaMemcpyHostToDevice));

  /* Zero the struct first: fields added by later versions then read as their defaults. */
  sgmv_expand_args_t a = SGMV_EXPAND_ARGS_INIT;
  a.inputs = dx;
  a.inputs_dtype = SGMV_DTYPE_BFLOAT16;
  a.inputs_row_stride = R;
  a.weights = dw;
  a.weights_dtype = SGMV_DTYPE_BFLOAT16;
  a.weights_lora_stride = (int64_t)N * R;
  a.weights_row_stride = R;
  a.output = dout;
  a.output_dtype = SGMV_DTYPE_FLOAT32;
  a.output_row_stride = N;
  a.total_tokens = T;
  a.hidden = N;
  a.rank = R;
  a.num_loras = L;
  a.seq_start = dstart;
  a.seq_len = dlen;
  a.lora_indices = didx;
  a.metadata_dtype = SGMV_DTYPE_INT32;
  a.batches = B;
  a.max_seq_length = 20; /* the longest segment; only sizes the launch grid */
  a.add_inputs = 1;      /* out += x @ W^T */
  a.stream = stream;     /* cudaStream_t and sgmv_stream_t are the same type */
  sgmv_status_t st = sgmv_expand(&a);
  if (st != SGMV_SUCCESS) {
    fprintf(stderr, "expand: sgmv_expand failed: %s: %s\n", sgmv_status_string(st), sgmv_last_error());
    return 1;
  }
  CUDA_CHECK(cudaStreamSynchronize(stream)); /* the launch is asynchronous */
  CUDA_CHECK(cudaMemcpy(out, dout, sizeof out, cudaMemcpyDeviceToHost));

  /* Reference in double. Each element's error is measured against the sum of the magnitudes
   * of its terms: fp32 accumulation keeps that ratio near 1e-7. */
  static char written[T];
  double max_err = 0;
  for (int b = 0; b < B; b++) {
    if (idx[b] < 0 || idx[b] >= L) continue;
    for (int m = start[b]; m < start[b] + len[b] && m < T; m++) {
      written[m] = 1;
      for (int n = 0; n < N; n++) {
        double ref = out0[m * N + n], scale = fabs(ref);
        for (int k = 0; k < R; k++) {
          double p = from_bf16(x[m * R + k]) * from_bf16(w[((size_t)idx[b] * N + n) * R + k]);
          ref += p;
          scale += fabs(p);
        }
        double err = fabs(out[m * N + n] - ref) / scale;
        if (!(err <= max_err)) max_err = err; /* also catches NaN */
      }
    }
  }
  int untouched = 0;
  for (int m = 0; m < T; m++) {
    if (written[m]) continue;
    untouched++;
    if (memcmp(&out[m * N], &out0[m * N], N * sizeof(float)) != 0) {
      fprintf(stderr, "expand: FAILED: row %d changed but no segment writes it\n", m);
      return 1;
    }
  }
  printf("expand: max relative error %.3g; %d untouched rows unchanged\n", max_err, untouched);

  CUDA_CHECK(cudaFree(dx));
  CUDA_CHECK(cudaFree(dw));
  CUDA_CHECK(cudaFree(dout));
  CUDA_CHECK(cudaFree(dstart));
  CUDA_CHECK(cudaFree(dlen));
  CUDA_CHECK(cudaFree(didx));
  CUDA_CHECK(cudaStreamDestroy(stream));
  if (!(max_err <= 1e-5)) {
    fprintf(stderr, "expand: FAILED: error above 1e-5\n");
    return 1;
  }
  printf("expand: ok\n");
  return 0;
}
