/* Host time of the layer call from C, on a tiny problem (4 single-row segments, hidden 64, rank 16,
 * two adapters, one slice): sgmv_layer_apply, sgmv_step_plan, and for comparison sgmv_shrink then
 * sgmv_expand (the two calls a layer makes without it). Best of 3 runs of 2000 calls each, enqueued
 * back to back on a stream after a synchronisation. Beside them, what the host cannot go below: one
 * cuLaunchKernel of an empty kernel, timed the same way; and the layer call in runs of 200 calls (best
 * of 20), which never fill the stream's queue of pending launches (2000 calls of two launches can:
 * then the loop waits for the GPU, and the figure is the GPU's, not the host's).
 * prints one JSON line: {"layer_apply_us": ..., "step_plan_us": ..., "shrink_expand_us": ...,
 * "empty_launch_us": ..., "layer_apply_200_us": ...} */
#include <cuda.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "sgmv.h"

#define CU(call)                                                                \
  do {                                                                          \
    CUresult r_ = (call);                                                       \
    if (r_ != CUDA_SUCCESS) {                                                   \
      fprintf(stderr, "layer_host: %s failed (%d, line %d)\n", #call, r_, __LINE__); \
      return 1;                                                                 \
    }                                                                           \
  } while (0)
#define SG(call)                                                                                    \
  do {                                                                                              \
    sgmv_status_t s_ = (call);                                                                      \
    if (s_) {                                                                                       \
      fprintf(stderr, "layer_host: %s: %s: %s\n", #call, sgmv_status_string(s_), sgmv_last_error()); \
      return 1;                                                                                     \
    }                                                                                               \
  } while (0)

enum { T = 4, H = 64, R = 16, L = 2 };

/* An empty kernel, in PTX: the driver compiles it for the GPU at load. */
static const char EMPTY_PTX[] =
    ".version 7.0\n.target sm_80\n.address_size 64\n.visible .entry sgmv_empty() { ret; }\n";

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static CUdeviceptr alloc(size_t bytes) {
  CUdeviceptr p = 0;
  if (cuMemAlloc(&p, bytes) || cuMemsetD8(p, 0, bytes)) return 0;
  return p;
}

#define PTR(p) ((void *)(uintptr_t)(p))
#define BEST(var, body) BEST_OF(var, 3, 2000, body)
#define BEST_OF(var, REPS, CALLS, body)                  \
  do {                                                   \
    var = 1e9;                                           \
    for (int rep = 0; rep < REPS; rep++) {               \
      CU(cuStreamSynchronize(stream));                   \
      double t0 = now_s();                               \
      for (int i = 0; i < CALLS; i++) body;              \
      double us = (now_s() - t0) / CALLS * 1e6;          \
      var = us < var ? us : var;                         \
    }                                                    \
    CU(cuStreamSynchronize(stream));                     \
  } while (0)

int main(void) {
  CUdevice dev;
  CUcontext ctx;
  CUstream stream;
  CU(cuInit(0));
  CU(cuDeviceGet(&dev, 0));
  CU(cuDevicePrimaryCtxRetain(&ctx, dev));
  CU(cuCtxSetCurrent(ctx));
  CU(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
  sgmv_stream_t s = (sgmv_stream_t)stream;
  const int32_t meta_host[3][T] = {{0, 1, 2, 3}, {1, 1, 1, 1}, {0, 1, 0, 1}};
  CUdeviceptr meta[3], x = alloc(T * H * 2), out = alloc(T * H * 2), y = alloc(T * R * 2);
  CUdeviceptr a = alloc(L * R * H * 2), b = alloc(L * H * R * 2);
  for (int i = 0; i < 3; i++) {
    meta[i] = alloc(sizeof meta_host[i]);
    CU(cuMemcpyHtoD(meta[i], meta_host[i], sizeof meta_host[i]));
  }
  const sgmv_dtype_t bf16 = SGMV_DTYPE_BFLOAT16;

  sgmv_layer_args_t la = SGMV_LAYER_ARGS_INIT;
  la.num_slices = 1;
  la.lora_a[0] = (sgmv_tensor_t){PTR(a), bf16, 3, {L, R, H}, {R * H, H, 1}};
  la.lora_b[0] = (sgmv_tensor_t){PTR(b), bf16, 3, {L, H, R}, {H * R, R, 1}};
  sgmv_layer_t *layer;
  SG(sgmv_layer_create(&la, &layer));
  size_t scratch_bytes = sgmv_step_scratch_bytes(T, T, R);
  CUdeviceptr scratch = alloc(scratch_bytes);
  sgmv_step_args_t sa = SGMV_STEP_ARGS_INIT;
  sgmv_tensor_t *m[3] = {&sa.seq_start, &sa.seq_len, &sa.lora_indices};
  for (int i = 0; i < 3; i++) *m[i] = (sgmv_tensor_t){PTR(meta[i]), SGMV_DTYPE_INT32, 1, {T}, {1}};
  sa.batches = T, sa.max_seq_length = 1, sa.total_tokens = T, sa.num_loras = L;
  sa.scratch = PTR(scratch), sa.scratch_bytes = scratch_bytes;
  sgmv_step_t *step;
  SG(sgmv_step_create(&sa, &step));
  SG(sgmv_step_plan(step, s));
  const sgmv_tensor_t in = {PTR(x), bf16, 2, {T, H}, {H, 1}}, o = {PTR(out), bf16, 2, {T, H}, {H, 1}};

  /* The same layer as two calls, with the step's plan (its first bytes). */
  sgmv_shrink_args_t sh = SGMV_SHRINK_ARGS_INIT;
  sh.inputs = PTR(x), sh.inputs_dtype = bf16, sh.inputs_row_stride = H;
  sh.weights = PTR(a), sh.weights_dtype = bf16, sh.weights_lora_stride = R * H, sh.weights_row_stride = H;
  sh.output = PTR(y), sh.output_dtype = bf16, sh.output_row_stride = R;
  sh.total_tokens = T, sh.hidden = H, sh.rank = R, sh.num_loras = L;
  sh.seq_start = PTR(meta[0]), sh.seq_len = PTR(meta[1]), sh.lora_indices = PTR(meta[2]);
  sh.metadata_dtype = SGMV_DTYPE_INT32, sh.batches = T, sh.max_seq_length = 1, sh.stream = s;
  sh.batch_plan = PTR(scratch), sh.batch_plan_bytes = sgmv_batch_plan_bytes(T, T);
  sgmv_expand_args_t ex = SGMV_EXPAND_ARGS_INIT;
  ex.inputs = PTR(y), ex.inputs_dtype = bf16, ex.inputs_row_stride = R;
  ex.weights = PTR(b), ex.weights_dtype = bf16, ex.weights_lora_stride = H * R, ex.weights_row_stride = R;
  ex.output = PTR(out), ex.output_dtype = bf16, ex.output_row_stride = H;
  ex.total_tokens = T, ex.hidden = H, ex.rank = R, ex.num_loras = L;
  ex.seq_start = sh.seq_start, ex.seq_len = sh.seq_len, ex.lora_indices = sh.lora_indices;
  ex.metadata_dtype = SGMV_DTYPE_INT32, ex.batches = T, ex.max_seq_length = 1, ex.add_inputs = 1, ex.stream = s;
  ex.batch_plan = sh.batch_plan, ex.batch_plan_bytes = sh.batch_plan_bytes;

  CUmodule mod;
  CUfunction empty;
  CU(cuModuleLoadData(&mod, EMPTY_PTX));
  CU(cuModuleGetFunction(&empty, mod, "sgmv_empty"));

  double apply_us, plan_us, two_us, empty_us, apply_200_us;
  BEST(empty_us, CU(cuLaunchKernel(empty, 1, 1, 1, 32, 1, 1, 0, stream, NULL, NULL)));
  BEST(apply_us, SG(sgmv_layer_apply(layer, step, &in, &o, 1, s)));
  BEST_OF(apply_200_us, 20, 200, SG(sgmv_layer_apply(layer, step, &in, &o, 1, s)));
  BEST(plan_us, SG(sgmv_step_plan(step, s)));
  BEST(two_us, {
    SG(sgmv_shrink(&sh));
    SG(sgmv_expand(&ex));
  });
  printf("{\"layer_apply_us\": %.3f, \"step_plan_us\": %.3f, \"shrink_expand_us\": %.3f, \"empty_launch_us\": %.3f, "
         "\"layer_apply_200_us\": %.3f}\n", apply_us, plan_us, two_us, empty_us, apply_200_us);
  cuModuleUnload(mod);
  sgmv_step_destroy(step);
  sgmv_layer_destroy(layer);
  return 0;
}
