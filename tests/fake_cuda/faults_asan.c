/* Injected driver faults against libsgmv built from csrc/ under ASan + UBSan (tests/test_faults.py):
 * each fault gives SGMV_ERROR_CUDA naming the CUDA error, and the next call launches. Linked with
 * the fake libcuda.so.1 (fake_cuda.c) to steer it; libsgmv's dlopen("libcuda.so.1") gets the same
 * object. Arguments fit one of the two variants of tests/fuzz/fake_variants.c: fp16 (aligned, rank 16)
 * or bf16 with fp32 output (unaligned, rank 7, add_inputs). */
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
  a.max_seq_length = 5;
  a.add_inputs = bf16;
  return sgmv_expand(&a);
}

static int launched(void) { return fake_cuda_calls("cuLaunchKernel") - fake_cuda_failures("cuLaunchKernel"); }

int main(void) {
  /* A loading fault needs a variant not loaded yet: each of the two gets one. */
  static const struct {
    const char *function, *error;
    int bf16;
  } faults[] = {
      {"cuLibraryLoadData", "CUDA_ERROR_INVALID_IMAGE", 0},
      {"cuLibraryGetKernel", "CUDA_ERROR_NOT_FOUND", 1},
      {"cuLaunchKernel", "CUDA_ERROR_LAUNCH_FAILED", 0},
      {"cuCtxGetId", "CUDA_ERROR_INVALID_CONTEXT", 1},
  };
  for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++) {
    int before = launched();
    fake_cuda_fail(faults[i].function, 1, 0);
    EXPECT(expand(faults[i].bf16) == SGMV_ERROR_CUDA);
    EXPECT(fake_cuda_failures(faults[i].function) == 1);
    EXPECT(strstr(sgmv_last_error(), faults[i].function) && strstr(sgmv_last_error(), faults[i].error));
    EXPECT(launched() == before);
    EXPECT(expand(faults[i].bf16) == SGMV_SUCCESS);
    EXPECT(launched() == before + 1);
  }
  EXPECT(fake_cuda_live_libraries() >= 1);
  printf("faults_asan: ok\n");
  return 0;
}
