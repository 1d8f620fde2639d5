/* A C program (no Python, no runtime API) that calls libsgmv on its own stream, first in the
 * device's primary context and then in a second context it creates, and checks every output
 * element against a host reference in double precision.
 * Build: gcc -std=c99 gpu_expand.c -I<sgmv include> -I<cuda.h dir> -l:libsgmv.so.0 -lcuda -lm */
#include <cuda.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sgmv.h"

#define CU(call)                                                             \
  do {                                                                       \
    CUresult r_ = (call);                                                    \
    if (r_ != CUDA_SUCCESS) {                                                \
      const char *n_ = "?";                                                  \
      cuGetErrorName(r_, &n_);                                               \
      printf("gpu_expand: FAILED %s: %s (line %d)\n", #call, n_, __LINE__); \
      exit(1);                                                               \
    }                                                                        \
  } while (0)

static uint16_t to_bf16(float f) { /* round to nearest even */
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

enum { T = 300, R = 24, N = 1000, L = 3, B = 5 };

/* One checked call in the current context; returns the max relative error. */
static double run_once(const char *where) {
  static uint16_t x[T * R], w[L * N * R];
  static float out0[T * N], out[T * N];
  int32_t start[B] = {0, 100, 100, 140, 290}, len[B] = {100, 0, 40, 150, 10}, idx[B] = {2, 0, -1, 1, 0};
  for (int i = 0; i < T * R; i++) x[i] = to_bf16(frand());
  for (int i = 0; i < L * N * R; i++) w[i] = to_bf16(frand());
  for (int i = 0; i < T * N; i++) out0[i] = frand();

  CUstream stream;
  CUdeviceptr dx, dw, dout, dstart, dlen, didx;
  CU(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
  CU(cuMemAlloc(&dx, sizeof x));
  CU(cuMemAlloc(&dw, sizeof w));
  CU(cuMemAlloc(&dout, sizeof out0));
  CU(cuMemAlloc(&dstart, sizeof start));
  CU(cuMemAlloc(&dlen, sizeof len));
  CU(cuMemAlloc(&didx, sizeof idx));
  CU(cuMemcpyHtoD(dx, x, sizeof x));
  CU(cuMemcpyHtoD(dw, w, sizeof w));
  CU(cuMemcpyHtoD(dout, out0, sizeof out0));
  CU(cuMemcpyHtoD(dstart, start, sizeof start));
  CU(cuMemcpyHtoD(dlen, len, sizeof len));
  CU(cuMemcpyHtoD(didx, idx, sizeof idx));

  sgmv_expand_args_t a = SGMV_EXPAND_ARGS_INIT;
  a.inputs = (const void *)dx;
  a.inputs_dtype = SGMV_DTYPE_BFLOAT16;
  a.inputs_row_stride = R;
  a.weights = (const void *)dw;
  a.weights_dtype = SGMV_DTYPE_BFLOAT16;
  a.weights_lora_stride = (int64_t)N * R;
  a.weights_row_stride = R;
  a.output = (void *)dout;
  a.output_dtype = SGMV_DTYPE_FLOAT32;
  a.output_row_stride = N;
  a.total_tokens = T;
  a.hidden = N;
  a.rank = R;
  a.num_loras = L;
  a.seq_start = (const void *)dstart;
  a.seq_len = (const void *)dlen;
  a.lora_indices = (const void *)didx;
  a.metadata_dtype = SGMV_DTYPE_INT32;
  a.batches = B;
  a.max_seq_length = 150;
  a.add_inputs = 1;
  a.stream = (sgmv_stream_t)stream;
  sgmv_status_t st = sgmv_expand(&a);
  if (st != SGMV_SUCCESS) {
    printf("gpu_expand: FAILED sgmv_expand in %s: %s: %s\n", where, sgmv_status_string(st), sgmv_last_error());
    exit(1);
  }
  CU(cuStreamSynchronize(stream));
  CU(cuMemcpyDtoH(out, dout, sizeof out));

  /* Host reference: written rows, and bitwise-untouched rows elsewhere. */
  double num = 0, den = 0;
  static char written[T];
  memset(written, 0, sizeof written);
  for (int b = 0; b < B; b++) {
    if (idx[b] < 0 || idx[b] >= L) continue;
    for (int m = start[b]; m < start[b] + len[b] && m < T; m++) {
      written[m] = 1;
      for (int n = 0; n < N; n++) {
        double acc = out0[m * N + n];
        for (int k = 0; k < R; k++) acc += from_bf16(x[m * R + k]) * from_bf16(w[((size_t)idx[b] * N + n) * R + k]);
        num += (out[m * N + n] - acc) * (out[m * N + n] - acc);
        den += acc * acc;
      }
    }
  }
  for (int m = 0; m < T; m++)
    if (!written[m] && memcmp(&out[m * N], &out0[m * N], N * sizeof(float)) != 0) {
      printf("gpu_expand: FAILED row %d changed but no segment writes it\n", m);
      exit(1);
    }
  CU(cuMemFree(dx));
  CU(cuMemFree(dw));
  CU(cuMemFree(dout));
  CU(cuMemFree(dstart));
  CU(cuMemFree(dlen));
  CU(cuMemFree(didx));
  CU(cuStreamDestroy(stream));
  double err = sqrt(num / den);
  printf("gpu_expand: %s: relative error %.3g\n", where, err);
  return err;
}

int main(void) {
  CUdevice dev;
  CUcontext primary, second;
  CU(cuInit(0));
  CU(cuDeviceGet(&dev, 0));
  CU(cuDevicePrimaryCtxRetain(&primary, dev));
  CU(cuCtxSetCurrent(primary));
  double e1 = run_once("primary context, own stream");
  CU(cuCtxCreate(&second, 0, dev)); /* cuda.h of the triton wheel: CUDA 12.8 */
  double e2 = run_once("second context, own stream");
  CU(cuCtxDestroy(second));
  CU(cuCtxSetCurrent(primary));
  double e3 = run_once("primary context again");
  if (e1 > 1e-5 || e2 > 1e-5 || e3 > 1e-5) {
    printf("gpu_expand: FAILED error above 1e-5\n");
    return 1;
  }
  printf("gpu_expand: ok\n");
  return 0;
}
