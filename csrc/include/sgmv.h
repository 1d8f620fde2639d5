/* libsgmv: the SGMV expand kernel of multi-LoRA serving, behind a stable C ABI.
 *
 *   out[start_b + m, :] (+)= x[start_b + m, :rank] @ W[idx_b, :, :rank]^T
 *
 * for every segment b in [0, batches) whose adapter index idx_b is in [0, num_loras) and every
 * row m < seq_len_b. Products are accumulated in fp32; with add_inputs the old output value is
 * added in fp32 and the sum is rounded once. Rows of skipped segments (idx_b == -1 or outside
 * [0, num_loras)), zero-length segments and rows past total_tokens are left untouched.
 *
 * This header needs no CUDA header and compiles as C99 and C++. It is also the source of the
 * Python binding's cffi declarations: keep it to declarations, enums with fixed values and
 * integer #defines.
 */
#ifndef SGMV_H
#define SGMV_H

#include <stddef.h>
#include <stdint.h>

#define SGMV_VERSION_MAJOR 0
#define SGMV_VERSION_MINOR 1
#define SGMV_VERSION_PATCH 0
/* MAJOR * 10000 + MINOR * 100 + PATCH, as returned by sgmv_version(). */
#define SGMV_VERSION 100

#if defined(_WIN32)
#define SGMV_API
#else
#define SGMV_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Statuses: values are fixed forever; new ones are only ever appended. */
typedef enum {
  SGMV_SUCCESS = 0,
  SGMV_ERROR_INVALID_ARGUMENT = 1,   /* a null pointer, a size or stride out of range */
  SGMV_ERROR_UNSUPPORTED_DTYPE = 2,  /* a dtype or dtype combination the library does not serve */
  SGMV_ERROR_NO_DRIVER = 3,          /* libcuda.so.1 could not be loaded, or is too old */
  SGMV_ERROR_NO_DEVICE = 4,          /* the driver found no GPU, or no CUDA context is current */
  SGMV_ERROR_UNSUPPORTED_ARCH = 5,   /* no cubin for this GPU's compute capability */
  SGMV_ERROR_CUDA = 6,               /* a CUDA driver call failed; sgmv_last_error() names it */
  SGMV_ERROR_INTERNAL = 7
} sgmv_status_t;

/* Element types, values fixed. */
typedef enum {
  SGMV_DTYPE_FLOAT16 = 0,
  SGMV_DTYPE_BFLOAT16 = 1,
  SGMV_DTYPE_FLOAT32 = 2,
  SGMV_DTYPE_INT32 = 3,
  SGMV_DTYPE_INT64 = 4
} sgmv_dtype_t;

/* The same type as CUstream and cudaStream_t. NULL is the legacy default stream. */
typedef struct CUstream_st *sgmv_stream_t;

/* Arguments of sgmv_expand. Set struct_size = sizeof(sgmv_expand_args_t): fields are only ever
 * appended, and a caller built against an older header keeps working. Strides are in elements;
 * the last dimension of every tensor has unit stride. */
typedef struct {
  size_t struct_size;

  const void *inputs;            /* (total_tokens, rank): fp16, bf16 or fp32 */
  sgmv_dtype_t inputs_dtype;     /* the weights' dtype, or fp32 (cast to the weights' dtype) */
  int64_t inputs_row_stride;

  const void *weights;           /* (num_loras, hidden, rank): fp16 or bf16 */
  sgmv_dtype_t weights_dtype;
  int64_t weights_lora_stride;
  int64_t weights_row_stride;

  void *output;                  /* (total_tokens, hidden), updated in place */
  sgmv_dtype_t output_dtype;     /* the weights' dtype, or fp32 */
  int64_t output_row_stride;     /* >= hidden: the output may be a column slice */

  int64_t total_tokens;          /* 0 .. 2^30 - 1 */
  int64_t hidden;                /* 1 .. 4194240 (65535 column tiles of 64) */
  int64_t rank;                  /* 1 .. 256 */
  int64_t num_loras;             /* >= 1 */

  const void *seq_start;         /* (batches,) first row of each segment */
  const void *seq_len;           /* (batches,) rows of each segment */
  const void *lora_indices;      /* (batches,) adapter of each segment, -1: skipped */
  sgmv_dtype_t metadata_dtype;   /* int32 or int64, for all three */
  int64_t batches;               /* 0 .. 2^30 - 1; segments must not overlap */
  int64_t max_seq_length;        /* >= 0: sizes the grid; any value gives correct results */

  int32_t add_inputs;            /* nonzero: out += product; zero: out = product */
  sgmv_stream_t stream;
} sgmv_expand_args_t;

/* Launches SGMV expand on args->stream (asynchronous). All arguments are checked before the
 * driver is touched; on error nothing is launched and sgmv_last_error() says why. */
SGMV_API sgmv_status_t sgmv_expand(const sgmv_expand_args_t *args);

/* SGMV_VERSION of the loaded library. */
SGMV_API int sgmv_version(void);
/* A fixed description of a status. */
SGMV_API const char *sgmv_status_string(sgmv_status_t status);
/* The message of this thread's last failed call ("" if none). Valid until this thread's next call. */
SGMV_API const char *sgmv_last_error(void);

/* Inventory: the archs the library holds cubins for ("80,90,100,120"), and its variant count. */
SGMV_API const char *sgmv_archs(void);
SGMV_API int sgmv_num_variants(void);
/* Number of CUDA devices the driver sees. Loads the driver if needed. */
SGMV_API sgmv_status_t sgmv_device_count(int *count);
/* Device `device`'s compute capability (major * 10 + minor) and the cubin family the library
 * uses on it (80, 90, 100 or 120; 0 if none fits: sgmv_expand then returns
 * SGMV_ERROR_UNSUPPORTED_ARCH). */
SGMV_API sgmv_status_t sgmv_device_arch(int device, int *compute_capability, int *cubin_arch);

#ifdef __cplusplus
}
#endif

#endif /* SGMV_H */
