/* Links against libsgmv.so and calls it from C: version, statuses, validation, device count. */
#include <stdio.h>
#include <string.h>

#include "sgmv.h"

#define EXPECT(cond)                                               \
  do {                                                             \
    if (!(cond)) {                                                 \
      printf("abi_check: FAILED line %d: %s\n", __LINE__, #cond); \
      return 1;                                                    \
    }                                                              \
  } while (0)

int main(void) {
  EXPECT(sgmv_version() == SGMV_VERSION);
  EXPECT(strcmp(sgmv_status_string(SGMV_SUCCESS), "success") == 0);
  EXPECT(sgmv_num_variants() > 0);

  EXPECT(sgmv_expand(NULL) == SGMV_ERROR_INVALID_ARGUMENT);

  sgmv_expand_args_t a = SGMV_EXPAND_ARGS_INIT;
  a.inputs_dtype = a.weights_dtype = a.output_dtype = SGMV_DTYPE_FLOAT16;
  a.metadata_dtype = SGMV_DTYPE_INT32;
  static double mem[4]; /* never read: every call below is refused before a launch */
  a.output = mem;
  a.inputs = a.weights = a.seq_start = a.seq_len = a.lora_indices = mem;
  a.total_tokens = 4;
  a.hidden = 64;
  a.rank = 0; /* invalid */
  a.num_loras = 1;
  a.batches = 1;
  EXPECT(sgmv_expand(&a) == SGMV_ERROR_INVALID_ARGUMENT);
  EXPECT(strstr(sgmv_last_error(), "rank") != NULL);

  a.rank = 16;
  a.inputs_row_stride = a.weights_row_stride = 16;
  a.output_row_stride = 64;
  a.weights_dtype = SGMV_DTYPE_FLOAT32;
  EXPECT(sgmv_expand(&a) == SGMV_ERROR_UNSUPPORTED_DTYPE);

  int count = -1;
  sgmv_status_t st = sgmv_device_count(&count);
  printf("abi_check: version %d, %d variants for sm %s, device count %d (status %s%s%s)\n", sgmv_version(),
         sgmv_num_variants(), sgmv_archs(), count, sgmv_status_string(st), st ? ": " : "",
         st ? sgmv_last_error() : "");
  printf("abi_check: ok\n");
  return 0;
}
