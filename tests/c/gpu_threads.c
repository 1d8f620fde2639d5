/* Sixteen threads make their first libsgmv call at the same moment, each on its own stream in
 * the device's primary context; each output must equal, bit for bit, a single-thread run of the
 * same inputs made afterwards (same kernel, same bits).
 * Build: gcc -std=c99 gpu_threads.c -I<sgmv include> -I<cuda.h dir> -l:libsgmv.so.0 -lcuda -lpthread */
#define _POSIX_C_SOURCE 200112L
#include <cuda.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sgmv.h"

enum { THREADS = 16, T = 96, R = 16, N = 512, L = 2, B = 3 };

static CUcontext ctx;
static pthread_barrier_t start_line;
static CUdeviceptr dx, dw, dstart, dlen, didx;
static uint16_t expected[T * N], results[THREADS][T * N];
static int failures;

static int call(CUdeviceptr out, CUstream stream) {
  sgmv_expand_args_t a = SGMV_EXPAND_ARGS_INIT;
  a.inputs = (const void *)dx;
  a.weights = (const void *)dw;
  a.output = (void *)out;
  a.inputs_dtype = a.weights_dtype = a.output_dtype = SGMV_DTYPE_BFLOAT16;
  a.inputs_row_stride = R;
  a.weights_lora_stride = (int64_t)N * R;
  a.weights_row_stride = R;
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
  a.max_seq_length = 60;
  a.stream = (sgmv_stream_t)stream;
  sgmv_status_t st = sgmv_expand(&a);
  if (st) printf("gpu_threads: sgmv_expand: %s: %s\n", sgmv_status_string(st), sgmv_last_error());
  return st;
}

static void *worker(void *arg) {
  uint16_t *got = results[(intptr_t)arg];
  CUstream stream;
  CUdeviceptr out;
  int ok = cuCtxSetCurrent(ctx) == CUDA_SUCCESS && cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING) == CUDA_SUCCESS &&
           cuMemAlloc(&out, sizeof results[0]) == CUDA_SUCCESS && cuMemsetD16(out, 0x7fc0, T * N) == CUDA_SUCCESS;
  pthread_barrier_wait(&start_line); /* the library's first call from this thread, with 15 others */
  ok = ok && call(out, stream) == 0 && cuStreamSynchronize(stream) == CUDA_SUCCESS &&
       cuMemcpyDtoH(got, out, sizeof results[0]) == CUDA_SUCCESS;
  if (!ok) __atomic_add_fetch(&failures, 1, __ATOMIC_SEQ_CST);
  return NULL;
}

int main(void) {
  CUdevice dev;
  if (cuInit(0) || cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) || cuCtxSetCurrent(ctx)) {
    printf("gpu_threads: FAILED to set up CUDA\n");
    return 1;
  }
  static uint16_t x[T * R], w[L * N * R];
  for (int i = 0; i < T * R; i++) x[i] = (uint16_t)(0x3c00 + (rand() & 0x3ff)) ^ (uint16_t)(rand() & 0x8000);
  for (int i = 0; i < L * N * R; i++) w[i] = (uint16_t)(0x3800 + (rand() & 0x3ff)) ^ (uint16_t)(rand() & 0x8000);
  int32_t start[B] = {0, 40, 70}, len[B] = {40, 30, 26}, idx[B] = {1, -1, 0};
  cuMemAlloc(&dx, sizeof x);
  cuMemAlloc(&dw, sizeof w);
  cuMemAlloc(&dstart, sizeof start);
  cuMemAlloc(&dlen, sizeof len);
  cuMemAlloc(&didx, sizeof idx);
  cuMemcpyHtoD(dx, x, sizeof x);
  cuMemcpyHtoD(dw, w, sizeof w);
  cuMemcpyHtoD(dstart, start, sizeof start);
  cuMemcpyHtoD(dlen, len, sizeof len);
  cuMemcpyHtoD(didx, idx, sizeof idx);

  pthread_t threads[THREADS];
  pthread_barrier_init(&start_line, NULL, THREADS + 1);
  for (intptr_t i = 0; i < THREADS; i++) pthread_create(&threads[i], NULL, worker, (void *)i);
  pthread_barrier_wait(&start_line); /* the process's first sgmv_expand calls: all at once */
  for (int i = 0; i < THREADS; i++) pthread_join(threads[i], NULL);
  /* Then one call from this thread as the expected bits (same kernel, same inputs); every
   * element of every thread's output must match it (untouched rows keep the NaN fill). */
  CUdeviceptr ref;
  if (cuMemAlloc(&ref, sizeof expected) || cuMemsetD16(ref, 0x7fc0, T * N) || call(ref, NULL) ||
      cuCtxSynchronize() || cuMemcpyDtoH(expected, ref, sizeof expected))
    return 1;
  for (int i = 0; i < THREADS; i++) failures += memcmp(results[i], expected, sizeof expected) != 0;
  printf("gpu_threads: %d threads, %d failed\n", THREADS, failures);
  printf(failures ? "gpu_threads: FAILED\n" : "gpu_threads: ok\n");
  return failures != 0;
}
