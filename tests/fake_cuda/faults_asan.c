/* Injected driver faults against libsgmv built from csrc/ under ASan + UBSan (tests/test_sanitizers.py):
 * each fault gives SGMV_ERROR_CUDA naming the CUDA error, and the next call launches. Linked with
 * the fake libcuda.so.1 (fake_cuda.c) to steer it; libsgmv's dlopen("libcuda.so.1") gets the same
 * object. Arguments fit the variants of tests/fuzz/fake_variants.c: fp16 on the short path (aligned,
 * rank 16, max_seq_length 1), bf16 with fp32 output (unaligned, rank 7), and the plan kernel. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "sgmv.h"

void fake_cuda_fail(const char *name, int count, int code);
int fake_cuda_calls(const char *name);
int fake_cuda_failures(const char *name);
int fake_cuda_live_libraries(void);

#define EXPECT(cond)                                                                            \
  do {                                                                                          \
    if (!(cond)) {                                                                              \
      printf("faults_asan: FAILED line %d: %s (last error: %s)\n", __LINE__, #cond, sgmv_last_error()); \
      return 1;                                                                                 \
    }                                                                                           \
  } while (0)

static sgmv_status_t expand(int bf16) {
  sgmv_expand_args_t a;
  memset(&a, 0, sizeof a);
  a.struct_size = sizeof a;
  a.inputs = (const void *)0x10000;
  a.weights = (const void *)0x20000;
  a.output = (void *)0x30000;
  a.seq_start = (const void *)0x40000;
  a.seq_len = (const void *)0x50000;
  a.lora_indices = (const void *)0x60000;
  a.inputs_dtype = a.weights_dtype = bf16 ? SGMV_DTYPE_BFLOAT16 : SGMV_DTYPE_FLOAT16;
  a.output_dtype = bf16 ? SGMV_DTYPE_FLOAT32 : SGMV_DTYPE_FLOAT16;
  a.metadata_dtype = SGMV_DTYPE_INT32;
  a.rank = a.inputs_row_stride = a.weights_row_stride = bf16 ? 7 : 16;
  a.hidden = a.output_row_stride = 64;
  a.weights_lora_stride = 64 * a.rank;
  a.num_loras = 2;
  a.total_tokens = 10;
  a.batches = 2;
  a.max_seq_length = bf16 ? 5 : 1;
  a.add_inputs = bf16;
  return sgmv_expand(&a);
}

static sgmv_status_t build_plan(void) {
  sgmv_batch_plan_args_t p;
  memset(&p, 0, sizeof p);
  p.struct_size = sizeof p;
  p.plan = (void *)0x70000;
  p.batches = 2;
  p.total_tokens = 10;
  p.num_loras = 2;
  p.plan_bytes = sgmv_batch_plan_bytes(p.batches, p.total_tokens);
  sgmv_tensor_t *meta[] = {&p.seq_start, &p.seq_len, &p.lora_indices};
  for (int i = 0; i < 3; i++) {
    meta[i]->data = (const void *)(uintptr_t)(0x40000 + 0x10000 * i);
    meta[i]->dtype = SGMV_DTYPE_INT32;
    meta[i]->ndim = 1;
    meta[i]->shape[0] = p.batches;
    meta[i]->strides[0] = 1;
  }
  return sgmv_batch_plan_build(&p);
}

/* Calls variant v: 0 and 1 are sgmv_expand's (fp16, bf16), 2 the plan build. */
static sgmv_status_t call(int v) { return v == 2 ? build_plan() : expand(v); }

static int launched(void) { return fake_cuda_calls("cuLaunchKernel") - fake_cuda_failures("cuLaunchKernel"); }

int main(void) {
  /* A loading fault needs a variant not loaded yet: each of the three gets one. */
  static const struct {
    const char *function, *error;
    int variant;
  } faults[] = {
      {"cuLibraryLoadData", "CUDA_ERROR_INVALID_IMAGE", 0},
      {"cuLibraryGetKernel", "CUDA_ERROR_NOT_FOUND", 1},
      {"cuKernelGetFunction", "CUDA_ERROR_INVALID_HANDLE", 2},
      {"cuLaunchKernel", "CUDA_ERROR_LAUNCH_FAILED", 0},
      {"cuLaunchKernel", "CUDA_ERROR_LAUNCH_FAILED", 2},
      {"cuCtxGetId", "CUDA_ERROR_INVALID_CONTEXT", 1},
  };
  for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++) {
    int before = launched(), failed_before = fake_cuda_failures(faults[i].function);
    fake_cuda_fail(faults[i].function, 1, 0);
    EXPECT(call(faults[i].variant) == SGMV_ERROR_CUDA);
    EXPECT(fake_cuda_failures(faults[i].function) == failed_before + 1);
    EXPECT(strstr(sgmv_last_error(), faults[i].function) && strstr(sgmv_last_error(), faults[i].error));
    EXPECT(launched() == before);
    EXPECT(call(faults[i].variant) == SGMV_SUCCESS);
    EXPECT(launched() == before + (faults[i].variant == 2 ? 2 : 1)); /* a plan build: two steps */
  }
  EXPECT(fake_cuda_live_libraries() >= 1);
  printf("faults_asan: ok\n");
  return 0;
}
